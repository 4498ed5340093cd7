# Entry points. On a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SMILY := $(VENV)/bin/smily
# protos/google: vendored googleapis files for buf; their Python code is the googleapis-common-protos wheel's.
PROTOS := $(shell find protos -path protos/google -prune -o -name '*.proto' -print)
MODEL := models/efficientnet-lite0/1/model.onnx
SAMPLES := data/samples/.done
# The viewer's browser libraries (npm, pinned by package-lock.json; served from node_modules).
WEB := services/http/vendor/node_modules/.installed

.PHONY: all venv proto model web sample-data demo test unit test-cluster test-cluster-fast bench up down clean up-cluster system-deps check buf-baseline

all: proto model web

# PYTHONWARNINGS: setuptools' note on every editable install of a package-dir layout
# ("careful with folders named like the package") is about smily/, which is so by design.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install -q -e '.[export,dev,eval]'
	touch $@

proto: $(VENV)/.installed $(PROTOS)
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos --grpc_python_out=protos $(PROTOS)

model: $(MODEL)
$(MODEL): $(VENV)/.installed smily/models/export.py
	$(SMILY) model export --output-dir models

web: $(WEB)
$(WEB): services/http/vendor/package.json services/http/vendor/package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: apt-get install -y nodejs npm"; exit 1; }
	cd services/http/vendor && npm ci --no-audit --no-fund --ignore-scripts
	touch $@

sample-data: $(SAMPLES)
$(SAMPLES): $(VENV)/.installed smily/synthetic.py
	$(SMILY) sample-data --output-dir data/samples
	touch $@

demo: proto model sample-data
	$(SMILY) demo --slides data/samples

test: system-deps proto model web check images
	$(PY) -m pytest -q

# The fast lane while you work: the tests marked `unit`, which need no model and no server
# (tests/conftest.py fails one that asks for them); under a minute. Only the files that
# hold such tests are collected (importing the others costs more than running these).
unit: proto
	$(PY) -m pytest -q -m unit $(shell grep -l 'pytest.mark.unit' tests/test_*.py)

# The deployment as rendered, in the cluster in a box (tests/cluster/, docs/deploy.md; root and
# `make images`). `make test` runs its fast subset (marker cluster_fast: one boot, token from the
# IdP, ingest over HTTP, search over gRPC with TLS and a token, a IIIF tile, the policies, an index
# replica killed during a short search loop); `make test-cluster` runs the rest (cluster_full:
# kills, rolling restarts, scale-up and certificate re-issue under a search loop).
test-cluster: system-deps proto images
	$(PY) -m pytest -q -m cluster_full tests/test_cluster.py

test-cluster-fast: system-deps proto images
	$(PY) -m pytest -q -m cluster_fast tests/test_cluster.py

# What the tests need from the system (redis-server, ...): installed when root, else named.
system-deps:
	tools/system-deps.sh

# Quality gates, run by `make test` (hence CI); CONTRIBUTING.md says what each holds.
BUF := tools/node_modules/.bin/buf
check: system-deps proto $(BUF)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) tools/namespace.py mypy
	$(PY) tools/namespace.py lint-imports
	$(PY) -m smily.common.rpcmeta
	$(BUF) lint
	$(BUF) breaking --against protos/buf-baseline.binpb

# buf from npm, pinned by tools/package-lock.json.
$(BUF): tools/package.json tools/package-lock.json
	cd tools && npm ci --no-audit --no-fund --ignore-scripts
	touch $@

# At a release: the protos as released, the baseline of `buf breaking` until the next one.
buf-baseline: $(BUF)
	$(BUF) build --exclude-source-info -o protos/buf-baseline.binpb

# Every bench/*.py is a standalone benchmark that prints its figures.
bench: proto model
	set -e; for b in bench/*.py; do echo "== $$b"; $(PY) $$b; done

up: proto model web sample-data
	$(SMILY) up

down:
	$(SMILY) down

# Index cluster on a local PostgreSQL: SHARDS x REPLICAS index processes.
up-cluster: system-deps proto model sample-data
	$(SMILY) up --shards $(or $(SHARDS),2) --replicas $(or $(REPLICAS),2)

clean:
	rm -rf $(VENV) models data/samples var build services/http/vendor/node_modules tools/node_modules
	find protos -name '*_pb2*.py*' -delete

# Container images for Kubernetes (deploy/docker/, deploy/k8s/), built from Debian
# packages, PyPI and npm only (tools/images.py; docs/deploy.md). Needs docker with
# BuildKit, run as root for the Debian base (debootstrap). VARIANTS="cpu gpu" adds
# the CUDA images. Names match deploy/k8s/base/kustomization.yaml:
# $(IMAGE_PREFIX)/<service>:<version>[-cpu|-gpu]; the digests go to
# deploy/k8s/components/image-digests.
IMAGE_PREFIX ?= localhost/smily

# The base's generated Secret values (Redis password, cache HMAC key); kept if present.
.PHONY: k8s-secrets
k8s-secrets:
	$(PYTHON) -m smily.k8s_secrets

.PHONY: images
images:
	IMAGE_PREFIX=$(IMAGE_PREFIX) nice -n 15 $(PYTHON) tools/images.py
