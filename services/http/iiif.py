"""IIIF Image API 3 (level 1) over the gateway: info.json from GetSlide,
tiles from ReadRegion. The gateway is the only path to pixels, so its access
rules and audit apply to every tile; the caller's token and view session go
with each call.

Tiles are cached in memory per caller (a digest of the Authorization header):
a cached tile is only ever served to the caller the gateway already let read
it, for at most http_tile_cache_ttl_s.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from collections import OrderedDict
from urllib.parse import quote

import grpc
from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from smily.gateway.v1 import gateway_pb2

from .api import error, metadata, rpc_error
from .rpc import Gateway

TILE = 512
# ReadRegion's largest output side.
MAX_SIDE = 4096
FORMATS = {"jpg": ("image/jpeg", gateway_pb2.IMAGE_FORMAT_JPEG), "png": ("image/png", gateway_pb2.IMAGE_FORMAT_PNG)}


class IIIFError(Exception):
    pass


class TileCache:
    """LRU of encoded tiles bounded by bytes, entries expiring after ttl_s."""

    def __init__(self, max_bytes: int, ttl_s: float):
        self._max, self._ttl = max_bytes, ttl_s
        self._items: OrderedDict[tuple, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: tuple, data: bytes) -> None:
        if len(data) > self._max:
            return
        if key in self._items:
            self._drop(key)
        self._items[key] = (time.monotonic() + self._ttl, data)
        self._bytes += len(data)
        while self._bytes > self._max:
            self._drop(next(iter(self._items)))

    def _drop(self, key: tuple) -> None:
        self._bytes -= len(self._items.pop(key)[1])


def scale_factors(width: int, height: int) -> list[int]:
    factors = [1]
    while max(width, height) / factors[-1] > TILE:
        factors.append(factors[-1] * 2)
    return factors


def info(base: str, slide_id: str, slide: gateway_pb2.GetSlideResponse) -> dict:
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


def _caller(request: Request) -> str:
    return hashlib.sha256(request.headers.get("authorization", "").encode()).hexdigest()


class IIIF:
    def __init__(self, gateway: Gateway, cache: TileCache):
        self._gateway = gateway
        self._cache = cache

    async def _slide(self, request: Request, slide_id: str) -> gateway_pb2.GetSlideResponse:
        """The slide's size, asked once per caller and cache period rather than per tile."""
        key = ("slide", _caller(request), slide_id)
        cached = self._cache.get(key)
        if cached is not None:
            return gateway_pb2.GetSlideResponse.FromString(cached)
        slide = await self._gateway.call("GetSlide", gateway_pb2.GetSlideRequest(slide_id=slide_id), metadata(request))
        self._cache.put(key, slide.SerializeToString())
        return slide

    async def info(self, request: Request) -> Response:
        slide_id = request.path_params["slide_id"]
        try:
            slide = await self._slide(request, slide_id)
        except grpc.RpcError as exc:
            return rpc_error(exc)
        return JSONResponse(
            info(str(request.base_url).rstrip("/"), slide_id, slide),
            media_type="application/ld+json",
            headers={"Cache-Control": "private, max-age=60"},
        )

    async def image(self, request: Request) -> Response:
        p = request.path_params
        fmt = p["format"]
        if fmt not in FORMATS:
            return error(grpc.StatusCode.INVALID_ARGUMENT, "format must be jpg or png")
        if p["rotation"] != "0" or p["quality"] not in ("default", "color"):
            return error(grpc.StatusCode.INVALID_ARGUMENT, "only rotation 0 and quality default are supported")
        key = ("tile", _caller(request), p["slide_id"], p["region"], p["size"], fmt)
        media, encoding = FORMATS[fmt]
        headers = {"Cache-Control": "private, max-age=3600"}
        cached = self._cache.get(key)
        if cached is not None:
            return Response(cached, media_type=media, headers=headers)
        try:
            slide = await self._slide(request, p["slide_id"])
            x, y, rw, rh = parse_region(p["region"], slide.width, slide.height)
            w, h = parse_size(p["size"], rw, rh)
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
        self._cache.put(key, data)
        return Response(data, media_type=media, headers=headers)
