"""Placement of slides on index shards by rendezvous (highest random weight) hashing.

Each slide goes to the shard with the highest hash of (shard, slide key);
a slide's key is its index key, "tenant/slide id" (shard_of_slide).
Going from N to N+1 shards moves only the slides the new shard wins, about
1/(N+1) of them, and none between the old shards. Stable across processes
and releases (unlike hash()).
"""

from __future__ import annotations

import hashlib

from . import tenancy


def shard_of(slide_id: str, shards: int) -> int:
    if shards < 1:
        raise ValueError("at least one shard is required")
    return max(range(shards), key=lambda s: hashlib.sha256(f"{s}\x00{slide_id}".encode()).digest()[:8])


def shard_of_slide(tenant: str, slide_id: str, shards: int) -> int:
    """A tenant's slide goes where its index key (tenancy.key) hashes: shards place by (tenant, slide id)."""
    return shard_of(tenancy.key(tenant, slide_id), shards)
