"""Tiler throughput: tissue tiles per second through the service (real gRPC
StreamTiles against `smily serve tiler` in its own process, reader processes
behind it) versus, in the same run, two single-threaded loops over the same
tiles of the same slide: a naive one (OpenSlide's public read_region and
Pillow, as a script would do it) and the service's own per-tile read (what
the parallel readers alone add). Each side runs --rounds times and medians
are reported; the pixels are checked equal.

The slide is a 40,000 x 30,000 px pyramidal JPEG TIFF at 0.25 um/px (40x):
an elliptical tissue area filled with a rendered synthetic texture, repeated,
written tile by tile so the big level is never held in memory.

    .venv/bin/python bench/tiler.py [--mpp 1.0] [--tile-size 224] [--keep DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from smily.types.v1 import types_pb2

WIDTH, HEIGHT, MPP, TILE, PERIOD = 40_000, 30_000, 0.25, 256, 2048
GLASS = np.array([246, 244, 246], np.uint8)


def write_big_slide(path: str) -> None:
    import tifffile

    from smily.synthetic import SlideSpec, render

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
    opts = dict(
        tile=(TILE, TILE),
        dtype=np.uint8,
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 85},
        resolution=res,
        resolutionunit="CENTIMETER",
        metadata=None,
    )
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
    env = dict(
        os.environ,
        SMILY_SLIDE_ROOTS=root,
        SMILY_TILER_PORT=str(port),
        SMILY_METRICS_PORT="0",
        SMILY_LOG_LEVEL="WARNING",
        SMILY_PLAINTEXT="1",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "smily.cli", "serve", "tiler"],
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mpp", type=float, default=1.0)
    ap.add_argument("--tile-size", type=int, default=224)
    ap.add_argument("--keep", help="directory to keep (and reuse) the big slide in")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side; medians are reported")
    args = ap.parse_args()

    import grpc
    import openslide

    from smily.common import memory
    from smily.tiler import tiling
    from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc

    # The service's own malloc settings, for the client and the naive loop alike.
    memory.keep_large_buffers()

    root = args.keep or tempfile.mkdtemp(prefix="smily-bench-")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "big-40x.tiff")
    if not os.path.exists(path):
        t = time.perf_counter()
        write_big_slide(path + ".tmp")
        os.replace(path + ".tmp", path)
        print(
            f"wrote {WIDTH}x{HEIGHT} slide at {MPP} um/px in {time.perf_counter() - t:.1f} s "
            f"({os.path.getsize(path) / 2**20:.0f} MiB)"
        )

    port = free_port()
    proc = start_tiler(root, port)
    try:
        stub = tiler_pb2_grpc.TilerServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)])
        )
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
            slide="big-40x.tiff",
            params=tiler_pb2.TilingParams(mpp=args.mpp, tile_size=args.tile_size),
            encoding=types_pb2.IMAGE_ENCODING_RAW_RGB,
        )
        service_s = []
        for _ in range(args.rounds):
            # Like a consumer that uses each tile and lets it go (the gateway embeds batches of them).
            t = time.perf_counter()
            count = sum(len(tile.image.data) > 0 for m in stub.StreamTiles(req, timeout=3600) for tile in m.tiles)
            service_s.append(time.perf_counter() - t)
        tiles = [tile for m in stub.StreamTiles(req, timeout=3600) for tile in m.tiles]  # kept, untimed
        assert len(tiles) == count
        rects = [(tile.x, tile.y, tile.width) for tile in tiles]
        served = [tile.image.data for tile in tiles]
    finally:
        proc.terminate()
        proc.wait()

    # Same tiles, one thread, a fresh handle each round. "naive": OpenSlide's public read_region
    # and Pillow, as a script would do it; "one reader": the service's own per-tile read in a loop.
    def naive(slide, x, y, size, out):
        level = tiling.level_for(slide, size / out)
        side = round(size / slide.level_downsamples[level])
        region = slide.read_region((x, y), level, (side, side))
        rgb = Image.new("RGB", region.size, (255, 255, 255))
        rgb.paste(region, mask=region.getchannel("A"))
        return np.asarray(rgb if rgb.size == (out, out) else rgb.resize((out, out), Image.Resampling.BOX))

    def own(slide, x, y, size, out):
        return tiling.read(slide, x, y, size, size, out, out)

    baselines = {}
    for name, read in (("naive single-threaded read_region", naive), ("one reader, in-process", own)):
        times = []
        for _ in range(args.rounds):
            slide = openslide.OpenSlide(path)
            t = time.perf_counter()
            for x, y, size in rects:
                read(slide, x, y, size, args.tile_size)
            times.append(time.perf_counter() - t)
        baselines[name] = statistics.median(times)
        # Same pixels, or the comparison means nothing (untimed).
        slide = openslide.OpenSlide(path)
        assert all(
            read(slide, x, y, size, args.tile_size).tobytes() == data for (x, y, size), data in zip(rects, served)
        ), name

    n, service = len(rects), statistics.median(service_s)
    print(
        f"slide {WIDTH}x{HEIGHT} px at {MPP} um/px; tiles {args.tile_size} px at {args.mpp} um/px; "
        f"{n} tissue tiles; {os.cpu_count()} CPUs; median of {args.rounds} rounds"
    )
    print(
        f"service (gRPC StreamTiles, raw RGB): {service:.2f} s, {n / service:.0f} tiles/s "
        "(includes planning: thumbnail + tissue mask)"
    )
    for name, seconds in baselines.items():
        print(f"{name + ':':36s} {seconds:.2f} s, {n / seconds:.0f} tiles/s; service speed-up {seconds / service:.2f}x")


if __name__ == "__main__":
    main()
