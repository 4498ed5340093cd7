"""Image bytes <-> uint8 RGB arrays, shared by tiler, embedder and gateway.

Encodings are smily.types.v1.ImageEncoding values.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from smily.types.v1 import types_pb2

from .errors import InvalidArgument

RAW_RGB, PNG, JPEG = types_pb2.IMAGE_ENCODING_RAW_RGB, types_pb2.IMAGE_ENCODING_PNG, types_pb2.IMAGE_ENCODING_JPEG

# Decompression-bomb guard for uploaded and stored images.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def decode(data: bytes, encoding: int = 0, width: int = 0, height: int = 0) -> np.ndarray:
    """Return an HxWx3 uint8 array; raises InvalidArgument on bad bytes."""
    if encoding == RAW_RGB:
        if width <= 0 or height <= 0 or len(data) != width * height * 3:
            raise InvalidArgument(
                f"raw RGB image of {width}x{height} needs {max(width * height * 3, 0)} bytes, got {len(data)}"
            )
        return np.frombuffer(data, np.uint8).reshape(height, width, 3)
    if not data:
        raise InvalidArgument("image is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("PNG", "JPEG", "TIFF", "BMP", "WEBP"):
                raise InvalidArgument(f"unsupported image format {img.format}; send PNG or JPEG")
            return np.asarray(img.convert("RGB"))
    except InvalidArgument:
        raise
    except Image.DecompressionBombError:
        raise InvalidArgument(f"image larger than {MAX_IMAGE_PIXELS} pixels") from None
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
