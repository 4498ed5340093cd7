"""A slide file that records no resolution, through the gateway: refused
until the caller states it, then ingested, searched and read at that one."""

from __future__ import annotations

import grpc
import pytest
import tifffile

from smily.common.channels import channel
from smily.gateway.v1 import gateway_pb2
from smily.synthetic import SlideSpec, render
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc

from .conftest import rpc_code, streamed_tiles
from .helpers.wait import wait_done


def test_a_slide_without_resolution_is_used_at_the_stated_one(client, ingested, settings, scratch):
    rgb = render(SlideSpec("no-mpp", "tiff", 1536, 1024, 0.5, 6))
    tifffile.imwrite(scratch.path("no-mpp.tiff"), rgb, tile=(256, 256), photometric="rgb", metadata=None)
    name = scratch.slide("no-mpp.tiff")

    with pytest.raises(grpc.RpcError) as refused:
        client.ingest(name, "no-mpp")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "slide_mpp" in refused.value.details()
    assert rpc_code(client.ingest, name, "no-mpp", None, -0.5) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(client.search_slides, source=name) == grpc.StatusCode.FAILED_PRECONDITION

    op = wait_done(client, client.ingest(name, "no-mpp", {"file": name}, slide_mpp=0.5))
    assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, op.error_message
    try:
        (slide,) = [s for s in client.slides() if s.slide_id == "no-mpp"]
        assert slide.slide_mpp == 0.5 and slide.tile_count == op.progress.tiles_indexed > 0
        # Later reads of the slide use the stated resolution: 448 level-0 px at 0.5 are 224 px at 1.0.
        tiler = tiler_pb2_grpc.TilerServiceStub(channel(settings.tiler.tiler_target))
        tiles = streamed_tiles(tiler, tiler_pb2.StreamTilesRequest(slide=name, slide_mpp=0.5))
        assert len(tiles) == slide.tile_count and {t.width for t in tiles} == {448}
        t = max(tiles, key=lambda t: t.tissue_fraction)
        region = {"slide_id": "no-mpp", "x": t.x, "y": t.y, "width": 448, "height": 448}
        hits = client.search(region=region, k=3).hits
        assert (hits[0].slide_id, hits[0].x, hits[0].y) == ("no-mpp", t.x, t.y) and hits[0].score > 0.99
        image = client.read_region(region, mpp=1.0)
        assert (image.width, image.height) == (224, 224)
        found = client.search_slides(slide_id="no-mpp", k=1)
        assert found.slides[0].slide_id == "no-mpp"
        assert client.search_slides(source=name, slide_mpp=0.5, k=1).slides[0].slide_id == "no-mpp"
    finally:
        client.delete("no-mpp")
