"""Finding and opening slides safely.

Slides are named by a path relative to one of the configured roots. The
name is resolved with realpath (so `..`, absolute paths and symlinks that
lead out are caught) and must stay inside a root. Only an allow-list of
facts leaves this module: never associated images (label, macro,
thumbnail) nor raw vendor properties, which carry patient data.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from urllib.parse import unquote

import openslide

from smily.common.errors import FailedPrecondition, InvalidArgument, NotFound


class SlideRoots:
    def __init__(self, roots: tuple[str, ...] | list[str]):
        if not roots:
            raise ValueError("at least one slide root is required")
        self.roots = [os.path.realpath(r) for r in roots]

    def resolve(self, name: str) -> str:
        """Return the real path of `name` under a root, or raise."""
        if not name or "\x00" in name:
            raise InvalidArgument("slide name is empty or malformed")
        if unquote(name) != name or "\\" in name:
            raise InvalidArgument("slide name must be a plain relative path (no %-escapes or backslashes)")
        if os.path.isabs(name) or ".." in name.split("/"):
            raise InvalidArgument("slide name must be relative to the slide roots, without '..'")
        for root in self.roots:
            path = os.path.realpath(os.path.join(root, name))
            if os.path.commonpath([root, path]) != root:
                raise InvalidArgument("slide name resolves outside the slide roots")
            if os.path.exists(path):
                if not os.path.isfile(path):
                    raise InvalidArgument(
                        "slide name is a folder, not a slide file (for MIRAX name the .mrxs file, "
                        "for DICOM WSI one .dcm file of the series)"
                    )
                return path
        raise NotFound("no such slide under the slide roots")


class SlideCache:
    """A few open OpenSlide handles, reused across requests (they are thread-safe).

    They share one decoded-tile cache, so neighbouring tiles that overlap a
    slide tile do not decode it twice. 32 MiB holds the slide tiles under a
    block of tiles (tiling.block_order); 128 MiB was slower on the bench
    slide (every decoded tile lands in fresh memory).
    """

    def __init__(self, size: int = 16, tile_cache_bytes: int = 32 * 1024 * 1024):
        self._size = size
        self._lock = threading.Lock()
        self._open: OrderedDict[str, tuple[float, openslide.OpenSlide]] = OrderedDict()
        self._tiles = openslide.OpenSlideCache(tile_cache_bytes)

    def get(self, path: str) -> openslide.OpenSlide:
        mtime = os.stat(path).st_mtime
        with self._lock:
            hit = self._open.get(path)
            if hit and hit[0] == mtime:
                self._open.move_to_end(path)
                return hit[1]
        slide = _open(path)
        slide.set_cache(self._tiles)
        with self._lock:
            self._open[path] = (mtime, slide)
            self._open.move_to_end(path)
            while len(self._open) > self._size:
                self._open.popitem(last=False)  # closed when the last reader lets go
        return slide

    def forget(self, path: str) -> None:
        """Drop a handle: after an error OpenSlide refuses every later call on it."""
        with self._lock:
            self._open.pop(path, None)


# Formats OpenSlide cannot read, named so the lab knows what to do instead.
UNSUPPORTED = {
    ".isyntax": "Philips iSyntax is not readable here; export the slide as Philips TIFF or DICOM WSI",
    ".czi": "Zeiss CZI is not readable here; export the slide as OME-TIFF or DICOM WSI",
}


def _open(path: str) -> openslide.OpenSlide:
    # OpenSlide's messages name the file path: they are not passed on.
    hint = UNSUPPORTED.get(os.path.splitext(path)[1].lower())
    if hint:
        raise FailedPrecondition(hint)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise FailedPrecondition("the slide file is empty (0 bytes); the upload or copy did not finish")
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        if _looks_like_slide_container(path):
            raise FailedPrecondition(
                "the file is a TIFF or DICOM file but cannot be read as a slide: it is damaged or truncated "
                "(an interrupted copy?) or not a tiled whole-slide image"
            ) from None
        raise FailedPrecondition(
            "the file is not a whole-slide image OpenSlide can read (Aperio, Hamamatsu, Leica, MIRAX, "
            "Philips TIFF, Ventana, generic tiled TIFF or DICOM WSI)"
        ) from None
    except openslide.OpenSlideError:
        raise FailedPrecondition("the slide file is damaged or truncated and cannot be opened") from None


def _looks_like_slide_container(path: str) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+") or head[128:132] == b"DICM"


def mpp(slide: openslide.OpenSlide) -> float:
    """Micrometres per level-0 pixel, or 0 when the file does not say."""
    try:
        x = float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X, 0) or 0)
        y = float(slide.properties.get(openslide.PROPERTY_NAME_MPP_Y, 0) or 0)
    except ValueError:
        return 0.0
    return (x + y) / 2 if x > 0 and y > 0 else 0.0


def geometry(slide) -> dict:
    """The size and levels part of a slide's info, for any slide with OpenSlide's level attributes."""
    w, h = slide.dimensions
    return {
        "width": w,
        "height": h,
        "levels": [
            {"width": lw, "height": lh, "downsample": ds}
            for (lw, lh), ds in zip(slide.level_dimensions, slide.level_downsamples)
        ],
    }


def info(slide: openslide.OpenSlide) -> dict:
    """The allow-listed facts about a slide."""
    props = slide.properties
    try:
        objective = float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER, 0) or 0)
    except ValueError:
        objective = 0.0
    return {
        **geometry(slide),
        "mpp_x": float(props.get(openslide.PROPERTY_NAME_MPP_X, 0) or 0),
        "mpp_y": float(props.get(openslide.PROPERTY_NAME_MPP_Y, 0) or 0),
        "objective_power": objective,
        "vendor": props.get(openslide.PROPERTY_NAME_VENDOR, ""),
        "fingerprint": props.get(openslide.PROPERTY_NAME_QUICKHASH1, ""),
    }
