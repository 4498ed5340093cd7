"""Tiler throughput: tissue tiles per second through the service (real gRPC
StreamTiles against `smily serve tiler` in its own process, reader processes
behind it) versus a naive single-threaded OpenSlide read_region loop over the
same tiles of the same slide, in one run.

The slide is a 40,000 x 30,000 px pyramidal JPEG TIFF at 0.25 um/px (40x):
an elliptical tissue area filled with a rendered synthetic texture, repeated,
written tile by tile so the big level is never held in memory.

    .venv/bin/python bench/tiler.py [--mpp 1.0] [--tile-size 224] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image
from protos.smily.types.v1 import types_pb2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WIDTH, HEIGHT, MPP, TILE, PERIOD = 40_000, 30_000, 0.25, 256, 2048
GLASS = np.array([246, 244, 246], np.uint8)


def write_big_slide(path: str) -> None:
    import tifffile

    from services.tiler.synthetic import SlideSpec, render

    texture = render(SlideSpec("texture", "tiff", PERIOD, PERIOD, MPP, 21))
    # A texture that is all tissue: its own glass is replaced by a second copy, shifted.
    glass = (np.abs(texture.astype(int) - GLASS).sum(axis=2) < 30)[..., None]
    texture = np.where(glass, np.roll(texture, (PERIOD // 2, PERIOD // 3), axis=(0, 1)), texture)

    def tiles(level: int):
        ds = 4**level
        tex = np.asarray(Image.fromarray(texture).reduce(ds)) if ds > 1 else texture
        period = PERIOD // ds
        reps = -(-(period + TILE) // period)
        tex = np.tile(tex, (reps, reps, 1))  # so any tile-sized window wraps without seams
        w, h = -(-WIDTH // ds), -(-HEIGHT // ds)
        for ty in range(0, h, TILE):
            for tx in range(0, w, TILE):
                ys = (np.arange(ty, ty + TILE) * ds)[:, None]
                xs = (np.arange(tx, tx + TILE) * ds)[None, :]
                inside = ((xs - WIDTH / 2) / (0.42 * WIDTH)) ** 2 + ((ys - HEIGHT / 2) / (0.4 * HEIGHT)) ** 2 < 1
                window = tex[ty % period : ty % period + TILE, tx % period : tx % period + TILE]
                yield np.where(inside[..., None], window, GLASS)

    res = (1e4 / MPP, 1e4 / MPP)
    opts = dict(tile=(TILE, TILE), dtype=np.uint8, photometric="rgb", compression="jpeg",
                compressionargs={"level": 85}, resolution=res, resolutionunit="CENTIMETER", metadata=None)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(4):
            ds = 4**level
            shape = (-(-HEIGHT // ds), -(-WIDTH // ds), 3)
            tif.write(tiles(level), shape=shape, subfiletype=1 if level else 0, **opts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tiler(root: str, port: int) -> subprocess.Popen:
    env = dict(os.environ, SMILY_SLIDE_ROOTS=root, SMILY_TILER_PORT=str(port), SMILY_METRICS_PORT="0",
               SMILY_LOG_LEVEL="WARNING")
    return subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "tiler"], env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpp", type=float, default=1.0)
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--keep", help="directory to keep (and reuse) the big slide in")
    args = ap.parse_args()

    import grpc
    import openslide

    from protos.smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc
    from services.tiler import tiling

    root = args.keep or tempfile.mkdtemp(prefix="smily-bench-")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "big-40x.tiff")
    if not os.path.exists(path):
        t = time.perf_counter()
        write_big_slide(path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"wrote {WIDTH}x{HEIGHT} slide at {MPP} um/px in {time.perf_counter() - t:.1f} s "
              f"({os.path.getsize(path) / 2**20:.0f} MiB)")

    port = free_port()
    proc = start_tiler(root, port)
    try:
        stub = tiler_pb2_grpc.TilerServiceStub(grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]))
        for _ in range(200):
            try:
                stub.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide="big-40x.tiff"), timeout=5)
                break
            except grpc.RpcError:
                time.sleep(0.1)
        # A long-running service has its readers started and the slide open: so does the bench.
        for _ in range(4):
            stub.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide="big-40x.tiff"), timeout=30)
        req = tiler_pb2.StreamTilesRequest(
            slide="big-40x.tiff", params=tiler_pb2.TilingParams(mpp=args.mpp, tile_size=args.tile_size),
            encoding=types_pb2.IMAGE_ENCODING_RAW_RGB)
        t = time.perf_counter()
        rects, nbytes = [], 0
        for m in stub.StreamTiles(req, timeout=3600):
            rects.append((m.tile.x, m.tile.y, m.tile.width))
            nbytes += len(m.tile.image.data)
        service_s = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait()

    # Naive: one thread, one read_region per tile, same level choice and resize, fresh handle.
    slide = openslide.OpenSlide(path)
    t = time.perf_counter()
    naive_bytes = 0
    for x, y, size in rects:
        naive_bytes += len(tiling.read(slide, x, y, size, size, args.tile_size, args.tile_size).tobytes())
    naive_s = time.perf_counter() - t
    assert naive_bytes == nbytes

    n = len(rects)
    print(f"slide {WIDTH}x{HEIGHT} px at {MPP} um/px; tiles {args.tile_size} px at {args.mpp} um/px; "
          f"{n} tissue tiles; {os.cpu_count()} CPUs")
    print(f"service (gRPC StreamTiles, raw RGB): {service_s:.2f} s, {n / service_s:.0f} tiles/s "
          "(includes planning: thumbnail + tissue mask)")
    print(f"naive single-threaded read_region:   {naive_s:.2f} s, {n / naive_s:.0f} tiles/s")
    print(f"speed-up: {naive_s / service_s:.2f}x")


if __name__ == "__main__":
    main()
