"""Issue 16 step 3: overlapping tiles (stride < 1) and de-duplicated hits."""

from __future__ import annotations

import os
from types import SimpleNamespace as NS

import pytest

from smily import stack
from smily.client import Client
from smily.gateway import paging
from smily.gateway.v1 import gateway_pb2
from smily.tiler import slides as slide_files
from smily.tiler import tiling

from .helpers.wait import wait_done


def _hit(slide_id, x, y, size=100, score=1.0):
    return NS(slide_id=slide_id, score=score, tile=NS(x=x, y=y, width=size, height=size))


def test_distinct_keeps_the_best_of_overlapping_tiles():
    hits = [_hit("a", 0, 0), _hit("a", 50, 0), _hit("b", 0, 0), _hit("a", 100, 0), _hit("a", 50, 50)]
    # IoU of half-overlapping neighbours is 1/3, of diagonal ones 1/7: both above 0.1.
    assert [(h.slide_id, h.tile.x, h.tile.y) for h in paging.distinct(hits, 0.1)] == [
        ("a", 0, 0),
        ("b", 0, 0),
        ("a", 100, 0),
    ]
    assert len(paging.distinct(hits, 0.5)) == 5  # a higher threshold keeps partial overlaps
    assert len(paging.distinct(hits, 0.0)) == 5  # off
    got = paging.top_hits(lambda n: hits[:n], 3, 0, 0.1)
    assert [(h.slide_id, h.tile.x) for h in got] == [("a", 0), ("b", 0), ("a", 100)]


def test_half_stride_plans_every_grid_tile_and_the_ones_between(slide_dir):
    slide = slide_files.SlideCache().get(os.path.join(slide_dir, "synth-b.svs"))
    grid = tiling.plan(slide, 0.5, [1.0], 224, 0.5, 1.0)[0]
    half = tiling.plan(slide, 0.5, [1.0], 224, 0.5, 0.5)[0]
    assert {(t.x, t.y) for t in grid} <= {(t.x, t.y) for t in half}
    assert all(t.x % 224 == 0 and t.y % 224 == 0 and t.size == 448 for t in half)
    assert 3 * len(grid) <= len(half) <= 4 * len(grid)


@pytest.fixture(scope="module")
def overlapping(settings, tmp_path_factory):
    """A second index with half-overlapping tiles and its gateway, on the session's tiler and embedder."""
    s = settings.replace(
        index_port=0,
        gateway_port=0,
        tile_stride=0.5,
        redis_url="",
        index_dir=str(tmp_path_factory.mktemp("overlap-index")),
    )
    running, s = stack.start(["index", "gateway"], s)
    c = Client(f"127.0.0.1:{s.gateway.gateway_port}", timeout=300)
    op = wait_done(c, c.ingest("synth-a.tiff", "synth-a"))
    assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, op.error_message
    yield c
    c.close()
    stack.stop(running, 0)


def test_overlapping_tiles_localise_an_off_grid_crop(client, ingested, overlapping):
    assert overlapping.index_info().tiling.stride == 0.5
    grid = next(s.tile_count for s in client.slides() if s.slide_id == "synth-a")
    assert 3 * grid <= next(s.tile_count for s in overlapping.slides()) <= 4 * grid
    crop = dict(slide_id="synth-a", x=448 + 224, y=448 + 224, width=448, height=448)  # between four grid tiles
    on_grid = client.search(region=crop, k=1, slide_ids=["synth-a"]).hits[0]
    best = overlapping.search(region=crop, k=1).hits[0]
    assert (best.x, best.y, best.width) == (672, 672, 448)  # the crop is a tile of the overlapping index
    # The grid index holds only tiles on its 448 px grid, so its best is a neighbour, and matches less well.
    assert on_grid.x % 448 == 0 and on_grid.y % 448 == 0 and (on_grid.x, on_grid.y) != (672, 672)
    assert best.score > on_grid.score


def test_top_k_holds_no_two_overlapping_tiles(overlapping):
    hits = overlapping.search(region=dict(slide_id="synth-a", x=896, y=672, width=448, height=448), k=50).hits
    # One small slide holds a dozen or so separate spots: all of them, each once.
    assert len(hits) >= 10
    rects = [(h.x, h.y, h.width) for h in hits]
    for i, (x, y, w) in enumerate(rects):
        for x2, y2, _ in rects[i + 1 :]:
            assert abs(x - x2) >= w or abs(y - y2) >= w, (rects[i], (x2, y2))
