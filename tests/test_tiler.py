"""The tiler over gRPC: safe names, allow-listed facts, tissue tiles, regions."""

from __future__ import annotations

import io
import os

import grpc
import numpy as np
import openslide
import pytest
from PIL import Image

from smily.common.channels import channel
from smily.common.errors import InvalidArgument, NotFound
from smily.synthetic import FAKE_PHI, SlideSpec, write_slide
from smily.tiler import tiling
from smily.tiler.server import MESSAGE_BYTES
from smily.tiler.slides import SlideRoots
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc
from smily.types.v1 import types_pb2

from .conftest import CMU, TEST_SLIDES, rpc_code, streamed_tiles


@pytest.fixture(scope="module")
def tiler(settings):
    return tiler_pb2_grpc.TilerServiceStub(channel(settings.tiler.tiler_target))


@pytest.mark.unit
def test_roots_refuse_escapes(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.svs").write_bytes(b"x")
    (tmp_path / "secret.svs").write_bytes(b"x")
    os.symlink(tmp_path / "secret.svs", root / "link.svs")
    roots = SlideRoots([str(root)])
    assert roots.resolve("ok.svs") == os.path.realpath(root / "ok.svs")
    for bad in (
        "../secret.svs",
        str(tmp_path / "secret.svs"),
        "link.svs",
        "%2e%2e/secret.svs",
        "a/../../secret.svs",
        "..\\secret.svs",
        "ok.svs\x00",
        "",
    ):
        with pytest.raises(InvalidArgument):
            roots.resolve(bad)
    with pytest.raises(NotFound):
        roots.resolve("missing.svs")


def test_slide_info_is_allow_listed(tiler):
    info = tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=CMU)).info
    assert (info.width, info.height) == (2220, 2967)
    assert info.vendor == "aperio" and info.objective_power == 20
    assert abs(info.mpp_x - 0.499) < 1e-6 and info.fingerprint
    synth = tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=TEST_SLIDES[1].name))
    # The synthetic SVS hides fake PHI in its label and vendor properties: none may leave.
    wire = synth.SerializeToString()
    for part in FAKE_PHI.split(" "):
        assert part.encode() not in wire
    assert len(synth.info.levels) >= 2 and synth.info.levels[0].downsample == 1


def test_tiles_cover_tissue_inside_the_slide(tiler):
    name = TEST_SLIDES[1].name
    tiles = streamed_tiles(tiler, tiler_pb2.StreamTilesRequest(slide=name))
    assert tiles
    keys = [(t.y, t.x) for t in tiles]
    block = 8 * 448  # 8 x 8 tiles of 224 px per block, blocks and tiles row-major
    assert keys == sorted(keys, key=lambda k: (k[0] // block, k[1] // block, k[0], k[1]))
    for t in tiles:
        assert t.x + t.width <= 3072 and t.y + t.height <= 2304
        assert t.width == 448 and abs(t.mpp - 1.0) < 1e-6 and t.tissue_fraction >= 0.5
        assert t.image.encoding == types_pb2.IMAGE_ENCODING_RAW_RGB
        assert len(t.image.data) == 224 * 224 * 3
    again = [(t.x, t.y) for t in streamed_tiles(tiler, tiler_pb2.StreamTilesRequest(slide=name))]
    assert again == [(x, y) for y, x in keys]


def test_tiles_travel_several_to_a_message(tiler):
    msgs = list(tiler.StreamTiles(tiler_pb2.StreamTilesRequest(slide=TEST_SLIDES[1].name)))
    sizes = [sum(len(t.image.data) for t in m.tiles) for m in msgs]
    assert max(len(m.tiles) for m in msgs) == MESSAGE_BYTES // (224 * 224 * 3) and max(sizes) <= MESSAGE_BYTES
    big = tiler_pb2.TilingParams(tile_size=1024, min_tissue_fraction=0.1)  # 3 MB a tile: one each
    assert {
        len(m.tiles) for m in tiler.StreamTiles(tiler_pb2.StreamTilesRequest(slide=TEST_SLIDES[1].name, params=big))
    } == {1}


def test_pixels_outside_the_scan_are_white(slide_dir):
    slide = openslide.OpenSlide(os.path.join(slide_dir, TEST_SLIDES[0].name))
    width, height = slide.dimensions
    inside = tiling.read(slide, width - 300, height - 200, 300, 200, 300, 200)
    past = tiling.read(slide, width - 300, height - 200, 600, 400, 600, 400)  # OpenSlide: transparent
    assert np.array_equal(past[:200, :300], inside)
    assert (past[200:] == 255).all() and (past[:, 300:] == 255).all()


def test_same_field_of_view_at_20x_and_40x(tiler):
    t20 = next(iter(tiler.StreamTiles(tiler_pb2.StreamTilesRequest(slide=TEST_SLIDES[1].name)))).tiles[0]
    t40 = next(iter(tiler.StreamTiles(tiler_pb2.StreamTilesRequest(slide=TEST_SLIDES[2].name)))).tiles[0]
    assert t20.width * 0.5 == t40.width * 0.25 == 224.0


def test_read_region_png(tiler):
    resp = tiler.ReadRegion(
        tiler_pb2.ReadRegionRequest(
            slide=CMU, x=1000, y=1300, width=400, height=300, mpp=1.0, encoding=types_pb2.IMAGE_ENCODING_PNG
        )
    )
    img = Image.open(io.BytesIO(resp.image.data))
    assert img.format == "PNG" and abs(img.size[0] - 200) <= 1 and abs(img.size[1] - 150) <= 1
    assert np.asarray(img).std() > 5  # real pixels, not a blank


def test_region_errors(tiler):
    def read(**kw):
        args = dict(slide=CMU, x=0, y=0, width=100, height=100)
        args.update(kw)
        return tiler.ReadRegion(tiler_pb2.ReadRegionRequest(**args))

    assert rpc_code(read, width=0) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(read, x=2200) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(read, width=2220, height=2967, mpp=0.01) == grpc.StatusCode.INVALID_ARGUMENT  # too many pixels
    assert rpc_code(read, slide="nope.svs") == grpc.StatusCode.NOT_FOUND


def test_unreadable_files(tiler, scratch):
    with open(scratch.path("photo.svs"), "wb") as fh:
        Image.new("RGB", (64, 64), "red").save(fh, format="JPEG")
    open(scratch.path("empty.svs"), "wb").close()
    os.makedirs(scratch.path("folder.svs"))
    for name in ("photo.svs", "empty.svs"):
        assert (
            rpc_code(tiler.GetSlideInfo, tiler_pb2.GetSlideInfoRequest(slide=scratch.slide(name)))
            == grpc.StatusCode.FAILED_PRECONDITION
        )
    assert (
        rpc_code(tiler.GetSlideInfo, tiler_pb2.GetSlideInfoRequest(slide=scratch.slide("folder.svs")))
        == grpc.StatusCode.INVALID_ARGUMENT
    )


def test_slide_without_resolution(tiler, scratch):
    import tifffile

    img = np.full((1024, 1024, 3), 200, np.uint8)
    tifffile.imwrite(scratch.path("no-mpp.tiff"), img, tile=(256, 256), photometric="rgb", metadata=None)
    with pytest.raises(grpc.RpcError) as info:
        list(tiler.StreamTiles(tiler_pb2.StreamTilesRequest(slide=scratch.slide("no-mpp.tiff"))))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "resolution" in info.value.details()


@pytest.mark.unit
def test_synthetic_slides_are_deterministic(tmp_path):
    spec = SlideSpec("a.tiff", "tiff", 1024, 768, 0.5, 7)
    write_slide(spec, str(tmp_path / "1.tiff"))
    write_slide(spec, str(tmp_path / "2.tiff"))
    assert (tmp_path / "1.tiff").read_bytes() == (tmp_path / "2.tiff").read_bytes()
