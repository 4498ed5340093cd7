"""schemathesis hooks for tests/test_openapi_fuzz.py (SCHEMATHESIS_HOOKS).

Two values the OpenAPI document can describe but JSON Schema cannot generate:
image bytes (`format: byte` / `binary`) are real PNG or JPEG images, each of
its own colour (identical examples with and without a concept teach nothing,
an INVALID_ARGUMENT), and page tokens are the server's own (`format:
page-token`), so a first page is asked for. A polygon's vertices must lie in
its region's bounding box, which JSON Schema cannot state: generated polygons
are dropped (tests/test_viewer_api.py queries by polygon). So is ListSlides'
metadataKey: it must be one of the deployment's searchable keys
(SMILY_SLIDE_SEARCH_KEYS), which a static document cannot enumerate
(tests/test_slide_search.py covers it).
"""

from __future__ import annotations

import base64
import io
import itertools

import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _image(colour: tuple[int, int, int], side: int, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(out, format=fmt)
    return out.getvalue()


_DRAWS = itertools.count()


def _colour(_) -> tuple[int, int, int]:
    n = next(_DRAWS) * 7919  # a prime stride walks the RGB cube without repeating for 2**24 draws
    return (n % 256, (n // 256) % 256, (n // 65536) % 256)


_IMAGES = st.builds(_image, st.none().map(_colour), st.integers(8, 96), st.sampled_from(["PNG", "JPEG"]))
schemathesis.openapi.format("byte", _IMAGES.map(lambda b: base64.b64encode(b).decode()))
schemathesis.openapi.format("binary", _IMAGES)
schemathesis.openapi.format("page-token", st.just(""))


def _without_polygons(value):
    if isinstance(value, dict):
        return {k: _without_polygons(v) for k, v in value.items() if k != "polygon"}
    if isinstance(value, list):
        return [_without_polygons(v) for v in value]
    return value


@schemathesis.hook
def map_body(context, body):
    return _without_polygons(body)


@schemathesis.hook
def map_query(context, query):
    return {k: v for k, v in (query or {}).items() if k != "metadataKey"} if query else query
