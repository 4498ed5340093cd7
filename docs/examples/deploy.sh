#!/usr/bin/env bash
# docs/deploy.md as commands: from an empty cluster to a checked SMILY, in order.
#   docs/examples/deploy.sh all                 every step below, in this order
#   docs/examples/deploy.sh apply check         some of them
# Steps: namespace cert-manager cnpg secrets images load apply check.
# Environment:
#   OVERLAY   your site's kustomization directory (docs/deploy.md, section 2);
#             default deploy/k8s/overlays/cpu
#   KUBECTL   kubectl (the cluster-in-a-box tests pass their own, tests/cluster/kubectl.py)
#   LOAD      how the images reach the nodes: kind, k3s or push (to IMAGE_PREFIX's registry)
#   IMAGE_PREFIX  localhost/smily, or registry.hospital.example/smily for LOAD=push
set -euo pipefail
cd "$(dirname "$0")/../.."
KUBECTL=${KUBECTL:-kubectl}
OVERLAY=${OVERLAY:-deploy/k8s/overlays/cpu}
LOAD=${LOAD:-kind}
IMAGE_PREFIX=${IMAGE_PREFIX:-localhost/smily}
CERT_MANAGER_VERSION=${CERT_MANAGER_VERSION:-v1.16.2}
CNPG_VERSION=${CNPG_VERSION:-1.24.1}
NS=smily

# 1. The namespace first: the Secrets and everything else live in it.
namespace() { $KUBECTL apply -f deploy/k8s/base/namespace.yaml; }

# 2. cert-manager: the tls component's Issuers and Certificates need its CRDs and webhook.
cert_manager() {
  $KUBECTL apply -f "https://github.com/cert-manager/cert-manager/releases/download/$CERT_MANAGER_VERSION/cert-manager.yaml"
  $KUBECTL -n cert-manager rollout status deploy/cert-manager-webhook --timeout=300s
}

# 3. CloudNativePG, for overlays with the postgres-cnpg component (the cpu overlay).
cnpg() {
  $KUBECTL apply --server-side -f \
    "https://raw.githubusercontent.com/cloudnative-pg/cloudnative-pg/release-${CNPG_VERSION%.*}/releases/cnpg-$CNPG_VERSION.yaml"
  $KUBECTL -n cnpg-system rollout status deploy/cnpg-controller-manager --timeout=300s
}

# 4. The generated Secret values (Redis password, cache HMAC key): kept if present.
secrets() { python3 -m smily.k8s_secrets; }

# 5. The images, from Debian packages, PyPI and npm (docs/deploy.md, section 1), and
#    their digests into deploy/k8s/components/image-digests for your overlay.
images() { make images IMAGE_PREFIX="$IMAGE_PREFIX"; }

# 6. Onto the nodes.
load() {
  local refs
  refs=$(IMAGE_PREFIX="$IMAGE_PREFIX" python3 tools/images.py --list)
  case "$LOAD" in
    kind) for ref in $refs; do kind load docker-image "$ref"; done ;;
    k3s) docker save $refs | sudo k3s ctr images import - ;;
    push) for ref in $refs; do docker push "$ref"; done ;;
    *) echo "LOAD must be kind, k3s or push" >&2; return 1 ;;
  esac
}

# 7. Apply the overlay: what `kubectl apply -k` does, with the rendering kept apart.
apply() { $KUBECTL kustomize "$OVERLAY" | $KUBECTL apply -f -; }

# 8. Check: every workload rolled out and ready, every certificate issued.
check() {
  local kind name
  for kind in deployment statefulset; do
    for name in $($KUBECTL -n "$NS" get "$kind" -o name); do
      $KUBECTL -n "$NS" rollout status "$name" --timeout=900s
    done
  done
  $KUBECTL -n "$NS" wait --for=condition=Ready certificate --all --timeout=300s
}

all() { namespace; cert_manager; cnpg; secrets; images; load; apply; check; }

[ $# -gt 0 ] || { sed -n '2,11p' "$0"; exit 2; }
for step in "$@"; do
  "${step//-/_}"
done
