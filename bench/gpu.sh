#!/usr/bin/env bash
# The GPU rows of issue 19 (docs/benchmarks.md), in one run on a lent GPU machine
# (one H200, 16 cores: see the device notes), results written to $OUT:
#   ingest.txt  ingest through the four services (16 cores: 12 tiler readers, 4 concurrent
#               ingests) vs the bare batch-32 ONNX Runtime session and the embedder alone
#   faiss.txt   faiss-gpu vs faiss-cpu at 1,000,000 x 1280 (exact and IVF-PQ)
#   trt.txt     TensorRT FP16 vs CUDA FP32: images/s and neighbour recall@10
#   env.txt     versions, GPU, providers
# A row whose package is missing says "untested" and why; the others still run.
#
# Wheels: Python packages the machine lacks travel as wheels in .whl/ (carried), installed
# here with --no-deps into /tmp/site. What the rows need beyond the machine's image
# (python3.12, numpy, pillow, protobuf, grpcio, prometheus-client, psutil, tifffile):
#   all:    grpcio-health-checking grpcio-reflection opentelemetry-api opentelemetry-sdk
#           opentelemetry-semantic-conventions redis cryptography PyJWT wsidicom dicomweb-client
#           (pyproject's dependencies the image lacks; check with `python3 -m pip check` there)
#           and grpcio-tools, to make the protos there unless protos/ is carried with its
#           generated *_pb2*.py
#   ingest: onnxruntime-gpu==1.31.1 openslide-python==1.4.7 openslide-bin==4.0.1.2 faiss-cpu==1.15.1
#           imagecodecs (the slide writer's JPEG); CUDA 13 / cuDNN 9 come with the image
#   faiss:  a faiss GPU wheel (e.g. faiss-gpu-cu13-cuvs, which brings its own needs) instead of faiss-cpu
#   trt:    TensorRT 10 libraries (libnvinfer.so.10) for onnxruntime-gpu 1.31
# Also carry models/ (the ONNX model: `make model` here).
#
#   bash bench/gpu.sh            (from the repository root; OUT defaults to var/gpu-bench)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-var/gpu-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$OUT/env.txt"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# NVIDIA's CUDA and cuDNN wheels keep their libraries under site-packages/nvidia/*/lib.
for d in /tmp/site/nvidia/*/lib $($PY -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | \
         xargs -n1 -I{} sh -c 'ls -d {}/nvidia/*/lib 2>/dev/null'); do
  [ -d "$d" ] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
# The repository's packages (smily.* from services/, protos/, smily/) without installing it.
mkdir -p /tmp/smily-ns
$PY - <<'EOF'
import os, tomllib
root = os.getcwd()
dirs = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]
# One namespace over several folders: a .pth-free shim package mapping smily.<x> to its folder.
with open("/tmp/smily-ns/smily_paths.py", "w") as fh:
    fh.write(f"DIRS = {({k: os.path.join(root, v) for k, v in dirs.items()})!r}\n")
EOF
export PYTHONPATH=/tmp/smily-ns:$PWD${PYTHONPATH:+:$PYTHONPATH}
cat > /tmp/smily-ns/sitecustomize.py <<'EOF'
import importlib.abc, importlib.util, sys
from smily_paths import DIRS
class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in DIRS:
            return importlib.util.spec_from_file_location(name, DIRS[name] + "/__init__.py",
                                                          submodule_search_locations=[DIRS[name]])
        return None
sys.meta_path.insert(0, _Finder())
EOF
if ! $PY -c 'import smily.tiler.v1.tiler_pb2' 2>/dev/null; then
  $PY -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos $(find protos -name '*.proto') \
    || echo "protos missing: carry protos/ with its generated files or a grpcio-tools wheel" | tee -a "$OUT/env.txt"
fi

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nproc
  $PY -c 'import sys; print(sys.version)'
  $PY -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
  $PY -c 'import faiss; print("faiss", faiss.__version__, "gpus", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)'
} >>"$OUT/env.txt" 2>&1

# 1. Ingest on 16 cores: 12 reader processes, 4 slides' ingests at once, 4 embedder clients alone.
SMILY_TILER_READERS=12 SMILY_MAX_CONCURRENT_INGESTS=4 SMILY_WORKER_THREADS=32 \
  timeout 360 $PY bench/overhead.py --part ingest --ingests 4 --rounds 2 --skip-loop --keep /tmp/smily-gpu-slides \
  >"$OUT/ingest.txt" 2>&1 || echo "ingest: failed or timed out (exit $?)" >>"$OUT/ingest.txt"
# 2. FAISS on the GPU vs the CPU at 1M vectors.
timeout 300 $PY bench/gpu_rows.py faiss --n 1000000 >"$OUT/faiss.txt" 2>&1 \
  || echo "faiss: failed or timed out (exit $?)" >>"$OUT/faiss.txt"
# 3. TensorRT FP16 vs CUDA FP32.
timeout 300 $PY bench/gpu_rows.py trt >"$OUT/trt.txt" 2>&1 || echo "trt: failed or timed out (exit $?)" >>"$OUT/trt.txt"
tail -n 20 "$OUT"/*.txt
