"""TilerService: slide facts, tissue tiles and regions over gRPC."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from protos.smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc
from services.common import images
from services.common.config import Settings
from services.common.errors import FailedPrecondition, InvalidArgument, require
from services.common.server import Registration

from . import slides, tiling

log = logging.getLogger("smily.tiler")

DEFAULT_MPP = 1.0
DEFAULT_TILE_SIZE = 224
DEFAULT_MIN_TISSUE = 0.5
MAX_TILE_SIZE = 2048
# Tiles read ahead of the stream, in parallel (OpenSlide releases the GIL).
READ_AHEAD = 16


class TilerServicer(tiler_pb2_grpc.TilerServiceServicer):
    def __init__(self, settings: Settings):
        self._roots = slides.SlideRoots(settings.slide_roots)
        self._cache = slides.SlideCache()
        self._max_region_pixels = settings.max_region_pixels
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tile-read")

    def _slide(self, name: str):
        return self._cache.get(self._roots.resolve(name))

    @staticmethod
    def _mpp(slide) -> float:
        value = slides.mpp(slide)
        if value <= 0:
            raise FailedPrecondition("the slide does not record its resolution (microns per pixel)")
        return value

    def GetSlideInfo(self, request, context):
        facts = slides.info(self._slide(request.slide))
        levels = [tiler_pb2.Level(**lvl) for lvl in facts.pop("levels")]
        return tiler_pb2.GetSlideInfoResponse(info=tiler_pb2.SlideInfo(levels=levels, **facts))

    def StreamTiles(self, request, context):
        slide = self._slide(request.slide)
        slide_mpp = self._mpp(slide)
        p = request.params
        target_mpp = p.mpp or DEFAULT_MPP
        tile_size = p.tile_size or DEFAULT_TILE_SIZE
        min_tissue = p.min_tissue_fraction or DEFAULT_MIN_TISSUE
        require(target_mpp > 0, "mpp must be positive")
        require(0 < tile_size <= MAX_TILE_SIZE, f"tile_size must be in 1..{MAX_TILE_SIZE}")
        require(0 <= min_tissue <= 1, "min_tissue_fraction must be in [0, 1]")
        encoding = request.encoding or images.RAW_RGB
        require(encoding in (images.RAW_RGB, images.PNG, images.JPEG), "unknown image encoding")

        rects = tiling.plan(slide, slide_mpp, target_mpp, tile_size, min_tissue)
        total = len(rects)
        mpp_out = rects[0].size * slide_mpp / tile_size if rects else target_mpp

        def load(rect: tiling.TileRect) -> bytes:
            rgb = tiling.read(slide, rect.x, rect.y, rect.size, rect.size, tile_size, tile_size)
            return images.encode(rgb, encoding)

        for start in range(0, total, READ_AHEAD):
            if not context.is_active():
                return
            chunk = rects[start : start + READ_AHEAD]
            for rect, data in zip(chunk, self._pool.map(load, chunk)):
                yield tiler_pb2.StreamTilesResponse(
                    tiles_total=total,
                    tile=tiler_pb2.Tile(
                        x=rect.x, y=rect.y, width=rect.size, height=rect.size, mpp=mpp_out,
                        tissue_fraction=rect.tissue_fraction,
                        image=tiler_pb2.Image(data=data, encoding=encoding, width=tile_size, height=tile_size),
                    ),
                )

    def ReadRegion(self, request, context):
        slide = self._slide(request.slide)
        width, height = slide.dimensions
        r = request
        require(r.width > 0 and r.height > 0, "region width and height must be positive")
        require(r.x >= 0 and r.y >= 0 and r.x + r.width <= width and r.y + r.height <= height,
                f"region lies outside the slide ({width}x{height} level-0 pixels)")
        require(r.mpp >= 0, "mpp must not be negative")
        scale = r.mpp / self._mpp(slide) if r.mpp else 1.0
        out_w, out_h = max(1, round(r.width / scale)), max(1, round(r.height / scale))
        if out_w * out_h > self._max_region_pixels:
            raise InvalidArgument(
                f"region of {out_w}x{out_h} pixels exceeds the limit of {self._max_region_pixels}; "
                "ask for a coarser mpp or a smaller region"
            )
        encoding = r.encoding or images.PNG
        require(encoding in (images.RAW_RGB, images.PNG, images.JPEG), "unknown image encoding")
        rgb = tiling.read(slide, r.x, r.y, r.width, r.height, out_w, out_h)
        return tiler_pb2.ReadRegionResponse(
            image=tiler_pb2.Image(data=images.encode(rgb, encoding), encoding=encoding, width=out_w, height=out_h),
            mpp=r.mpp or slides.mpp(slide),
        )


def registration(settings: Settings) -> Registration:
    return Registration(
        tiler_pb2.DESCRIPTOR.services_by_name["TilerService"].full_name,
        TilerServicer(settings),
        tiler_pb2_grpc.add_TilerServiceServicer_to_server,
    )
