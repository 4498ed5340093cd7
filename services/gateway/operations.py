"""Ingest operations that every gateway replica can answer for.

A client may poll or cancel an operation on any replica: its connection
moves when connections age out, a pod is replaced or the autoscaler adds
one. The replica running an ingest publishes the operation to Redis on each
change and at least every HEARTBEAT_S; the others read it there, and ask
for a cancel with a flag the runner checks between batches. An unfinished
operation not heard of for STALE_S belonged to a replica that died: it is
reported FAILED (UNAVAILABLE) so the client ingests again instead of
waiting forever. Without Redis (one replica) operations stay local.
"""

from __future__ import annotations

import time

from smily.gateway.v1 import gateway_pb2

from .cache import RedisGuard

State = gateway_pb2.OperationState
FINISHED = (State.OPERATION_STATE_SUCCEEDED, State.OPERATION_STATE_FAILED, State.OPERATION_STATE_CANCELLED)
HEARTBEAT_S = 30.0
STALE_S = 5 * HEARTBEAT_S
KEEP_S = 7 * 24 * 3600  # how long any replica can answer for a finished operation


def _key(operation_id: str) -> str:
    return f"smily:op:{operation_id}"


def _cancel_key(operation_id: str) -> str:
    return f"smily:op:{operation_id}:cancel"


def failed_unavailable(op: gateway_pb2.Operation, why: str) -> None:
    op.state = State.OPERATION_STATE_FAILED
    op.error_code = "UNAVAILABLE"
    op.error_message = f"{why}; ingest the slide again"


class SharedOperations:
    def __init__(self, redis: RedisGuard):
        self._redis = redis

    def publish(self, op: gateway_pb2.Operation) -> None:
        data = op.SerializeToString()
        self._redis.call(lambda r: r.set(_key(op.operation_id), data, ex=KEEP_S))

    def fetch(self, operation_id: str) -> gateway_pb2.Operation | None:
        data = self._redis.call(lambda r: r.get(_key(operation_id)))
        if not data:
            return None
        op = gateway_pb2.Operation.FromString(data)
        if op.state not in FINISHED and time.time() - op.updated_at > STALE_S:
            failed_unavailable(op, "the gateway replica running this ingest stopped reporting on it")
        return op

    def request_cancel(self, operation_id: str) -> None:
        self._redis.call(lambda r: r.set(_cancel_key(operation_id), b"1", ex=KEEP_S))

    def cancel_requested(self, operation_id: str) -> bool:
        return bool(self._redis.call(lambda r: r.exists(_cancel_key(operation_id)), 0))


class LocalOperations:
    """No Redis: nothing to share (a single gateway replica)."""

    def publish(self, op: gateway_pb2.Operation) -> None:
        pass

    def fetch(self, operation_id: str) -> gateway_pb2.Operation | None:
        return None

    def request_cancel(self, operation_id: str) -> None:
        pass

    def cancel_requested(self, operation_id: str) -> bool:
        return False
