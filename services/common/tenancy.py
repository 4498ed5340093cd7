"""Tenants: who owns a slide, and who may read whose (issue 24).

Inside the index a slide's identity is (tenant, slide id), stored as one key
"tenant/slide id": slide ids hold no "/" (limits.slide_id) and tenants are
1-64 characters of [A-Za-z0-9._-], so the key splits back unambiguously, and
one tenant's keys are one contiguous range [tenant + "/", tenant + "0")
that a search selects with a range condition. Placement hashes the key, so
shards place by (tenant, slide id).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .errors import InvalidArgument

DEFAULT = "default"
SEP = "/"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def valid(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def tenant(name: str, what: str = "tenant") -> str:
    """A tenant name, else INVALID_ARGUMENT."""
    if not valid(name):
        raise InvalidArgument(f"{what} must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return name


def key(tenant_name: str, slide_id: str) -> str:
    """The index's key of a slide of a tenant."""
    return f"{tenant_name}{SEP}{slide_id}"


def split(slide_key: str) -> tuple[str, str]:
    """(tenant, slide id) of an index key."""
    tenant_name, _, slide_id = slide_key.partition(SEP)
    return tenant_name, slide_id


def key_range(tenant_name: str) -> tuple[str, str]:
    """[lo, hi): every key of the tenant ("0" follows "/" in ASCII)."""
    return tenant_name + SEP, tenant_name + "0"


def parse_grants(text: str) -> dict[str, frozenset[str]]:
    """SMILY_TENANT_GRANTS, "research=site-a,site-b;site-b=site-a": who may read whose slides."""
    grants: dict[str, set[str]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        reader, eq, owners = part.partition("=")
        names = [o.strip() for o in owners.split(",") if o.strip()]
        if not eq or not valid(reader.strip()) or not names or not all(valid(o) for o in names):
            raise ValueError(f"SMILY_TENANT_GRANTS: {part!r} is not reader=owner[,owner...]")
        grants.setdefault(reader.strip(), set()).update(names)
    return {r: frozenset(o) for r, o in grants.items()}


def readable(tenant_name: str, grants: Mapping[str, Iterable[str]]) -> tuple[str, ...]:
    """The tenants whose slides `tenant_name` may search and read: its own first, then its grants."""
    return (tenant_name, *sorted(set(grants.get(tenant_name, ())) - {tenant_name}))
