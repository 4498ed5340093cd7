"""Limits on the names and facts callers send: slide ids, metadata, filters.

The gateway checks them at the public boundary and the index again (defence
in depth), so one slide can never make every Search reply too big, and ids
stay safe to show, log and use as keys. Each refusal is an InvalidArgument
naming the limit.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping

from .errors import InvalidArgument

MAX_ID_CHARS = 128
MAX_METADATA_KEYS = 64
MAX_KEY_CHARS = 128
MAX_VALUE_CHARS = 1024
MAX_METADATA_BYTES = 16 * 1024  # keys and values of one slide, UTF-8
MAX_FILTERS = 32
MAX_SLIDE_IDS = 1000  # ids listed in one search (slide_ids, exclude_slide_ids)
MAX_SOURCE_CHARS = 1024
MAX_TOKEN_CHARS = 1024  # page tokens and operation ids

# Bounds of the public requests. gateway.proto states them next to the fields,
# the gateway checks them up front (gateway/requests.py) and the HTTP API's
# OpenAPI document declares them (http/openapi.py).
MAX_K = 1000  # hits of one search over every page; the index's limit too
DEFAULT_K = 10
MAX_SLIDE_MATCHES, DEFAULT_SLIDE_MATCHES = 100, 10
MAX_MOSAIC, DEFAULT_MOSAIC = 64, 16
MAX_REGIONS, DEFAULT_REGIONS = 20, 3
MAX_SIDE, DEFAULT_MAX_SIDE = 4096, 1024
MAX_EXAMPLES = 32  # per list (positives, negatives, with, without)
MAX_POLYGON_VERTICES = 256
MAX_POLYGON_CELLS = 64  # tile-sized cells of a polygon query, each one embedding
MAX_HEATMAP_TILES = 1000  # one index search (MAX_K)
MAX_CONCEPTS = 16
MAX_CONCEPT_WEIGHT = 10.0
MAX_QUERY_IMAGE_BYTES = 32 * 1024 * 1024
MAX_METADATA_QUERY_CHARS = 64  # find slides by metadata: the text a value starts with
CONCEPT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A model id, "NAME/VERSION" as the model repository names them.
MODEL_ID = re.compile(r"[A-Za-z0-9._-]{1,64}/[A-Za-z0-9._-]{1,64}")
# The most tiles per second a migration may be asked to re-embed at (its throttle).
MAX_MIGRATION_TILES_PER_S = 100_000.0
# A DICOM SH without QIDO wildcards, as the tiler requires.
ACCESSION = re.compile(r"[^*?\\\x00-\x1f]{1,16}")

# Explicit bidi controls (embeddings, overrides, isolates, marks): they make
# text display other than it reads.
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _text(value: str, what: str, max_chars: int) -> None:
    if len(value) > max_chars:
        raise InvalidArgument(f"{what} is longer than {max_chars} characters")
    if any(c in _BIDI for c in value):
        raise InvalidArgument(f"{what} must not hold bidirectional control characters")
    if not value.isprintable():  # control, format, surrogate and unassigned characters
        bad = next(c for c in value if not c.isprintable())
        raise InvalidArgument(f"{what} holds a non-printable character ({unicodedata.category(bad)} U+{ord(bad):04X})")


def slide_id(value: str, what: str = "slide_id") -> str:
    """A slide id: 1..128 printable characters, no path syntax, no outer spaces."""
    if not value:
        raise InvalidArgument(f"{what} is required")
    _text(value, what, MAX_ID_CHARS)
    if value != value.strip():
        raise InvalidArgument(f"{what} must not start or end with a space")
    if "/" in value or "\\" in value or value in (".", ".."):
        raise InvalidArgument(f"{what} must not hold path syntax ('/', '\\', '.' or '..')")
    return value


def slide_ids(values: Iterable[str], what: str) -> list[str]:
    values = list(values)
    if len(values) > MAX_SLIDE_IDS:
        raise InvalidArgument(f"{what} lists more than {MAX_SLIDE_IDS} slide ids")
    return [slide_id(v, what) for v in values]


def _pairs(pairs: Mapping[str, str], what: str) -> None:
    for key, value in pairs.items():
        if not key:
            raise InvalidArgument(f"{what} keys must not be empty")
        _text(key, f"a {what} key", MAX_KEY_CHARS)
        _text(value, f"the {what} value of {key!r}", MAX_VALUE_CHARS)


def metadata(pairs: Mapping[str, str]) -> dict[str, str]:
    """A slide's metadata: at most 64 keys, 128/1024 characters each, 16 KiB in all."""
    if len(pairs) > MAX_METADATA_KEYS:
        raise InvalidArgument(f"metadata has more than {MAX_METADATA_KEYS} keys")
    _pairs(pairs, "metadata")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in pairs.items())
    if size > MAX_METADATA_BYTES:
        raise InvalidArgument(f"metadata holds {size} bytes, over the limit of {MAX_METADATA_BYTES} per slide")
    return dict(pairs)


def filters(pairs: Mapping[str, str], what: str = "filters") -> dict[str, str]:
    if len(pairs) > MAX_FILTERS:
        raise InvalidArgument(f"{what} has more than {MAX_FILTERS} keys")
    _pairs(pairs, what)
    return dict(pairs)


def text(value: str, what: str, max_chars: int) -> str:
    """Any other caller string that is echoed, logged or used as a key."""
    _text(value, what, max_chars)
    return value


# Micrometres per level-0 pixel a scan can plausibly have (about 200x down to 0.5x).
MIN_SLIDE_MPP, MAX_SLIDE_MPP = 0.05, 20.0


def slide_mpp(value: float, what: str = "slide_mpp") -> float:
    """A stated resolution: 0 (the file's own) or a plausible one."""
    if value == 0:
        return 0.0
    if not (math.isfinite(value) and MIN_SLIDE_MPP <= value <= MAX_SLIDE_MPP):
        raise InvalidArgument(
            f"{what} must be 0 (the file's own) or {MIN_SLIDE_MPP:g}..{MAX_SLIDE_MPP:g} "
            f"microns per pixel, got {value:g}"
        )
    return value


def plausible_mpp(value: float) -> bool:
    return math.isfinite(value) and MIN_SLIDE_MPP <= value <= MAX_SLIDE_MPP


def tile_grid(width: int, height: int, slide_mpp: float, target_mpps, tile_size: int, stride: float = 1.0) -> int:
    """Grid cells a slide is cut into (every tile before the tissue test), as
    the tiler's planning cuts it: the bound on its tile count and planning work."""
    total = 0
    for m in target_mpps:
        size = max(1, round(tile_size * m / slide_mpp))
        step = max(1, round(size * (stride or 1.0)))
        total += grid_steps(width, size, step) * grid_steps(height, size, step)
    return total


def grid_steps(length: int, size: int, step: int) -> int:
    """Tiles of `size` at multiples of `step` that fit in `length`."""
    return (length - size) // step + 1 if length >= size else 0


def tiles_per_slide(grid: int, cap: int, slide_mpp: float) -> None:
    if grid > cap:
        raise InvalidArgument(
            f"the slide would be cut into {grid} tiles at {slide_mpp:g} microns per pixel, over the limit of "
            f"{cap} tiles per slide; check slide_mpp"
        )


def metadata_query(prefix: str, keys: Iterable[str], what: str = "metadata_query") -> tuple[tuple[str, ...], str]:
    """Find slides by metadata: (keys, prefix), bounded; the error never echoes the text (an accession number)."""
    keys = tuple(keys)
    _text(prefix, what, MAX_METADATA_QUERY_CHARS)
    if bool(prefix) != bool(keys):
        raise InvalidArgument(f"{what} and the metadata keys it is matched under go together: both or neither")
    if len(keys) > MAX_FILTERS:
        raise InvalidArgument(f"{what} matches under at most {MAX_FILTERS} metadata keys")
    for key in keys:
        _text(key, f"{what} key", MAX_KEY_CHARS)
    return keys, prefix
