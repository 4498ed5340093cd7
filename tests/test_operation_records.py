"""Operation records in the system of record: an index on PostgreSQL, two gateways sharing it and a
Redis of their own that is flushed, then stopped. Neither forgets an operation, and a cancel asked on
one still stops the ingest the other runs. The stores' expiry, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3

import grpc
import psycopg
import pytest
import redis

from smily import stack
from smily.client import Client
from smily.gateway.v1 import gateway_pb2
from smily.index.operations import OperationStore
from smily.index.pg_store import PgOperations, PgStorage
from smily.localstack import start_redis

from .conftest import CMU, TEST_SLIDES, base_settings, rpc_code
from .helpers.pg import fresh_database, postgres  # noqa: F401 (fixture)
from .helpers.wait import wait_done, wait_until

State = gateway_pb2.OperationState


def _op(client: Client, operation_id: str) -> gateway_pb2.Operation:
    return client.stub.GetOperation(gateway_pb2.GetOperationRequest(operation_id=operation_id)).operation


@pytest.fixture
def cluster(postgres, slide_dir, scratch_root, model_repo, tmp_path):  # noqa: F811 (fixture)
    """tiler, embedder, an index on PostgreSQL, and gateways A (one slow ingest at a time: one tile per
    batch) and B, with a Redis of their own (this test stops it)."""
    proc, redis_url = start_redis()
    assert proc is not None, "redis-server is missing: apt-get install redis-server"
    url = fresh_database(postgres)
    base = base_settings(
        slide_roots=(slide_dir, scratch_root),
        model_repository=model_repo,
        index_dir=str(tmp_path / "index"),
        index_database_url=url,
        redis_url=redis_url,
    )
    backends, settings = stack.start(["tiler", "embedder", "index"], base)
    a_running, a = stack.start(["gateway"], settings.replace(max_concurrent_ingests=1, embed_batch=1))
    b_running, b = stack.start(["gateway"], settings.replace(gateway_port=0))
    ca, cb = Client(f"127.0.0.1:{a.gateway.gateway_port}"), Client(f"127.0.0.1:{b.gateway.gateway_port}")
    yield ca, cb, proc, redis_url, url
    ca.close()
    cb.close()
    for running in (b_running, a_running, backends):
        stack.stop(running, 0)
    if proc.poll() is None:
        proc.terminate()
    proc.wait()


def test_operations_live_in_postgresql_and_outlive_redis(cluster):
    a, b, redis_proc, redis_url, url = cluster
    op = a.ingest(CMU, "records-running")
    running = wait_until(
        "B reports A's ingest progressing",
        lambda: (seen := _op(b, op.operation_id)).progress.tiles_embedded and seen,
        poll_s=0.01,
    )
    assert running.state == State.OPERATION_STATE_RUNNING
    with psycopg.connect(url) as conn:  # the record is in the system of record, not only in Redis
        row = conn.execute("SELECT COUNT(*) FROM shard_0.operations WHERE operation_id = %s", (op.operation_id,))
        assert row.fetchone()[0] == 1

    # Redis forgets everything, then goes away: B still answers, with A's progress.
    redis.Redis.from_url(redis_url).flushall()
    assert _op(b, op.operation_id).state == State.OPERATION_STATE_RUNNING
    redis_proc.terminate()
    redis_proc.wait()
    later = wait_until(
        "B reports more progress without Redis",
        lambda: (seen := _op(b, op.operation_id)).progress.tiles_embedded > running.progress.tiles_embedded and seen,
        poll_s=0.01,
    )
    assert later.state == State.OPERATION_STATE_RUNNING

    # A cancel asked on B reaches A, which stops between two batches.
    assert b.cancel(op.operation_id).cancel_requested
    assert wait_done(b, op, poll_s=0.05).state == State.OPERATION_STATE_CANCELLED
    assert _op(a, op.operation_id).state == State.OPERATION_STATE_CANCELLED
    assert "records-running" not in {s.slide_id for s in b.slides()}

    # A finished ingest reads the same on both, Redis still down.
    done = wait_done(b, a.ingest(TEST_SLIDES[0].name, "records-done"))
    assert done.state == State.OPERATION_STATE_SUCCEEDED and done.progress.tiles_indexed > 0
    assert _op(a, done.operation_id) == done
    assert rpc_code(_op, b, "nope") == rpc_code(b.cancel, "nope") == grpc.StatusCode.NOT_FOUND


def test_sqlite_records_expire_and_are_purged(tmp_path):
    store = OperationStore(str(tmp_path))
    store.put("old", b"r", b"", keep_s=0.01)  # this process's first write purges (nothing yet)
    store.put("kept", b"r", b"c", keep_s=3600)
    wait_until("the short record expires", lambda: store.get("old") is None)
    assert store.get("kept") == (b"r", b"c")
    store.close()
    # The next process's first write purges what expired.
    again = OperationStore(str(tmp_path))
    again.put("new", b"r", b"", keep_s=3600)
    again.close()
    with sqlite3.connect(str(tmp_path / "operations.sqlite3")) as db:
        assert sorted(r[0] for r in db.execute("SELECT operation_id FROM operations")) == ["kept", "new"]


def test_postgresql_records_expire_and_are_purged(postgres):  # noqa: F811 (fixture)
    url = fresh_database(postgres)
    PgStorage(url, 0).close()  # the shard's schema, as an index replica makes it
    store = PgOperations(url, 0)
    store.put("old", b"r", b"", keep_s=0.01)
    store.put("kept", b"r", b"", keep_s=3600)
    store.put("kept", b"", b"c", keep_s=3600)
    wait_until("the short record expires", lambda: store.get("old") is None)
    assert store.get("kept") == (b"r", b"c")
    store.close()
    again = PgOperations(url, 0)
    again.put("new", b"r", b"", keep_s=3600)
    again.close()
    with psycopg.connect(url) as conn:
        ids = [r[0] for r in conn.execute("SELECT operation_id FROM shard_0.operations ORDER BY operation_id")]
    assert ids == ["kept", "new"]
