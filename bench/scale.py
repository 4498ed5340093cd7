"""Index cluster benchmark on loopback: a private PostgreSQL, index replica processes.

Measures
- the store: load rate and PostgreSQL bytes per vector;
- a new replica catching up from the store (empty folder: process start, mirror
  and FAISS built from PostgreSQL), a restarted one catching up from its
  snapshot, each per million vectors; the replica's RAM (RSS) and disk per vector;
- searches per second through the gateway's shard router (smily.gateway.shards)
  with 1 and 2 replicas of one shard, and with the same vectors on 1 vs 2
  shards (after `reshard` 1 -> 2).

Every process shares this machine's cores: on a small machine the CPU is the
ceiling, so a second replica or shard adds no cores, only parallel work on the
same ones. Run on a machine with cores to spare per process to see them scale.

    .venv/bin/python bench/scale.py                  # 100,000 x 1280, ~5 min on 2 cores
    .venv/bin/python bench/scale.py --vectors 200000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np
import psycopg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from smily.common.channels import channel  # noqa: E402
from smily.common.tensors import to_tensor  # noqa: E402
from smily.gateway.shards import ShardedIndex  # noqa: E402
from smily.index.pg_store import PgStorage, schema  # noqa: E402
from smily.index.reshard import reshard  # noqa: E402
from smily.index.storage import Slide, Tile  # noqa: E402
from smily.index.v1 import index_pb2, index_pb2_grpc  # noqa: E402
from smily.localpg import LocalPostgres  # noqa: E402
from smily.localstack import free_port  # noqa: E402

MODEL = "bench/1"
TILES_PER_SLIDE = 1000


class Replica:
    """One `smily.index` process serving a shard of the store."""

    def __init__(self, url: str, shard: int, directory: str):
        self.port = free_port()
        self.directory = directory
        env = dict(
            os.environ,
            SMILY_INDEX_PORT=str(self.port),
            SMILY_INDEX_DIR=directory,
            SMILY_METRICS_PORT="0",
            SMILY_INDEX_DATABASE_URL=url,
            SMILY_INDEX_SHARD=str(shard),
            SMILY_PLAINTEXT="1",
            SMILY_LOG_LEVEL="WARNING",
            SMILY_BIND_HOST="127.0.0.1",
            SMILY_INDEX_FACTORY="Flat",
            SMILY_INDEX_SNAPSHOT_INTERVAL_S="300",
        )
        self.proc = subprocess.Popen([sys.executable, "-m", "smily.index"], env=env)
        self.channel = channel(f"127.0.0.1:{self.port}")
        self.stub = index_pb2_grpc.IndexServiceStub(self.channel)

    def info(self):
        return self.stub.GetIndexInfo(index_pb2.GetIndexInfoRequest(), timeout=5)

    def wait_seq(self, seq: int) -> float:
        """Seconds until the replica answers serving commit `seq`."""
        start = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit("an index replica exited")
            try:
                if self.info().journal_seq >= seq:
                    return time.perf_counter() - start
            except grpc.RpcError:  # not listening yet
                pass
            time.sleep(0.05)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def disk_mb(self) -> float:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(self.directory) for f in fs) / 2**20

    def stop(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(60)


def load(url: str, n: int, dim: int) -> float:
    """n random unit vectors into shard 0 as slides of TILES_PER_SLIDE; returns seconds."""
    store = PgStorage(url, 0)
    store.bind(MODEL, dim)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for s in range(0, n, TILES_PER_SLIDE):
        m = min(TILES_PER_SLIDE, n - s)
        v = rng.standard_normal((m, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        sid = f"bench-{s // TILES_PER_SLIDE:05d}"
        store.stage(sid, "g", [Tile(i, 0, 224, 224, 0.5) for i in range(m)], v)
        store.commit_slide("g", Slide(sid, "x", {}), m)
    store.close()
    return time.perf_counter() - start


def qps(index: ShardedIndex, queries: np.ndarray, seconds: float, threads: int) -> float:
    done, stop = [0] * threads, threading.Event()

    def loop(t: int) -> None:
        i = t
        while not stop.is_set():
            index.Search(
                index_pb2.SearchRequest(model_id=MODEL, query=to_tensor(queries[i % len(queries)]), k=10), timeout=60
            )
            done[t] += 1
            i += threads

    workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return sum(done) / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--seconds", type=float, default=10.0, help="per searches/s measurement")
    ap.add_argument("--threads", type=int, default=4, help="concurrent searches")
    args = ap.parse_args()
    n, per_m = args.vectors, 1e6 / args.vectors
    root = tempfile.mkdtemp(prefix="smily-scale-")
    pg_dir = tempfile.mkdtemp(prefix="smily-scale-pg-")  # its own folder: handed to another user as root
    pg = LocalPostgres(pg_dir, free_port()).start()
    replicas: list[Replica] = []
    try:
        url = pg.url
        print(f"{n} vectors x {args.dim} (Flat index), {os.cpu_count()} cores, {args.threads} concurrent searches")
        t = load(url, n, args.dim)
        with psycopg.connect(url) as conn:
            pg_bytes = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
            seq = conn.execute(f"SELECT value FROM {schema(0)}.seq").fetchone()[0]
        print(f"store: loaded in {t:.1f} s ({n / t:,.0f} vectors/s); PostgreSQL {pg_bytes / n:,.0f} B/vector")

        a = Replica(url, 0, os.path.join(root, "a"))
        replicas.append(a)
        t = a.wait_seq(seq)
        print(
            f"new replica from the store: {t:.1f} s = {t * per_m / 60:.1f} min per million vectors; "
            f"RSS {a.rss_mb() * 2**20 / n:,.0f} B/vector, disk {a.disk_mb() * 2**20 / n:,.0f} B/vector"
        )

        queries = np.random.default_rng(1).standard_normal((64, args.dim)).astype(np.float32)
        one = ShardedIndex([[a.stub]])
        qps(one, queries, 2, args.threads)  # warm-up
        q11 = qps(one, queries, args.seconds, args.threads)
        print(f"1 shard x 1 replica: {q11:.1f} searches/s")

        b = Replica(url, 0, os.path.join(root, "b"))
        replicas.append(b)
        t = b.wait_seq(seq)
        print(f"second new replica from the store: {t:.1f} s = {t * per_m / 60:.1f} min per million vectors")
        two = ShardedIndex([[a.stub, b.stub]])
        qps(two, queries, 2, args.threads)
        q12 = qps(two, queries, args.seconds, args.threads)
        print(f"1 shard x 2 replicas: {q12:.1f} searches/s ({q12 / q11:.2f}x)")
        b.stop()
        replicas.remove(b)
        b.channel.close()

        # Restart from the snapshot: SIGTERM writes one; the restart loads it and replays nothing.
        a.stop()
        replicas.remove(a)
        start = time.perf_counter()
        a = Replica(url, 0, a.directory)
        replicas.append(a)
        a.wait_seq(seq)
        t = time.perf_counter() - start
        print(f"restarted replica from its snapshot: {t:.1f} s = {t * per_m / 60:.1f} min per million vectors")

        start = time.perf_counter()
        moved = reshard(url, 1, 2)
        t_reshard = time.perf_counter() - start
        c = Replica(url, 1, os.path.join(root, "c"))
        replicas.append(c)
        with psycopg.connect(url) as conn:
            seqs = [conn.execute(f"SELECT value FROM {schema(s)}.seq").fetchone()[0] for s in range(2)]
        a.wait_seq(seqs[0])
        c.wait_seq(seqs[1])
        print(f"reshard 1 -> 2: {moved} of {n // TILES_PER_SLIDE} slides moved in {t_reshard:.1f} s")
        split = ShardedIndex([[a.stub], [c.stub]])
        qps(split, queries, 2, args.threads)
        q21 = qps(split, queries, args.seconds, args.threads)
        print(f"2 shards x 1 replica (same vectors split): {q21:.1f} searches/s ({q21 / q11:.2f}x)")
        for idx in (one, two, split):
            idx.close()
    finally:
        for r in replicas:
            r.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(pg_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
