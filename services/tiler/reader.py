"""The code that runs inside a reader process: every byte of a slide file is
parsed here, never in the gRPC server process (see workers.py).

Each process keeps its own OpenSlide handles and decoded-tile cache. Tile
pixels go back through the process's shared arena (arena.py), everything
else in the fixed layouts of protocol.py (never pickle: the server must not
trust this process); errors go back as an error class and a message with
OpenSlide's text (which names the file path) left out.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import uuid
from collections.abc import Callable
from multiprocessing import reduction

import openslide

from smily.common import errors, images, memory  # images sets Pillow's pixel limit
from smily.common.errors import ServiceError
from smily.tiler.v1 import tiler_pb2

from . import dicomweb, protocol, slides, tiling
from .arena import Arena

log = logging.getLogger("smily.tiler.reader")

_cache = slides.SlideCache()
_arena: Arena | None = None  # set by serve()


def slide_id(path: str) -> str:
    """An opaque id for logs: the path itself never appears there."""
    return hashlib.sha256(path.encode()).hexdigest()[:12]


def _slide(path: str):
    """An OpenSlide handle, or a DICOMweb series for a dicomweb locator (dicomweb.py)."""
    return dicomweb.open_series(path) if dicomweb.is_locator(path) else _cache.get(path)


def info(path: str) -> bytes:
    slide = _slide(path)
    facts = slide.info() if isinstance(slide, dicomweb.DicomWebSlide) else slides.info(slide)
    levels = [tiler_pb2.Level(**lvl) for lvl in facts.pop("levels")]
    dicom = tiler_pb2.DicomIdentifiers(**facts.pop("dicom", {}))
    return protocol.ok_info(tiler_pb2.SlideInfo(levels=levels, dicom=dicom, **facts))


def plan(
    path: str, slide_mpp: float, target_mpps: list[float], tile_size: int, min_tissue: float, stride: float = 1.0
) -> bytes:
    return protocol.ok_plan(tiling.plan(_slide(path), slide_mpp, target_mpps, tile_size, min_tissue, stride))


def tiles(path: str, rects: list[tuple[int, int, int]], tile_size: int, encoding: int) -> bytes:
    """Encoded square tiles at level-0 (x, y, size), read in the order given, placed in the arena."""
    slide = _slide(path)
    assert _arena is not None, "serve() sets the arena before any request"
    _arena.reset()
    out = []
    for x, y, size in rects:
        pixels = tiling.read(slide, x, y, size, size, tile_size, tile_size)
        out.append(_arena.put(pixels if encoding == images.RAW_RGB else images.encode(pixels, encoding)))
    return protocol.ok_tiles(out)


def region(path: str, x: int, y: int, w: int, h: int, out_w: int, out_h: int, encoding: int) -> bytes:
    return protocol.ok_region(images.encode(tiling.read(_slide(path), x, y, w, h, out_w, out_h), encoding))


OPS: dict[str, Callable[..., bytes]] = {"info": info, "plan": plan, "tiles": tiles, "region": region}


def _run(op: str, path: str, args: list) -> bytes:
    try:
        return OPS[op](path, *args)
    except ServiceError as exc:
        return protocol.error(type(exc), str(exc))
    except openslide.OpenSlideError as exc:
        _cache.forget(path)
        log.warning("slide read failed", extra={"slide_id": slide_id(path), "error_type": type(exc).__name__})
        return protocol.error(
            errors.FailedPrecondition, "the slide file is damaged or truncated: a part of it cannot be read"
        )
    except MemoryError:
        return protocol.error(errors.ResourceExhausted, "the slide reader ran out of memory; ask for a smaller region")
    except Exception as exc:  # a bug here must not look like a crash of the reader
        error_id = uuid.uuid4().hex[:12]
        log.error(
            "reader error", extra={"slide_id": slide_id(path), "error_type": type(exc).__name__, "error_id": error_id}
        )
        return protocol.error(errors.ServiceError, f"internal error in the slide reader (error id {error_id})")


def serve(conn, arena_size: int, log_level: str = "INFO") -> None:
    """Answer protocol requests on `conn` until the server closes it; the
    first thing on `conn` is the arena's file descriptor."""
    global _arena
    from smily.common import logs

    logs.setup(log_level)
    memory.keep_large_buffers()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process decides when readers stop
    _arena = Arena(reduction.recv_handle(conn), arena_size)
    conn.send_bytes(READY)
    while True:
        try:
            op, path, args = protocol.parse_request(conn.recv_bytes())
        except (EOFError, OSError):
            return
        conn.send_bytes(_run(op, path, args))


READY = b"ready"
