"""Bytes per tile: PostgreSQL, a serving replica's RAM and its disk, measured.

Writes --n tiles (slides of 1,000, random unit vectors at --dim) through
PgStorage into a fresh local PostgreSQL, follows them with a Replica (its
SQLite mirror and FAISS index on disk). The IVF threshold defaults to --n, so
the replica trains the automatic factory for n tiles (IVF{sqrt n},PQ64 at
1280-d) once it has caught up, as bench/index.py's configuration; then reports:

- PostgreSQL: pg_total_relation_size of the shard's tables (heap, TOAST, indexes) / n;
- replica RAM: the serialised FAISS index plus its re-rank vectors / n (what the
  replica holds in memory for search, centroids included), and the process's
  RSS growth from before the replica opened to after it trained (heap left by
  the catch-up included);
- replica disk: the SQLite mirror plus the snapshot files / n.

Bytes do not depend on the vectors' content: random unit vectors suffice.
Needs about 9 GB of free disk per million 1280-d tiles while it runs (removed after).

    nice -n 10 .venv/bin/python bench/bytes.py --n 1000000 [--dim 256]
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import psutil
import psycopg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from smily.index.faiss_index import IndexConfig  # noqa: E402
from smily.index.pg_store import PgStorage, schema  # noqa: E402
from smily.index.replica import Replica  # noqa: E402
from smily.index.storage import Slide, Tile  # noqa: E402
from smily.localpg import LocalPostgres  # noqa: E402
from smily.localstack import free_port  # noqa: E402

PER_SLIDE = 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--threshold", type=int, help="SMILY_INDEX_IVF_THRESHOLD for this run (default --n)")
    ap.add_argument("--rerank-form", default="fp16")
    args = ap.parse_args()
    threshold = args.n if args.threshold is None else args.threshold
    print(f"load average before the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        pg_dir = tempfile.mkdtemp(prefix="smily-bytes-pg-")  # its own folder: the server runs as another user
        pg = LocalPostgres(pg_dir, free_port()).start()
        try:
            store = PgStorage(pg.url, 0)
            store.bind("bench/1", args.dim)
            start = time.perf_counter()
            for s in range(0, args.n, PER_SLIDE):
                v = rng.standard_normal((PER_SLIDE, args.dim)).astype(np.float32)
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                sid = f"b-{s:09d}"
                store.stage(sid, "g", [Tile(i, 0, 224, 224, 1.0, 1.0) for i in range(PER_SLIDE)], v)
                store.commit_slide("g", Slide(sid, "x"), PER_SLIDE)
            written = time.perf_counter() - start
            with psycopg.connect(pg.url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")
                pg_bytes = conn.execute(
                    "SELECT SUM(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n "
                    "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
                    (schema(0),),
                ).fetchone()[0]
            config = IndexConfig(ivf_threshold=threshold, snapshot_interval_s=0, rerank_form=args.rerank_form)
            replica_dir = os.path.join(tmp, "replica")
            me = psutil.Process()
            gc.collect()
            rss_before = me.memory_info().rss
            start = time.perf_counter()
            replica = Replica(replica_dir, config, pg.url, 0)
            replica.local.wait_trained(3600)
            followed = time.perf_counter() - start
            gc.collect()
            rss = me.memory_info().rss - rss_before
            info = replica.info()
            replica.close()  # writes the snapshot
            faiss_files = glob.glob(os.path.join(replica_dir, "*.faiss"))
            ram = sum(os.path.getsize(f) for f in faiss_files)
            refine = sum(os.path.getsize(f) for f in faiss_files if os.path.basename(f).startswith("refine-"))
            files = [os.path.join(d, f) for d, _, names in os.walk(replica_dir) for f in names]
            disk = sum(os.path.getsize(f) for f in files)
            mirror = sum(os.path.getsize(f) for f in files if not f.endswith(".faiss"))
            store.close()
        finally:
            pg.stop()
            shutil.rmtree(pg_dir, ignore_errors=True)
    n = args.n
    print(
        f"{n} tiles x {args.dim}, {info.factory}, re-rank form {args.rerank_form}; written in {written:.0f} s, "
        f"replica built in {followed:.0f} s"
    )
    print("| where | bytes per tile |")
    print("|---|---:|")
    print(f"| PostgreSQL (heap + TOAST + indexes) | {pg_bytes / n:,.0f} |")
    print(f"| replica RAM: IVF-PQ index | {(ram - refine) / n:,.0f} |")
    print(f"| replica RAM: re-rank vectors | {refine / n:,.0f} |")
    print(f"| replica RAM: process RSS growth (open, catch up, train) | {rss / n:,.0f} |")
    print(f"| replica disk: SQLite mirror (and what is not a snapshot) | {mirror / n:,.0f} |")
    print(f"| replica disk: snapshot files | {(disk - mirror) / n:,.0f} |")
    print(f"| replica disk, total | {disk / n:,.0f} |")


if __name__ == "__main__":
    main()
