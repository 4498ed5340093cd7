"""The caller's tenant scope (issue 24), from the verified token (smily.common.caller).

A caller writes to its own tenant only and reads its own plus the tenants
SMILY_TENANT_GRANTS gives it. Whatever lies outside that scope is answered
NOT_FOUND, exactly as if it did not exist.
"""

from __future__ import annotations

import grpc

from smily.common import caller as callers
from smily.common.errors import NotFound, ServiceError
from smily.index.v1 import index_pb2


def _me() -> callers.Caller:
    me = callers.current()
    if me is callers.ANONYMOUS:
        # Outside the RPC's context (a pool thread, say): never fall back to some tenant's scope.
        raise RuntimeError("no caller is bound here: read the tenant scope in the RPC's own thread")
    return me


def own() -> str:
    """The tenant the caller writes to."""
    return _me().tenant


def readable() -> list[str]:
    """The tenants the caller may search and read, its own first."""
    me = _me()
    return list(me.readable or (me.tenant,))


def owner(stated: str) -> list[str]:
    """The tenants to look a slide up in: the stated one if readable (NOT_FOUND otherwise), else every
    readable one, own first."""
    scope = readable()
    if not stated:
        return scope
    if stated not in scope:
        raise NotFound("no such slide")  # another tenant's: no different from one that does not exist
    return [stated]


def get_slide(index, slide_id: str, tenant: str, timeout: float) -> index_pb2.Slide:
    """The slide the caller may read under this id (a stated tenant, else own first, then granted)."""
    for t in owner(tenant):
        try:
            return index.GetSlide(index_pb2.GetSlideRequest(slide_id=slide_id, tenant=t), timeout=timeout).slide
        except ServiceError as exc:  # as backends.Backend translates an index error
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
    raise NotFound(f"slide {slide_id!r} is not in the index")


def check_operation(op, operation_id: str, default_tenant: str):
    """An operation of the caller's tenant, else NOT_FOUND (as one that does not exist). One recorded
    before tenancy (no tenant) is the default tenant's."""
    if (op.tenant or default_tenant) != own():
        raise NotFound(f"no operation {operation_id!r}")
    return op
