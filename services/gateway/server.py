"""GatewayService: the public API. Orchestrates ingest and search."""
from __future__ import annotations

import hashlib
import threading

from protos.smily.embedder.v1 import embedder_pb2
from protos.smily.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from protos.smily.index.v1 import index_pb2
from protos.smily.tiler.v1 import tiler_pb2
from services.common import images
from services.common.config import Settings
from services.common.errors import InvalidArgument, require
from services.common.server import Registration
from services.common.tensors import from_tensor, to_tensor

from .backends import Backends
from .cache import make_cache
from .ingest import Ingestor

DEFAULT_K = 10
MAX_K = 1000
MAX_QUERY_IMAGE_BYTES = 32 * 1024 * 1024


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, settings: Settings):
        self._b = Backends(settings)
        self._tiling = tiler_pb2.TilingParams(
            mpp=settings.tile_mpp, tile_size=settings.tile_size, min_tissue_fraction=settings.min_tissue_fraction)
        self._cache = make_cache(settings.redis_url, settings.cache_ttl_s, settings.redis_timeout_s)
        self._ingest = Ingestor(self._b, self._tiling, settings.embed_batch, settings.max_concurrent_ingests)
        self._model_id = ""
        self._model_lock = threading.Lock()

    # -- ingest -------------------------------------------------------------
    def IngestSlide(self, request, context):
        require(bool(request.source), "source (the slide's path under the slide roots) is required")
        op = self._ingest.start(request.source, request.slide_id, dict(request.metadata), self._b.timeout(context))
        return gateway_pb2.IngestSlideResponse(operation=op)

    def GetOperation(self, request, context):
        return gateway_pb2.GetOperationResponse(operation=self._ingest.get(request.operation_id))

    # -- search -------------------------------------------------------------
    def _current_model(self, context) -> str:
        with self._model_lock:
            if not self._model_id:
                info = self._b.embedder.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=self._b.timeout(context))
                self._model_id = info.info.model_id
            return self._model_id

    def _embed(self, fetch_image, key: str, context):
        """Embedding of one query image, from the cache when possible.

        fetch_image is called on a miss only, so a cached region query never
        touches the tiler or the embedder. Returns (vector, model_id, cached).
        """
        model_id = self._current_model(context)
        cache_key = f"smily:emb:{model_id}:{key}"
        vector = self._cache.get(cache_key)
        if vector is not None:
            return vector, model_id, True
        resp = self._b.embedder.Embed(embedder_pb2.EmbedRequest(images=[fetch_image()]),
                                      timeout=self._b.timeout(context))
        vector = from_tensor(resp.embeddings)[0]
        if resp.model_id != model_id:  # the embedder was redeployed with another model
            with self._model_lock:
                self._model_id = resp.model_id
        else:
            self._cache.put(cache_key, vector)
        return vector, resp.model_id, False

    def _region_query(self, region: gateway_pb2.Region, context):
        require(bool(region.slide_id), "region.slide_id is required")
        require(region.width > 0 and region.height > 0, "region width and height must be positive")
        require(region.x >= 0 and region.y >= 0, "region x and y must not be negative")
        timeout = self._b.timeout(context)
        slide = self._b.index.GetSlide(index_pb2.GetSlideRequest(slide_id=region.slide_id), timeout=timeout).slide
        key = hashlib.sha256(
            f"region:{slide.slide_id}:{slide.indexed_at}:{region.x},{region.y},{region.width},{region.height}:"
            f"{self._tiling.mpp}:{self._tiling.tile_size}".encode()).hexdigest()

        def read_region() -> embedder_pb2.Image:
            img = self._b.tiler.ReadRegion(tiler_pb2.ReadRegionRequest(
                slide=slide.source, x=region.x, y=region.y, width=region.width, height=region.height,
                mpp=self._tiling.mpp, encoding=tiler_pb2.IMAGE_ENCODING_RAW_RGB), timeout=timeout).image
            return embedder_pb2.Image(data=img.data, encoding=img.encoding, width=img.width, height=img.height)

        return self._embed(read_region, key, context)

    def Search(self, request, context):
        k = request.k if request.HasField("k") else DEFAULT_K
        require(0 < k <= MAX_K, f"k must be in 1..{MAX_K}, got {k}")
        require(request.nprobe >= 0, "nprobe must not be negative")
        exclude = list(request.exclude_slide_ids)
        which = request.WhichOneof("query")
        if which == "image":
            data = request.image
            require(0 < len(data) <= MAX_QUERY_IMAGE_BYTES, "image must be 1 byte to 32 MiB of PNG or JPEG")
            images.decode(data)  # reject non-images here, with a clear message
            vector, model_id, cached = self._embed(
                lambda: embedder_pb2.Image(data=data), hashlib.sha256(data).hexdigest(), context)
        elif which == "region":
            vector, model_id, cached = self._region_query(request.region, context)
            if request.exclude_query_slide:
                exclude.append(request.region.slide_id)
        else:
            raise InvalidArgument("a query needs an image or a region")
        resp = self._b.index.Search(index_pb2.SearchRequest(
            model_id=model_id, query=to_tensor(vector, index_pb2.Tensor), k=k, exclude_slide_ids=exclude,
            slide_ids=request.slide_ids, filters=request.filters, nprobe=request.nprobe),
            timeout=self._b.timeout(context))
        return gateway_pb2.SearchResponse(
            model_id=model_id, cached=cached,
            hits=[gateway_pb2.Hit(slide_id=h.slide_id, x=h.tile.x, y=h.tile.y, width=h.tile.width,
                                  height=h.tile.height, mpp=h.tile.mpp, score=h.score, metadata=h.metadata)
                  for h in resp.hits])

    # -- catalogue -----------------------------------------------------------
    def ListSlides(self, request, context):
        resp = self._b.index.ListSlides(index_pb2.ListSlidesRequest(
            page_size=request.page_size, page_token=request.page_token), timeout=self._b.timeout(context))
        return gateway_pb2.ListSlidesResponse(
            next_page_token=resp.next_page_token,
            slides=[gateway_pb2.Slide(slide_id=s.slide_id, metadata=s.metadata, tile_count=s.tile_count,
                                      model_id=s.model_id, indexed_at=s.indexed_at) for s in resp.slides])

    def DeleteSlide(self, request, context):
        require(bool(request.slide_id), "slide_id is required")
        resp = self._b.index.DeleteSlide(index_pb2.DeleteSlideRequest(slide_id=request.slide_id),
                                         timeout=self._b.timeout(context))
        return gateway_pb2.DeleteSlideResponse(deleted_tiles=resp.deleted_tiles)

    def close(self) -> None:
        self._ingest.close()
        self._b.close()


def registration(settings: Settings) -> Registration:
    return Registration(
        gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
        GatewayServicer(settings),
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
    )
