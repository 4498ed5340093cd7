"""Ingest operations that every gateway replica can answer for.

A client may poll or cancel an operation on any replica: its connection
moves when connections age out, a pod is replaced or the autoscaler adds
one. The replica running an ingest publishes the operation to Redis on each
change and at least every HEARTBEAT_S; the others read it there, and ask
for a cancel with a flag the runner checks between batches. An unfinished
operation not heard of for STALE_S belonged to a replica that died: it is
reported FAILED (UNAVAILABLE) so the client ingests again instead of
waiting forever. Without Redis (one replica) operations stay local.

Redis is not trusted: an operation record (its callers, then the operation)
and a cancel flag carry an HMAC bound to their key (cache.tag, keyed by
SMILY_CACHE_KEY), so a Redis writer without the key can neither forge a
GetOperation answer, nor claim an operation, nor cancel an ingest.
"""

from __future__ import annotations

import json
import time

from smily.gateway.v1 import gateway_pb2

from .cache import RedisGuard, signed, verified

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
    def __init__(self, redis: RedisGuard, secret: bytes):
        self._redis = redis
        self._secret = secret

    def publish(self, op: gateway_pb2.Operation, starters: frozenset[str]) -> None:
        """starters: the callers who started it (caller.Caller.key), who may follow it with the ingest role."""
        key = _key(op.operation_id)
        head = json.dumps(sorted(starters)).encode()
        data = signed(self._secret, key, len(head).to_bytes(4, "big") + head + op.SerializeToString())
        self._redis.call(lambda r: r.set(key, data, ex=KEEP_S))

    def fetch(self, operation_id: str) -> tuple[gateway_pb2.Operation, frozenset[str]] | None:
        key = _key(operation_id)
        data = verified(self._secret, key, self._redis.call(lambda r: r.get(key)))
        if data is None:
            return None
        size = int.from_bytes(data[:4], "big")
        starters = frozenset(json.loads(data[4 : 4 + size]))
        op = gateway_pb2.Operation.FromString(data[4 + size :])
        if op.state not in FINISHED and time.time() - op.updated_at > STALE_S:
            failed_unavailable(op, "the gateway replica running this ingest stopped reporting on it")
        return op, starters

    def request_cancel(self, operation_id: str) -> None:
        key = _cancel_key(operation_id)
        flag = signed(self._secret, key, b"1")
        self._redis.call(lambda r: r.set(key, flag, ex=KEEP_S))

    def cancel_requested(self, operation_id: str) -> bool:
        key = _cancel_key(operation_id)
        return verified(self._secret, key, self._redis.call(lambda r: r.get(key))) == b"1"


class LocalOperations:
    """No Redis: nothing to share (a single gateway replica)."""

    def publish(self, op: gateway_pb2.Operation, starters: frozenset[str]) -> None:
        pass

    def fetch(self, operation_id: str) -> tuple[gateway_pb2.Operation, frozenset[str]] | None:
        return None

    def request_cancel(self, operation_id: str) -> None:
        pass

    def cancel_requested(self, operation_id: str) -> bool:
        return False
