"""The query engine: query embeddings (cached), Rocchio steering, concepts,
and the slide mosaics of whole-slide search. It is given requests that
requests.py has checked; the RPC handlers in server.py shape responses around it."""

from __future__ import annotations

import hashlib
import threading

import grpc
import numpy as np
from PIL import Image

from smily.common import images, limits
from smily.common.config import GatewaySettings, LimitsSettings
from smily.common.errors import Aborted, Busy, FailedPrecondition, InvalidArgument
from smily.common.tensors import from_tensor
from smily.common.tiling import DEFAULT_MPPS, Tiling
from smily.common.tracing import span
from smily.embedder.v1 import embedder_pb2
from smily.gateway.v1 import gateway_pb2
from smily.index.v1 import index_pb2
from smily.tiler.v1 import tiler_pb2
from smily.types.v1 import types_pb2

from . import dihedral, geometry, tenants, vectors
from .backends import BackendError, Backends
from .models import Models
from .streaming import check_tiling, embed_slide
from .tilings import IndexTiling, params

# A stated image resolution this close (relative) to an indexed one is used as it is.
MPP_TOLERANCE = 0.02


def region_request(
    slide: index_pb2.Slide, region, mpp: float, encoding: types_pb2.ImageEncoding
) -> tiler_pb2.ReadRegionRequest:
    """The tiler read of a region (x, y, width, height in level-0 pixels) of an indexed slide."""
    return tiler_pb2.ReadRegionRequest(
        slide=slide.source,
        x=region.x,
        y=region.y,
        width=region.width,
        height=region.height,
        mpp=mpp,
        encoding=encoding,
        slide_mpp=slide.slide_mpp,
    )


def _at_scale(data: bytes, scale: float) -> types_pb2.Image:
    """An uploaded patch for the embedder: at the indexed resolution, as it is (the embedder decodes it,
    once); stated at another, decoded here and resampled by `scale`."""
    if abs(scale - 1) <= MPP_TOLERANCE:
        return types_pb2.Image(data=data)
    rgb = images.decode(data)
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))
    return types_pb2.Image(
        data=images.encode(rgb, images.RAW_RGB), encoding=images.RAW_RGB, width=size[0], height=size[1]
    )


class QueryEngine:
    def __init__(
        self,
        backends: Backends,
        tilings: IndexTiling,
        cache,
        gateway: GatewaySettings,
        bounds: LimitsSettings,
        models: Models,
    ):
        self._b = backends
        self.models = models
        self.tilings = tilings
        self._cache = cache
        self._batch = gateway.embed_batch
        self._case_key = gateway.case_key
        # Whole slides streamed and embedded at once for SearchSlides (cache misses).
        self._slide_queries = threading.BoundedSemaphore(max(1, bounds.max_slide_queries))
        self._max_slide_queries = bounds.max_slide_queries
        self._max_tiles = bounds.max_tiles_per_slide
        self.transforms = dihedral.parse(gateway.query_transforms or ("identity",))
        self.merge = dihedral.check_merge(gateway.query_merge)

    def current_model(self, context) -> str:
        """The model serving searches (models.py): every query is embedded with it."""
        return self.models.serving(self._b.timeout(context))

    def _embedder(self, model_id: str, context):
        """(the embedder serving the model, its ModelInfo)."""
        return self._b.embedder_for(model_id, self._b.timeout(context))

    def tiling(self, context) -> Tiling:
        return self.tilings.current(self._b.timeout(context))[0]

    def _embed(self, fetch_image, key: str, context):
        """Embeddings [transforms, dim] of one query image, from the cache when possible.

        fetch_image is called on a miss only, so a cached region query never
        touches the tiler or the embedder. Every transform of the image goes
        to the embedder in one call. Returns (vectors, model_id, cached).
        """
        model_id = self.current_model(context)
        names = self.transforms
        # Per tenant: a hit would tell a caller that another tenant searched the same patch.
        cache_key = f"smily:emb:{tenants.own()}:{model_id}:{key}" + ("" if len(names) == 1 else ":" + ",".join(names))
        with span("cache.get") as s:
            flat = self._cache.get(cache_key)
            s.set_attribute("hit", flat is not None)
        if flat is not None:
            return flat.reshape(len(names), -1), model_id, True
        image = fetch_image()
        if len(names) > 1:  # the tiler's raw pixels, or an upload decoded once here
            rgb = images.decode(image.data, image.encoding, image.width, image.height)
            batch = [
                types_pb2.Image(
                    data=images.encode(t, images.RAW_RGB), encoding=images.RAW_RGB, width=t.shape[1], height=t.shape[0]
                )
                for t in dihedral.apply(rgb, names)
            ]
        else:
            batch = [image]
        embedder, _ = self._embedder(model_id, context)
        resp = embedder.Embed(embedder_pb2.EmbedRequest(images=batch), timeout=self._b.timeout(context))
        vectors_ = from_tensor(resp.embeddings)
        self._check_model(resp.model_id, model_id)
        with span("cache.put"):
            self._cache.put(cache_key, vectors_)
        return vectors_, resp.model_id, False

    def _check_model(self, got: str, expected: str) -> None:
        if got != expected:  # the embedder was redeployed: cache nothing, mix no models
            self._b.forget_models()
            raise Aborted("the embedder's model changed during the query; retry")

    def _region_mpp(self, tiling: Tiling, slide: index_pb2.Slide, region: gateway_pb2.Region, timeout: float) -> float:
        """The indexed resolution nearest the region's own scale (its longer side read as one tile)."""
        if len(tiling.mpps) == 1:
            return tiling.mpps[0]
        base = (
            slide.slide_mpp
            or self._b.tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=slide.source), timeout=timeout).info.mpp_x
        )
        if base <= 0:
            return tiling.nearest_mpp(DEFAULT_MPPS[0])
        return tiling.nearest_mpp(max(region.width, region.height) * base / tiling.tile_size)

    def _region_query(self, region: gateway_pb2.Region, context):
        timeout = self._b.timeout(context)
        slide = tenants.get_slide(self._b.index, region.slide_id, region.tenant, timeout)
        tiling = self.tilings.current(timeout)[0]
        mpp = self._region_mpp(tiling, slide, region, timeout)
        key = hashlib.sha256(
            f"region:{slide.tenant}:{slide.slide_id}:{slide.indexed_at}:{region.x},{region.y},{region.width},{region.height}:"
            f"{mpp}:{tiling.tile_size}".encode()
        ).hexdigest()

        def read_region() -> types_pb2.Image:
            return self._b.tiler.ReadRegion(
                region_request(slide, region, mpp, types_pb2.IMAGE_ENCODING_RAW_RGB),
                timeout=timeout,
            ).image

        return (*self._embed(read_region, key, context), mpp)

    def _polygon_cells(self, region: gateway_pb2.Region, slide: index_pb2.Slide, tiling: Tiling, timeout: float):
        """A polygon ROI's tile-sized cells of its bounding box whose centres lie inside it (evenly
        thinned to MAX_POLYGON_CELLS); none when it is smaller than a tile."""
        mpp = tiling.nearest_mpp(DEFAULT_MPPS[0])
        base = (
            slide.slide_mpp
            or self._b.tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=slide.source), timeout=timeout).info.mpp_x
        )
        side = max(1, round(tiling.tile_size * mpp / base)) if base > 0 else tiling.tile_size
        ring = [(p.x, p.y) for p in region.polygon]
        cells = [
            gateway_pb2.Region(slide_id=region.slide_id, x=x, y=y, width=side, height=side)
            for y in range(region.y, region.y + max(1, region.height - side + 1), side)
            for x in range(region.x, region.x + max(1, region.width - side + 1), side)
            if geometry.inside(x + side / 2, y + side / 2, ring)
        ]
        if len(cells) > limits.MAX_POLYGON_CELLS:
            step = len(cells) / limits.MAX_POLYGON_CELLS
            cells = [cells[int(i * step)] for i in range(limits.MAX_POLYGON_CELLS)]
        return cells

    def _polygon_query(self, region: gateway_pb2.Region, context):
        """A polygon ROI: the mean embedding of its cells (_polygon_cells), each a cached region query."""
        timeout = self._b.timeout(context)
        slide = self._b.index.GetSlide(index_pb2.GetSlideRequest(slide_id=region.slide_id), timeout=timeout).slide
        cells = self._polygon_cells(region, slide, self.tilings.current(timeout)[0], timeout)
        if not cells:  # smaller than a tile: its bounding box as one region
            bbox = gateway_pb2.Region(
                slide_id=region.slide_id, x=region.x, y=region.y, width=region.width, height=region.height
            )
            return self._region_query(bbox, context)
        got = [self._region_query(c, context) for c in cells]
        vecs = np.stack([g[0] for g in got]).mean(axis=0)
        return vecs, got[0][1], all(g[2] for g in got), got[0][3]

    def _image_query(self, data: bytes, image_mpp: float, context):
        stated = image_mpp or DEFAULT_MPPS[0]
        mpp = self.tiling(context).nearest_mpp(stated)
        scale = stated / mpp  # output pixels per image pixel at the indexed resolution

        def checked() -> types_pb2.Image:
            return _at_scale(data, scale)  # a cache miss only

        key = hashlib.sha256(data).hexdigest() + ("" if abs(scale - 1) <= MPP_TOLERANCE else f":{stated}:{mpp}")
        try:
            return (*self._embed(checked, key, context), mpp)
        except BackendError as exc:  # bytes that passed the header check but do not decode
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"query image: {str(exc).removeprefix('image 0: ')}") from None
            raise

    def examples(self, examples, context, image_mpp: float = 0.0):
        """Embeddings of Example messages: (array [n, transforms, dim], all cached, region slide ids,
        the resolution each was searched at)."""
        vecs, cached, slides, mpps = [], True, [], []
        for ex in examples:
            which = ex.WhichOneof("example")
            if which == "image":
                v, _, hit, mpp = self._image_query(ex.image, image_mpp, context)
            else:
                query = self._polygon_query if ex.region.polygon else self._region_query
                v, _, hit, mpp = query(ex.region, context)
                slides.append(ex.region.slide_id)
            vecs.append(v)
            mpps.append(mpp)
            cached = cached and hit
        return (np.stack(vecs) if vecs else np.empty((0, len(self.transforms), 0), np.float32)), cached, slides, mpps

    def embed_stored(self, examples, model_id: str, timeout: float) -> np.ndarray:
        """Embeddings [n, dim] of a concept's stored examples with `model_id`: untransformed (as
        CreateConcept fits), uncached, outside any caller's request (the refit at a cutover).
        Regions name their tenant; a polygon is the mean of its cells, as _polygon_query."""
        tiling = self.tilings.current(timeout)[0]
        embedder, _ = self._b.embedder_for(model_id, timeout)

        def embed(batch: list[types_pb2.Image]) -> np.ndarray:
            resp = embedder.Embed(embedder_pb2.EmbedRequest(images=batch), timeout=timeout)
            self._check_model(resp.model_id, model_id)
            return from_tensor(resp.embeddings)

        out = []
        for ex in examples:
            if ex.WhichOneof("example") == "image":
                out.append(embed([_at_scale(ex.image, DEFAULT_MPPS[0] / tiling.nearest_mpp(DEFAULT_MPPS[0]))])[0])
                continue
            r = ex.region
            slide = self._b.index.GetSlide(
                index_pb2.GetSlideRequest(slide_id=r.slide_id, tenant=r.tenant), timeout=timeout
            ).slide
            cells = (self._polygon_cells(r, slide, tiling, timeout) if r.polygon else []) or [r]
            reads = [
                self._b.tiler.ReadRegion(
                    region_request(
                        slide, c, self._region_mpp(tiling, slide, c, timeout), types_pb2.IMAGE_ENCODING_RAW_RGB
                    ),
                    timeout=timeout,
                ).image
                for c in cells
            ]
            out.append(embed(reads).mean(axis=0))
        return np.stack(out)

    def query_vector(self, request, negative_weight: float, context):
        """(query vectors [q, dim], model id, all cached, region slide ids, µm/px to search at).
        One vector per transform (merged by best score after searching), or one (their mean)."""
        which = request.WhichOneof("query")
        head = []
        if which == "image":
            head.append(gateway_pb2.Example(image=request.image))
        elif which == "region":
            head.append(gateway_pb2.Example(region=request.region))
        positives = head + list(request.positives)
        pos, cached, slides, mpps = self.examples(positives, context, request.image_mpp)
        neg, neg_cached, neg_slides, _ = self.examples(request.negatives, context, request.image_mpp)
        model_id = self.current_model(context)
        concepts = []
        for wc in request.concepts:
            c = self._b.index.GetConcept(
                index_pb2.GetConceptRequest(name=wc.name, model_id=model_id, tenant=tenants.own()),
                timeout=self._b.timeout(context),
            ).concept
            concepts.append((wc.weight, from_tensor(c.vector)))
        if self.merge == "mean":
            pos, neg = pos.mean(axis=1, keepdims=True), neg.mean(axis=1, keepdims=True)
        queries = np.stack(
            [
                vectors.combine(pos[:, t], neg[:, t] if len(neg) else (), negative_weight, concepts)
                for t in range(pos.shape[1])
            ]
        )
        return queries, model_id, cached and neg_cached, slides + neg_slides, mpps[0]

    def query_case(self, request, context) -> dict[str, str]:
        """{case key: case id} of the query region's slide, for the index to leave that case out."""
        region = request.region
        slide = tenants.get_slide(self._b.index, region.slide_id, region.tenant, self._b.timeout(context))
        case = slide.metadata.get(self._case_key, "")
        if not case:
            raise FailedPrecondition(
                f"slide {slide.slide_id!r} has no {self._case_key!r} metadata to exclude its case by"
            )
        return {self._case_key: case}

    @staticmethod
    def mosaic_mpp(tiling: Tiling) -> float:
        """Whole-slide search compares mosaics at one resolution: the indexed one nearest the default."""
        return tiling.nearest_mpp(DEFAULT_MPPS[0])

    def mosaic(self, source: str, slide_mpp: float, size: int, context):
        """The slide's mosaic embeddings [m, dim]; computed by streaming every
        tissue tile through the tiler and embedder, cached by the slide's
        content fingerprint, resolution, model, tiling and mosaic size."""
        timeout = self._b.timeout(context)
        info = self._b.tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=source), timeout=timeout).info
        model_id = self.current_model(context)
        tiling = self.tilings.current(timeout)[0]
        mpp = self.mosaic_mpp(tiling)
        t = params(tiling, [mpp], stride=1.0)  # a mosaic samples the slide: overlap adds nothing
        key = f"smily:mosaic:{tenants.own()}:{model_id}:{info.fingerprint}:{slide_mpp}:{mpp}:{t.tile_size}:{t.min_tissue_fraction}:{size}"
        embedder, model = self._embedder(model_id, context)
        flat = self._cache.get(key)
        if flat is not None:
            return flat.reshape(-1, model.embedding_dim), model_id, True
        check_tiling(info, slide_mpp, t, self._max_tiles)
        if not self._slide_queries.acquire(blocking=False):
            raise Busy(
                f"{self._max_slide_queries} whole-slide searches are running on this gateway, the most it runs at once",
                retry_after_s=10,
            )
        try:
            chunks = []
            for _, embeddings, got in embed_slide(
                self._b, source, t, slide_mpp, self._batch, timeout, embedder=embedder
            ):
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
