"""Embedder speed, in one process, on the same model and tiles:

1. ONNX Runtime vs PyTorch eager, images/s at batch 1, 8, 32.
2. The gRPC service end to end (raw RGB tiles -> decode, preprocess,
   inference) vs a bare ONNX Runtime session on the same tensors, batch 32.
3. 16 concurrent single-image clients, dynamic batching on vs off:
   throughput and p50/p99 latency.
4. INT8 vs FP32: images/s at batch 32 and recall@10 of nearest neighbours.
5. On a GPU: the provider the service chose (CUDA/TensorRT) vs ONNX Runtime's
   CPU provider on the same machine: embedding parity, images/s at batch 1,
   32, 128, and the CPU preprocessing rate that feeds the GPU.

Run from the repository root after `make proto model`: .venv/bin/python bench/embedder.py
"""

from __future__ import annotations

import os
import threading
import time
import warnings

import numpy as np

from smily import stack
from smily.common.channels import channel
from smily.common.config import Settings
from smily.embedder import model_repo
from smily.embedder.runtime import Model
from smily.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from smily.models.quantize import quantize, synthetic_tiles
from smily.types.v1 import types_pb2

REPO = "models"
FP32 = "efficientnet-lite0/1"
DEFAULT_FP32_CONVS = 3  # smily model quantize's default
CLIENTS, PER_CLIENT = 16, 8


def rate(fn, images_per_call: int, min_s: float = 3.0, max_calls: int = 50) -> float:
    """images/s of fn() after one warm-up call, over at least min_s seconds."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < max_calls and (calls < 2 or time.perf_counter() - start < min_s):
        fn()
        calls += 1
    return calls * images_per_call / (time.perf_counter() - start)


def settings(**changes) -> Settings:
    return Settings().replace(
        bind_host="127.0.0.1",
        embedder_port=0,
        metrics_port=0,
        model_repository=REPO,
        plaintext=True,
        **changes,
    )


def raw(tile: np.ndarray) -> types_pb2.Image:
    return types_pb2.Image(
        data=tile.tobytes(), encoding=types_pb2.IMAGE_ENCODING_RAW_RGB, width=tile.shape[1], height=tile.shape[0]
    )


def onnx_vs_torch(model: Model, tiles) -> None:
    import torch

    from smily.models.export import efficientnet_lite0

    module, _ = efficientnet_lite0()
    print("1. ONNX Runtime vs PyTorch eager (FP32, images/s)")
    for batch in (1, 8, 32):
        x = model.preprocess(tiles[:batch])
        ort_rate = rate(lambda x=x: model.session.run(None, {"images": x}), batch)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            torch_rate = rate(lambda xt=xt: module(xt), batch, max_calls=10)
        print(
            f"   batch {batch:>2}: onnxruntime {ort_rate:7.1f}  pytorch {torch_rate:7.1f}  "
            f"({ort_rate / torch_rate:.1f}x)"
        )


def service_vs_bare(model: Model, tiles) -> None:
    running, s = stack.start(["embedder"], settings())
    try:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel(s.embedder.embedder_target))
        req = embedder_pb2.EmbedRequest(images=[raw(t) for t in tiles[:32]])
        x = model.preprocess(tiles[:32])
        bare = rate(lambda: model.session.run(None, {"images": x}), 32)
        service = rate(lambda: stub.Embed(req), 32)
        bare2 = rate(lambda: model.session.run(None, {"images": x}), 32)  # again: the shared CPU drifts
    finally:
        stack.stop(running, 0)
    bare = (bare + bare2) / 2
    print("2. Service end to end (gRPC + raw RGB decode + preprocessing + inference) vs bare session, batch 32")
    print(f"   bare session {bare:7.1f} images/s, service {service:7.1f} images/s ({service / bare:.2f}x)")


def concurrent(tiles, per_request: int = 1, clients: int = CLIENTS, **changes) -> tuple[float, float, float]:
    """images/s, p50 and p99 ms of `clients` threads each sending PER_CLIENT requests of per_request tiles."""
    running, s = stack.start(["embedder"], settings(**changes))
    latencies: list[float] = []
    lock = threading.Lock()
    try:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel(s.embedder.embedder_target))
        stub.Embed(embedder_pb2.EmbedRequest(images=[raw(tiles[0])]))

        def client(i: int) -> None:
            mine = []
            for j in range(PER_CLIENT):
                first = (i * PER_CLIENT + j) * per_request
                req = embedder_pb2.EmbedRequest(
                    images=[raw(tiles[k % len(tiles)]) for k in range(first, first + per_request)]
                )
                t0 = time.perf_counter()
                stub.Embed(req)
                mine.append(time.perf_counter() - t0)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    finally:
        stack.stop(running, 0)
    ms = np.asarray(latencies) * 1e3
    return len(latencies) * per_request / elapsed, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def batching(tiles) -> None:
    print(f"3. {CLIENTS} concurrent single-image clients x {PER_CLIENT} requests (raw RGB 224x224)")
    on = concurrent(tiles, preferred_batch=32)  # on even on the CPU, where it is off by default
    off = concurrent(tiles, preferred_batch=1)
    for label, (tput, p50, p99) in (("dynamic batching on ", on), ("dynamic batching off", off)):
        print(f"   {label}: {tput:7.1f} images/s, p50 {p50:7.1f} ms, p99 {p99:7.1f} ms")
    print(f"   speed-up {on[0] / off[0]:.2f}x")


def top10(v: np.ndarray) -> np.ndarray:
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1)[:, :10]


def int8_vs_fp32(fp32: Model, tiles) -> None:
    x = fp32.preprocess(tiles[:32])
    r32 = rate(lambda: fp32.session.run(None, {"images": x}), 32)
    va = np.concatenate([fp32.embed_tensor(fp32.preprocess(tiles[i : i + 32])) for i in range(0, len(tiles), 32)])
    a = top10(va)
    print(f"4. INT8 vs FP32 ({r32:.1f} images/s), batch 32, recall@10 over {len(tiles)} synthetic tissue tiles")
    # Quantised afresh, so the figures are the current code's; calibrated on tiles of other seeds.
    for fp32_convs in (0, 1, 3, 7, 14):
        version = "1-int8" if fp32_convs == DEFAULT_FP32_CONVS else f"1-int8-fp32convs{fp32_convs}"
        config = quantize(REPO, FP32, version=version, fp32_convs=fp32_convs)
        int8 = Model(*model_repo.load(REPO, config.model_id))
        r8 = rate(lambda m=int8: m.session.run(None, {"images": x}), 32)
        vb = np.concatenate([int8.embed_tensor(int8.preprocess(tiles[i : i + 32])) for i in range(0, len(tiles), 32)])
        b = top10(vb)
        recall = np.mean([len(set(a[i]) & set(b[i])) / 10 for i in range(len(tiles))])
        print(
            f"   first {fp32_convs:2d} convolutions FP32 ({config.model_id}): {r8:7.1f} images/s ({r8 / r32:.2f}x); "
            f"neighbour recall@10 {recall:.3f}; mean cosine to FP32 {(va * vb).sum(1).mean():.4f}",
            flush=True,
        )


def gpu_vs_cpu(model: Model, tiles) -> None:
    import onnxruntime as ort

    if model.provider == "CPUExecutionProvider":
        print("5. GPU vs CPU: skipped, this onnxruntime has no GPU provider (install onnxruntime-gpu)")
        return
    config, path = model_repo.load(REPO, FP32)
    cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = model.preprocess(tiles[:128])
    feed = {config.input_name: x}
    (a,), (b,) = model.session.run(None, feed), cpu.run(None, feed)
    a, b = a.reshape(len(x), -1), b.reshape(len(x), -1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(
        f"5. {model.provider} vs CPUExecutionProvider ({os.cpu_count()} CPUs), FP32, images/s; "
        f"parity over {len(x)} tiles: min cosine {cos.min():.6f}, max |diff| {np.abs(a - b).max():.2e}"
    )
    for batch in (1, 32, 128):
        xb = {config.input_name: x[:batch]}
        gpu_rate = rate(lambda xb=xb: model.session.run(None, xb), batch)
        cpu_rate = rate(lambda xb=xb: cpu.run(None, xb), batch, max_calls=20)
        print(
            f"   batch {batch:>3}: {model.provider} {gpu_rate:8.1f}  CPU {cpu_rate:7.1f}  ({gpu_rate / cpu_rate:.1f}x)"
        )
    pre = rate(lambda: model.preprocess(tiles[:128]), 128)
    print(f"   preprocessing (CPU, one thread, raw RGB -> normalised tensor): {pre:.1f} images/s")
    clients = settings().embedder.max_queue // 32  # as many as the queue admits at once
    tput, p50, p99 = concurrent(tiles, per_request=32, clients=clients)
    print(
        f"   service, {clients} clients x batch 32 (raw RGB over gRPC): {tput:.1f} images/s, "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="12345", help="which comparisons to run, e.g. 4 for INT8 only")
    parts = ap.parse_args().parts
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    tiles = synthetic_tiles(256, seed=7)
    fp32 = Model(*model_repo.load(REPO, FP32))
    print(
        f"model {FP32} on {fp32.provider}, {os.cpu_count()} CPUs, {len(tiles)} tiles "
        f"(prepared in {time.perf_counter() - t0:.0f} s)"
    )
    for part, run in (("1", onnx_vs_torch), ("2", service_vs_bare), ("4", int8_vs_fp32), ("5", gpu_vs_cpu)):
        if part in parts:
            run(fp32, tiles)
        if part == "2" and "3" in parts:
            batching(tiles)


if __name__ == "__main__":
    main()
