"""Errors a servicer raises, each bound to a canonical gRPC status code.

Servicers raise these; the server interceptor turns them (and errors of
downstream calls) into statuses, so a client never sees a bare UNKNOWN.
"""

from __future__ import annotations

import logging
import uuid

import grpc

log = logging.getLogger("smily.errors")


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


# An index replica's answer when its system of record (PostgreSQL) cannot be reached:
# the gateway tells it from a replica that is down by this text.
INDEX_DATABASE_UNREACHABLE = "the index database is unreachable"


def require(condition: bool, message: str) -> None:
    """Raise InvalidArgument(message) unless condition holds."""
    if not condition:
        raise InvalidArgument(message)


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Busy(ServiceError):
    """RESOURCE_EXHAUSTED with a hint: the server sends `retry-after-s` in the trailers."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(f"{message}; retry in about {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


def status_of(exc: BaseException, context=None) -> tuple[grpc.StatusCode, str]:
    """The status a caller gets for exc: a ServiceError's own, a failed
    downstream call's (already canonical), the one a handler set on context
    before raising, else INTERNAL with an error id, logged here with the traceback."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code(), exc.details() or exc.code().name
    if context is not None and context.code() not in (None, grpc.StatusCode.OK):
        return context.code(), context.details() or context.code().name
    error_id = uuid.uuid4().hex[:12]
    log.error("unhandled error", exc_info=exc, extra={"error_id": error_id})
    return grpc.StatusCode.INTERNAL, f"internal error (error id {error_id})"
