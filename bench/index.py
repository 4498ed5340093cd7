"""Index benchmark: exact vs the automatic IVF-PQ configuration, with re-ranking.

Vectors are synthetic but clustered like real embeddings: CNN embeddings of
tissue tiles vary along few directions (their PCA spectrum decays fast; see
--latent), so points are drawn from a Gaussian mixture of --clusters centres in
a --latent-dimensional space, mapped to the model's dimension by a fixed random
linear map, plus small isotropic noise, and L2-normalised. Queries are fresh
draws from the same mixture. Exact vectors for re-ranking live on
disk as a float16 memmap (the service re-ranks from SQLite instead), so the
RAM per vector of the ANN configuration is its codes and ids only.

    .venv/bin/python bench/index.py                 # 1,000,000 x 1280
    .venv/bin/python bench/index.py --n 100000      # quick look
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import faiss
import numpy as np

from smily.index import ann

CHUNK = 50_000


def mixture(rng, centres, lift, n, spread, noise):
    c = rng.integers(0, len(centres), n)
    z = centres[c] + spread[c, None] * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    x = z @ lift + rng.standard_normal((n, lift.shape[1]), dtype=np.float32) * noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def single_query_qps(fn, queries) -> float:
    start = time.perf_counter()
    for q in queries:
        fn(q[None])
    return len(queries) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--latent", type=int, default=64, help="dimensions the embeddings vary along")
    ap.add_argument("--noise", type=float, default=0.002, help="isotropic noise per dimension")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--timed-exact", type=int, default=20, help="single queries timed on the exact index")
    ap.add_argument("--train", type=int, default=64_000)
    ap.add_argument("--threshold", type=int, default=200_000)
    ap.add_argument("--factory", default="", help="FAISS factory string; default: the service's automatic choice")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, d, k = args.n, args.dim, 10
    centres = rng.standard_normal((args.clusters, args.latent), dtype=np.float32)
    lift = rng.standard_normal((args.latent, d), dtype=np.float32) / np.sqrt(d)
    spread = rng.uniform(0.2, 0.5, args.clusters).astype(np.float32)
    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; n={n} dim={d}, "
        f"{args.clusters} clusters in {args.latent} latent dimensions, noise {args.noise}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        disk = np.lib.format.open_memmap(os.path.join(tmp, "vectors.f16.npy"), "w+", np.float16, (n, d))
        exact = faiss.IndexFlatIP(d)
        t0 = time.perf_counter()
        for s in range(0, n, CHUNK):
            x = mixture(rng, centres, lift, min(CHUNK, n - s), spread, args.noise)
            disk[s : s + len(x)] = x
            exact.add(x)
        disk.flush()
        print(f"generated and added to exact index: {time.perf_counter() - t0:.1f}s")
        queries = mixture(rng, centres, lift, args.queries, spread, args.noise)
        t0 = time.perf_counter()
        _, truth = exact.search(queries, k)
        batch_exact = args.queries / (time.perf_counter() - t0)
        exact_qps = single_query_qps(lambda q, flat=exact: flat.search(q, k), queries[: args.timed_exact])
        print(
            f"exact: {exact_qps:.2f} q/s single query, {batch_exact:.1f} q/s in one batch of {args.queries}; "
            f"{exact.ntotal * d * 4 / n:.0f} B/vector"
        )
        del exact

        factory = args.factory or ann.auto_factory(n, d, args.threshold)
        sample = np.asarray(disk[np.sort(rng.choice(n, min(args.train, n), replace=False))], np.float32)
        rss0 = rss_mb()
        index, train_s = ann.build(factory, d, sample)
        t0 = time.perf_counter()
        for s in range(0, n, CHUNK):
            index.add_with_ids(
                np.asarray(disk[s : s + CHUNK], np.float32), np.arange(s, min(s + CHUNK, n), dtype=np.int64)
            )
        add_s = time.perf_counter() - t0
        bytes_per_vector = faiss.serialize_index(index).size / n
        print(
            f"{factory}: trained on {len(sample)} in {train_s:.1f}s, added {n} in {add_s:.1f}s; "
            f"{bytes_per_vector:.1f} B/vector in RAM (serialised size; max RSS grew {rss_mb() - rss0:.0f} MB)"
        )

        def ann_search(q, nprobe, rerank):
            _, cand = ann.search(index, q, max(k, rerank), nprobe)
            ids = np.sort(cand[0][cand[0] >= 0])
            if rerank <= k:
                return cand[0][:k]
            scores = np.asarray(disk[ids], np.float32) @ q[0]
            return ids[np.argsort(-scores)[:k]]

        print("| nprobe | re-rank candidates | recall@10 | q/s (single query) | x exact |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for nprobe in (16, 64):
            for rerank in (0, 200, 1000, 2000):
                got = [ann_search(q[None], nprobe, rerank) for q in queries]
                recall = np.mean([len(set(g) & set(t)) / k for g, t in zip(got, truth)])
                qps = single_query_qps(lambda q, p=nprobe, r=rerank: ann_search(q, p, r), queries)
                print(f"| {nprobe} | {rerank or 'none'} | {recall:.3f} | {qps:.0f} | {qps / exact_qps:.0f} |")
        print(
            f"projection (codes+ids grow linearly, centroids {ann.nlist(index) * d * 4 / 1e6:.1f} MB): "
            f"10M -> {bytes_per_vector * 1e7 / 2**30:.2f} GiB, 100M -> {bytes_per_vector * 1e8 / 2**30:.2f} GiB; "
            f"exact float32 would be {d * 4e7 / 2**30:.0f} / {d * 4e8 / 2**30:.0f} GiB"
        )


if __name__ == "__main__":
    main()
