"""Operations (ingests, cases, migrations) that every gateway replica can answer for.

A client may poll or cancel an operation on any replica: its connection
moves when connections age out, a pod is replaced or the autoscaler adds
one. The replica running an operation writes its record to the system of
record on each change and at least every HEARTBEAT_S: the index keeps it
(PutOperationRecord, on the first shard: PostgreSQL in a cluster, the
SQLite store alone) for KEEP_S, so losing Redis, or the replica, forgets no
operation. The others read it there, and ask for a cancel with a mark the
runner checks between batches. An unfinished operation not heard of for
STALE_S belonged to a replica that died: it is reported FAILED
(UNAVAILABLE) so the client ingests again instead of waiting forever.

The store is not trusted: an operation record (its callers, then the
operation) and a cancel mark carry an HMAC bound to their operation
(cache.tag, keyed by SMILY_CACHE_KEY), so a writer to the index's table
without the key can neither forge a GetOperation answer, nor claim an
operation, nor cancel an ingest.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from smily.common.errors import ServiceError
from smily.gateway.v1 import gateway_pb2
from smily.index.v1 import index_pb2

from .backends import Backend
from .cache import signed, verified

log = logging.getLogger("smily.operations")

State = gateway_pb2.OperationState
FINISHED = (State.OPERATION_STATE_SUCCEEDED, State.OPERATION_STATE_FAILED, State.OPERATION_STATE_CANCELLED)
HEARTBEAT_S = 30.0
STALE_S = 5 * HEARTBEAT_S
KEEP_S = 7 * 24 * 3600  # how long any replica can answer for a finished operation
# A record or cancel mark is written and read within this (an index that does not answer costs little).
TIMEOUT_S = 5.0


def _key(operation_id: str) -> str:
    return f"smily:op:{operation_id}"


def _cancel_key(operation_id: str) -> str:
    return f"smily:op:{operation_id}:cancel"


def failed_unavailable(op: gateway_pb2.Operation, why: str) -> None:
    op.state = State.OPERATION_STATE_FAILED
    op.error_code = "UNAVAILABLE"
    op.error_message = f"{why}; ingest the slide again"


class SharedOperations:
    """Operation records in the index (the system of record), signed with `secret`."""

    def __init__(self, index: Backend, secret: bytes):
        self._index = index
        self._secret = secret
        self._failing = False
        self._lock = threading.Lock()

    def publish(self, op: gateway_pb2.Operation, starters: frozenset[str]) -> None:
        """starters: the callers who started it (caller.Caller.key), who may follow it with the ingest role.
        A write that fails is logged, never raised: the operation goes on, and the next write catches up."""
        head = json.dumps(sorted(starters)).encode()
        data = signed(self._secret, _key(op.operation_id), len(head).to_bytes(4, "big") + head + op.SerializeToString())
        self._put(index_pb2.PutOperationRecordRequest(operation_id=op.operation_id, record=data, keep_s=KEEP_S))

    def fetch(self, operation_id: str) -> tuple[gateway_pb2.Operation, frozenset[str]] | None:
        """The operation and its starters; None when the index keeps no genuine record of it.
        UNAVAILABLE when the index does not answer."""
        reply = self._get(operation_id)
        data = verified(self._secret, _key(operation_id), reply.record)
        if data is None:
            return None
        size = int.from_bytes(data[:4], "big")
        starters = frozenset(json.loads(data[4 : 4 + size]))
        op = gateway_pb2.Operation.FromString(data[4 + size :])
        if op.state not in FINISHED and time.time() - op.updated_at > STALE_S:
            failed_unavailable(op, "the gateway replica running this ingest stopped reporting on it")
        return op, starters

    def request_cancel(self, operation_id: str) -> None:
        """Raises UNAVAILABLE when the index does not answer: the caller must not think it asked."""
        flag = signed(self._secret, _cancel_key(operation_id), b"1")
        self._index.PutOperationRecord(
            index_pb2.PutOperationRecordRequest(operation_id=operation_id, cancel=flag, keep_s=KEEP_S),
            timeout=TIMEOUT_S,
        )

    def cancel_requested(self, operation_id: str) -> bool:
        """Whether a replica asked to cancel it; False while the index does not answer."""
        try:
            reply = self._get(operation_id)
        except ServiceError as exc:
            self._trouble(exc)
            return False
        self._fine()
        return verified(self._secret, _cancel_key(operation_id), reply.cancel) == b"1"

    def _get(self, operation_id: str) -> index_pb2.GetOperationRecordResponse:
        return self._index.GetOperationRecord(
            index_pb2.GetOperationRecordRequest(operation_id=operation_id), timeout=TIMEOUT_S
        )

    def _put(self, request: index_pb2.PutOperationRecordRequest) -> None:
        try:
            self._index.PutOperationRecord(request, timeout=TIMEOUT_S)
        except ServiceError as exc:
            self._trouble(exc)
            return
        self._fine()

    def _trouble(self, exc: ServiceError) -> None:
        with self._lock:
            first, self._failing = not self._failing, True
        if first:  # once per outage, not once per batch
            log.warning("operation records unavailable in the index; retrying", extra={"error": type(exc).__name__})

    def _fine(self) -> None:
        with self._lock:
            back, self._failing = self._failing, False
        if back:
            log.info("operation records reachable again in the index")
