"""Image bytes <-> uint8 RGB arrays, shared by tiler, embedder and gateway.

Encodings are smily.types.v1.ImageEncoding values.
"""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
from PIL import Image

from smily.types.v1 import types_pb2

from .errors import InvalidArgument

RAW_RGB, PNG, JPEG = types_pb2.IMAGE_ENCODING_RAW_RGB, types_pb2.IMAGE_ENCODING_PNG, types_pb2.IMAGE_ENCODING_JPEG

# Pillow's own decompression-bomb guard, for images this suite makes itself.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Uploads are refused by header() below, before Pillow would warn.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Uploaded images: the largest accepted, and how many are decoded at once
# (each holds up to 4 bytes per pixel while Pillow decodes it). configure() sets them.
_max_pixels = 4096 * 4096
_decodes = threading.BoundedSemaphore(2)
FORMATS = ("PNG", "JPEG")


def configure(max_pixels: int, decodes: int) -> None:
    """Set this process's limits on uploaded images (SMILY_MAX_IMAGE_PIXELS, SMILY_IMAGE_DECODES)."""
    global _max_pixels, _decodes
    _max_pixels, _decodes = max_pixels, threading.BoundedSemaphore(max(1, decodes))


def _open(data: bytes) -> Image.Image:
    """Open PNG or JPEG bytes and check their size from the header: no pixel is decoded here."""
    if not data:
        raise InvalidArgument("image is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise InvalidArgument(f"image is over the limit of {_max_pixels} pixels") from None
    except Image.UnidentifiedImageError:
        raise InvalidArgument("image is not PNG or JPEG; send PNG or JPEG") from None
    except Exception:
        raise InvalidArgument("image bytes are not a readable PNG or JPEG image") from None
    w, h = img.size
    if w * h > _max_pixels:
        img.close()
        raise InvalidArgument(f"image of {w}x{h} pixels is over the limit of {_max_pixels} pixels")
    return img


def header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) of PNG or JPEG bytes within the pixel limit, read from the header only."""
    with _open(data) as img:
        return img.format, img.size[0], img.size[1]


def decode(data: bytes, encoding: int = 0, width: int = 0, height: int = 0) -> np.ndarray:
    """Return an HxWx3 uint8 array; raises InvalidArgument on bad or oversized bytes."""
    if encoding == RAW_RGB:
        if width <= 0 or height <= 0 or len(data) != width * height * 3:
            raise InvalidArgument(
                f"raw RGB image of {width}x{height} needs {max(width * height * 3, 0)} bytes, got {len(data)}"
            )
        if width * height > _max_pixels:
            raise InvalidArgument(f"image of {width}x{height} pixels is over the limit of {_max_pixels} pixels")
        return np.frombuffer(data, np.uint8).reshape(height, width, 3)
    if encoding not in (0, PNG, JPEG):
        raise InvalidArgument(f"unknown image encoding {encoding}")
    with _open(data) as img, _decodes:
        try:
            img.load()
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
        except Exception:
            raise InvalidArgument("image bytes are not a readable PNG or JPEG image") from None


def encode(rgb: np.ndarray, encoding: int) -> bytes:
    if encoding == RAW_RGB:
        return np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    if encoding == JPEG:
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    elif encoding == PNG:
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    else:
        raise InvalidArgument(f"unknown image encoding {encoding}")
    return buf.getvalue()
