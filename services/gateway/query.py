"""The query engine: query embeddings (cached), Rocchio steering, concepts,
and the slide mosaics of whole-slide search. The RPC handlers in server.py
validate requests and shape responses around it."""
from __future__ import annotations

import hashlib
import threading

import grpc
import numpy as np

from smily.common import images, limits
from smily.common.errors import Aborted, Busy, FailedPrecondition, InvalidArgument, require
from smily.common.tensors import from_tensor
from smily.common.tracing import span
from smily.embedder.v1 import embedder_pb2
from smily.gateway.v1 import gateway_pb2
from smily.index.v1 import index_pb2
from smily.tiler.v1 import tiler_pb2
from smily.types.v1 import types_pb2

from . import vectors
from .backends import Backends
from .streaming import check_tiling, embed_slide

MAX_QUERY_IMAGE_BYTES = 32 * 1024 * 1024
MAX_EXAMPLES = 32
MAX_CONCEPTS = 16
DEFAULT_NEGATIVE_WEIGHT = 0.5


class QueryEngine:
    def __init__(self, backends: Backends, tiling: tiler_pb2.TilingParams, cache, batch: int, case_key: str,
                 max_slide_queries: int, max_tiles: int):
        self._b = backends
        self.tiling = tiling
        self._cache = cache
        self._batch = batch
        self._case_key = case_key
        # Whole slides streamed and embedded at once for SearchSlides (cache misses).
        self._slide_queries = threading.BoundedSemaphore(max(1, max_slide_queries))
        self._max_slide_queries = max_slide_queries
        self._max_tiles = max_tiles
        self._model_id, self._dim = "", 0
        self._model_lock = threading.Lock()

    def current_model(self, context) -> str:
        with self._model_lock:
            if not self._model_id:
                info = self._b.embedder.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=self._b.timeout(context))
                self._model_id, self._dim = info.info.model_id, info.info.embedding_dim
            return self._model_id

    def _embed(self, fetch_image, key: str, context):
        """Embedding of one query image, from the cache when possible.

        fetch_image is called on a miss only, so a cached region query never
        touches the tiler or the embedder. Returns (vector, model_id, cached).
        """
        model_id = self.current_model(context)
        cache_key = f"smily:emb:{model_id}:{key}"
        with span("cache.get") as s:
            vector = self._cache.get(cache_key)
            s.set_attribute("hit", vector is not None)
        if vector is not None:
            return vector, model_id, True
        resp = self._b.embedder.Embed(embedder_pb2.EmbedRequest(images=[fetch_image()]),
                                      timeout=self._b.timeout(context))
        vector = from_tensor(resp.embeddings)[0]
        self._check_model(resp.model_id, model_id)
        with span("cache.put"):
            self._cache.put(cache_key, vector)
        return vector, resp.model_id, False

    def _check_model(self, got: str, expected: str) -> None:
        if got != expected:  # the embedder was redeployed: cache nothing, mix no models
            with self._model_lock:
                self._model_id = ""
            raise Aborted("the embedder's model changed during the query; retry")

    def _region_query(self, region: gateway_pb2.Region, context):
        limits.slide_id(region.slide_id, "region.slide_id")
        require(region.width > 0 and region.height > 0, "region width and height must be positive")
        require(region.x >= 0 and region.y >= 0, "region x and y must not be negative")
        timeout = self._b.timeout(context)
        slide = self._b.index.GetSlide(index_pb2.GetSlideRequest(slide_id=region.slide_id), timeout=timeout).slide
        key = hashlib.sha256(
            f"region:{slide.slide_id}:{slide.indexed_at}:{region.x},{region.y},{region.width},{region.height}:"
            f"{self.tiling.mpp}:{self.tiling.tile_size}".encode()).hexdigest()

        def read_region() -> types_pb2.Image:
            return self._b.tiler.ReadRegion(tiler_pb2.ReadRegionRequest(
                slide=slide.source, x=region.x, y=region.y, width=region.width, height=region.height,
                mpp=self.tiling.mpp, encoding=types_pb2.IMAGE_ENCODING_RAW_RGB, slide_mpp=slide.slide_mpp),
                timeout=timeout).image

        return self._embed(read_region, key, context)

    def _image_query(self, data: bytes, context):
        require(0 < len(data) <= MAX_QUERY_IMAGE_BYTES, "image must be 1 byte to 32 MiB of PNG or JPEG")

        def checked() -> types_pb2.Image:
            # A cache miss only: the header is checked (format, pixel limit)
            # without decoding; the embedder decodes the image, once.
            images.header(data)
            return types_pb2.Image(data=data)

        try:
            return self._embed(checked, hashlib.sha256(data).hexdigest(), context)
        except grpc.RpcError as exc:  # bytes that passed the header check but do not decode
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"query image: {(exc.details() or '').removeprefix('image 0: ')}") from None
            raise

    def examples(self, examples, what: str, context):
        """Embeddings of Example messages: (array [n, dim], all cached, region slide ids)."""
        require(len(examples) <= MAX_EXAMPLES, f"at most {MAX_EXAMPLES} {what} examples")
        vecs, cached, slides = [], True, []
        for ex in examples:
            which = ex.WhichOneof("example")
            if which == "image":
                v, _, hit = self._image_query(ex.image, context)
            elif which == "region":
                v, _, hit = self._region_query(ex.region, context)
                slides.append(ex.region.slide_id)
            else:
                raise InvalidArgument(f"each {what} example needs an image or a region")
            vecs.append(v)
            cached = cached and hit
        return (np.stack(vecs) if vecs else np.empty((0, 0), np.float32)), cached, slides

    def query_vector(self, request, context):
        which = request.WhichOneof("query")
        head = []
        if which == "image":
            head.append(gateway_pb2.Example(image=request.image))
        elif which == "region":
            head.append(gateway_pb2.Example(region=request.region))
        positives = head + list(request.positives)
        require(bool(positives), "a query needs an image or a region (or positive examples)")
        pos, cached, slides = self.examples(positives, "positive", context)
        neg, neg_cached, neg_slides = self.examples(request.negatives, "negative", context)
        b = request.negative_weight if request.HasField("negative_weight") else DEFAULT_NEGATIVE_WEIGHT
        require(0 <= b <= 1, "negative_weight must be in 0..1")
        require(len(request.concepts) <= MAX_CONCEPTS, f"at most {MAX_CONCEPTS} concepts")
        model_id = self.current_model(context)
        concepts = []
        for wc in request.concepts:
            require(np.isfinite(wc.weight) and abs(wc.weight) <= 10, "a concept weight must be in -10..10")
            c = self._b.index.GetConcept(index_pb2.GetConceptRequest(name=wc.name, model_id=model_id),
                                         timeout=self._b.timeout(context)).concept
            concepts.append((wc.weight, from_tensor(c.vector)))
        vector = vectors.combine(pos, neg, b, concepts)
        return vector, model_id, cached and neg_cached, slides + neg_slides

    def query_case(self, request, context) -> dict[str, str]:
        """{case key: case id} of the query region's slide, for the index to leave that case out."""
        require(request.WhichOneof("query") == "region", "exclude_query_case needs a region query")
        slide = self._b.index.GetSlide(index_pb2.GetSlideRequest(slide_id=request.region.slide_id),
                                       timeout=self._b.timeout(context)).slide
        case = slide.metadata.get(self._case_key, "")
        if not case:
            raise FailedPrecondition(f"slide {slide.slide_id!r} has no {self._case_key!r} metadata to exclude its case by")
        return {self._case_key: case}

    def mosaic(self, source: str, slide_mpp: float, size: int, context):
        """The slide's mosaic embeddings [m, dim]; computed by streaming every
        tissue tile through the tiler and embedder, cached by the slide's
        content fingerprint, resolution, model, tiling and mosaic size."""
        timeout = self._b.timeout(context)
        info = self._b.tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=source), timeout=timeout).info
        model_id = self.current_model(context)
        t = self.tiling
        key = (f"smily:mosaic:{model_id}:{info.fingerprint}:{slide_mpp}:{t.mpp}:{t.tile_size}:"
               f"{t.min_tissue_fraction}:{size}")
        flat = self._cache.get(key)
        if flat is not None:
            return flat.reshape(-1, self._dim), model_id, True
        check_tiling(info, slide_mpp, t, self._max_tiles)
        if not self._slide_queries.acquire(blocking=False):
            raise Busy(f"{self._max_slide_queries} whole-slide searches are running on this gateway, the most "
                       "it runs at once", retry_after_s=10)
        try:
            chunks = []
            for _, embeddings, got in embed_slide(self._b, source, t, slide_mpp, self._batch, timeout):
                self._check_model(got, model_id)
                chunks.append(from_tensor(embeddings))
        finally:
            self._slide_queries.release()
        if not chunks:
            raise InvalidArgument("the query slide has no tissue tiles at the archive's tiling parameters")
        tiles = np.concatenate(chunks)
        picked = tiles[vectors.mosaic(tiles, size)]
        self._cache.put(key, picked)
        return picked, model_id, False

