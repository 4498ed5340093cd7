"""2 shards x 2 replica processes on a real PostgreSQL, behind the gateway's shard router.

They answer as one index; a SIGKILLed replica fails no search; with PostgreSQL
stopped, searches go on and ingests fail UNAVAILABLE until it is back; a shard
with no live replica is named, or left out when the search allows a partial
answer; resharding 2 -> 3 moves slides without losing or doubling any.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import psycopg
import pytest

from smily import stack
from smily.common import tenancy
from smily.common.channels import channel
from smily.common.errors import Unavailable
from smily.common.placement import shard_of, shard_of_slide
from smily.common.tensors import to_tensor
from smily.gateway.shards import ShardedIndex, connect
from smily.index.faiss_index import IndexConfig
from smily.index.pg_store import PgStorage, schema
from smily.index.replica import Replica
from smily.index.reshard import reshard
from smily.index.storage import Slide, Tile
from smily.index.v1 import index_pb2, index_pb2_grpc
from smily.localstack import free_port

from .conftest import ROOT, base_settings
from .helpers.pg import fresh_database, postgres  # noqa: F401 (fixture)

MODEL = "m/1"
DIM = 16
SLIDES = 16


def start_replica(url: str, shard: int, directory: str, port: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        SMILY_INDEX_PORT=str(port),
        SMILY_INDEX_DIR=directory,
        SMILY_METRICS_PORT="0",
        SMILY_INDEX_DATABASE_URL=url,
        SMILY_INDEX_SHARD=str(shard),
        SMILY_INDEX_SNAPSHOT_INTERVAL_S="0.5",
        SMILY_LOG_LEVEL="WARNING",
        SMILY_PLAINTEXT="1",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "smily.cli", "serve", "index"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(directory + ".log"), "ab"),
    )


def wait_ready(target: str, proc: subprocess.Popen) -> None:
    stub = index_pb2_grpc.IndexServiceStub(ch := channel(target))
    deadline = time.monotonic() + 90
    try:
        while True:
            assert proc.poll() is None, "an index replica exited on its own"
            try:
                stub.GetIndexInfo(index_pb2.GetIndexInfoRequest(), timeout=2)
                return
            except grpc.RpcError:
                assert time.monotonic() < deadline, "an index replica did not come up"
                time.sleep(0.1)
    finally:
        ch.close()


def vectors(i: int) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal((10, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def ingest(index, sid: str, v: np.ndarray, meta: dict, generation: str = "g") -> None:
    rects = [index_pb2.TileRect(x=i, y=0, width=1, height=1, mpp=1.0) for i in range(len(v))]
    index.AddTiles(
        index_pb2.AddTilesRequest(
            model_id=MODEL, slide_id=sid, generation=generation, tiles=rects, embeddings=to_tensor(v)
        )
    )
    index.CommitSlide(
        index_pb2.CommitSlideRequest(
            model_id=MODEL,
            generation=generation,
            expected_tiles=len(v),
            slide=index_pb2.Slide(slide_id=sid, source="x", metadata=meta),
        )
    )


def search(index, q, k=25, **kw):
    hits = index.Search(index_pb2.SearchRequest(model_id=MODEL, query=to_tensor(q), k=k, **kw)).hits
    return [(h.slide_id, h.tile.x, round(h.score, 5)) for h in hits]


class Cluster:
    def __init__(self, url: str, root: str, shards: int = 2, replicas: int = 2):
        self.url, self.root = url, root
        self.targets = [[f"127.0.0.1:{free_port()}" for _ in range(replicas)] for _ in range(shards)]
        self.procs = {}
        for shard, group in enumerate(self.targets):
            for r in range(len(group)):
                self.start(shard, r)
        for (shard, r), proc in self.procs.items():
            wait_ready(self.targets[shard][r], proc)
        self.index, shards = connect(["|".join(t) for t in self.targets])
        self.channels = [ch for replicas in shards for ch in replicas]

    def start(self, shard: int, r: int, directory: str | None = None) -> None:
        port = int(self.targets[shard][r].rsplit(":", 1)[1])
        directory = directory or os.path.join(self.root, f"s{shard}r{r}")
        self.procs[shard, r] = start_replica(self.url, shard, directory, port)

    def restart(self, shard: int, r: int, directory: str | None = None) -> None:
        self.start(shard, r, directory)
        wait_ready(self.targets[shard][r], self.procs[shard, r])

    def kill(self, shard: int, r: int) -> None:
        self.procs[shard, r].send_signal(signal.SIGKILL)
        self.procs[shard, r].wait()

    def replica(self, shard: int, r: int):
        ch = channel(self.targets[shard][r])
        self.channels.append(ch)
        return index_pb2_grpc.IndexServiceStub(ch)

    def close(self) -> None:
        self.index.close()
        for ch in self.channels:
            ch.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory):  # noqa: F811
    root = str(tmp_path_factory.mktemp("cluster"))
    c = Cluster(fresh_database(postgres), root)
    srv, settings = stack.start(
        ["index"], base_settings(index_dir=os.path.join(root, "single"), index_snapshot_interval_s=0)
    )
    single_ch = channel(settings.index.index_target)
    single = ShardedIndex([index_pb2_grpc.IndexServiceStub(single_ch)])
    try:
        for i in range(SLIDES):
            meta = {"organ": ["lung", "skin"][i % 2]}
            for index in (c.index, single):
                ingest(index, f"slide-{i:02d}", vectors(i), meta)
        yield c, single
    finally:
        single.close()
        single_ch.close()
        stack.stop(srv, 0)
        c.close()


QUERIES = np.random.default_rng(99).standard_normal((6, DIM)).astype(np.float32)


def test_two_shards_of_two_replicas_answer_as_one_index(cluster):
    c, single = cluster
    for shard in range(2):  # both replicas of a shard serve the same slides, and each shard a part
        counts = [c.replica(shard, r).GetIndexInfo(index_pb2.GetIndexInfoRequest()).slide_count for r in range(2)]
        assert counts[0] == counts[1] > 0
    assert c.index.GetIndexInfo(index_pb2.GetIndexInfoRequest()).slide_count == SLIDES
    for q in QUERIES:
        for kw in ({}, {"filters": {"organ": "skin"}}, {"exclude_slide_ids": ["slide-00", "slide-05"]}):
            assert search(c.index, q, **kw) == search(single, q, **kw), kw


def test_sigkill_of_a_replica_fails_no_search(cluster):
    c, single = cluster
    expected = [search(single, q) for q in QUERIES]
    for n in range(120):
        if n == 20:
            c.kill(0, 1)
        assert search(c.index, QUERIES[n % len(QUERIES)]) == expected[n % len(QUERIES)]
    c.restart(0, 1)  # catches up from its snapshot and the store
    # A fresh replica (empty folder) of shard 1 catches up from the store and answers as its sibling does.
    c.kill(1, 1)
    c.restart(1, 1, os.path.join(c.root, "fresh"))
    for q in QUERIES:
        assert search(c.replica(1, 1), q) == search(c.replica(1, 0), q)
        assert search(c.replica(0, 1), q) == search(c.replica(0, 0), q)


def test_postgres_down_searches_go_on_ingests_unavailable(cluster, postgres):  # noqa: F811
    c, single = cluster
    expected = [search(single, q) for q in QUERIES]
    postgres.stop()
    try:
        for n in range(30):
            assert search(c.index, QUERIES[n % len(QUERIES)]) == expected[n % len(QUERIES)]
        with pytest.raises(grpc.RpcError) as err:
            ingest(c.index, "late", vectors(50), {"organ": "lung"})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # The replicas are up: the message names the database, not the shard's replicas.
        assert "the index database is unreachable" in err.value.details()
        assert "no live replica" not in err.value.details()
    finally:
        postgres.start()
    ingest(c.index, "late", vectors(50), {"organ": "lung"})  # the retry succeeds
    ingest(single, "late", vectors(50), {"organ": "lung"})
    for q in QUERIES:
        assert search(c.index, q) == search(single, q)


def test_a_replica_started_before_its_database_waits_for_it(postgres, tmp_path):  # noqa: F811
    """In a cluster the index pods may start before PostgreSQL listens: the replica waits
    (replica.DATABASE_WAIT_S) instead of exiting into a crash-loop back-off."""
    url = fresh_database(postgres)
    PgStorage(url, 0).close()
    postgres.stop()
    started = threading.Timer(3.0, postgres.start)
    started.start()
    try:
        replica = Replica(str(tmp_path / "r"), IndexConfig(snapshot_interval_s=0), url, 0)
    finally:
        started.join()
    try:
        assert replica.store.seq() == 0
    finally:
        replica.close()


def test_a_shard_without_replicas_is_named_or_left_out(cluster):
    c, single = cluster
    c.kill(1, 0)
    c.kill(1, 1)
    try:
        with pytest.raises(Unavailable, match="index shard 1 has no live replica"):
            search(c.index, QUERIES[0])
        reply = c.index.Search(
            index_pb2.SearchRequest(model_id=MODEL, query=to_tensor(QUERIES[0]), k=50, allow_partial=True)
        )
        assert list(reply.missing_shards) == [1]
        assert reply.hits and all(shard_of_slide(h.tenant, h.slide_id, 2) == 0 for h in reply.hits)
    finally:
        c.restart(1, 0)
        c.restart(1, 1)


def test_reshard_two_to_three_moves_each_slide_once(postgres, tmp_path):  # noqa: F811
    url = fresh_database(postgres)
    stores = [PgStorage(url, s) for s in range(2)]
    placed = {}
    for i in range(30):
        # Stored under its index key, as the gateway stores a slide (tenancy.key).
        sid = tenancy.key(tenancy.DEFAULT, f"r-{i:02d}")
        store = stores[shard_of(sid, 2)]
        store.bind(MODEL, DIM)
        store.stage(sid, "g", [Tile(j, 0, 1, 1, 1.0) for j in range(10)], vectors(i), MODEL)
        store.commit_slide("g", Slide(sid, "x", {"n": str(i)}), 10, MODEL)
        placed[sid] = vectors(i)
    follower = Replica(str(tmp_path / "r0"), IndexConfig(snapshot_interval_s=0), url, 0)
    moved = reshard(url, 2, 3)
    assert 0 < moved < 30
    held = {}
    with psycopg.connect(url) as conn:
        for s in range(3):
            for sid, count in conn.execute(f"SELECT slide_id, tile_count FROM {schema(s)}.slides"):
                assert sid not in held and shard_of(sid, 3) == s and count == 10
                held[sid] = s
                vecs = [
                    bytes(r[0])
                    for r in conn.execute(
                        f"SELECT vector FROM {schema(s)}.tiles WHERE slide_id = %s ORDER BY x", (sid,)
                    )
                ]
                assert b"".join(vecs) == placed[sid].astype(np.float16).tobytes()  # stored as float16
    assert sorted(held) == sorted(placed)
    follower.catch_up()  # shard 0's replica drops what moved away
    assert follower.counts() == (10 * sum(1 for s in held.values() if s == 0), sum(1 for s in held.values() if s == 0))
    follower.close()
    for store in stores:
        store.close()
