"""The tiler against hostile and broken files: crashes and hangs stay in a
reader process, broken inputs get clear statuses, no PHI ever leaves."""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
import tifffile

from smily.common.channels import channel
from smily.common.errors import InvalidArgument, Unavailable
from smily.synthetic import FAKE_PHI, SlideSpec, render, write_slide
from smily.tiler.slides import SlideRoots
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc
from smily.tiler.workers import WorkerPool
from smily.types.v1 import types_pb2

from .conftest import CMU, TEST_SLIDES, scratch_for, streamed_tiles
from .helpers.tiler_files import fake_isyntax, huge_tile_tiff, jpeg_named, truncated_copy

FAIL = grpc.StatusCode.FAILED_PRECONDITION
BAD = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def tiler(settings):
    return tiler_pb2_grpc.TilerServiceStub(channel(settings.tiler.tiler_target))


@pytest.fixture(scope="module")
def readers(services):
    return services[0]["tiler"].servicer.readers


def error_of(fn, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        r = fn(*args)
        if not isinstance(r, tiler_pb2.GetSlideInfoResponse | tiler_pb2.ReadRegionResponse):
            list(r)
    return info.value


def test_a_file_that_crashes_the_decoder_costs_one_reader_only(tiler, readers, scratch):
    huge_tile_tiff(scratch.path("crash.tiff"))
    crash = scratch.slide("crash.tiff")
    info = tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=crash)).info
    assert info.width == 1 << 20  # opening is fine: only decoding pixels aborts
    before = readers.replaced
    for _ in range(readers.size + 1):  # more crashes than readers: replacements must work too
        err = error_of(tiler.ReadRegion, tiler_pb2.ReadRegionRequest(slide=crash, width=64, height=64))
        assert err.code() == FAIL and "crashed the slide reader" in err.details()
        assert scratch.root not in err.details()
    assert readers.replaced == before + readers.size + 1
    # The service keeps serving, on fresh readers.
    assert tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=CMU)).info.width == 2220
    assert list(tiler.StreamTiles(tiler_pb2.StreamTilesRequest(slide=TEST_SLIDES[0].name)))
    # Tiling it is refused before any decode: at 0.5 um/px its grid is over the tile cap, and
    # at a coarse mpp there is no small level for the tissue mask.
    err = error_of(tiler.StreamTiles, tiler_pb2.StreamTilesRequest(slide=crash, slide_mpp=0.5))
    assert err.code() == BAD and "tiles per slide" in err.details()
    err = error_of(
        tiler.StreamTiles,
        tiler_pb2.StreamTilesRequest(slide=crash, slide_mpp=0.5, params=tiler_pb2.TilingParams(mpp=1000)),
    )
    assert err.code() == FAIL and "pyramidal" in err.details()


def test_a_read_that_hangs_is_stopped_and_the_reader_replaced(tmp_path, slide_dir):
    fifo = str(tmp_path / "hang.svs")
    os.mkfifo(fifo)  # opening a FIFO blocks until a writer comes: a real hang inside OpenSlide
    pool = WorkerPool(1, timeout_s=2.0)
    try:
        with pytest.raises(Unavailable, match="longer than 2 s"):
            pool.call("info", fifo)
        assert pool.replaced == 1
        info, mpp = pool.call("info", os.path.join(slide_dir, CMU))
        assert info.width == 2220 and abs(mpp - 0.499) < 1e-6
    finally:
        pool.close()
    # The service never gets that far: only regular files are slides.
    with pytest.raises(InvalidArgument):
        SlideRoots([str(tmp_path)]).resolve("hang.svs")


@pytest.fixture(scope="module")
def broken(slide_dir, scratch_root):
    d = scratch_for(scratch_root, "broken").dir
    os.makedirs(os.path.join(d, "folder.svs"))
    open(os.path.join(d, "empty.svs"), "wb").close()
    jpeg_named(os.path.join(d, "photo.svs"))
    fake_isyntax(os.path.join(d, "scan.isyntax"))
    truncated_copy(os.path.join(slide_dir, TEST_SLIDES[0].name), os.path.join(d, "cut.tiff"))
    return d


@pytest.mark.parametrize(
    "name,code,words",
    [
        ("empty.svs", FAIL, "empty (0 bytes)"),
        ("photo.svs", FAIL, "not a whole-slide image"),
        ("scan.isyntax", FAIL, "iSyntax"),
        ("cut.tiff", FAIL, "damaged or truncated"),  # however much survives
        ("folder.svs", BAD, "folder, not a slide file"),
        ("../" + CMU, BAD, "without '..'"),
        ("%2e%2e/" + CMU, BAD, "%-escapes"),
        ("/etc/passwd", BAD, "relative"),
    ],
)
def test_broken_inputs_get_clear_statuses(tiler, broken, slide_dir, name, code, words):
    name = name if name.startswith(("..", "%", "/")) else "broken/" + name
    # Whichever step first meets the damage, the caller gets the same answer.
    err = error_of(tiler.StreamTiles, tiler_pb2.StreamTilesRequest(slide=name, slide_mpp=0.5))
    assert err.code() == code and words in err.details(), err.details()
    assert slide_dir not in err.details() and os.path.dirname(broken) not in err.details()


def test_symlink_out_of_the_roots(tiler, scratch, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.svs"
    write_slide(SlideSpec("s.tiff", "tiff", 512, 512, 0.5, 3), str(outside))
    os.symlink(outside, scratch.path("broken-link.svs"))
    err = error_of(tiler.GetSlideInfo, tiler_pb2.GetSlideInfoRequest(slide=scratch.slide("broken-link.svs")))
    assert err.code() == BAD and "outside the slide roots" in err.details()


def test_a_slide_without_resolution_needs_the_caller_to_state_it(tiler, scratch):
    rgb = render(SlideSpec("x", "tiff", 1536, 1024, 0.5, 5))
    tifffile.imwrite(scratch.path("no-mpp-tissue.tiff"), rgb, tile=(256, 256), photometric="rgb", metadata=None)
    name = scratch.slide("no-mpp-tissue.tiff")
    req = tiler_pb2.StreamTilesRequest(slide=name)
    err = error_of(tiler.StreamTiles, req)
    assert err.code() == FAIL and "slide_mpp" in err.details()
    err = error_of(tiler.ReadRegion, tiler_pb2.ReadRegionRequest(slide=name, width=448, height=448, mpp=1.0))
    assert err.code() == FAIL and "slide_mpp" in err.details()

    req.slide_mpp = 0.5
    tiles = streamed_tiles(tiler, req)
    assert tiles and all(t.width == 448 and abs(t.mpp - 1.0) < 1e-9 for t in tiles)
    region = tiler.ReadRegion(
        tiler_pb2.ReadRegionRequest(
            slide=name,
            x=tiles[0].x,
            y=tiles[0].y,
            width=448,
            height=448,
            mpp=1.0,
            slide_mpp=0.5,
            encoding=types_pb2.IMAGE_ENCODING_RAW_RGB,
        )
    )
    assert region.image.data == tiles[0].image.data
    assert tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=name)).info.mpp_x == 0


def test_region_size_is_capped_before_reading(tiler, readers, scratch):
    # 2^20 x 2^20 at level 0 would crash a reader if it were read: the cap answers first.
    huge_tile_tiff(scratch.path("crash.tiff"))
    huge = tiler_pb2.ReadRegionRequest(slide=scratch.slide("crash.tiff"), width=1 << 20, height=1 << 20)
    before = readers.replaced
    err = error_of(tiler.ReadRegion, huge)
    assert err.code() == BAD and "exceeds the limit" in err.details()
    assert readers.replaced == before


def _label_fingerprints(path: str) -> list[bytes]:
    """The label page's bytes as stored, and one row of its pixels with text in it."""
    with tifffile.TiffFile(path) as tif:
        page = next(p for p in tif.pages if "label" in (p.description or ""))
        with open(path, "rb") as fh:
            fh.seek(page.dataoffsets[0])
            stored = fh.read(min(64, page.databytecounts[0]))
        pixels = page.asarray()
    row = pixels[np.argmax((pixels < 100).sum(axis=(1, 2)))]
    # Parts of 3 letters (MRN, ACC) would turn up by chance in compressed pixels.
    return [stored, row.tobytes(), FAKE_PHI.encode()] + [p.encode() for p in FAKE_PHI.split(" ") if len(p) > 5]


def test_no_response_carries_the_label_or_vendor_phi(tiler, slide_dir):
    name = TEST_SLIDES[1].name
    secrets = _label_fingerprints(os.path.join(slide_dir, name))
    wire: list[bytes] = [tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=name)).SerializeToString()]
    for enc in (types_pb2.IMAGE_ENCODING_RAW_RGB, types_pb2.IMAGE_ENCODING_PNG, types_pb2.IMAGE_ENCODING_JPEG):
        params = tiler_pb2.TilingParams(mpps=[1.0, 4.0], min_tissue_fraction=0.01)
        wire += [
            m.SerializeToString()
            for m in tiler.StreamTiles(tiler_pb2.StreamTilesRequest(slide=name, params=params, encoding=enc))
        ]
        wire.append(
            tiler.ReadRegion(
                tiler_pb2.ReadRegionRequest(slide=name, width=3072, height=2304, mpp=2.0, encoding=enc)
            ).SerializeToString()
        )
    for bad in (dict(width=0), dict(x=99999), dict(mpp=0.01, width=3072, height=2304)):
        args = dict(slide=name, width=10, height=10) | bad
        wire.append(error_of(tiler.ReadRegion, tiler_pb2.ReadRegionRequest(**args)).details().encode())
    assert len(wire) > 20
    for blob in wire:
        for secret in secrets:
            assert secret not in blob
