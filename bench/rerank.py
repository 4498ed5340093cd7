"""Re-rank forms on real embeddings: recall@10 of IVF-PQ + re-rank against exact float32.

Tiles are cut from the project's slides (tests/data's CMU slide and the
`make sample-data` slides) at several tile sizes, on grids shifted by a
fraction of a tile (--offsets; overlapping tiles, as a stride below 1 cuts
them), each in its 8 rotations and flips, and embedded with the default model in this process. The embeddings
are cached (--cache), so later runs only search. The IVF-PQ index is the
service's automatic factory at this size (ann.auto_factory), forced on
(threshold 0); its k * rerank candidates are re-scored from each re-rank
form, as services/index/rerank.py does, and compared with an exact float32
search of the same base. Then the served search itself: the index service's
TileIndex (SQLite store, the default re-rank form in RAM) over the same base,
trained with the same automatic factory, searched through TileIndex.search as
the Search RPC does.

    nice -n 10 .venv/bin/python bench/rerank.py --tiles 20000 [--offsets 2]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import faiss
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from smily.index import ann, rerank  # noqa: E402

SIZES = (224, 280, 336, 392, 448, 560, 672, 784)  # level-0 pixels per tile: several scales of one tissue


def slides() -> list[str]:
    found = [os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")]
    found += sorted(glob.glob(os.path.join(ROOT, "data", "samples", "*.*")))
    return [p for p in found if p.endswith((".svs", ".tiff", ".tif", ".ndpi"))]


def tiles(target: int, offsets: int):
    """RGB tiles of 224 px: every slide, every size, `offsets` x `offsets` grids each shifted by a
    fraction of a tile, each tile in its 8 dihedral forms."""
    import openslide

    from smily.embedder.preprocess import resize

    made = 0
    paths = slides()
    grids = [
        (size, size * i // offsets, size * j // offsets)
        for size in SIZES
        for i in range(offsets)
        for j in range(offsets)
    ]
    for size, dx, dy in grids:
        for path in paths:
            slide = openslide.OpenSlide(path)
            w, h = slide.dimensions
            for y in range(dy, h - size + 1, size):
                for x in range(dx, w - size + 1, size):
                    rgb = np.asarray(slide.read_region((x, y), 0, (size, size)).convert("RGB"))
                    if rgb.mean() > 225:  # background: the service's tissue filter would drop it
                        continue
                    rgb = resize(rgb, 224)
                    for k in range(4):
                        for flip in (False, True):
                            t = np.rot90(rgb, k)
                            yield np.ascontiguousarray(t[:, ::-1] if flip else t)
                            made += 1
                            if made >= target:
                                return
            slide.close()


def embed(target: int, offsets: int) -> np.ndarray:
    from smily.embedder.model_repo import load
    from smily.embedder.runtime import Model

    config, path = load(os.path.join(ROOT, "models"), "efficientnet-lite0/1")
    model = Model(config, path)
    out, batch, start = [], [], time.perf_counter()
    for t in tiles(target, offsets):
        batch.append(t)
        if len(batch) == 32:
            out.append(model.embed_tensor(model.preprocess(batch)))
            batch = []
            if len(out) % 20 == 0:
                print(f"  {32 * len(out)} tiles embedded, {time.perf_counter() - start:.0f} s", flush=True)
    if batch:
        out.append(model.embed_tensor(model.preprocess(batch)))
    v = np.concatenate(out).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def recall(got: np.ndarray, want: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(g[:k]) & set(w[:k])) / k for g, w in zip(got, want)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=20_000)
    ap.add_argument("--offsets", type=int, default=1, help="grids per axis, each shifted by 1/offsets of a tile")
    ap.add_argument("--cache", help="embeddings kept between runs (default: var/bench-embeddings-oN.npy)")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank", type=int, default=100, help="candidates per hit, as SMILY_INDEX_RERANK")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[32, 8])
    args = ap.parse_args()

    args.cache = args.cache or os.path.join(ROOT, "var", f"bench-embeddings-o{args.offsets}.npy")
    if os.path.exists(args.cache) and len(np.load(args.cache, mmap_mode="r")) >= args.tiles:
        vectors = np.load(args.cache)[: args.tiles]
    else:
        print(f"embedding {args.tiles} tiles of {len(slides())} slides at sizes {SIZES}, 8 dihedral forms each")
        vectors = embed(args.tiles, args.offsets)
        os.makedirs(os.path.dirname(args.cache), exist_ok=True)
        np.save(args.cache, vectors)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(vectors))
    queries, base = vectors[order[: args.queries]], vectors[order[args.queries :]]
    n, dim = base.shape
    ids = np.arange(n, dtype=np.int64)
    exact = faiss.IndexFlatIP(dim)
    exact.add(base)
    _, want = exact.search(queries, args.k)

    factory = ann.auto_factory(n, dim, 0)
    index, train_s = ann.build(factory, dim, base)
    index.add_with_ids(base, ids)
    print(f"{n} tiles x {dim} (real embeddings), {args.queries} held-out queries; {factory}, trained {train_s:.1f} s")
    refines = {}
    for form in rerank.FORMS:
        refines[form] = rerank.build(dim, form, base), rerank.Positions()
        refines[form][0].add_with_ids(base, ids)
    candidates = min(args.k * args.rerank, ann_max())
    print(f"| nprobe | re-rank | recall@{args.k} | re-rank RAM B/tile | re-rank ms/query |")
    print("|---|---|---|---|---|")
    for nprobe in args.nprobe:
        _, cand = ann.search(index, queries, candidates, nprobe)
        print(
            f"| {nprobe} | none (PQ scores) | {recall(ann.search(index, queries, args.k, nprobe)[1], want, args.k):.4f} | 0 | 0 |"
        )
        rows = [("float32 (exact rows)", lambda c, q: base[c] @ q, 4 * dim)]
        rows += [
            (form, lambda c, q, r=r, at=at: rerank.scores(r, c, q, at), faiss.downcast_index(r.index).code_size)
            for form, (r, at) in refines.items()
        ]
        for name, score, size in rows:
            got, start = [], time.perf_counter()
            for c, q in zip(cand, queries):
                c = c[c >= 0]
                got.append(c[np.argsort(-score(c, q))][: args.k])
            ms = (time.perf_counter() - start) * 1000 / len(queries)
            print(f"| {nprobe} | {name} | {recall(np.array(got), want, args.k):.4f} | {size} | {ms:.2f} |")
    served(base, queries, want, args.k, args.nprobe)


def served(base: np.ndarray, queries: np.ndarray, want: np.ndarray, k: int, nprobes: list[int]) -> None:
    """recall@k of TileIndex.search (what the Search RPC runs) over the same base, at the given nprobes."""
    from smily.index.faiss_index import IndexConfig, TileIndex
    from smily.index.shard import Query, TileBatch
    from smily.index.storage import Slide, Tile

    model, per_slide = "bench/1", 1000
    with tempfile.TemporaryDirectory() as tmp:
        # Threshold n: the last commit trains the automatic factory for n tiles, as above.
        index = TileIndex(tmp, IndexConfig(ivf_threshold=len(base), snapshot_interval_s=0))
        for s in range(0, len(base), per_slide):
            v = base[s : s + per_slide]
            sid = f"r-{s:08d}"
            tiles = [Tile(s + i, 0, 224, 224, 1.0) for i in range(len(v))]  # x: the tile's row in base
            index.stage(TileBatch(model, sid, "g", v, tiles))
            index.commit_slide(model, "g", Slide(sid, "x"), len(v))
        index.wait_trained()
        info = index.info()
        for nprobe in nprobes:
            got = np.array([[h.tile.x for h in index.search(Query(model, q, k, nprobe=nprobe))] for q in queries])
            print(
                f"| {nprobe} | served: TileIndex.search ({info.factory}, re-rank {index.config.rerank_form}) "
                f"| {recall(got, want, k):.4f} | | |"
            )
        index.close()


def ann_max() -> int:
    from smily.index.model_search import RERANK_MAX

    return RERANK_MAX


if __name__ == "__main__":
    main()
