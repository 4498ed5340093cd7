"""GatewayService: the public API. Orchestrates ingest and search."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor


from smily.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from smily.index.v1 import index_pb2
from smily.tiler.v1 import tiler_pb2
from smily.common.config import Settings
from smily.common.errors import InvalidArgument, require
from smily.common.server import Registration
from smily.common.tensors import to_tensor

from . import paging, vectors
from .backends import Backends
from .cache import RedisGuard, make_cache
from .ingest import Ingestor
from .query import QueryEngine
from .operations import LocalOperations, SharedOperations

DEFAULT_K = 10
DEFAULT_SLIDES, MAX_SLIDES = 10, 100
DEFAULT_MOSAIC, MAX_MOSAIC = 16, 64
DEFAULT_REGIONS, MAX_REGIONS = 3, 20
# Index hits per mosaic tile: enough for a few dozen candidate slides.
MOSAIC_TILE_K = 200
DEFAULT_MAX_SIDE, MAX_SIDE = 1024, 4096


def _hit(h: index_pb2.Hit) -> gateway_pb2.Hit:
    return gateway_pb2.Hit(slide_id=h.slide_id, x=h.tile.x, y=h.tile.y, width=h.tile.width, height=h.tile.height,
                           mpp=h.tile.mpp, score=h.score, metadata=h.metadata)


def _stated_mpp(value: float) -> float:
    """A caller's slide_mpp: 0 (use the file's own) or a positive resolution."""
    require(value >= 0 and math.isfinite(value), "slide_mpp must be 0 or a positive number of microns per pixel")
    return value


def _concept(c: index_pb2.Concept) -> gateway_pb2.Concept:
    return gateway_pb2.Concept(name=c.name, model_id=c.model_id, with_examples=c.with_examples,
                               without_examples=c.without_examples, train_accuracy=c.train_accuracy,
                               created_at=c.created_at)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, settings: Settings):
        self._b = Backends(settings)
        tiling = tiler_pb2.TilingParams(
            mpp=settings.tile_mpp, tile_size=settings.tile_size, min_tissue_fraction=settings.min_tissue_fraction)
        redis = RedisGuard(settings.redis_url, settings.redis_timeout_s) if settings.redis_url else None
        self._q = QueryEngine(self._b, tiling, make_cache(redis, settings.cache_ttl_s), settings.embed_batch,
                              settings.case_key)
        self._ingest = Ingestor(self._b, tiling, settings.embed_batch, settings.max_concurrent_ingests,
                                SharedOperations(redis) if redis else LocalOperations())
        # Fans a slide query's mosaic tiles out to the index.
        self._fanout = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mosaic")

    # -- ingest -------------------------------------------------------------
    def IngestSlide(self, request, context):
        require(bool(request.source), "source (the slide's path under the slide roots) is required")
        op = self._ingest.start(request.source, request.slide_id, dict(request.metadata), self._b.timeout(context),
                                _stated_mpp(request.slide_mpp))
        return gateway_pb2.IngestSlideResponse(operation=op)

    def GetOperation(self, request, context):
        return gateway_pb2.GetOperationResponse(operation=self._ingest.get(request.operation_id))

    def CancelOperation(self, request, context):
        return gateway_pb2.CancelOperationResponse(operation=self._ingest.cancel(request.operation_id))

    def Search(self, request, context):
        k = request.k if request.HasField("k") else DEFAULT_K
        require(0 < k <= paging.MAX_K, f"k must be in 1..{paging.MAX_K}, got {k}")
        require(request.page_size >= 0, "page_size must not be negative")
        require(request.max_hits_per_slide >= 0, "max_hits_per_slide must not be negative")
        require(request.nprobe >= 0, "nprobe must not be negative")
        # Only paged requests need the fingerprint (it serialises the whole request, image and all).
        fp = paging.fingerprint(request) if request.page_token or request.page_size else ""
        offset = paging.read_token(request.page_token, fp)
        vector, model_id, cached, slides = self._q.query_vector(request, context)
        exclude = sorted(set(request.exclude_slide_ids) | (set(slides) if request.exclude_query_slide else set()))
        exclude_filters = self._q.query_case(request, context) if request.exclude_query_case else {}
        query = to_tensor(vector)

        def search(n: int):
            return self._b.index.Search(index_pb2.SearchRequest(
                model_id=model_id, query=query, k=n, exclude_slide_ids=exclude, exclude_filters=exclude_filters,
                slide_ids=request.slide_ids, filters=request.filters, nprobe=request.nprobe),
                timeout=self._b.timeout(context)).hits

        hits = paging.top_hits(search, k, request.max_hits_per_slide)
        end = len(hits) if request.page_size == 0 else min(len(hits), offset + request.page_size)
        token = paging.make_token(end, fp) if end < len(hits) else ""
        return gateway_pb2.SearchResponse(model_id=model_id, cached=cached, next_page_token=token,
                                          hits=[_hit(h) for h in hits[offset:end]])

    def SearchSlides(self, request, context):
        k = request.k if request.HasField("k") else DEFAULT_SLIDES
        size = request.mosaic_size if request.HasField("mosaic_size") else DEFAULT_MOSAIC
        per_slide = request.regions_per_slide if request.HasField("regions_per_slide") else DEFAULT_REGIONS
        require(0 < k <= MAX_SLIDES, f"k must be in 1..{MAX_SLIDES}")
        require(0 < size <= MAX_MOSAIC, f"mosaic_size must be in 1..{MAX_MOSAIC}")
        require(0 <= per_slide <= MAX_REGIONS, f"regions_per_slide must be in 0..{MAX_REGIONS}")
        which = request.WhichOneof("query")
        exclude = []
        if which == "slide_id":
            slide = self._b.index.GetSlide(index_pb2.GetSlideRequest(slide_id=request.slide_id),
                                           timeout=self._b.timeout(context)).slide
            source, slide_mpp = slide.source, slide.slide_mpp
            if request.exclude_query_slide:
                exclude.append(request.slide_id)
        elif which == "source":
            source, slide_mpp = request.source, _stated_mpp(request.slide_mpp)
        else:
            raise InvalidArgument("a slide query needs a slide_id or a source")
        mosaic, model_id, cached = self._q.mosaic(source, slide_mpp, size, context)

        def search(v):
            return list(self._b.index.Search(index_pb2.SearchRequest(
                model_id=model_id, query=to_tensor(v), k=MOSAIC_TILE_K, exclude_slide_ids=exclude),
                timeout=self._b.timeout(context)).hits)

        per_tile = list(self._fanout.map(search, mosaic))
        out = []
        for slide_id, score, found, hits in vectors.rank_slides(per_tile)[:k]:
            regions, seen = [], set()
            for h in hits:
                key = (h.tile.x, h.tile.y, h.tile.width)
                if key not in seen and len(regions) < per_slide:
                    seen.add(key)
                    regions.append(_hit(h))
            out.append(gateway_pb2.SlideMatch(slide_id=slide_id, score=score, matched_mosaic_tiles=found,
                                              regions=regions, metadata=hits[0].metadata))
        return gateway_pb2.SearchSlidesResponse(slides=out, model_id=model_id, mosaic_size=len(mosaic), cached=cached)

    # -- viewer support --------------------------------------------------------
    def ReadRegion(self, request, context):
        r = request.region
        require(bool(r.slide_id), "region.slide_id is required")
        require(r.width > 0 and r.height > 0 and r.x >= 0 and r.y >= 0, "region needs x, y >= 0 and a positive size")
        max_side = request.max_side or DEFAULT_MAX_SIDE
        require(0 < max_side <= MAX_SIDE, f"max_side must be in 1..{MAX_SIDE}")
        require(request.mpp >= 0, "mpp must not be negative")
        fmt = request.format or gateway_pb2.IMAGE_FORMAT_PNG
        require(fmt in (gateway_pb2.IMAGE_FORMAT_PNG, gateway_pb2.IMAGE_FORMAT_JPEG), "format must be PNG or JPEG")
        timeout = self._b.timeout(context)
        slide = self._b.index.GetSlide(index_pb2.GetSlideRequest(slide_id=r.slide_id), timeout=timeout).slide
        base = slide.slide_mpp or self._b.tiler.GetSlideInfo(
            tiler_pb2.GetSlideInfoRequest(slide=slide.source), timeout=timeout).info.mpp_x
        mpp = request.mpp or self._q.tiling.mpp
        if base > 0:  # coarsen so the longer side fits max_side
            mpp = max(mpp, max(r.width, r.height) * base / max_side)
        resp = self._b.tiler.ReadRegion(tiler_pb2.ReadRegionRequest(
            slide=slide.source, x=r.x, y=r.y, width=r.width, height=r.height, mpp=mpp, encoding=fmt,
            slide_mpp=slide.slide_mpp), timeout=timeout)
        return gateway_pb2.ReadRegionResponse(image=resp.image.data, format=fmt, width=resp.image.width,
                                              height=resp.image.height, mpp=resp.mpp)

    # -- concepts ----------------------------------------------------------------
    def CreateConcept(self, request, context):
        require(len(request.with_examples) > 0 and len(request.without_examples) > 0,
                "a concept needs at least one example with it and one without")
        with_, _, _ = self._q.examples(request.with_examples, "with", context)
        without, _, _ = self._q.examples(request.without_examples, "without", context)
        direction, accuracy = vectors.concept_vector(with_, without)
        model_id = self._q.current_model(context)
        saved = self._b.index.PutConcept(index_pb2.PutConceptRequest(concept=index_pb2.Concept(
            name=request.name, model_id=model_id, vector=to_tensor(direction),
            with_examples=len(with_), without_examples=len(without), train_accuracy=accuracy)),
            timeout=self._b.timeout(context)).concept
        return gateway_pb2.CreateConceptResponse(concept=_concept(saved))

    def ListConcepts(self, request, context):
        resp = self._b.index.ListConcepts(index_pb2.ListConceptsRequest(model_id=self._q.current_model(context)),
                                          timeout=self._b.timeout(context))
        return gateway_pb2.ListConceptsResponse(concepts=[_concept(c) for c in resp.concepts])

    def DeleteConcept(self, request, context):
        self._b.index.DeleteConcept(index_pb2.DeleteConceptRequest(
            name=request.name, model_id=self._q.current_model(context)), timeout=self._b.timeout(context))
        return gateway_pb2.DeleteConceptResponse()

    # -- catalogue -----------------------------------------------------------
    def ListSlides(self, request, context):
        resp = self._b.index.ListSlides(index_pb2.ListSlidesRequest(
            page_size=request.page_size, page_token=request.page_token), timeout=self._b.timeout(context))
        return gateway_pb2.ListSlidesResponse(
            next_page_token=resp.next_page_token,
            slides=[gateway_pb2.Slide(slide_id=s.slide_id, metadata=s.metadata, tile_count=s.tile_count,
                                      model_id=s.model_id, indexed_at=s.indexed_at, slide_mpp=s.slide_mpp)
                    for s in resp.slides])

    def DeleteSlide(self, request, context):
        require(bool(request.slide_id), "slide_id is required")
        resp = self._b.index.DeleteSlide(index_pb2.DeleteSlideRequest(slide_id=request.slide_id),
                                         timeout=self._b.timeout(context))
        return gateway_pb2.DeleteSlideResponse(deleted_tiles=resp.deleted_tiles)

    def close(self) -> None:
        self._ingest.close()
        self._fanout.shutdown(wait=False, cancel_futures=True)
        self._b.close()


def registration(settings: Settings) -> Registration:
    return Registration(
        gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
        GatewayServicer(settings),
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
    )
