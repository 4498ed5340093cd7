"""Tenant-scoped search (issue 24): its cost next to an unscoped search, and its recall.

One TileIndex (SQLite + FAISS, as the index server runs it) holds --tenants tenants of
--tiles tiles each, clustered like real embeddings (bench/index.py's mixture). Side by side in
one run, on the same queries: the p50 latency of a search scoped to one tenant (the tenant's key
range selected inside FAISS) against an unscoped one, and the recall@10 of the scoped search on
the IVF-PQ index (re-ranked, the service's default) against the exact scoped top 10.

    nice -n 10 .venv/bin/python bench/tenants.py                  # 10 tenants x 10,000 tiles
    .venv/bin/python bench/tenants.py --tiles 2000 --queries 50   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from smily.common.tenancy import key, split
from smily.index.faiss_index import IndexConfig, TileIndex
from smily.index.shard import Query, TileBatch
from smily.index.storage import Slide, Tile

MODEL = "bench/1"
SLIDE_TILES = 1000


def mixture(rng, centres, lift, n, noise=0.05):
    c = rng.integers(0, len(centres), n)
    z = centres[c] + 0.3 * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    x = z @ lift + rng.standard_normal((n, lift.shape[1]), dtype=np.float32) * noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def p50_ms(index: TileIndex, queries, tenants) -> float:
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(Query(MODEL, q, 10, tenants=tenants))
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tenants", type=int, default=10)
    ap.add_argument("--tiles", type=int, default=10_000, help="per tenant")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--factory", default="IVF256,PQ32", help="the ANN index (re-ranked from storage)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((64, 32), dtype=np.float32)
    lift = rng.standard_normal((32, args.dim), dtype=np.float32) / np.sqrt(32)
    names = [f"site-{t}" for t in range(args.tenants)]
    data = {t: mixture(rng, centres, lift, args.tiles) for t in names}
    queries = mixture(rng, centres, lift, args.queries)

    with tempfile.TemporaryDirectory(prefix="smily-bench-tenants-") as d:
        # Trained once, when the last slide lands.
        config = IndexConfig(factory=args.factory, ivf_threshold=args.tenants * args.tiles, snapshot_interval_s=0)
        index = TileIndex(d, config)
        start = time.perf_counter()
        for t, vectors in data.items():
            for s in range(0, len(vectors), SLIDE_TILES):
                k, part = key(t, f"s{s}"), vectors[s : s + SLIDE_TILES]
                tiles = [Tile(i * 224, 0, 224, 224, 0.5) for i in range(len(part))]
                index.stage(TileBatch(MODEL, k, "g", part, tiles))
                index.commit_slide(MODEL, "g", Slide(k, "x.svs"), len(part))
        index.wait_trained()
        print(
            f"indexed {args.tenants} x {args.tiles} tiles in {time.perf_counter() - start:.0f} s: {index.info().factory}"
        )

        tenant = names[0]
        for q in queries[:5]:  # warm caches (the tenant's id set is read once per commit)
            index.search(Query(MODEL, q, 10, tenants=[tenant]))
            index.search(Query(MODEL, q, 10))
        scoped, unscoped = [], []
        for _ in range(3):  # interleaved rounds: load on the machine hits both alike
            scoped.append(p50_ms(index, queries, [tenant]))
            unscoped.append(p50_ms(index, queries, []))
        s, u = statistics.median(scoped), statistics.median(unscoped)

        exact = data[tenant] @ queries.T  # [tiles, queries]
        recalls, foreign = [], 0
        for j, q in enumerate(queries):
            truth = set(np.argsort(-exact[:, j])[:10].tolist())
            hits = index.search(Query(MODEL, q, 10, tenants=[tenant]))
            foreign += sum(split(h.slide_id)[0] != tenant for h in hits)
            got = {int(split(h.slide_id)[1][1:]) + h.tile.x // 224 for h in hits}
            recalls.append(len(got & truth) / 10)
        index.close()

    print(f"p50 scoped {s:.2f} ms, unscoped {u:.2f} ms: {s / u:.2f}x (goal <= 1.2x)")
    print(f"recall@10 of scoped {args.factory} vs exact scoped: {np.mean(recalls):.3f} (goal >= 0.99)")
    print(f"hits of another tenant: {foreign}")


if __name__ == "__main__":
    main()
