"""Who is calling: set by the gateway's auth interceptor for the length of one RPC.

Code anywhere under a gateway handler (per-caller quotas, audit) reads the
verified identity with current(); outside an RPC, or with SMILY_AUTH=none,
it is the anonymous caller.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from urllib.parse import unquote

from . import tenancy


@dataclass(frozen=True)
class Caller:
    subject: str  # the token's `sub` (or "anonymous" with SMILY_AUTH=none)
    issuer: str = ""
    roles: frozenset[str] = frozenset()
    # The tenant the token names (issue 24): its slides are the ones the caller writes.
    tenant: str = tenancy.DEFAULT
    # Tenants whose slides the caller may search and read: its own first, then SMILY_TENANT_GRANTS'.
    readable: tuple[str, ...] = (tenancy.DEFAULT,)

    @property
    def key(self) -> str:
        """One string per identity (a subject is unique within its issuer), e.g. an operation's starter."""
        return f"{self.issuer} {self.subject}"


ANONYMOUS = Caller("anonymous")

_current: contextvars.ContextVar[Caller] = contextvars.ContextVar("smily_caller", default=ANONYMOUS)


def current() -> Caller:
    """The caller of the RPC this thread is handling."""
    return _current.get()


def bind(caller: Caller) -> contextvars.Token:
    return _current.set(caller)


def unbind(token: contextvars.Token) -> None:
    _current.reset(token)


def caller_of(context) -> str:
    """The key of per-caller quotas: the verified token's issuer and subject,
    else the peer's host ('ipv4:10.0.0.7:51234' -> '10.0.0.7'; a NAT or proxy
    in front makes many anonymous callers one)."""
    who = current()
    if who is not ANONYMOUS:
        return f"{who.issuer} {who.subject}"
    peer = unquote(context.peer() or "")
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0] or rest
        return host.strip("[]")
    return peer
