# syntax=docker/dockerfile:1
# SMILY index, two variants (`make images` builds both):
#   docker build -f deploy/docker/index.Dockerfile --target cpu -t localhost/smily/index:0.1.0-cpu .
#   docker build -f deploy/docker/index.Dockerfile --target gpu -t localhost/smily/index:0.1.0-gpu .
# FAISS (faiss-cpu, or faiss-gpu in the gpu variant) and SQLite; no torch, no
# ONNX Runtime, no OpenSlide. Data lives on a volume at SMILY_INDEX_DIR.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: gRPC stubs and the project's wheel ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/docker/requirements/ /req/
RUN python -m pip install -r /req/build.txt
WORKDIR /src
COPY pyproject.toml ./
COPY protos/ protos/
COPY services/ services/
COPY smily/ smily/
RUN python -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos $(find protos -name '*.proto') \
 && python -m pip wheel --no-deps --no-build-isolation -w /wheels .

# ---- serving venvs: pinned deps per variant ----
FROM build AS venv-cpu
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r /req/index-cpu.txt \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl

FROM build AS venv-gpu
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r /req/index-gpu.txt \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl

# ---- runtime base: slim, non-root, read-only-root friendly ----
FROM ${PYTHON_IMAGE} AS runtime
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
