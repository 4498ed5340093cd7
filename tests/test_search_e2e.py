"""Ingest and search end to end through the real gateway, tiler, embedder and index."""

from __future__ import annotations

import os

import grpc
import pytest

from smily.common.channels import channel
from smily.gateway.v1 import gateway_pb2
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc
from smily.types.v1 import types_pb2

from .conftest import CMU, TEST_SLIDES, rpc_code, streamed_tiles
from .helpers.wait import wait_done


def _tissue_tile(settings, name: str):
    """A tile the tiler calls almost all tissue, from the middle of the slide's list."""
    stub = tiler_pb2_grpc.TilerServiceStub(channel(settings.tiler.tiler_target))
    tiles = streamed_tiles(
        stub, tiler_pb2.StreamTilesRequest(slide=name, params=tiler_pb2.TilingParams(min_tissue_fraction=0.9))
    )
    assert tiles, name
    return tiles[len(tiles) // 2], stub


# A crop shifted by a third (a quarter) of a tile off the grid lies 4/9 (9/16) on its source
# tile, 2/9 (3/16) on an edge neighbour and 1/9 (1/16) on a diagonal one.
SOURCE = 0.25  # more than any neighbour holds: the source tile itself
EDGE = 0.15  # more than any diagonal neighbour holds: the source or a tile sharing a side band


def _overlap(hit, rect) -> float:
    ox = max(0, min(hit.x + hit.width, rect["x"] + rect["width"]) - max(hit.x, rect["x"]))
    oy = max(0, min(hit.y + hit.height, rect["y"] + rect["height"]) - max(hit.y, rect["y"]))
    return ox * oy / (rect["width"] * rect["height"])


@pytest.mark.parametrize("name", [TEST_SLIDES[1].name, TEST_SLIDES[2].name, CMU])
def test_off_grid_crop_finds_its_source(client, settings, ingested, name):
    tile, _ = _tissue_tile(settings, name)
    size = tile.width
    # Shifted a third of a tile off the grid: no indexed tile matches it exactly.
    rect = dict(x=tile.x + size // 3, y=tile.y + size // 3, width=size, height=size)
    slide_id = os.path.splitext(name)[0]
    resp = client.search(region=dict(slide_id=slide_id, **rect), k=5)
    assert len(resp.hits) == 5
    assert resp.model_id == "efficientnet-lite0/1"
    scores = [h.score for h in resp.hits]
    assert scores == sorted(scores, reverse=True)
    assert any(h.slide_id == slide_id and _overlap(h, rect) > SOURCE for h in resp.hits), [
        (h.slide_id, h.x, h.y, round(h.score, 3)) for h in resp.hits
    ]


def test_image_query_matches_region_query(client, settings, ingested):
    name = TEST_SLIDES[0].name
    tile, tiler = _tissue_tile(settings, name)
    rect = dict(x=tile.x + tile.width // 4, y=tile.y + tile.height // 4, width=tile.width, height=tile.height)
    png = tiler.ReadRegion(
        tiler_pb2.ReadRegionRequest(
            slide=name, mpp=settings.gateway.tile_mpp, encoding=types_pb2.IMAGE_ENCODING_PNG, **rect
        )
    ).image.data
    by_image = client.search(image=png, k=5)
    by_region = client.search(region=dict(slide_id="synth-a", **rect), k=5)
    assert [(h.slide_id, h.x, h.y) for h in by_image.hits][:3] == [(h.slide_id, h.x, h.y) for h in by_region.hits][:3]
    assert by_image.hits[0].metadata["file"] == name
    assert any(_overlap(h, rect) > EDGE and h.slide_id == "synth-a" for h in by_image.hits), (
        rect,
        (tile.x, tile.y, tile.width),
        [(h.slide_id, h.x, h.y, h.width, round(_overlap(h, rect), 3), round(h.score, 3)) for h in by_image.hits],
    )


def test_second_identical_query_is_served_from_cache(client, ingested):
    region = dict(slide_id="synth-b", x=1000, y=700, width=448, height=448)
    first = client.search(region=region, k=3)
    second = client.search(region=region, k=3)
    assert second.cached
    assert [(h.slide_id, h.x, h.y) for h in first.hits] == [(h.slide_id, h.x, h.y) for h in second.hits]


def test_exclude_query_slide(client, ingested):
    resp = client.search(
        region=dict(slide_id="synth-b", x=1000, y=700, width=448, height=448), k=20, exclude_query_slide=True
    )
    assert resp.hits and all(h.slide_id != "synth-b" for h in resp.hits)


def test_reingest_replaces_never_duplicates(client, ingested):
    before = {s.slide_id: s.tile_count for s in client.slides()}
    op = wait_done(client, client.ingest(TEST_SLIDES[0].name, "synth-a", {"file": TEST_SLIDES[0].name, "run": "2"}))
    assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED
    after = {s.slide_id: s for s in client.slides()}
    assert {k: v.tile_count for k, v in after.items()} == before
    assert after["synth-a"].metadata["run"] == "2"
    hits = client.search(region=dict(slide_id="synth-a", x=900, y=900, width=448, height=448), k=50).hits
    keys = [(h.slide_id, h.x, h.y, h.width) for h in hits]
    assert len(keys) == len(set(keys))


def test_ingest_reports_progress_and_default_id(client, ingested):
    op = ingested[TEST_SLIDES[1].name]
    assert op.progress.tiles_total == op.progress.tiles_indexed > 10
    # Without a caller id, the id comes from the slide's content, not its file name.
    op = wait_done(client, client.ingest(TEST_SLIDES[1].name))
    assert op.slide_id.startswith("s-") and "synth" not in op.slide_id
    assert client.delete(op.slide_id) == op.progress.tiles_indexed


def test_list_slides_pages(client, ingested):
    first = client.stub.ListSlides(gateway_pb2.ListSlidesRequest(page_size=2))
    assert len(first.slides) == 2 and first.next_page_token
    rest = client.stub.ListSlides(gateway_pb2.ListSlidesRequest(page_size=100, page_token=first.next_page_token))
    ids = [s.slide_id for s in first.slides] + [s.slide_id for s in rest.slides]
    assert len(ids) == len(set(ids)) >= 4
    assert all(s.model_id == "efficientnet-lite0/1" and s.tile_count > 0 for s in rest.slides)


def test_delete_slide(client, ingested):
    op = wait_done(client, client.ingest(TEST_SLIDES[2].name, "to-delete"))
    # A copy of synth-c-40x: the same query finds it before the delete, and never after.
    query = dict(slide_id="synth-c-40x", x=1000, y=1000, width=896, height=896)
    assert "to-delete" in {h.slide_id for h in client.search(region=query, k=100).hits}
    assert client.delete("to-delete") == op.progress.tiles_indexed
    assert "to-delete" not in {s.slide_id for s in client.slides()}
    assert rpc_code(client.delete, "to-delete") == grpc.StatusCode.NOT_FOUND
    hits = client.search(region=query, k=100).hits
    assert hits and "to-delete" not in {h.slide_id for h in hits}


@pytest.mark.parametrize(
    "source, code",
    [
        ("no-such-slide.svs", grpc.StatusCode.NOT_FOUND),
        ("../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
        ("/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
        ("%2e%2e/secret.svs", grpc.StatusCode.INVALID_ARGUMENT),
        ("", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_ingest_sources(client, source, code):
    assert rpc_code(client.ingest, source) == code


def test_bad_queries(client, ingested):
    assert rpc_code(client.search, image=b"this is not an image") == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(client.search, image=b"") == grpc.StatusCode.INVALID_ARGUMENT
    region = dict(slide_id="synth-a", x=0, y=0, width=448, height=448)
    assert rpc_code(client.search, region=region, k=0) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(client.search, region=region, k=-3) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(client.search, region=dict(region, slide_id="unknown")) == grpc.StatusCode.NOT_FOUND
    assert rpc_code(client.search, region=dict(region, x=10**7)) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(client.stub.Search, gateway_pb2.SearchRequest()) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        rpc_code(client.stub.GetOperation, gateway_pb2.GetOperationRequest(operation_id="nope"))
        == grpc.StatusCode.NOT_FOUND
    )
