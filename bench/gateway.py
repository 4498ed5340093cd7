"""End-to-end search latency through the gateway, against the full local stack.

Builds an index of >= 100,000 tiles quickly (synthetic unit vectors staged
through the index's AddTiles/CommitSlide, plus one real ingested slide for
region queries), then measures p50/p99 and queries/s with 1 and 16
concurrent clients for image and region queries, cached and uncached.
Tiler and embedder request counters (same process, Prometheus registry)
show whether a cached query touched them.

    .venv/bin/python bench/gateway.py [--tiles 100000] [--queries 40] [--ivf-threshold 50000]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import prometheus_client as prom
from PIL import Image

from smily import stack
from smily.client import Client
from smily.common.channels import channel
from smily.common.config import Settings
from smily.common.tensors import to_tensor
from smily.index.v1 import index_pb2, index_pb2_grpc
from smily.localstack import start_redis
from smily.synthetic import SlideSpec, write_samples
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc
from smily.types.v1 import types_pb2

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
SLIDE = SlideSpec("bench-slide.svs", "svs", 4096, 3072, 0.5, 7)
PER_SLIDE = 5000


def backend_requests(service: str) -> float:
    total = 0.0
    for metric in prom.REGISTRY.collect():
        for s in metric.samples:
            if s.name == "smily_grpc_requests_total" and s.labels.get("service") == service:
                total += s.value
    return total


def fill_index(target: str, model_id: str, dim: int, n: int) -> None:
    stub = index_pb2_grpc.IndexServiceStub(channel(target))
    rng = np.random.default_rng(0)
    for s in range(0, n, PER_SLIDE):
        m = min(PER_SLIDE, n - s)
        # Non-negative like the model's pooled features, then L2-normalised.
        v = np.abs(rng.standard_normal((m, dim))).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        slide_id = f"bench-{s // PER_SLIDE:03d}"
        tiles = [
            index_pb2.TileRect(x=(i % 100) * 448, y=(i // 100) * 448, width=448, height=448, mpp=1.0) for i in range(m)
        ]
        stub.AddTiles(
            index_pb2.AddTilesRequest(
                model_id=model_id, slide_id=slide_id, generation="g", embeddings=to_tensor(v), tiles=tiles
            ),
            timeout=600,
        )
        stub.CommitSlide(
            index_pb2.CommitSlideRequest(
                model_id=model_id,
                generation="g",
                expected_tiles=m,
                slide=index_pb2.Slide(slide_id=slide_id, source="none"),
            ),
            timeout=600,
        )


def measure(client: Client, make_query, queries: int, clients: int) -> dict:
    """make_query(i) -> kwargs of Client.search; returns latency figures."""

    def one(i):
        start = time.perf_counter()
        resp = client.search(k=10, **make_query(i))
        return time.perf_counter() - start, resp.cached

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(queries)))
    wall = time.perf_counter() - start
    lat = np.array([r[0] for r in results]) * 1000
    return dict(
        p50=np.percentile(lat, 50),
        p99=np.percentile(lat, 99),
        qps=queries / wall,
        cached=sum(r[1] for r in results) / queries,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=40, help="queries per measurement and client count")
    ap.add_argument(
        "--ivf-threshold",
        type=int,
        default=50_000,
        help="tiles from which the index trains IVF-PQ (the service default is 200,000; "
        "pass a larger value to measure exact search)",
    )
    args = ap.parse_args()
    redis, url = start_redis()
    if redis is None:
        print("redis-server is required", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="smily-bench-")
    write_samples(os.path.join(tmp, "slides"), [SLIDE])
    settings = Settings().replace(
        gateway_port=0,
        tiler_port=0,
        embedder_port=0,
        index_port=0,
        metrics_port=0,
        slide_roots=(os.path.join(tmp, "slides"),),
        model_repository=MODELS,
        index_dir=os.path.join(tmp, "index"),
        redis_url=url,
        log_level="WARNING",
        index_ivf_threshold=args.ivf_threshold,
        plaintext=True,
        auth="none",
    )
    running, settings = stack.start(stack.ORDER, settings)
    client = Client(f"127.0.0.1:{settings.gateway.gateway_port}", timeout=120)
    try:
        t0 = time.perf_counter()
        op = client.wait(client.ingest(SLIDE.name, "real"))
        assert op.model_id, op.error_message
        fill_index(settings.index.index_target, op.model_id, 1280, args.tiles)
        running["index"].servicer.store.wait_trained()  # IVF trains in the background: measure the trained index
        info = index_pb2_grpc.IndexServiceStub(channel(settings.index.index_target)).GetIndexInfo(
            index_pb2.GetIndexInfoRequest()
        )
        print(
            f"index: {info.tile_count} tiles in {info.slide_count} slides ({info.index_type or 'Flat'}, "
            f"nprobe {info.default_nprobe}), built in {time.perf_counter() - t0:.0f} s"
        )

        tiler = tiler_pb2_grpc.TilerServiceStub(channel(settings.tiler.tiler_target))
        patch = np.asarray(
            Image.open(
                io.BytesIO(
                    tiler.ReadRegion(
                        tiler_pb2.ReadRegionRequest(
                            slide=SLIDE.name,
                            x=1000,
                            y=1000,
                            width=448,
                            height=448,
                            mpp=1.0,
                            encoding=types_pb2.IMAGE_ENCODING_PNG,
                        )
                    ).image.data
                )
            )
        )

        def png(i: int) -> bytes:
            img = patch.copy()
            img[0, 0] = (i % 256, i // 256 % 256, 7)  # one pixel: a new hash, the same tissue
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG", compress_level=1)
            return buf.getvalue()

        fixed_png = png(10**6)
        run = [0]  # distinct uncached queries across measurements

        def fresh_region(i):
            run[0] += 1
            return dict(
                region=dict(slide_id="real", x=800 + run[0] % 1500, y=800 + run[0] // 1500, width=448, height=448)
            )

        def fresh_image(i):
            run[0] += 1
            return dict(image=png(run[0]))

        cases = {
            "image, uncached": fresh_image,
            "image, cached": lambda i: dict(image=fixed_png),
            "region, uncached": fresh_region,
            "region, cached": lambda i: dict(region=dict(slide_id="real", x=1000, y=1000, width=448, height=448)),
        }
        client.search(image=fixed_png)
        client.search(region=dict(slide_id="real", x=1000, y=1000, width=448, height=448))
        print("| query | clients | p50 ms | p99 ms | queries/s | served from cache | tiler+embedder requests |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, make in cases.items():
            for clients in (1, 16):
                n = args.queries if clients == 1 else args.queries * 4
                before = backend_requests("tiler") + backend_requests("embedder")
                r = measure(client, make, n, clients)
                touched = backend_requests("tiler") + backend_requests("embedder") - before
                print(
                    f"| {name} | {clients} | {r['p50']:.1f} | {r['p99']:.1f} | {r['qps']:.0f} | "
                    f"{r['cached']:.0%} | {touched:.0f} |",
                    flush=True,
                )
    finally:
        client.close()
        stack.stop(running, 0)
        redis.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
