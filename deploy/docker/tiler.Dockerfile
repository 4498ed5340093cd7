# SMILY tiler. Build from the repository root (`make images`):
#   docker build -f deploy/docker/tiler.Dockerfile -t localhost/smily/tiler:0.1.0 .
# Carries OpenSlide and SciPy only: no torch, no ONNX Runtime, no FAISS.
# BASE_IMAGE: any Debian bookworm with python3.11 and its venv module: the public
# python image, or `make images`'s own from Debian packages (deploy/docker/base.sh).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: gRPC stubs, the project's wheel and a venv of pinned deps ----
FROM ${BASE_IMAGE} AS build
# pip's indexes as `make images` found them here (tools/images.py); unset, PyPI.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/build/bin:$PATH
COPY deploy/docker/build-env.sh /usr/local/bin/build-env
COPY deploy/docker/requirements/ /req/
RUN --mount=type=secret,id=build-ca python3 -m venv /opt/build \
 && build-env pip install -r /req/build.txt
WORKDIR /src
COPY pyproject.toml ./
COPY protos/ protos/
COPY services/ services/
COPY smily/ smily/
RUN python3 -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos $(find protos -name '*.proto') \
 && pip wheel --no-deps --no-build-isolation -w /wheels .
RUN --mount=type=secret,id=build-ca python3 -m venv /opt/venv \
 && build-env /opt/venv/bin/pip install -r /req/tiler.txt \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl

# ---- runtime: slim, non-root, read-only-root friendly ----
FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 smily \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin smily
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SMILY_BIND_HOST=0.0.0.0 \
    SMILY_SLIDE_ROOTS=/slides
USER 10001:10001
EXPOSE 50051 9100
ENTRYPOINT ["python", "-m", "smily.tiler"]
