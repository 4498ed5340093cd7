"""Ingest operations seen from every gateway replica, shared through the index (its SQLite store
here; test_operation_records.py: PostgreSQL, with Redis flushed and stopped), with no Redis at all."""

from __future__ import annotations

import time

import grpc
import pytest

from smily import stack
from smily.client import Client
from smily.common.channels import channel
from smily.gateway.backends import Backend
from smily.gateway.operations import FINISHED, KEEP_S, STALE_S, SharedOperations
from smily.gateway.v1 import gateway_pb2
from smily.index.v1 import index_pb2, index_pb2_grpc

from .conftest import CMU, TEST_SLIDES, rpc_code
from .helpers.wait import wait_done, wait_until

State = gateway_pb2.OperationState


def _op(client: Client, operation_id: str) -> gateway_pb2.Operation:
    return client.stub.GetOperation(gateway_pb2.GetOperationRequest(operation_id=operation_id)).operation


@pytest.fixture
def index(settings):
    """The index's own API, as a writer to its store (not a gateway) uses it."""
    ch = channel(settings.index.index_target)
    yield index_pb2_grpc.IndexServiceStub(ch)
    ch.close()


@pytest.fixture
def two_gateways(settings):
    """A: one slow ingest at a time (one tile per batch); B: any other replica. Neither has Redis:
    what they share goes through the index."""
    alone = settings.replace(gateway_port=0, redis_url="")
    a_running, a = stack.start(["gateway"], alone.replace(max_concurrent_ingests=1, embed_batch=1))
    b_running, b = stack.start(["gateway"], alone)
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


def test_an_operation_whose_replica_died_goes_stale(settings, client, index):
    # What a replica killed without a chance to say so leaves behind.
    ghost = gateway_pb2.Operation(
        operation_id="ghost", slide_id="x", state=State.OPERATION_STATE_RUNNING, updated_at=time.time() - STALE_S - 1
    )
    # Written as a replica writes it, with the shared key.
    SharedOperations(Backend("index", index), settings.gateway.cache_key.encode()).publish(ghost, frozenset())
    seen = _op(client, "ghost")
    assert seen.state == State.OPERATION_STATE_FAILED and seen.error_code == "UNAVAILABLE"
    assert client.cancel("ghost").state == State.OPERATION_STATE_FAILED  # nothing left to cancel


def test_an_index_writer_without_the_key_cannot_forge_an_operation_or_cancel_an_ingest(index, two_gateways):
    a, b, _ = two_gateways

    def put(operation_id: str, record: bytes = b"", cancel: bytes = b"") -> None:
        index.PutOperationRecord(
            index_pb2.PutOperationRecordRequest(operation_id=operation_id, record=record, cancel=cancel, keep_s=60)
        )

    def stored(operation_id: str) -> index_pb2.GetOperationRecordResponse:
        return index.GetOperationRecord(index_pb2.GetOperationRecordRequest(operation_id=operation_id))

    forged = gateway_pb2.Operation(
        operation_id="forged", slide_id="x", state=State.OPERATION_STATE_SUCCEEDED, updated_at=time.time()
    )
    put("forged", forged.SerializeToString())
    assert stored("forged").found
    assert rpc_code(_op, b, "forged") == grpc.StatusCode.NOT_FOUND
    # A genuine record copied under another operation's id fails its HMAC too.
    op = a.ingest(CMU, "forged-cancel")
    put("copied", stored(op.operation_id).record)
    assert rpc_code(_op, b, "copied") == grpc.StatusCode.NOT_FOUND
    # A cancel mark without the HMAC: the ingest runs on past several batches (A checks between each).
    put(op.operation_id, cancel=b"1")
    assert stored(op.operation_id).cancel == b"1"
    seen = _op(b, op.operation_id)
    while seen.state not in FINISHED and seen.progress.tiles_embedded < 3:
        time.sleep(0.01)
        seen = _op(b, op.operation_id)
    assert seen.state == State.OPERATION_STATE_RUNNING and not seen.cancel_requested
    # A cancel asked through a replica still stops it.
    b.cancel(op.operation_id)
    assert b.wait(seen, poll_s=0.05, deadline_s=300).state == State.OPERATION_STATE_CANCELLED


def test_the_index_keeps_records_for_a_while_and_checks_what_it_is_given(index):
    def put(**fields) -> None:
        index.PutOperationRecord(index_pb2.PutOperationRecordRequest(**fields))

    put(operation_id="kept", record=b"r1", keep_s=KEEP_S)
    put(operation_id="kept", cancel=b"c", keep_s=KEEP_S)  # marks it, keeping the record
    put(operation_id="kept", record=b"r2", keep_s=KEEP_S)  # replaces the record, keeping the mark
    got = index.GetOperationRecord(index_pb2.GetOperationRecordRequest(operation_id="kept"))
    assert (got.found, got.record, got.cancel) == (True, b"r2", b"c")
    assert not index.GetOperationRecord(index_pb2.GetOperationRecordRequest(operation_id="never")).found
    for bad in (
        dict(operation_id="", record=b"r", keep_s=1),
        dict(operation_id="x", keep_s=1),  # neither a record nor a cancel mark
        dict(operation_id="x", record=b"r", keep_s=0),
        dict(operation_id="x", record=b"r", keep_s=float("nan")),
    ):
        assert rpc_code(put, **bad) == grpc.StatusCode.INVALID_ARGUMENT
