"""Every slide flavour the project can write, tiled at several resolutions;
tissue detection that leaves pen marks and glass out."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from smily.common.channels import channel
from smily.synthetic import SlideSpec, render
from smily.tiler.tissue import tissue_mask
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc
from smily.types.v1 import types_pb2

from .conftest import CMU, TEST_SLIDES, scratch_for, streamed_tiles
from .helpers.tiler_files import dicom_wsi

RAW = types_pb2.IMAGE_ENCODING_RAW_RGB


@pytest.fixture(scope="module")
def tiler(settings):
    return tiler_pb2_grpc.TilerServiceStub(channel(settings.tiler.tiler_target))


@pytest.fixture(scope="module")
def dicom(scratch_root):
    """A two-level DICOM WSI series; the tiler is given one file of it."""
    series = scratch_for(scratch_root, "dicom-series")
    rgb = render(SlideSpec("dcm", "tiff", 2048, 1536, 0.5, 9))
    dicom_wsi(series.dir, [rgb, np.asarray(Image.fromarray(rgb).reduce(4))], mpp=0.5)
    return series.slide("level-0.dcm"), rgb


def test_dicom_wsi_series(tiler, dicom):
    name, rgb = dicom
    info = tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=name)).info
    assert (info.width, info.height, info.vendor) == (2048, 1536, "dicom")
    assert [lvl.downsample for lvl in info.levels] == [1, 4] and abs(info.mpp_x - 0.5) < 1e-9
    region = tiler.ReadRegion(
        tiler_pb2.ReadRegionRequest(slide=name, x=300, y=200, width=500, height=400, encoding=RAW)
    )
    got = np.frombuffer(region.image.data, np.uint8).reshape(400, 500, 3)
    assert np.array_equal(got, rgb[200:600, 300:800])  # uncompressed frames: exact pixels


def test_dicom_wsi_series_with_jpeg_frames(tiler, scratch):
    rgb = render(SlideSpec("dcm-jpeg", "tiff", 2048, 1536, 0.5, 10))
    files = dicom_wsi(scratch.dir, [rgb, np.asarray(Image.fromarray(rgb).reduce(4))], mpp=0.5, jpeg=True)
    name = scratch.slide(os.path.basename(files[1]))  # any file of the series names the slide
    info = tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=name)).info
    assert (info.width, info.height, info.vendor) == (2048, 1536, "dicom")
    region = tiler.ReadRegion(
        tiler_pb2.ReadRegionRequest(slide=name, x=300, y=200, width=500, height=400, encoding=RAW)
    )
    got = np.frombuffer(region.image.data, np.uint8).reshape(400, 500, 3).astype(int)
    assert np.abs(got - rgb[200:600, 300:800]).mean() < 4  # JPEG at quality 95: close, not exact
    tiles = streamed_tiles(tiler, tiler_pb2.StreamTilesRequest(slide=name))
    assert tiles and all(len(t.image.data) == 224 * 224 * 3 for t in tiles)


@pytest.mark.parametrize("name", [s.name for s in TEST_SLIDES] + [CMU, "dicom-series/level-0.dcm"])
def test_every_flavour_tiles(tiler, dicom, name):
    info = tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=name)).info
    tiles = streamed_tiles(tiler, tiler_pb2.StreamTilesRequest(slide=name))
    assert tiles, name
    size = round(224 * 1.0 / info.mpp_x)
    for t in tiles:
        assert abs(t.width - size) <= 1 and t.x + t.width <= info.width and t.y + t.height <= info.height
        assert t.tissue_fraction >= 0.5 and len(t.image.data) == 224 * 224 * 3
    pixels = np.frombuffer(tiles[len(tiles) // 2].image.data, np.uint8)
    assert pixels.std() > 5  # tissue, not glass


def test_several_resolutions_in_one_stream(tiler):
    name = TEST_SLIDES[1].name  # 3072 x 2304 at 0.5 um/px
    params = tiler_pb2.TilingParams(mpps=[0.5, 1.0, 2.0], min_tissue_fraction=0.3)
    streamed = streamed_tiles(tiler, tiler_pb2.StreamTilesRequest(slide=name, params=params))
    mpps = [t.mpp for t in streamed]
    assert mpps == sorted(mpps) and set(mpps) == {0.5, 1.0, 2.0}  # one resolution after another
    by_mpp = {}
    for t in streamed:
        by_mpp.setdefault(t.mpp, []).append(t)
    for mpp, tiles in by_mpp.items():
        assert {t.width for t in tiles} == {round(224 * mpp / 0.5)}
        keys = [(t.y, t.x) for t in tiles]
        block = 8 * tiles[0].width
        assert keys == sorted(keys, key=lambda k: (k[0] // block, k[1] // block, k[0], k[1]))
        assert all(t.x + t.width <= 3072 and t.y + t.height <= 2304 for t in tiles)
    # The 1.0 um/px part is exactly what a single-resolution request returns, pixels included.
    single = streamed_tiles(
        tiler, tiler_pb2.StreamTilesRequest(slide=name, params=tiler_pb2.TilingParams(mpp=1.0, min_tissue_fraction=0.3))
    )
    assert [(t.x, t.y, t.image.data) for t in single] == [(t.x, t.y, t.image.data) for t in by_mpp[1.0]]
    # A streamed tile equals the same rectangle read as a region.
    t = by_mpp[2.0][len(by_mpp[2.0]) // 2]
    alone = tiler.ReadRegion(
        tiler_pb2.ReadRegionRequest(slide=name, x=t.x, y=t.y, width=t.width, height=t.height, mpp=2.0, encoding=RAW)
    )
    assert alone.image.data == t.image.data


def test_tiles_under_the_threshold_never_leave(tiler):
    name = TEST_SLIDES[0].name
    loose = streamed_tiles(
        tiler, tiler_pb2.StreamTilesRequest(slide=name, params=tiler_pb2.TilingParams(min_tissue_fraction=0.01))
    )
    strict = streamed_tiles(
        tiler, tiler_pb2.StreamTilesRequest(slide=name, params=tiler_pb2.TilingParams(min_tissue_fraction=0.9))
    )
    assert strict and all(t.tissue_fraction >= 0.9 for t in strict)
    assert len(strict) < len(loose) and any(t.tissue_fraction < 0.9 for t in loose)
    assert {(t.x, t.y) for t in strict} <= {(t.x, t.y) for t in loose}


@pytest.mark.unit
def test_tissue_mask_leaves_out_pen_glass_and_black():
    img = np.full((200, 300, 3), (246, 244, 246), np.uint8)  # glass
    img[40:160, 30:130] = (220, 150, 190)  # eosin-pink tissue...
    img[70:100, 60:90] = (120, 70, 150)  # ...with a haematoxylin-purple spot
    img[20:180, 170:176] = (40, 80, 190)  # blue pen line
    img[60:120, 200:260] = (50, 160, 70)  # green pen dot
    img[150:190, 220:290] = (15, 15, 20)  # black ink
    img[100:104, 30:130] = (40, 80, 190)  # blue line drawn across the tissue
    mask = tissue_mask(img)
    assert mask[45:155, 35:125][~np.isin(np.arange(45, 155), range(100, 104))].mean() > 0.98
    assert not mask[:, 150:].any()  # pen and ink on glass
    assert not mask[100:104, 40:120].any()  # ink over tissue is not tissue
    assert not mask[:30].any() and not mask[:, :25].any()  # glass
