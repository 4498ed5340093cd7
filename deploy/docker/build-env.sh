#!/bin/sh
# Build stages only: trust the builder's CA bundle for pip and npm when `make images`
# passes one (a build secret: it is mounted for one RUN and lands in no layer).
if [ -f /run/secrets/build-ca ]; then
  export PIP_CERT=/run/secrets/build-ca NODE_EXTRA_CA_CERTS=/run/secrets/build-ca NPM_CONFIG_CAFILE=/run/secrets/build-ca
fi
exec "$@"
