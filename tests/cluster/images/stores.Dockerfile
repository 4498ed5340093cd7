# The box's stand-in for the public images it cannot pull: Redis (the manifests'
# docker.io/library/redis, run with the same command) and PostgreSQL (what the
# CloudNativePG stand-in runs), both Debian's packages on `make images`'s base.
ARG BASE_IMAGE=localhost/smily/base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends redis-server redis-tools postgresql-15 >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/*
# CloudNativePG's images run PostgreSQL as uid/gid 26; initdb needs that user to exist.
RUN usermod -o -u 26 postgres && groupmod -o -g 26 postgres
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
