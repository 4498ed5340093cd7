"""Localisation of off-grid crops with abutting (stride 1.0) and overlapping (0.5) tiles,
and what the overlap costs in index size and ingest time (issue 16; docs/evaluation.md).

For each stride: a fresh stack and index, two small synthetic slides ingested
(timed), then crops of one tile's field of view cut at random off-grid
positions over tissue are searched by region, their own slide included. The
score of a crop is the IoU of the best hit with it (0 when the best hit is on
another slide); the oracle is the best IoU any indexed tile has with it.

    .venv/bin/python -m bench.localisation [--queries 60] [--strides 1.0 0.5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from smily.client import Client  # noqa: E402
from smily.common import logs  # noqa: E402
from smily.common.tiling import DEFAULT_TILE_SIZE  # noqa: E402
from smily.evaluation.metrics import bootstrap_ci  # noqa: E402
from smily.gateway.v1 import gateway_pb2  # noqa: E402
from smily.localstack import local_stack  # noqa: E402
from smily.synthetic import SlideSpec, write_samples  # noqa: E402
from smily.tiler import slides as slide_files  # noqa: E402
from smily.tiler import tiling  # noqa: E402

SLIDES = (SlideSpec("loc-a.svs", "svs", 3072, 2304, 0.5, 21), SlideSpec("loc-b.svs", "svs", 3072, 2304, 0.5, 22))
MPP = 1.0


def iou(a, b) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


def crops(slide_dir: str, n: int, seed: int) -> list[tuple[int, int, int, int]]:
    """n tile-sized crops of slide a over tissue, each shifted off the grid by 1/8..3/8 of a tile."""
    slide = slide_files.SlideCache().get(os.path.join(slide_dir, SLIDES[0].name))
    size = round(DEFAULT_TILE_SIZE * MPP / SLIDES[0].mpp)
    plan = tiling.plan(slide, SLIDES[0].mpp, [MPP], DEFAULT_TILE_SIZE, 0.9)[0]
    rng = np.random.default_rng(seed)
    width, height = slide.dimensions
    out = []
    for t in rng.choice(len(plan), n, replace=len(plan) < n):
        dx, dy = (rng.uniform(0.125, 0.375, 2) * size * rng.choice([-1, 1], 2)).astype(int)
        x, y = int(np.clip(plan[t].x + dx, 0, width - size)), int(np.clip(plan[t].y + dy, 0, height - size))
        out.append((x, y, size, size))
    return out


def run(stride: float, slide_dir: str, queries: list, k: int) -> dict:
    with local_stack((slide_dir,), model_repository=os.path.join(ROOT, "models"), tile_stride=stride) as s:
        client = Client(f"127.0.0.1:{s.gateway.gateway_port}", timeout=600)
        started = time.perf_counter()
        for spec in SLIDES:
            op = client.wait(client.ingest(spec.name, spec.name.split(".")[0]))
            assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, (op.error_code, op.error_message)
        ingest_s = time.perf_counter() - started
        tiles = sum(x.tile_count for x in client.slides())
        index_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(s.index.index_dir) for f in fs)
        best, oracle, overlapping, seconds = [], [], 0, []
        # Every indexed tile of slide a, for the oracle: the tiler's plan with the index's record.
        t = client.index_info().tiling
        slide = slide_files.SlideCache().get(os.path.join(slide_dir, SLIDES[0].name))
        indexed = [
            (r.x, r.y, r.size, r.size)
            for r in tiling.plan(slide, SLIDES[0].mpp, list(t.mpps), t.tile_size, t.min_tissue_fraction, t.stride)[0]
        ]
        for q in queries:
            t0 = time.perf_counter()
            hits = client.search(region=dict(slide_id="loc-a", x=q[0], y=q[1], width=q[2], height=q[3]), k=k).hits
            seconds.append(time.perf_counter() - t0)
            top = hits[0]
            best.append(iou(q, (top.x, top.y, top.width, top.height)) if top.slide_id == "loc-a" else 0.0)
            oracle.append(max(iou(q, r) for r in indexed))
            rects = [(h.slide_id, (h.x, h.y, h.width, h.height)) for h in hits]
            overlapping += sum(
                1 for i, (sa, a) in enumerate(rects) for sb, b in rects[i + 1 :] if sa == sb and iou(a, b) > 0
            )
        client.close()
    groups = np.arange(len(queries))
    return {
        "stride": stride,
        "tiles": tiles,
        "index_mb": index_bytes / 2**20,
        "ingest_s": ingest_s,
        "best_iou": bootstrap_ci(np.array(best), groups),
        "oracle_iou": bootstrap_ci(np.array(oracle), groups),
        "iou_ge_half": bootstrap_ci((np.array(best) >= 0.5).astype(float), groups),
        "overlapping_pairs_top_k": overlapping,
        "search_ms_median": 1000 * float(np.median(seconds)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--strides", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logs.setup("WARNING")
    with tempfile.TemporaryDirectory(prefix="smily-loc-") as tmp:
        write_samples(tmp, SLIDES)
        queries = crops(tmp, args.queries, args.seed)
        print(
            f"{len(queries)} off-grid crops of {queries[0][2]} level-0 px ({MPP} µm/px tiles of "
            f"{DEFAULT_TILE_SIZE} px) on a {SLIDES[0].width}x{SLIDES[0].height} slide, 2 slides indexed; "
            "mean [95% bootstrap interval over queries]"
        )
        print(
            "| stride | tiles | index MB | ingest s | best-hit IoU | IoU >= 0.5 | oracle IoU | overlapping pairs "
            f"in top {args.k} | search ms (median) |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for stride in args.strides:
            r = run(stride, tmp, queries, args.k)
            f = lambda v: f"{v[0]:.3f} [{v[1]:.2f},{v[2]:.2f}]"  # noqa: E731
            print(
                f"| {stride:g} | {r['tiles']} | {r['index_mb']:.1f} | {r['ingest_s']:.1f} | {f(r['best_iou'])} | "
                f"{f(r['iou_ge_half'])} | {f(r['oracle_iou'])} | {r['overlapping_pairs_top_k']} | "
                f"{r['search_ms_median']:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
