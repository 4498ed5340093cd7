"""Messages between the tiler server and its reader processes: no pickle.

A reader parses untrusted slide files, so a hostile file may take it over.
Unpickling its replies would then let it run code in the server; instead a
reply is a fixed binary layout that the server parses and checks before
using any of it (a malformed one costs the reader its life, see workers.py).
Requests go the other way (server to reader) as JSON.

Reply = status byte (OK, or an index into ERRORS) + payload:
  error   UTF-8 message (checked: printable, at most MAX_ERROR_CHARS)
  info    a smily.tiler.v1.SlideInfo protobuf
  plan    u32 resolutions, u32 tile count per resolution, then RECT records
  tiles   u32 tiles, then per tile (u8 where, u64 offset, u64 length), then
          the inline bytes: where=0 is a slot of the shared arena, where=1
          an offset into the inline bytes (tiles that did not fit the arena)
  region  the encoded image
"""

from __future__ import annotations

import json
import struct

import numpy as np

from smily.common import errors
from smily.tiler.v1 import tiler_pb2

from .arena import Arena, Slot
from .tiling import TileRect

MAX_REPLY_BYTES = 80 * 1024 * 1024  # the largest region (16 Mpx of RGB) fits with room to spare
MAX_ERROR_CHARS = 1000
OK = 0
ERRORS = (
    errors.ServiceError,
    errors.InvalidArgument,
    errors.NotFound,
    errors.FailedPrecondition,
    errors.ResourceExhausted,
    errors.Unavailable,
)
_U32 = struct.Struct("<I")
_ITEM = struct.Struct("<BQQ")
RECT = np.dtype([("x", "<i8"), ("y", "<i8"), ("size", "<i8"), ("tissue", "<f8"), ("mpp", "<f8")])


class Malformed(Exception):
    """A reply that breaks the format: the reader is not to be trusted again."""


# -- server -> reader ------------------------------------------------------------
def request(op: str, path: str, args: tuple) -> bytes:
    return json.dumps([op, path, list(args)]).encode()


def parse_request(data: bytes) -> tuple[str, str, list]:
    op, path, args = json.loads(data)
    return op, path, args


# -- reader side -------------------------------------------------------------------
def error(exc_class: type, message: str) -> bytes:
    cls = exc_class if exc_class in ERRORS else errors.FailedPrecondition
    return bytes([ERRORS.index(cls) + 1]) + message[:MAX_ERROR_CHARS].encode()


def ok_info(info: tiler_pb2.SlideInfo) -> bytes:
    return bytes([OK]) + info.SerializeToString()


def ok_plan(plans: list[list[TileRect]]) -> bytes:
    parts = [bytes([OK]), _U32.pack(len(plans))] + [_U32.pack(len(p)) for p in plans]
    for rects in plans:
        parts.append(np.array([(t.x, t.y, t.size, t.tissue_fraction, t.mpp) for t in rects], RECT).tobytes())
    return b"".join(parts)


def ok_tiles(items: list[Slot | bytes]) -> bytes:
    head, tail, inline = [bytes([OK]), _U32.pack(len(items))], [], 0
    for item in items:
        if isinstance(item, Slot):
            head.append(_ITEM.pack(0, item.offset, item.length))
        else:
            head.append(_ITEM.pack(1, inline, len(item)))
            tail.append(item)
            inline += len(item)
    return b"".join(head + tail)


def ok_region(data: bytes) -> bytes:
    return bytes([OK]) + data


# -- server side: every reply checked --------------------------------------------
def parse(op: str, reply: bytes, arena: Arena, expected: int = 0):
    """The value of a reply to `op`; raises the reader's ServiceError, or
    Malformed. `expected` is the tile count asked for (tiles only)."""
    if not reply:
        raise Malformed("empty reply")
    status, body = reply[0], memoryview(reply)[1:]
    if status != OK:
        if status > len(ERRORS):
            raise Malformed("unknown error class")
        try:
            message = bytes(body).decode()
        except UnicodeDecodeError:
            raise Malformed("error message is not UTF-8") from None
        if len(message) > MAX_ERROR_CHARS or not message.isprintable():
            raise Malformed("error message is too long or not printable")
        raise ERRORS[status - 1](message)
    if op == "info":
        return _info(body)
    if op == "plan":
        return _plan(body)
    if op == "tiles":
        return _tiles(body, arena, expected)
    if op == "region":
        return bytes(body)
    raise ValueError(f"unknown reader op {op!r}")


def _info(body) -> tuple[tiler_pb2.SlideInfo, float]:
    try:
        info = tiler_pb2.SlideInfo.FromString(bytes(body))
    except Exception:
        raise Malformed("slide info does not parse") from None
    if info.width <= 0 or info.height <= 0 or not info.levels:
        raise Malformed("slide info without dimensions or levels")
    x, y = info.mpp_x, info.mpp_y
    return info, (x + y) / 2 if x > 0 and y > 0 and np.isfinite(x + y) else 0.0


def _plan(body) -> list[list[TileRect]]:
    if len(body) < _U32.size:
        raise Malformed("plan without a header")
    (n,) = _U32.unpack_from(body)
    head = _U32.size * (1 + n)
    if n > 64 or len(body) < head:
        raise Malformed("plan header is malformed")
    counts = [_U32.unpack_from(body, _U32.size * (1 + i))[0] for i in range(n)]
    if len(body) - head != sum(counts) * RECT.itemsize:
        raise Malformed("plan size does not match its counts")
    records = np.frombuffer(body, RECT, offset=head)
    if len(records) and not (
        (records["x"] >= 0).all()
        and (records["y"] >= 0).all()
        and (records["size"] > 0).all()
        and ((records["tissue"] >= 0) & (records["tissue"] <= 1)).all()
        and (np.isfinite(records["mpp"]) & (records["mpp"] > 0)).all()
    ):
        raise Malformed("plan holds an impossible tile")
    plans, start = [], 0
    for count in counts:
        plans.append(
            [
                TileRect(int(r["x"]), int(r["y"]), int(r["size"]), float(r["tissue"]), float(r["mpp"]))
                for r in records[start : start + count]
            ]
        )
        start += count
    return plans


def _tiles(body, arena: Arena, expected: int) -> list[bytes]:
    if len(body) < _U32.size:
        raise Malformed("tiles without a header")
    (n,) = _U32.unpack_from(body)
    tail = _U32.size + n * _ITEM.size
    if n != expected or len(body) < tail:
        raise Malformed("tile count does not match the request")
    inline = body[tail:]
    out = []
    for i in range(n):
        where, offset, length = _ITEM.unpack_from(body, _U32.size + i * _ITEM.size)
        if where == 0 and offset + length <= arena.size:
            out.append(arena.take(Slot(offset, length)))  # copied out before the reader may overwrite it
        elif where == 1 and offset + length <= len(inline):
            out.append(bytes(inline[offset : offset + length]))
        else:
            raise Malformed("tile slot outside the arena or the reply")
    return out
