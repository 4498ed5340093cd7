#!/usr/bin/env bash
# The images' base, from Debian packages only (no registry but Debian, PyPI and
# npm is reachable where these images are built): debootstrap a bookworm rootfs
# with Debian's python3.11 and import it as $BASE_IMAGE. Needs root and debootstrap.
# Usage: deploy/docker/base.sh [IMAGE]   (default localhost/smily/base:bookworm)
set -euo pipefail
IMAGE=${1:-localhost/smily/base:bookworm}
DOCKER=${DOCKER:-docker}
# The mirror apt already uses here (deb.debian.org unless configured otherwise).
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
# python3-venv: the images' venvs; passwd: the non-root user; ca-certificates: TLS.
debootstrap --variant=minbase \
  --include=python3,python3-venv,ca-certificates,passwd \
  bookworm "$rootfs" "$MIRROR" >&2
# Slim it: no apt lists, docs or locales in an image layer.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
tar -C "$rootfs" -c . | "$DOCKER" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' - "$IMAGE"
