"""The GPU rows of issue 19 that need no running stack (bench/gpu.sh runs them
and bench/overhead.py's ingest row):

faiss   faiss-gpu vs faiss-cpu at --n vectors (default 1,000,000 x 1280, bench/index.py's
        clustered synthetic embeddings): exact (Flat) and the service's IVF-PQ, queries/s
        one at a time and in one batch, and recall@10 of each against the CPU exact answer.
trt     TensorRT FP16 vs CUDA FP32 (ONNX Runtime), batch 32: images/s and neighbour recall@10
        of the FP16 embeddings against the FP32 ones over synthetic tissue tiles.

A row whose library is missing prints "untested" and why.

    python3 bench/gpu_rows.py faiss [--n 1000000]
    python3 bench/gpu_rows.py trt [--tiles 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(found, truth)]))


def faiss_rows(args) -> None:
    import faiss
    from index import mixture  # bench/index.py's generator

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        print("faiss-gpu: untested (this faiss has no GPU support or sees no GPU)")
        return
    rng = np.random.default_rng(0)
    d, clusters, latent = 1280, 2000, 64
    centres = rng.standard_normal((clusters, latent), dtype=np.float32)
    lift = rng.standard_normal((latent, d), dtype=np.float32) / np.sqrt(d)
    spread = rng.uniform(0.2, 0.5, clusters).astype(np.float32)
    t0 = time.perf_counter()
    x = np.concatenate(
        [mixture(rng, centres, lift, min(100_000, args.n - s), spread, 0.002) for s in range(0, args.n, 100_000)]
    ).astype(np.float32)
    q = mixture(rng, centres, lift, args.queries, spread, 0.002).astype(np.float32)
    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} CPU threads, {faiss.get_num_gpus()} GPU; "
        f"{args.n} x {d} made in {time.perf_counter() - t0:.0f} s"
    )
    res = faiss.StandardGpuResources()
    k = 10

    def timed(index, name: str, truth=None):
        index.search(q[:8], k)  # warm
        t0 = time.perf_counter()
        for i in range(args.single):
            index.search(q[i : i + 1], k)
        single = args.single / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, ids = index.search(q, k)
        batch = len(q) / (time.perf_counter() - t0)
        rec = recall_at_10(ids, truth) if truth is not None else 1.0
        print(f"| {name} | {single:.0f} | {batch:.0f} | {rec:.3f} |", flush=True)
        return ids

    print(f"| index | q/s one at a time | q/s, one batch of {len(q)} | recall@10 vs exact |")
    print("| --- | ---: | ---: | ---: |")
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    truth = timed(flat, "Flat, CPU")
    gpu_flat = faiss.index_cpu_to_gpu(res, 0, flat)
    timed(gpu_flat, "Flat, GPU", truth)
    del gpu_flat
    nlist = int(np.sqrt(args.n))
    ivf = faiss.index_factory(d, f"IVF{nlist},PQ64", faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    ivf.train(x[rng.choice(args.n, min(args.n, 64_000), replace=False)])
    ivf.add(x)
    print(f"(IVF{nlist},PQ64 trained and filled on the CPU in {time.perf_counter() - t0:.0f} s)")
    for nprobe in (16, 64):
        faiss.extract_index_ivf(ivf).nprobe = nprobe
        timed(ivf, f"IVF{nlist},PQ64 nprobe {nprobe}, CPU (no re-rank)", truth)
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True  # PQ64 at 1280-d needs float16 lookup tables on the GPU
        gpu_ivf = faiss.index_cpu_to_gpu(res, 0, ivf, co)
        faiss.GpuParameterSpace().set_index_parameter(gpu_ivf, "nprobe", nprobe)
        timed(gpu_ivf, f"IVF{nlist},PQ64 nprobe {nprobe}, GPU (no re-rank)", truth)
        del gpu_ivf


def trt_rows(args) -> None:
    import onnxruntime as ort

    from smily.embedder import model_repo
    from smily.embedder.runtime import Model, tensorrt_installed
    from smily.models.quantize import synthetic_tiles

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        print(f"TensorRT FP16 vs CUDA FP32: untested (providers {available})")
        return
    if "TensorrtExecutionProvider" not in available or not tensorrt_installed():
        print(
            "TensorRT FP16 vs CUDA FP32: untested (onnxruntime-gpu lists TensorRT but libnvinfer.so.10 "
            "does not load: carry TensorRT 10 libraries)"
        )
        return
    config, path = model_repo.load(MODELS, "efficientnet-lite0/1")
    tiles = synthetic_tiles(args.tiles)

    def run(model):
        x = model.preprocess(tiles)
        out = model.embed_tensor(x)
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            for i in range(0, len(x), 32):
                model.embed_tensor(x[i : i + 32])
        return out, args.repeat * len(x) / (time.perf_counter() - t0)

    cuda = Model(config, path, max_batch=64, fp16=False)
    print(f"FP32 model on {cuda.provider}")
    if cuda.provider == "TensorrtExecutionProvider":
        # FP32 reference on the CUDA provider itself: hide TensorRT for this session.
        from smily.embedder import runtime

        runtime.tensorrt_installed = lambda: False
        cuda = Model(config, path, max_batch=64, fp16=False)
        runtime.tensorrt_installed = tensorrt_installed
    v32, s32 = run(cuda)
    t0 = time.perf_counter()
    trt = Model(config, path, max_batch=64, fp16=True)
    build = time.perf_counter() - t0
    v16, s16 = run(trt)
    sims32, sims16 = v32 @ v32.T, v16 @ v16.T
    np.fill_diagonal(sims32, -2)
    np.fill_diagonal(sims16, -2)
    a, b = np.argsort(-sims16, 1)[:, :10], np.argsort(-sims32, 1)[:, :10]
    print("| provider | images/s, batch 32 | neighbour recall@10 vs CUDA FP32 | mean cosine to FP32 |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| CUDA FP32 | {s32:.0f} | 1.000 | 1.0000 |")
    print(
        f"| TensorRT FP16 ({trt.provider}, engine build {build:.0f} s) | {s16:.0f} | {recall_at_10(a, b):.3f} | "
        f"{(v16 * v32).sum(1).mean():.4f} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["faiss", "trt"])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    {"faiss": faiss_rows, "trt": trt_rows}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
