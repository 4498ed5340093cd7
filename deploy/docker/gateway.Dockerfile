# syntax=docker/dockerfile:1
# SMILY gateway. Build from the repository root (`make images`):
#   docker build -f deploy/docker/gateway.Dockerfile -t localhost/smily/gateway:0.1.0 .
# Carries the Redis client: no OpenSlide, no torch, no ONNX Runtime, no FAISS.
# The HTTP/JSON API and viewer run from the same image: `python -m smily.http`.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG NODE_IMAGE=node:20-bookworm-slim

# ---- web: the viewer's browser libraries, pinned by package-lock.json ----
FROM ${NODE_IMAGE} AS web
WORKDIR /web
COPY services/http/vendor/package.json services/http/vendor/package-lock.json ./
RUN npm ci --no-audit --no-fund --ignore-scripts

# ---- build: gRPC stubs, the project's wheel and a venv of pinned deps ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/docker/requirements/ /req/
RUN python -m pip install -r /req/build.txt
WORKDIR /src
COPY pyproject.toml ./
COPY protos/ protos/
COPY services/ services/
COPY smily/ smily/
COPY --from=web /web/node_modules/ services/http/vendor/node_modules/
RUN python -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos $(find protos -name '*.proto') \
 && python -m pip wheel --no-deps --no-build-isolation -w /wheels .
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r /req/gateway.txt \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl

# ---- runtime: slim, non-root, read-only-root friendly ----
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 smily \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin smily
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SMILY_BIND_HOST=0.0.0.0
USER 10001:10001
EXPOSE 50050 9100
# smily.http
EXPOSE 8080
ENTRYPOINT ["python", "-m", "smily.gateway"]
