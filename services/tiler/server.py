"""TilerService: slide facts, tissue tiles and regions over gRPC.

This process only checks requests and streams answers; every slide byte is
parsed in the reader processes of workers.WorkerPool.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from smily.common import images, limits
from smily.common.config import Settings
from smily.common.errors import FailedPrecondition, InvalidArgument, require
from smily.common.server import Registration, Servicer
from smily.common.tiling import (
    DEFAULT_MIN_TISSUE,
    DEFAULT_MPPS,
    DEFAULT_STRIDE,
    DEFAULT_TILE_SIZE,
    Tiling,
)
from smily.common.tracing import span
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc
from smily.types.v1 import types_pb2

from . import dicom_ann, dicomweb, slides
from .tiling import block_order
from .workers import WorkerPool

log = logging.getLogger("smily.tiler")

# Pixels per stream message: 8 raw 224-px tiles cost sender and receiver half
# the CPU of one tile per message, and 64 cost more again (docs/benchmarks.md).
MESSAGE_BYTES = 1 << 20
ENCODINGS = (images.RAW_RGB, images.PNG, images.JPEG)


class TilerServicer(tiler_pb2_grpc.TilerServiceServicer, Servicer):
    def __init__(self, settings: Settings):
        self._roots = slides.SlideRoots(settings.tiler.slide_roots)
        self._archives = dicomweb.Archives(
            settings.tiler.dicomweb_url,
            settings.tiler.dicomweb_credentials_file,
            settings.tiler.dicomweb_ca,
            settings.tiler.dicomweb_frame_cache_mb,
        )
        self._max_region_pixels = settings.limits.max_region_pixels
        self._max_tiles = settings.limits.max_tiles_per_slide
        self.readers = WorkerPool(
            settings.tiler.tiler_readers, settings.tiler.tiler_read_timeout_s, settings.server.log_level
        )
        # Threads only wait on reader processes; two per reader keep each one busy.
        self._pool = ThreadPoolExecutor(max_workers=2 * settings.tiler.tiler_readers, thread_name_prefix="tile-read")

    def _info(self, name: str) -> tuple[str, tiler_pb2.SlideInfo, float]:
        path = self._archives.locate(name) or self._roots.resolve(name)
        info, mpp = self.readers.call("info", path)
        return path, info, mpp

    @staticmethod
    def _slide_mpp(file_mpp: float, stated: float) -> float:
        if limits.slide_mpp(stated):
            return stated
        if file_mpp <= 0:
            raise FailedPrecondition(
                "the slide does not record its resolution (microns per pixel); "
                "state it in the request's slide_mpp (e.g. 0.25 for a 40x scan, 0.5 for 20x)"
            )
        if not limits.plausible_mpp(file_mpp):
            raise FailedPrecondition(
                f"the slide records an implausible resolution ({file_mpp:g} microns per "
                "pixel); state the right one in slide_mpp"
            )
        return file_mpp

    def GetSlideInfo(self, request, context):
        _, info, _ = self._info(request.slide)
        return tiler_pb2.GetSlideInfoResponse(info=info)

    def StreamTiles(self, request, context):
        p = request.params
        targets = list(p.mpps) or [p.mpp or DEFAULT_MPPS[0]]
        tile_size = p.tile_size or DEFAULT_TILE_SIZE
        min_tissue = p.min_tissue_fraction or DEFAULT_MIN_TISSUE
        stride = p.stride or DEFAULT_STRIDE
        Tiling(tuple(targets), tile_size, stride, min_tissue).validate()
        encoding = request.encoding or images.RAW_RGB
        require(encoding in ENCODINGS, "unknown image encoding")
        path, info, file_mpp = self._info(request.slide)
        slide_mpp = self._slide_mpp(file_mpp, request.slide_mpp)
        # Before planning: a wrong slide_mpp can ask for a million tiles.
        limits.tiles_per_slide(
            limits.tile_grid(info.width, info.height, slide_mpp, targets, tile_size, stride), self._max_tiles, slide_mpp
        )

        plans = self.readers.call("plan", path, slide_mpp, targets, tile_size, min_tissue, stride)
        total = sum(len(rects) for rects in plans)
        chunks = [block for rects in plans for block in block_order(rects, tile_size)]
        per_message = max(1, MESSAGE_BYTES // (tile_size * tile_size * 3))
        # Read ahead: every reader has work queued while tiles go out in order.
        pending: deque = deque()
        ahead = 2 * self.readers.size
        try:
            for i in range(len(chunks) + ahead):
                if i < len(chunks):
                    rects = [(t.x, t.y, t.size) for t in chunks[i]]
                    pending.append(
                        (
                            chunks[i],
                            self._pool.submit(
                                contextvars.copy_context().run, self._read_tiles, path, rects, tile_size, encoding
                            ),
                        )
                    )
                if i < ahead:
                    continue
                if not pending or not context.is_active():
                    return
                rects, future = pending.popleft()
                encoded = future.result()
                for start in range(0, len(rects), per_message):
                    msg = tiler_pb2.StreamTilesResponse(tiles_total=total)
                    for rect, data in zip(rects[start : start + per_message], encoded[start : start + per_message]):
                        tile = msg.tiles.add(
                            x=rect.x,
                            y=rect.y,
                            width=rect.size,
                            height=rect.size,
                            mpp=rect.mpp,
                            tissue_fraction=rect.tissue_fraction,
                        )
                        # Set in place: a message built apart would be copied in again, pixels and all.
                        tile.image.data = data
                        tile.image.encoding, tile.image.width, tile.image.height = encoding, tile_size, tile_size
                    yield msg
        finally:
            for _, future in pending:
                future.cancel()

    def _read_tiles(self, path: str, rects, tile_size: int, encoding: int) -> list[bytes]:
        with span("tiler.read", tiles=len(rects)):
            return self.readers.call("tiles", path, rects, tile_size, encoding)

    def ReadRegion(self, request, context):
        r = request
        require(r.width > 0 and r.height > 0, "region width and height must be positive")
        require(r.mpp >= 0 and math.isfinite(r.mpp), "mpp must not be negative")
        encoding = r.encoding or images.PNG
        require(encoding in ENCODINGS, "unknown image encoding")
        path, info, file_mpp = self._info(r.slide)
        width, height = info.width, info.height
        require(
            r.x >= 0 and r.y >= 0 and r.x + r.width <= width and r.y + r.height <= height,
            f"region lies outside the slide ({width}x{height} level-0 pixels)",
        )
        slide_mpp = self._slide_mpp(file_mpp, r.slide_mpp) if r.mpp else (r.slide_mpp or file_mpp)
        scale = r.mpp / slide_mpp if r.mpp else 1.0
        out_w, out_h = max(1, round(r.width / scale)), max(1, round(r.height / scale))
        # Checked before any pixel is read.
        if out_w * out_h > self._max_region_pixels:
            raise InvalidArgument(
                f"region of {out_w}x{out_h} pixels exceeds the limit of {self._max_region_pixels}; "
                "ask for a coarser mpp or a smaller region"
            )
        with span("tiler.read", pixels=out_w * out_h):
            data = self.readers.call("region", path, r.x, r.y, r.width, r.height, out_w, out_h, encoding)
        return tiler_pb2.ReadRegionResponse(
            image=types_pb2.Image(data=data, encoding=encoding, width=out_w, height=out_h),
            mpp=r.mpp or slide_mpp,
        )

    def ListCaseSeries(self, request, context):
        found = self._archives.case_series(request.archive, request.accession_number)
        return tiler_pb2.ListCaseSeriesResponse(series=[tiler_pb2.DicomSeries(**s) for s in found])

    def BuildBulkAnnotations(self, request, context):
        if not request.regions:
            raise InvalidArgument("regions: give at least one")
        client, study, series = self._archives.series_client(request.slide)
        with dicomweb.http_errors():
            source = dicom_ann.source_image(client, study, series)
        return tiler_pb2.BuildBulkAnnotationsResponse(
            dicom=dicom_ann.bulk_annotations(request.regions, request.description[:64], source)
        )


def registration(settings: Settings) -> Registration:
    return Registration(
        tiler_pb2.DESCRIPTOR.services_by_name["TilerService"].full_name,
        TilerServicer(settings),
        tiler_pb2_grpc.add_TilerServiceServicer_to_server,
    )
