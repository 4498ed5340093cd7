"""Who is calling: the key of per-caller quotas.

Today the caller is the peer's host (a NAT or proxy in front makes many
callers one). Once the gateway authenticates callers (issue 12), this is
the one place to switch to the token's subject.
"""
from __future__ import annotations

from urllib.parse import unquote


def caller_of(context) -> str:
    """'ipv4:10.0.0.7:51234' -> '10.0.0.7'; 'ipv6:[::1]:5000' -> '::1'; anything else as it is."""
    peer = unquote(context.peer() or "")
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0] or rest
        return host.strip("[]")
    return peer
