"""Cutting a slide into tissue tiles at one or more physical resolutions.

A slide is an OpenSlide handle or a dicomweb.DicomWebSlide, which has the
same dimensions/level_* members and reads a level itself.

A tile of `tile_size` pixels at `target_mpp` covers tile_size * target_mpp /
slide_mpp level-0 pixels. It is read from the coarsest pyramid level that is
still at least as fine as the target, then downsampled by area averaging, so
a 20x and a 40x scan give the same field of view.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import numpy as np
import openslide
from openslide import lowlevel
from PIL import Image

from smily.common.errors import FailedPrecondition
from smily.common.limits import grid_steps

from .tissue import tissue_mask

# Mask pixels per tile edge: enough to measure a tissue fraction.
MASK_PX_PER_TILE = 8
MAX_THUMBNAIL_SIDE = 4096
BLOCK_PIXELS = 1792
# Largest pyramid level read whole to make the thumbnail.
MAX_THUMBNAIL_SOURCE_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class TileRect:
    x: int
    y: int
    size: int  # level-0 pixels, square
    tissue_fraction: float
    mpp: float  # resolution of the tile as sent


def level_for(slide: openslide.OpenSlide, downsample: float) -> int:
    """The coarsest level whose downsample does not exceed `downsample`."""
    best = 0
    for i, ds in enumerate(slide.level_downsamples):
        if ds <= downsample * 1.001:
            best = i
    return best


def _read_level(slide: openslide.OpenSlide, x: int, y: int, w: int, h: int, level: int) -> Image.Image:
    ds = slide.level_downsamples[level]
    lw, lh = max(1, round(w / ds)), max(1, round(h / ds))
    if not isinstance(slide, openslide.OpenSlide):  # a DICOMweb series (dicomweb.DicomWebSlide)
        return slide.read_level(x, y, level, lw, lh)
    # openslide_read_region fills premultiplied BGRA. openslide-python's public
    # read_region un-premultiplies it into RGBA that must then be composited
    # again (a fifth of a tile's read time); here it is converted once. The
    # private _read_region is stable since 2012, and openslide-python is pinned.
    buf = (ctypes.c_uint32 * (lw * lh))()
    lowlevel._read_region(slide._osr, buf, x, y, level, lw, lh)
    px = np.ctypeslib.as_array(buf)
    if (px >= 0xFF000000).all():  # opaque: nearly every read
        return Image.frombuffer("RGB", (lw, lh), px, "raw", "BGRX", 0, 1)
    # Transparent pixels (outside the scanned area) become white, like glass:
    # premultiplied colour + (1 - alpha) * white, which cannot overflow.
    bgra = px.view(np.uint8).reshape(lh, lw, 4)
    return Image.fromarray(bgra[..., 2::-1] + (255 - bgra[..., 3:]))


def read(slide: openslide.OpenSlide, x: int, y: int, w: int, h: int, out_w: int, out_h: int) -> np.ndarray:
    """Read a level-0 rectangle and return it as out_h x out_w x 3 uint8 RGB."""
    rgb = _read_level(slide, x, y, w, h, level_for(slide, min(w / out_w, h / out_h)))
    if rgb.size != (out_w, out_h):
        rgb = rgb.resize((out_w, out_h), Image.Resampling.BOX)
    return np.asarray(rgb)


def plan(
    slide: openslide.OpenSlide,
    slide_mpp: float,
    target_mpps: list[float],
    tile_size: int,
    min_tissue: float,
    stride: float = 1.0,
) -> list[list[TileRect]]:
    """For each target resolution, its tissue tiles in row-major order; none
    reaches past the edge. Tiles step by `stride` of a tile (1.0: abutting,
    0.5: each overlaps its neighbours by half). One thumbnail mask serves every
    resolution."""
    sizes = [max(1, round(tile_size * m / slide_mpp)) for m in target_mpps]
    width, height = slide.dimensions
    scale = min(MASK_PX_PER_TILE / min(sizes), MAX_THUMBNAIL_SIDE / max(width, height), 1.0)
    tw, th = max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))
    mask = tissue_mask(thumbnail(slide, tw, th))
    return [
        _grid(mask, width, height, size, max(1, round(size * stride)), size * slide_mpp / tile_size, min_tissue)
        for size in sizes
    ]


def block_side(tile_size: int) -> int:
    """Tiles per edge of a block: about 1792 output pixels (8 tiles of 224)."""
    return max(1, min(8, round(BLOCK_PIXELS / tile_size)))


def block_order(rects: list[TileRect], tile_size: int) -> list[list[TileRect]]:
    """Row-major tiles regrouped into square blocks of tiles, blocks in row-major
    order, tiles row-major inside each block. One block goes to one reader, so
    the slide tiles a block overlaps are decoded once, in one process, instead
    of once per reader that holds a neighbouring row."""
    if not rects:
        return []
    side = block_side(tile_size) * rects[0].size
    blocks: dict[tuple[int, int], list[TileRect]] = {}
    for t in rects:
        blocks.setdefault((t.y // side, t.x // side), []).append(t)
    return [blocks[k] for k in sorted(blocks)]


def thumbnail(slide: openslide.OpenSlide, tw: int, th: int) -> np.ndarray:
    """The slide shrunk to tw x th RGB, read from the best pyramid level, which
    is size-checked first: a file with no small level would otherwise make the
    reader decode the whole slide at once."""
    level = slide.get_best_level_for_downsample(max(slide.dimensions[0] / tw, slide.dimensions[1] / th))
    lw, lh = slide.level_dimensions[level]
    if lw * lh > MAX_THUMBNAIL_SOURCE_PIXELS:
        raise FailedPrecondition(
            f"the slide has no low-resolution level small enough for tissue detection (smallest usable level "
            f"is {lw}x{lh} pixels); re-save it as a pyramidal (multi-resolution) file"
        )
    rgb = _read_level(slide, 0, 0, *slide.dimensions, level)
    return np.asarray(rgb.resize((tw, th), Image.Resampling.BOX))


def _grid(
    mask: np.ndarray, width: int, height: int, size: int, step: int, mpp: float, min_tissue: float
) -> list[TileRect]:
    cols, rows = grid_steps(width, size, step), grid_steps(height, size, step)
    sy, sx = mask.shape[0] / height, mask.shape[1] / width
    tiles = []
    for r in range(rows):
        y = r * step
        y0, y1 = int(y * sy), max(int(y * sy) + 1, int((y + size) * sy))
        for c in range(cols):
            x = c * step
            x0, x1 = int(x * sx), max(int(x * sx) + 1, int((x + size) * sx))
            frac = float(mask[y0:y1, x0:x1].mean()) if y1 <= mask.shape[0] and x1 <= mask.shape[1] else 0.0
            if frac >= min_tissue:
                tiles.append(TileRect(x, y, size, frac, mpp))
    return tiles
