# Debian's node and npm on the Debian base, for the viewer's libraries (gateway.Dockerfile,
# NODE_IMAGE). `make images` builds it when no public node image can be pulled.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/*
