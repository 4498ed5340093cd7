"""Tissue tiles of the hospital's own slides, drawn the way ingest draws them.

The tiler's own planning and reading code (smily.tiler.tiling), with its
tissue mask and a tiling record (the index's, or the one a gateway would
propose), cuts the tiles; each slide gives at most its share of the sample
so that no slide dominates. Besides a tile itself, a sample carries the two
positives only the slide can give: an overlapping neighbouring crop
(NearbyPatchCL) and the same place read at +-10 % scale.

Slides are named by their content fingerprint, never by path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import openslide

from smily.common.tiling import Tiling
from smily.tiler import slides as slide_files
from smily.tiler import tiling


class SampleError(RuntimeError):
    pass


@dataclass
class Slide:
    fingerprint: str  # content hash (OpenSlide quickhash), never the path
    handle: openslide.OpenSlide
    mpp: float
    plan: list  # the tiler's TileRects at the sampled resolution


@dataclass
class Tiles:
    """Tiles at tile_size px: `images[i]` is from slide `slide[i]` at `rects[i]`."""

    images: list[np.ndarray]
    slide: np.ndarray
    rects: np.ndarray  # (n, 4) level-0 x, y, width, height
    fingerprints: list[str]  # per slide index


def fingerprint(handle, path_for_fallback: str) -> str:
    quick = slide_files.info(handle).get("fingerprint", "")
    # A format without a quickhash: hash the first MiB of the file, never its name.
    if not quick:
        with open(path_for_fallback, "rb") as fh:
            quick = hashlib.sha256(fh.read(1 << 20)).hexdigest()
    return quick[:16]


def walk_roots(roots: list[str]) -> list[str]:
    """Slide files under the roots, in a stable order (what OpenSlide can open)."""
    found = []
    for root in roots:
        if not os.path.isdir(root):
            raise SampleError(f"slide root {root!r} is not a folder")
        for folder, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                path = os.path.join(folder, name)
                if not name.startswith(".") and openslide.OpenSlide.detect_format(path):
                    found.append(path)
    return found


def open_slides(paths: list[str], record: Tiling, mpp: float) -> list[Slide]:
    cache = slide_files.SlideCache(size=max(16, len(paths)))
    out, seen = [], set()
    for path in paths:
        handle = cache.get(path)
        slide_mpp = slide_files.mpp(handle)
        if slide_mpp <= 0:
            continue  # ingest would need --slide-mpp for it; the sample skips it
        fp = fingerprint(handle, path)
        if fp in seen:
            continue  # the same slide twice (a copy): once is enough
        seen.add(fp)
        plan = tiling.plan(handle, slide_mpp, [mpp], record.tile_size, record.min_tissue, record.stride)[0]
        if plan:
            out.append(Slide(fp, handle, slide_mpp, plan))
    return out


def _read(slide: Slide, x: int, y: int, size: int, out: int) -> np.ndarray:
    width, height = slide.handle.dimensions
    x, y = min(max(0, x), width - size), min(max(0, y), height - size)
    return tiling.read(slide.handle, x, y, size, size, out, out)


def neighbour(slide: Slide, rect, tile_size: int, rng) -> np.ndarray:
    """An overlapping crop: the tile's window moved by 1/8 to 1/2 of a tile."""
    x, y, size = int(rect[0]), int(rect[1]), int(rect[2])
    shift = rng.uniform(0.125, 0.5) * size
    angle = rng.uniform(0, 2 * np.pi)
    return _read(slide, x + round(shift * np.cos(angle)), y + round(shift * np.sin(angle)), size, tile_size)


def rescaled(slide: Slide, rect, tile_size: int, factor: float) -> np.ndarray:
    """The same centre read over a field `factor` times as wide, into the same pixels."""
    x, y, size = int(rect[0]), int(rect[1]), int(rect[2])
    grown = max(1, round(size * factor))
    return _read(slide, x - (grown - size) // 2, y - (grown - size) // 2, grown, tile_size)


def sample(slides: list[Slide], max_tiles: int, tile_size: int, rng) -> Tiles:
    """Up to max_tiles tiles, an equal share per slide (a small slide's unused
    share goes to the others), each slide's tiles drawn at random."""
    if not slides:
        raise SampleError("no slide with tissue tiles and a recorded resolution")
    counts = [0] * len(slides)
    left = np.array([len(s.plan) for s in slides])
    budget = max_tiles
    while budget > 0 and left.sum() > 0:
        open_ = np.flatnonzero(left > 0)
        share = max(1, budget // len(open_))
        for i in open_:
            take = int(min(share, left[i], budget))
            counts[i] += take
            left[i] -= take
            budget -= take
            if budget == 0:
                break
    images, slide_idx, rects = [], [], []
    for k, (s, n) in enumerate(zip(slides, counts)):
        for j in sorted(rng.choice(len(s.plan), n, replace=False)):
            t = s.plan[j]
            images.append(tiling.read(s.handle, t.x, t.y, t.size, t.size, tile_size, tile_size))
            slide_idx.append(k)
            rects.append((t.x, t.y, t.size, t.size))
    return Tiles(
        images, np.array(slide_idx, np.int64), np.array(rects, np.int64).reshape(-1, 4), [s.fingerprint for s in slides]
    )


def index_sources(index_target: str, timeout: float = 60.0) -> tuple[list[str], Tiling | None]:
    """The recorded sources of every slide an index service holds, and its
    tiling record (the gateway never hands sources out: they are paths)."""
    import grpc

    from smily.common.channels import channel
    from smily.index.v1 import index_pb2, index_pb2_grpc

    sources, token = [], ""
    with channel(index_target) as ch:
        stub = index_pb2_grpc.IndexServiceStub(ch)
        try:
            record = Tiling.from_pb(stub.GetIndexInfo(index_pb2.GetIndexInfoRequest(), timeout=timeout).tiling)
            while True:
                resp = stub.ListSlides(index_pb2.ListSlidesRequest(page_size=500, page_token=token), timeout=timeout)
                sources += [s.source for s in resp.slides if s.source]
                token = resp.next_page_token
                if not token:
                    return sources, record
        except grpc.RpcError as exc:
            raise SampleError(f"the index at {index_target} did not list its slides: {exc.code().name}") from None
