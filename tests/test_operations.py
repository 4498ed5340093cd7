"""Ingest operations seen from every gateway replica (shared through Redis)."""

from __future__ import annotations

import time

import grpc
import pytest
import redis

from smily import stack
from smily.client import Client
from smily.gateway.cache import RedisGuard
from smily.gateway.operations import FINISHED, STALE_S, SharedOperations
from smily.gateway.v1 import gateway_pb2

from .conftest import CMU, TEST_SLIDES, rpc_code
from .helpers.wait import wait_done, wait_until

State = gateway_pb2.OperationState


def _op(client: Client, operation_id: str) -> gateway_pb2.Operation:
    return client.stub.GetOperation(gateway_pb2.GetOperationRequest(operation_id=operation_id)).operation


@pytest.fixture
def two_gateways(settings):
    """A: one slow ingest at a time (one tile per batch); B: any other replica."""
    a_running, a = stack.start(["gateway"], settings.replace(gateway_port=0, max_concurrent_ingests=1, embed_batch=1))
    b_running, b = stack.start(["gateway"], settings.replace(gateway_port=0))
    ca, cb = Client(f"127.0.0.1:{a.gateway.gateway_port}"), Client(f"127.0.0.1:{b.gateway.gateway_port}")
    yield ca, cb, a_running
    ca.close()
    cb.close()
    stack.stop(b_running, 0)
    stack.stop(a_running, 0)


def test_any_replica_reports_and_cancels_an_ingest(two_gateways):
    a, b, _ = two_gateways
    running = a.ingest(CMU, "shared-running")
    queued = a.ingest(TEST_SLIDES[0].name, "shared-queued")
    assert _op(b, queued.operation_id).state == State.OPERATION_STATE_QUEUED

    def progressed():  # as A reports it
        latest = _op(b, running.operation_id)
        return latest if latest.progress.tiles_embedded else None

    op = wait_until("the running ingest reports progress", progressed, poll_s=0.01)
    assert op.state == State.OPERATION_STATE_RUNNING and op.updated_at > time.time() - 60
    # Cancels asked on B: A stops the running one between batches and never starts the queued one.
    assert b.cancel(queued.operation_id).cancel_requested
    assert b.cancel(running.operation_id).cancel_requested
    assert wait_done(b, op, poll_s=0.05).state == State.OPERATION_STATE_CANCELLED
    assert wait_done(b, queued, poll_s=0.05).state == State.OPERATION_STATE_CANCELLED
    assert _op(a, running.operation_id).state == State.OPERATION_STATE_CANCELLED
    assert not {"shared-running", "shared-queued"} & {s.slide_id for s in b.slides()}
    # A finished ingest reads the same on both.
    done = wait_done(b, a.ingest(TEST_SLIDES[0].name, "shared-done"))
    assert done.state == State.OPERATION_STATE_SUCCEEDED and done.progress.tiles_indexed > 0
    assert _op(a, done.operation_id) == done
    assert b.delete("shared-done") > 0
    assert rpc_code(b.cancel, "nope") == rpc_code(_op, b, "nope") == grpc.StatusCode.NOT_FOUND


def test_a_stopped_replica_fails_its_ingests_for_the_others(two_gateways):
    a, b, a_running = two_gateways
    op = a.ingest(CMU, "shared-stopped")
    wait_until("the ingest reports progress", lambda: _op(b, op.operation_id).progress.tiles_embedded, poll_s=0.01)
    stack.stop(a_running, 0)  # a rolling update takes A away mid-ingest
    seen = _op(b, op.operation_id)
    assert seen.state == State.OPERATION_STATE_FAILED and seen.error_code == "UNAVAILABLE"
    assert "ingest the slide again" in seen.error_message


def test_an_operation_whose_replica_died_goes_stale(settings, client):
    # What a replica killed without a chance to say so leaves behind.
    ghost = gateway_pb2.Operation(
        operation_id="ghost", slide_id="x", state=State.OPERATION_STATE_RUNNING, updated_at=time.time() - STALE_S - 1
    )
    # Written as a replica writes it, with the shared key.
    SharedOperations(RedisGuard(settings.gateway.redis_url, 1.0), settings.gateway.cache_key.encode()).publish(
        ghost, frozenset()
    )
    seen = _op(client, "ghost")
    assert seen.state == State.OPERATION_STATE_FAILED and seen.error_code == "UNAVAILABLE"
    assert client.cancel("ghost").state == State.OPERATION_STATE_FAILED  # nothing left to cancel


def test_a_redis_writer_without_the_key_cannot_forge_an_operation_or_cancel_an_ingest(settings, two_gateways):
    a, b, _ = two_gateways
    r = redis.Redis.from_url(settings.gateway.redis_url)
    forged = gateway_pb2.Operation(
        operation_id="forged", slide_id="x", state=State.OPERATION_STATE_SUCCEEDED, updated_at=time.time()
    )
    r.set("smily:op:forged", forged.SerializeToString(), ex=60)
    assert rpc_code(_op, b, "forged") == grpc.StatusCode.NOT_FOUND
    # A genuine record copied under another operation's key fails its HMAC too.
    op = a.ingest(CMU, "forged-cancel")
    r.set("smily:op:copied", r.get(f"smily:op:{op.operation_id}"), ex=60)
    assert rpc_code(_op, b, "copied") == grpc.StatusCode.NOT_FOUND
    # A cancel flag without the HMAC: the ingest runs on past several batches (A checks between each).
    r.set(f"smily:op:{op.operation_id}:cancel", b"1", ex=60)
    seen = _op(b, op.operation_id)
    while seen.state not in FINISHED and seen.progress.tiles_embedded < 3:
        time.sleep(0.01)
        seen = _op(b, op.operation_id)
    assert seen.state == State.OPERATION_STATE_RUNNING and not seen.cancel_requested
    # A cancel asked through a replica still stops it.
    b.cancel(op.operation_id)
    assert b.wait(seen, poll_s=0.05, deadline_s=300).state == State.OPERATION_STATE_CANCELLED
