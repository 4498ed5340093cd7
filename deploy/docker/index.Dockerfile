# SMILY index, two variants (`make images` builds both):
#   docker build -f deploy/docker/index.Dockerfile --target cpu -t localhost/smily/index:0.1.0-cpu .
#   docker build -f deploy/docker/index.Dockerfile --target gpu -t localhost/smily/index:0.1.0-gpu .
# FAISS (faiss-cpu, or faiss-gpu in the gpu variant) and SQLite; no torch, no
# ONNX Runtime, no OpenSlide. Data lives on a volume at SMILY_INDEX_DIR.
# BASE_IMAGE: any Debian bookworm with python3.11 and its venv module: the public
# python image, or `make images`'s own from Debian packages (deploy/docker/base.sh).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: gRPC stubs and the project's wheel ----
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

# ---- serving venvs: pinned deps per variant ----
FROM build AS venv-cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
RUN --mount=type=secret,id=build-ca python3 -m venv /opt/venv \
 && build-env /opt/venv/bin/pip install -r /req/index-cpu.txt \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl

FROM build AS venv-gpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
RUN --mount=type=secret,id=build-ca python3 -m venv /opt/venv \
 && build-env /opt/venv/bin/pip install -r /req/index-gpu.txt \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl

# ---- runtime base: slim, non-root, read-only-root friendly ----
FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 smily \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin smily
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SMILY_BIND_HOST=0.0.0.0 \
    SMILY_INDEX_DIR=/var/lib/smily/index
EXPOSE 50053 9100
ENTRYPOINT ["python", "-m", "smily.index"]

# ---- gpu: faiss-gpu's CUDA wheels registered with ldconfig; the NVIDIA runtime adds the driver ----
FROM runtime AS gpu
COPY --from=venv-gpu /opt/venv /opt/venv
RUN find /opt/venv/lib -type d -path '*/site-packages/nvidia/*/lib' > /etc/ld.so.conf.d/smily-nvidia.conf \
 && ldconfig
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001

# ---- cpu (the default target) ----
FROM runtime AS cpu
COPY --from=venv-cpu /opt/venv /opt/venv
USER 10001:10001
