"""`make demo`: the whole system end to end on the sample slides, then stop.

Starts Redis (when installed) and the four services on free loopback ports
with a fresh index, ingests every slide in the folder, searches with a
region of one slide (off the tile grid) and with the same patch as a PNG
upload, prints the hits and the time of each step, and stops it all.
"""

from __future__ import annotations

import os
import sys
import time

from smily.client import Client
from smily.common import logs
from smily.common.channels import channel
from smily.common.config import Settings
from smily.localstack import keep_password, local_stack
from smily.output import print_hits
from smily.synthetic import BIG_SLIDE
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc
from smily.types.v1 import types_pb2

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".bif", ".dcm")


def _step(name: str, start: float) -> float:
    now = time.perf_counter()
    print(f"[{now - start:6.1f}s] {name}")
    return now


def run(slides_dir: str) -> int:
    logs.setup("WARNING")
    names = sorted(f for f in os.listdir(slides_dir) if f.lower().endswith(SLIDE_SUFFIXES))
    if BIG_SLIDE.name in names:  # the README's walk-through wrote it to try cancel on: minutes to ingest
        names.remove(BIG_SLIDE.name)
        print(f"skipping {BIG_SLIDE.name}, the slow slide of `smily sample-data --big`")
    if not names:
        print(f"no slides in {slides_dir}; run `make sample-data`")
        return 1
    t0 = time.perf_counter()
    with local_stack((slides_dir,)) as settings:
        if not settings.gateway.redis_url:
            print("warning: redis-server is not installed; using an in-process query cache")
        if _ingest_and_search(settings, names, t0):
            return 1
    _step("stopped", t0)
    return 0


def _ingest_and_search(settings: Settings, names: list[str], t0: float) -> int:
    """Ingest every slide, then search by region and by image; non-zero on failure."""
    # The generated password goes to a file of the demo's own (0600), never to the terminal.
    redis = keep_password(
        settings.gateway.redis_url, os.path.join(os.path.dirname(settings.index.index_dir), "redis-password")
    )
    _step(
        f"started redis {'(' + redis + ')' if settings.gateway.redis_url else '(none)'} and 4 services "
        f"(gateway on port {settings.gateway.gateway_port})",
        t0,
    )
    client = Client(f"127.0.0.1:{settings.gateway.gateway_port}", timeout=120)

    for name in names:
        t = time.perf_counter()
        slide_id = os.path.splitext(name)[0]
        op = client.wait(client.ingest(name, slide_id, {"sample": name}))
        if op.error_code:
            print(f"ingest of {name} failed: {op.error_code}: {op.error_message}")
            return 1
        print(f"  ingested {slide_id}: {op.progress.tiles_indexed} tissue tiles in {time.perf_counter() - t:.1f}s")
    _step(f"ingested {len(names)} slides", t0)

    # A query region off the tile grid: a third of a tile right and down of a tissue tile.
    tiler = tiler_pb2_grpc.TilerServiceStub(channel(settings.tiler.tiler_target))
    query_slide = names[len(names) // 2]
    tiles = [
        t
        for m in tiler.StreamTiles(
            tiler_pb2.StreamTilesRequest(slide=query_slide, params=tiler_pb2.TilingParams(min_tissue_fraction=0.9))
        )
        for t in m.tiles
    ]
    tile = tiles[len(tiles) // 2]
    size = tile.width
    region = dict(
        slide_id=os.path.splitext(query_slide)[0], x=tile.x + size // 3, y=tile.y + size // 3, width=size, height=size
    )
    print(f"\nquery: region {region['x']},{region['y']},{size},{size} of {region['slide_id']}")
    t = time.perf_counter()
    resp = client.search(region=region, k=5)
    print_hits(resp)
    print(f"  ({(time.perf_counter() - t) * 1000:.0f} ms)")
    t = time.perf_counter()
    resp = client.search(region=region, k=5)
    print(f"same query again: {(time.perf_counter() - t) * 1000:.0f} ms, cached={resp.cached}")

    png = tiler.ReadRegion(
        tiler_pb2.ReadRegionRequest(
            slide=query_slide,
            x=region["x"],
            y=region["y"],
            width=size,
            height=size,
            mpp=settings.gateway.tile_mpp,
            encoding=types_pb2.IMAGE_ENCODING_PNG,
        )
    ).image.data
    print(f"\nquery: the same patch uploaded as a {len(png) // 1024} KiB PNG")
    resp = client.search(image=png, k=5)
    print_hits(resp)
    _step("searched", t0)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1] if len(sys.argv) > 1 else "data/samples"))
