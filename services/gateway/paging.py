"""Pages of hits with a per-slide cap, over-fetching from the index.

Stateless: a page token is the offset plus a fingerprint of the request,
so any gateway replica serves the next page (the query embedding is
cached) and a token is refused for a different request. Every token the
gateway hands out is sealed to the caller's tenant with an HMAC (seal):
another tenant's token, replayed or forged, is NOT_FOUND (issue 24).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from smily.common.errors import InvalidArgument, NotFound
from smily.common.limits import MAX_K


def page_key(secret: str) -> bytes:
    """The HMAC key of page tokens, derived from the gateway's secret (SMILY_CACHE_KEY) apart from its other uses."""
    return hashlib.sha256(b"smily page token\0" + secret.encode()).digest()


def _tag(key: bytes, token: str, tenant: str) -> str:
    return hmac.new(key, f"{tenant}\0{token}".encode(), hashlib.sha256).hexdigest()[:32]


def seal(key: bytes, token: str, tenant: str) -> str:
    """`token` bound to `tenant` ("." never occurs in the url-safe base64 of a token)."""
    return f"{token}.{_tag(key, token, tenant)}" if token else ""


def unseal(key: bytes, sealed: str, tenant: str) -> str:
    """The token inside a sealed one; NOT_FOUND unless it was sealed for `tenant`."""
    if not sealed:
        return ""
    token, dot, tag = sealed.rpartition(".")
    if not dot or not hmac.compare_digest(tag.encode(), _tag(key, token, tenant).encode()):
        raise NotFound("page_token is not one this service issued to the caller")
    return token


def fingerprint(request) -> str:
    r = type(request)()
    r.CopyFrom(request)
    r.ClearField("page_token")
    r.ClearField("page_size")
    return hashlib.sha256(r.SerializeToString(deterministic=True)).hexdigest()[:16]


def make_token(offset: int, fp: str) -> str:
    return base64.urlsafe_b64encode(f"{offset}:{fp}".encode()).decode()


def read_token(token: str, fp: str) -> int:
    if not token:
        return 0
    token = token.partition(".")[0]  # the tenant seal, checked by the servicer (unseal)
    try:
        text, got = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        offset = int(text)
    except Exception:
        raise InvalidArgument("page_token is not one this service issued") from None
    if got != fp or offset < 0:
        raise InvalidArgument("page_token belongs to a different search request")
    return offset


def capped(hits, per_slide: int) -> list:
    if per_slide <= 0:
        return list(hits)
    seen: dict[tuple[str, str], int] = {}
    out = []
    for h in hits:
        slide = _slide(h)
        if seen.get(slide, 0) < per_slide:
            seen[slide] = seen.get(slide, 0) + 1
            out.append(h)
    return out


def _slide(hit) -> tuple[str, str]:
    """A hit's slide: (tenant, slide id); the same id in two tenants is two slides."""
    return getattr(hit, "tenant", ""), hit.slide_id


def iou(a, b) -> float:
    """Intersection over union of two hits' level-0 tiles."""
    ta, tb = a.tile, b.tile
    w = min(ta.x + ta.width, tb.x + tb.width) - max(ta.x, tb.x)
    h = min(ta.y + ta.height, tb.y + tb.height) - max(ta.y, tb.y)
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / (ta.width * ta.height + tb.width * tb.height - inter)


def distinct(hits, threshold: float) -> list:
    """Hits in order, without any that overlaps a better hit of its slide by IoU >= threshold
    (overlapping tiles of one spot); threshold <= 0 keeps every hit."""
    if threshold <= 0:
        return list(hits)
    kept: dict[tuple[str, str], list] = {}
    out = []
    for h in hits:
        mine = kept.setdefault(_slide(h), [])
        if all(iou(h, other) < threshold for other in mine):
            mine.append(h)
            out.append(h)
    return out


def top_hits(search, k: int, per_slide: int, overlap: float = 0.0) -> list:
    """The best k hits with at most per_slide per slide and no two overlapping
    by IoU >= overlap (when > 0). search(n) returns the index's top n; with a
    cap or de-duplication, fetch more until k survive or the index has no
    more (or its limit is reached)."""
    n = k if per_slide <= 0 and overlap <= 0 else min(MAX_K, k * 4)
    while True:
        raw = search(n)
        hits = capped(distinct(raw, overlap), per_slide)
        if len(hits) >= k or len(raw) < n or n >= MAX_K:
            return hits[:k]
        n = min(MAX_K, n * 4)
