#!/usr/bin/env bash
# The system packages `make test` needs. Each line: a Debian package and a command (or
# file) that shows it is installed. Run as root, the missing ones are installed with
# apt-get; otherwise this fails naming the command to run. Add a line per new need.
set -euo pipefail
NEEDS='
redis-server redis-server
postgresql-15 /usr/lib/postgresql/15/bin/initdb
orthanc Orthanc
orthanc-dicomweb /usr/share/orthanc/plugins/libOrthancDicomWeb.so
orthanc-wsi OrthancWSIDicomizer
chromium /usr/bin/chromium
chromium-driver /usr/bin/chromedriver
npm npm
nftables nft
iproute2 ip
docker.io dockerd
debootstrap debootstrap
'
missing=()
while read -r package probe; do
  [ -n "$package" ] || continue
  command -v "$probe" >/dev/null 2>&1 || [ -e "$probe" ] || missing+=("$package")
done <<< "$NEEDS"
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "make test needs ${missing[*]}: run  sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
