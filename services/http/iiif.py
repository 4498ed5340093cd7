"""IIIF Image API 3 (level 1) over the gateway: info.json from GetSlide,
tiles from ReadRegion. The gateway is the only path to pixels, so its access
rules and audit apply to every tile; the caller's token and view session go
with each call.

Tiles are cached in memory under the caller's token (its digest and `exp`): a
cached tile is only served to the token the gateway already let read it,
never after that token expires, and for at most http_tile_cache_ttl_s. At
most every http_slide_check_s each token's view of a slide is checked again
with the gateway (GetSlide): a refusal (token revoked or expired, roles
gone, slide deleted) stops the cache serving it, and a slide deleted or
ingested again drops its tiles for everyone. Tiles are served from the
cache only under a view session, and reported to the gateway within
http_slide_check_s, so that session's record counts them. info.json mints the view session: an id the
gateway can verify, for this caller and slide (smily.common.viewsession).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import quote

import grpc
import jwt
from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from smily.common import viewsession
from smily.common.caller import ANONYMOUS as _ANONYMOUS
from smily.common.config import Settings
from smily.gateway.v1 import gateway_pb2

from .api import error, metadata, rpc_error
from .rpc import Gateway

TILE = 512
# ReadRegion's largest output side.
MAX_SIDE = 4096
ANONYMOUS = _ANONYMOUS.subject
# (token, slide) checks remembered, at most.
MAX_CHECKS = 10_000
FORMATS = {"jpg": ("image/jpeg", gateway_pb2.IMAGE_FORMAT_JPEG), "png": ("image/png", gateway_pb2.IMAGE_FORMAT_PNG)}


class IIIFError(Exception):
    pass


class TileCache:
    """LRU of encoded tiles bounded by bytes; each entry expires at its own time (time.time())."""

    def __init__(self, max_bytes: int, ttl_s: float):
        self._max, self.ttl = max_bytes, ttl_s
        self._items: OrderedDict[tuple, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= time.time():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: tuple, data: bytes, until: float) -> None:
        if len(data) > self._max or until <= time.time():
            return
        if key in self._items:
            self._drop(key)
        self._items[key] = (min(until, time.time() + self.ttl), data)
        self._bytes += len(data)
        while self._bytes > self._max:
            self._drop(next(iter(self._items)))

    def drop_slide(self, slide_id: str) -> None:
        """Forget every caller's tiles of a slide (deleted, or ingested again)."""
        for key in [k for k in self._items if k[1] == slide_id]:
            self._drop(key)

    def _drop(self, key: tuple) -> None:
        self._bytes -= len(self._items.pop(key)[1])


def scale_factors(width: int, height: int) -> list[int]:
    factors = [1]
    while max(width, height) / factors[-1] > TILE:
        factors.append(factors[-1] * 2)
    return factors


def info(base: str, slide_id: str, slide: gateway_pb2.GetSlideResponse) -> dict:
    """base: the configured public URL (never the request's Host), or "" for a path-only id."""
    return {
        "@context": "http://iiif.io/api/image/3/context.json",
        "id": f"{base}/iiif/3/{quote(slide_id, safe='')}",
        "type": "ImageService3",
        "protocol": "http://iiif.io/api/image",
        "profile": "level1",
        "width": slide.width,
        "height": slide.height,
        "maxWidth": MAX_SIDE,
        "maxHeight": MAX_SIDE,
        "tiles": [{"width": TILE, "scaleFactors": scale_factors(slide.width, slide.height)}],
        "extraFormats": ["png"],
    }


def parse_region(text: str, width: int, height: int) -> tuple[int, int, int, int]:
    if text == "full":
        return 0, 0, width, height
    if text == "square":
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, side, side
    m = re.fullmatch(r"(\d+),(\d+),(\d+),(\d+)", text)
    if not m:
        raise IIIFError(f"region must be full, square or x,y,w,h; got {text!r}")
    x, y, w, h = (int(v) for v in m.groups())
    if w == 0 or h == 0 or x >= width or y >= height:
        raise IIIFError("the region is empty or outside the image")
    return x, y, min(w, width - x), min(h, height - y)


def parse_size(text: str, rw: int, rh: int) -> tuple[int, int]:
    if text.startswith("^"):
        raise IIIFError("upscaling (^) is not supported")
    if text == "max":
        scale = min(1.0, MAX_SIDE / max(rw, rh))
        return max(1, round(rw * scale)), max(1, round(rh * scale))
    m = re.fullmatch(r"(!?)(\d*),(\d*)", text)
    if not m or not (m[2] or m[3]) or (m[1] and not (m[2] and m[3])):
        raise IIIFError(f"size must be max, w,, ,h, w,h or !w,h; got {text!r}")
    if m[1]:
        scale = min(int(m[2]) / rw, int(m[3]) / rh)
        w, h = round(rw * scale), round(rh * scale)
    elif m[2] and m[3]:
        w, h = int(m[2]), int(m[3])
    elif m[2]:
        w = int(m[2])
        h = round(rh * w / rw)
    else:
        h = int(m[3])
        w = round(rw * h / rh)
    w, h = max(1, w), max(1, h)
    if w > rw or h > rh:
        raise IIIFError("upscaling is not supported: the size is larger than the region")
    if max(w, h) > MAX_SIDE:
        raise IIIFError(f"the size is larger than {MAX_SIDE} pixels")
    return w, h


def _exact(data: bytes, width: int, height: int, fmt: str) -> bytes:
    """The tiler rounds output sizes; IIIF wants the size asked for."""
    img = Image.open(io.BytesIO(data))
    if img.size == (width, height):
        return data
    out = io.BytesIO()
    img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR).save(
        out, "JPEG" if fmt == "jpg" else "PNG", quality=90
    )
    return out.getvalue()


@dataclass(frozen=True)
class _Token:
    """The caller as the cache knows it: a digest of its Authorization header, and when it expires."""

    digest: str
    exp: float
    subject: str


def _token(request: Request) -> _Token:
    header = request.headers.get("authorization", "")
    digest = hashlib.sha256(header.encode()).hexdigest()
    scheme, _, raw = header.partition(" ")
    if not raw:
        return _Token(digest, math.inf, ANONYMOUS)
    try:
        # Not verified here: the gateway verifies the token on every call that fills the cache or
        # checks it, and the digest binds these claims to the exact token it verified.
        claims = jwt.decode(raw.strip(), options={"verify_signature": False})
        return _Token(digest, float(claims["exp"]), str(claims.get("sub", "")))
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        return _Token(digest, 0.0, "")  # never cached: the gateway decides what it is


@dataclass
class _Check:
    """A token's last check of a slide with the gateway, and the reads served from the cache since."""

    slide: gateway_pb2.GetSlideResponse
    at: float  # time.monotonic()
    reads: dict[str, list[int]] = field(default_factory=dict)  # view session -> [count, x0, y0, x1, y1]
    metadata: list[tuple[str, str]] = field(default_factory=list)  # the caller's, to report the reads with


def _generation(slide: gateway_pb2.GetSlideResponse) -> tuple:
    return (slide.slide.indexed_at, slide.slide.tile_count)


class IIIF:
    def __init__(self, gateway: Gateway, settings: Settings):
        self._gateway = gateway
        self._cache = TileCache(settings.http.http_tile_cache_bytes, settings.http.http_tile_cache_ttl_s)
        self._check_s = settings.http.http_slide_check_s
        self._session_key = viewsession.key(settings)
        self._session_ttl = settings.auth.view_session_ttl_s
        self._public_url = settings.http.http_public_url.rstrip("/")
        self._checks: OrderedDict[tuple[str, str], _Check] = OrderedDict()
        self._generations: dict[str, tuple] = {}
        self._reporting: set[asyncio.Task] = set()

    async def _slide(self, request: Request, slide_id: str, token: _Token) -> gateway_pb2.GetSlideResponse:
        """The slide's size; asked again of the gateway at most every check_s per token,
        which re-authorises the token and notices a deleted or re-ingested slide."""
        key = (token.digest, slide_id)
        check = self._checks.get(key)
        if check is not None and time.monotonic() - check.at < self._check_s and time.time() < token.exp:
            return check.slide
        await self._flush(key)
        try:
            slide = await self._gateway.call(
                "GetSlide", gateway_pb2.GetSlideRequest(slide_id=slide_id), metadata(request)
            )
        except grpc.RpcError as exc:
            self._checks.pop(key, None)
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                self._forget(slide_id)
            raise
        if self._generations.get(slide_id, _generation(slide)) != _generation(slide):
            self._forget(slide_id)
        self._generations[slide_id] = _generation(slide)
        self._checks[key] = _Check(slide, time.monotonic())
        self._checks.move_to_end(key)
        while len(self._checks) > MAX_CHECKS:
            self._checks.popitem(last=False)
        return slide

    def _forget(self, slide_id: str) -> None:
        self._cache.drop_slide(slide_id)
        self._generations.pop(slide_id, None)
        for key in [k for k in self._checks if k[1] == slide_id]:
            del self._checks[key]

    async def _flush(self, key: tuple[str, str]) -> None:
        """Report the reads served from the cache since the last report, one call per view session
        (the gateway adds them to that session's record)."""
        check = self._checks.get(key)
        if check is None or not check.reads:
            return
        reads, check.reads = check.reads, {}
        for session, (count, x0, y0, x1, y1) in reads.items():
            report = (viewsession.CACHED_READS, f"{count};{x0},{y0},{x1 - x0},{y1 - y0}")
            with contextlib.suppress(grpc.RpcError):  # the next check answers the caller
                await self._gateway.call(
                    "GetSlide",
                    gateway_pb2.GetSlideRequest(slide_id=key[1]),
                    [*check.metadata, (viewsession.HEADER, session), report],
                )

    def _report_soon(self, key: tuple[str, str]) -> None:
        task = asyncio.ensure_future(self._flush(key))
        self._reporting.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._reporting.discard)

    def _session(self, request: Request, token: _Token, slide_id: str) -> str:
        """The request's view session if it is one this front end minted for this caller and slide, else ""."""
        session = request.headers.get(viewsession.HEADER, "")[:128]
        ok = viewsession.verify(self._session_key, session, token.subject, slide_id, self._session_ttl)
        return session if ok is not None else ""

    def _count(self, request: Request, session: str, token: _Token, slide_id: str, box: tuple[int, ...]) -> None:
        """Note a read served from the cache; reported within check_s, whether or not the caller comes back."""
        key = (token.digest, slide_id)
        check = self._checks.get(key)
        if check is None:
            return
        if not check.reads:
            check.metadata = [(k, v) for k, v in metadata(request) if k != viewsession.HEADER]
            asyncio.get_running_loop().call_later(self._check_s, self._report_soon, key)
        x, y, w, h = box
        seen = check.reads.get(session)
        if seen is None:
            check.reads[session] = [1, x, y, x + w, y + h]
        else:
            seen[0] += 1
            seen[1:] = [min(seen[1], x), min(seen[2], y), max(seen[3], x + w), max(seen[4], y + h)]

    def _max_age(self, token: _Token) -> str:
        left = min(self._cache.ttl, token.exp - time.time())
        return f"private, max-age={max(0, int(left))}"

    async def info(self, request: Request) -> Response:
        slide_id = request.path_params["slide_id"]
        token = _token(request)
        try:
            slide = await self._slide(request, slide_id, token)
        except grpc.RpcError as exc:
            return rpc_error(exc)
        headers = {"Cache-Control": self._max_age(token)}
        if self._session_key:
            # The viewer sends this back with the slide's tiles; the gateway checks it is ours,
            # this caller's and this slide's.
            headers[viewsession.HEADER] = viewsession.mint(self._session_key, token.subject, slide_id)
        return JSONResponse(info(self._public_url, slide_id, slide), media_type="application/ld+json", headers=headers)

    async def image(self, request: Request) -> Response:
        p = request.path_params
        fmt = p["format"]
        if fmt not in FORMATS:
            return error(grpc.StatusCode.INVALID_ARGUMENT, "format must be jpg or png")
        if p["rotation"] != "0" or p["quality"] not in ("default", "color"):
            return error(grpc.StatusCode.INVALID_ARGUMENT, "only rotation 0 and quality default are supported")
        token = _token(request)
        key = (token.digest, p["slide_id"], token.exp, p["region"], p["size"], fmt)
        media, encoding = FORMATS[fmt]
        try:
            slide = await self._slide(request, p["slide_id"], token)
            x, y, rw, rh = parse_region(p["region"], slide.width, slide.height)
            w, h = parse_size(p["size"], rw, rh)
            headers = {"Cache-Control": self._max_age(token)}
            # Served from the cache only under a view session, which the gateway is told of and
            # records; without one every tile is read (and audited) through the gateway.
            session = self._session(request, token, p["slide_id"])
            cached = self._cache.get(key) if session and time.time() < token.exp else None
            if cached is not None:
                self._count(request, session, token, p["slide_id"], (x, y, rw, rh))
                return Response(cached, media_type=media, headers=headers)
            if slide.mpp <= 0:
                return error(grpc.StatusCode.FAILED_PRECONDITION, "the slide records no resolution")
            resp = await self._gateway.call(
                "ReadRegion",
                gateway_pb2.ReadRegionRequest(
                    region=gateway_pb2.Region(slide_id=p["slide_id"], x=x, y=y, width=rw, height=rh),
                    # The output resolution that makes the region w pixels wide; ReadRegion
                    # coarsens it further only if the longer side would pass max_side.
                    mpp=slide.mpp * rw / w,
                    max_side=max(w, h),
                    format=encoding,
                ),
                metadata(request),
            )
        except IIIFError as exc:
            return error(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except grpc.RpcError as exc:
            return rpc_error(exc)
        data = _exact(resp.image, w, h, fmt)
        self._cache.put(key, data, token.exp)
        return Response(data, media_type=media, headers=headers)
