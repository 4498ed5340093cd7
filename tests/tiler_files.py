"""Slide files the tiler must survive, written byte by byte or with tifffile."""
from __future__ import annotations

import struct

import numpy as np
from PIL import Image


def huge_tile_tiff(path: str, side: int = 1 << 20) -> None:
    """A one-tile TIFF declaring a side x side tile backed by 64 bytes.

    Opening it works; reading any pixel makes libtiff/OpenSlide allocate
    side*side*4 bytes (4 TiB by default) and GLib aborts the process on the
    failed allocation: a real decoder crash, no fault injection.
    """
    tags = [(256, 4, side), (257, 4, side), (258, 3, None), (259, 3, 1), (262, 3, 2), (277, 3, 3),
            (284, 3, 1), (322, 4, side), (323, 4, side), (324, 4, None), (325, 4, 64)]
    ifd_end = 8 + 2 + 12 * len(tags) + 4
    bps_at, data_at = ifd_end, ifd_end + 8
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)))
    for tag, typ, val in tags:
        count = 3 if tag == 258 else 1
        val = {258: bps_at, 324: data_at}.get(tag, val)
        out += struct.pack("<HHIHH", tag, typ, count, val, 0) if typ == 3 and count == 1 else \
            struct.pack("<HHII", tag, typ, count, val)
    out += struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + b"\0\0" + b"\x80" * 64
    with open(path, "wb") as fh:
        fh.write(out)


def truncated_copy(src: str, dst: str, keep: float = 0.5) -> None:
    with open(src, "rb") as fh:
        data = fh.read()
    with open(dst, "wb") as fh:
        fh.write(data[: int(len(data) * keep)])


def jpeg_named(path: str) -> None:
    Image.fromarray(np.full((64, 64, 3), (200, 120, 160), np.uint8)).save(path, format="JPEG")


def fake_isyntax(path: str) -> None:
    # iSyntax files start with an XML header; OpenSlide has no reader for them.
    with open(path, "wb") as fh:
        fh.write(b'<?xml version="1.0" encoding="UTF-8" ?>\r\n<DataObject ObjectType="DPUfsImport">\r\n' + b"\0" * 4096)
