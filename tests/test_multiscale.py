"""Issue 16 step 5: several magnifications in one ingest; searches at the query's own scale."""

from __future__ import annotations

import pytest

from smily import stack
from smily.client import Client
from smily.common import images
from smily.gateway.v1 import gateway_pb2

from .helpers.wait import wait_done
from .test_search_e2e import _tissue_tile


@pytest.fixture(scope="module")
def multiscale(settings, tmp_path_factory):
    """An index at 0.5, 1.0 and 2.0 µm/px and its gateway, on the session's tiler and embedder."""
    s = settings.replace(
        index_port=0,
        gateway_port=0,
        tile_mpps=(0.5, 1.0, 2.0),
        redis_url="",
        index_dir=str(tmp_path_factory.mktemp("multiscale-index")),
    )
    running, s = stack.start(["index", "gateway"], s)
    c = Client(f"127.0.0.1:{s.gateway.gateway_port}", timeout=300)
    op = wait_done(c, c.ingest("synth-b.svs", "synth-b"))  # 0.5 µm/px, 3072 x 2304
    assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, op.error_message
    yield c, op
    c.close()
    stack.stop(running, 0)


def test_one_ingest_indexes_every_resolution(multiscale):
    client, op = multiscale
    assert list(client.index_info().tiling.mpps) == [0.5, 1.0, 2.0]
    at_1 = client.search(region=dict(slide_id="synth-b", x=0, y=0, width=448, height=448), k=1000).hits
    assert {h.width for h in at_1} == {448}  # a search stays at one resolution
    # Level-0 tile sides 224, 448 and 896: the 0.5 µm/px tiles alone are about 4 times the 1.0 ones.
    assert op.progress.tiles_indexed > 4 * len(at_1)


@pytest.mark.parametrize("side, mpp", [(224, 0.5), (448, 1.0), (896, 2.0), (1200, 2.0), (300, 0.5)])
def test_region_search_uses_the_regions_own_scale(multiscale, side, mpp):
    client, _ = multiscale
    hits = client.search(region=dict(slide_id="synth-b", x=896, y=896, width=side, height=side), k=5).hits
    assert hits and all(h.mpp == pytest.approx(mpp) and h.width == round(224 * mpp / 0.5) for h in hits)


def test_image_search_at_a_stated_resolution(settings, multiscale):
    client, _ = multiscale
    tile, _ = _tissue_tile(settings, "synth-b.svs")  # 224 px at 1.0 µm/px
    png = images.encode(
        images.decode(tile.image.data, tile.image.encoding, tile.image.width, tile.image.height), images.PNG
    )
    default = client.search(image=png, k=3).hits
    assert [h.mpp for h in default] == [1.0] * 3 and (default[0].x, default[0].y) == (tile.x, tile.y)
    assert [h.mpp for h in client.search(image=png, k=3, image_mpp=2.0).hits] == [2.0] * 3
    assert [h.mpp for h in client.search(image=png, k=3, image_mpp=0.7).hits] == [0.5] * 3  # nearest on a log scale
    # Stated at 1.2 µm/px: resampled to, and searched at, the nearest indexed scale, 1.0.
    assert [h.mpp for h in client.search(image=png, k=3, image_mpp=1.2).hits] == [1.0] * 3
