"""GatewayService: the public API. Orchestrates ingest and search."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from smily.common import caller as callers
from smily.common import images
from smily.common.config import Settings
from smily.common.errors import PermissionDenied
from smily.common.limits import MAX_K
from smily.common.server import Registration, Servicer
from smily.common.tensors import to_tensor
from smily.common.tiling import Tiling
from smily.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from smily.index.v1 import index_pb2
from smily.tiler.v1 import tiler_pb2
from smily.types.v1 import types_pb2

from . import auth, dicom, dihedral, export, labels, moves, paging, refit, requests, tenants, vectors
from .backends import Backends
from .cache import RedisGuard, hmac_key, make_cache
from .cases import CaseIngestor
from .guard import Guard
from .ingest import Ingestor
from .migration import Latencies, Migrator
from .models import Models
from .operations import SharedOperations
from .query import QueryEngine, region_request
from .readiness import Readiness
from .searches import SearchRecords
from .tilings import IndexTiling

_ENCODINGS = {
    gateway_pb2.IMAGE_FORMAT_PNG: types_pb2.IMAGE_ENCODING_PNG,
    gateway_pb2.IMAGE_FORMAT_JPEG: types_pb2.IMAGE_ENCODING_JPEG,
}
# Index hits per mosaic tile: enough for a few dozen candidate slides.
MOSAIC_TILE_K = 200


def _hit(h: index_pb2.Hit, links: dicom.ViewerLinks) -> gateway_pb2.Hit:
    t = h.tile
    return gateway_pb2.Hit(
        tenant=h.tenant,
        slide_id=h.slide_id,
        x=t.x,
        y=t.y,
        width=t.width,
        height=t.height,
        mpp=t.mpp,
        score=h.score,
        metadata=h.metadata,
        study_instance_uid=h.metadata.get(dicom.STUDY, ""),
        series_instance_uid=h.metadata.get(dicom.SERIES, ""),
        viewer_url=links.link(h.slide_id, h.metadata, t.x, t.y, t.width, t.height),
    )


def _slide(s: index_pb2.Slide) -> gateway_pb2.Slide:
    return gateway_pb2.Slide(
        tenant=s.tenant,
        slide_id=s.slide_id,
        metadata=s.metadata,
        tile_count=s.tile_count,
        model_id=s.model_id,
        indexed_at=s.indexed_at,
        slide_mpp=s.slide_mpp,
        study_instance_uid=s.metadata.get(dicom.STUDY, ""),
        series_instance_uid=s.metadata.get(dicom.SERIES, ""),
    )


def _concept(c: index_pb2.Concept) -> gateway_pb2.Concept:
    return gateway_pb2.Concept(
        name=c.name,
        model_id=c.model_id,
        with_examples=c.with_examples,
        without_examples=c.without_examples,
        train_accuracy=c.train_accuracy,
        created_at=c.created_at,
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer, Servicer):
    def __init__(self, settings: Settings):
        images.configure(settings.limits.max_image_pixels, settings.limits.image_decodes)
        self._b = Backends(settings)
        self._readiness = Readiness(self._b.stubs)
        # The index's tiling record; these settings only for an index without one (its first ingest).
        self._tilings = IndexTiling(self._b.index, Tiling.from_settings(settings.gateway))
        self._dedup_iou = settings.gateway.dedup_iou
        # Page tokens are HMAC'd, bound to the caller's tenant (paging.seal).
        self._page_key = paging.page_key(settings.gateway.cache_key)
        self._default_tenant = settings.auth.default_tenant
        redis = (
            RedisGuard(
                settings.gateway.redis_url,
                settings.gateway.redis_timeout_s,
                settings.tls.tls_ca_file,
                settings.gateway.redis_password,
            )
            if settings.gateway.redis_url
            else None
        )
        # Authenticates what this gateway reads back from Redis (cached embeddings, searches) and the
        # operation records it reads back from the index.
        secret = hmac_key(settings.gateway.cache_key)
        cache = make_cache(redis, settings.gateway.cache_ttl_s, secret)
        self._searches = SearchRecords(cache)
        self._label_key = settings.gateway.label_key
        self._case_key = settings.gateway.case_key
        # Find slides by metadata: the case key and the other searchable keys, once each.
        self._search_keys = tuple(dict.fromkeys((self._case_key, *settings.gateway.slide_search_keys)))
        self._models = Models(self._b)
        self._q = QueryEngine(
            self._b,
            self._tilings,
            cache,
            settings.gateway,
            settings.limits,
            self._models,
        )
        shared = SharedOperations(self._b.index, secret)
        self._ingest = Ingestor(self._b, self._tilings, shared, settings.gateway, settings.limits, self._models)
        self._cases = CaseIngestor(self._b, self._ingest, shared)
        # Search latencies, for the p95 guard that pauses a migration while searches slow down.
        self._latencies = Latencies()
        self._migrations = Migrator(
            self._b,
            self._tilings,
            self._models,
            shared,
            settings.gateway.embed_batch,
            self._default_tenant,
            self._latencies,
            lambda old, new: refit.refit_all(self._b, self._q, old, new),
        )
        self._links = dicom.ViewerLinks(settings.gateway.viewer_url_template)
        # Fans a slide query's mosaic tiles out to the index.
        self._fanout = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mosaic")
        self._close_hooks: list = []

    def watch_readiness(self, set_ready) -> None:
        self._readiness.watch(set_ready)

    # -- ingest -------------------------------------------------------------
    def IngestSlide(self, request, context):
        requests.ingest_slide(request)
        op = self._ingest.start(
            request.source,
            request.slide_id,
            dict(request.metadata),
            self._b.timeout(context),
            request.slide_mpp,
            starter=callers.current().key,
            tenant=tenants.own(),
        )
        return gateway_pb2.IngestSlideResponse(operation=op)

    def IngestCase(self, request, context):
        requests.ingest_case(request)
        op = self._cases.start(
            request.accession_number,
            request.archive,
            dict(request.slide_ids),
            dict(request.metadata),
            tenant=tenants.own(),
            starter=callers.current().key,
        )
        return gateway_pb2.IngestCaseResponse(operation=op)

    def _follow(self, operation_id: str, any_operation: frozenset[str]) -> None:
        """A caller without one of the any_operation roles follows only the operations it started."""
        who = callers.current()
        if who.roles & any_operation:
            return
        starters = (
            self._cases.starters(operation_id)
            or self._migrations.starters(operation_id)
            or self._ingest.starters(operation_id)
        )
        if who.key not in starters:
            raise PermissionDenied("this operation was started by another caller")

    def GetOperation(self, request, context):
        requests.operation(request)
        op = (
            self._cases.get(request.operation_id)
            or self._migrations.get(request.operation_id)
            or self._ingest.get(request.operation_id)
        )
        # Another tenant's operation is NOT_FOUND (as a missing one), before whose it is counts.
        tenants.check_operation(op, request.operation_id, self._default_tenant)
        self._follow(request.operation_id, frozenset({auth.SEARCH, auth.ADMIN}))
        return gateway_pb2.GetOperationResponse(operation=op)

    def CancelOperation(self, request, context):
        requests.operation(request)
        # Another tenant's operation is NOT_FOUND before anything is asked of it.
        tenants.check_operation(
            self._cases.get(request.operation_id)
            or self._migrations.get(request.operation_id)
            or self._ingest.get(request.operation_id),
            request.operation_id,
            self._default_tenant,
        )
        self._follow(request.operation_id, frozenset({auth.ADMIN}))
        op = (
            self._cases.cancel(request.operation_id)
            or self._migrations.cancel(request.operation_id)
            or self._ingest.cancel(request.operation_id)
        )
        return gateway_pb2.CancelOperationResponse(operation=op)

    def _ranked(self, request, negative_weight: float, k: int, context, slide_ids=None, diverse: bool = True):
        """The top k index hits for a SearchRequest's query: (hits, model id, cached, missing shards).
        The tiles of negative region examples never come back, so a page is never short of them."""
        queries, model_id, cached, slides, mpp = self._q.query_vector(request, negative_weight, context)
        exclude = sorted(set(request.exclude_slide_ids) | (set(slides) if request.exclude_query_slide else set()))
        exclude_filters = self._q.query_case(request, context) if request.exclude_query_case else {}
        tiling = self._q.tiling(context)
        base = index_pb2.SearchRequest(
            model_id=model_id,
            exclude_slide_ids=exclude,
            exclude_filters=exclude_filters,
            slide_ids=request.slide_ids if slide_ids is None else slide_ids,
            filters=request.filters,
            nprobe=request.nprobe,
            mpp=mpp,
            allow_partial=request.partial,
            tenants=tenants.readable(),
        )
        tiling.to_pb(base.tiling)
        tensors = [to_tensor(q) for q in queries]
        negative_tiles = {
            (r.slide_id, r.x, r.y, r.width, r.height)
            for r in (ex.region for ex in request.negatives if ex.WhichOneof("example") == "region")
        }
        missing: set[int] = set()

        def one(query, n: int):
            req = index_pb2.SearchRequest()
            req.CopyFrom(base)
            req.query.CopyFrom(query)
            req.k = min(MAX_K, n + len(negative_tiles))
            reply = self._b.index.Search(req, timeout=self._b.timeout(context))
            missing.update(reply.missing_shards)
            hits = [
                h
                for h in reply.hits
                if (h.slide_id, h.tile.x, h.tile.y, h.tile.width, h.tile.height) not in negative_tiles
            ]
            return hits[:n] if len(reply.hits) == req.k else hits

        def search(n: int):
            if len(tensors) == 1:
                return one(tensors[0], n)
            # One search per transform of the query, in parallel; each tile keeps its best score.
            return dihedral.merge_hits(list(self._fanout.map(lambda q: one(q, n), tensors)), n)

        if not diverse:
            return search(k), model_id, cached, missing
        # Overlapping tiles (stride < 1) of one spot would crowd the top k: keep the best of each spot.
        iou = self._dedup_iou if tiling.stride < 1 else 0.0
        return paging.top_hits(search, k, request.max_hits_per_slide, iou), model_id, cached, missing

    def Search(self, request, context):
        started = time.monotonic()
        resp = self._search(request, context)
        self._latencies.add(time.monotonic() - started)
        return resp

    def _search(self, request, context):
        args = requests.search(request)
        offset = args.offset
        paging.unseal(self._page_key, request.page_token, tenants.own())  # another tenant's: NOT_FOUND
        search_id = self._searches.remember(request)  # stored while the search runs
        hits, model_id, cached, missing = self._ranked(request, args.negative_weight, args.k, context)
        end = len(hits) if request.page_size == 0 else min(len(hits), offset + request.page_size)
        token = (
            paging.seal(self._page_key, paging.make_token(end, args.fingerprint), tenants.own())
            if end < len(hits)
            else ""
        )
        resp = gateway_pb2.SearchResponse(
            model_id=model_id,
            cached=cached,
            next_page_token=token,
            hits=[_hit(h, self._links) for h in hits[offset:end]],
            partial=bool(missing),
            missing_shards=sorted(missing),
            search_id=search_id.result(),
        )
        if self._label_key:
            resp.label_stats.CopyFrom(labels.stats(hits, self._label_key))
        return resp

    def GetSlideHeatmap(self, request, context):
        max_tiles = requests.slide_heatmap(request)
        q = request.search
        weight = q.negative_weight if q.HasField("negative_weight") else requests.DEFAULT_NEGATIVE_WEIGHT
        # The slide first: an unknown one is NOT_FOUND, not an empty heatmap.
        slide = tenants.get_slide(self._b.index, request.slide_id, "", self._b.timeout(context))
        hits, model_id, _, _ = self._ranked(q, weight, max_tiles, context, [request.slide_id], diverse=False)
        truncated = len(hits) >= max_tiles and slide.tile_count > len(hits)
        scores = [h.score for h in hits]
        return gateway_pb2.GetSlideHeatmapResponse(
            tiles=[
                gateway_pb2.HeatmapTile(x=h.tile.x, y=h.tile.y, width=h.tile.width, height=h.tile.height, score=h.score)
                for h in hits
            ],
            min_score=min(scores, default=0.0),
            max_score=max(scores, default=0.0),
            truncated=truncated,
            model_id=model_id,
        )

    def ExportSearch(self, request, context):
        fmt = requests.export_search(request)
        search = self._searches.recall(request.search_id)
        if fmt == requests.DICOM_ANN:  # the slide first: an unknown one is NOT_FOUND, whatever the hits
            source = tenants.get_slide(self._b.index, request.slide_id, "", self._b.timeout(context)).source
        args = requests.search(search)
        hits, _, _, _ = self._ranked(search, args.negative_weight, args.k, context)
        ranked = [(rank, h) for rank, h in enumerate(hits, 1) if not request.slide_id or h.slide_id == request.slide_id]
        if fmt == requests.DICOM_ANN:
            build = export.dicom_ann_request(ranked, request.search_id, source)
            return export.dicom_ann(self._b.tiler.BuildBulkAnnotations(build, timeout=self._b.timeout(context)))
        return export.geojson(ranked, request.search_id)

    def SearchSlides(self, request, context):
        args = requests.search_slides(request)
        k, size, per_slide = args.k, args.mosaic_size, args.regions_per_slide
        exclude = []
        if request.WhichOneof("query") == "slide_id":
            slide = tenants.get_slide(self._b.index, request.slide_id, "", self._b.timeout(context))
            source, slide_mpp = slide.source, slide.slide_mpp
            if request.exclude_query_slide:
                exclude.append(request.slide_id)
        else:
            source, slide_mpp = request.source, request.slide_mpp
        mosaic, model_id, cached = self._q.mosaic(source, slide_mpp, size, context)
        tiling = self._q.tiling(context)
        tiling_pb = tiling.to_pb(types_pb2.Tiling())

        missing: set[int] = set()
        scope = tenants.readable()  # here: the pool's threads see no caller

        def search(v):
            reply = self._b.index.Search(
                index_pb2.SearchRequest(
                    model_id=model_id,
                    query=to_tensor(v),
                    k=MOSAIC_TILE_K,
                    exclude_slide_ids=exclude,
                    allow_partial=request.partial,
                    tiling=tiling_pb,
                    mpp=self._q.mosaic_mpp(tiling),
                    tenants=scope,
                ),
                timeout=self._b.timeout(context),
            )
            missing.update(reply.missing_shards)
            return list(reply.hits)

        per_tile = list(self._fanout.map(search, mosaic))
        out = []
        for (tenant, slide_id), score, found, hits in vectors.rank_slides(per_tile)[:k]:
            regions: list[gateway_pb2.Hit] = []
            seen = set()
            for h in hits:
                key = (h.tile.x, h.tile.y, h.tile.width)
                if key not in seen and len(regions) < per_slide:
                    seen.add(key)
                    regions.append(_hit(h, self._links))
            meta = hits[0].metadata
            out.append(
                gateway_pb2.SlideMatch(
                    tenant=tenant,
                    slide_id=slide_id,
                    score=score,
                    matched_mosaic_tiles=found,
                    regions=regions,
                    metadata=meta,
                    study_instance_uid=meta.get(dicom.STUDY, ""),
                    series_instance_uid=meta.get(dicom.SERIES, ""),
                    viewer_url=regions[0].viewer_url if regions else self._links.link(slide_id, meta),
                )
            )
        return gateway_pb2.SearchSlidesResponse(
            slides=out,
            model_id=model_id,
            mosaic_size=len(mosaic),
            cached=cached,
            partial=bool(missing),
            missing_shards=sorted(missing),
        )

    # -- viewer support --------------------------------------------------------
    def ReadRegion(self, request, context):
        max_side, fmt = requests.read_region(request)
        r = request.region
        timeout = self._b.timeout(context)
        slide = tenants.get_slide(self._b.index, r.slide_id, r.tenant, timeout)
        base = (
            slide.slide_mpp
            or self._b.tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=slide.source), timeout=timeout).info.mpp_x
        )
        mpp = request.mpp or self._q.tiling(context).mpps[0]
        if base > 0:  # coarsen so the longer side fits max_side
            mpp = max(mpp, max(r.width, r.height) * base / max_side)
        resp = self._b.tiler.ReadRegion(
            region_request(slide, r, mpp, _ENCODINGS[fmt]),
            timeout=timeout,
        )
        return gateway_pb2.ReadRegionResponse(
            image=resp.image.data, format=fmt, width=resp.image.width, height=resp.image.height, mpp=resp.mpp
        )

    # -- concepts ----------------------------------------------------------------
    def CreateConcept(self, request, context):
        requests.create_concept(request)
        # Concepts are learned on the untransformed embeddings (transform 0 is the identity).
        with_ = self._q.examples(request.with_examples, context)[0][:, 0]
        without = self._q.examples(request.without_examples, context)[0][:, 0]
        direction, accuracy = vectors.concept_vector(with_, without)
        model_id = self._q.current_model(context)
        saved = self._b.index.PutConcept(
            index_pb2.PutConceptRequest(
                concept=index_pb2.Concept(
                    tenant=tenants.own(),
                    name=request.name,
                    model_id=model_id,
                    vector=to_tensor(direction),
                    with_examples=len(with_),
                    without_examples=len(without),
                    train_accuracy=accuracy,
                    examples=refit.stored_examples(
                        self._resolved(request.with_examples, context),
                        self._resolved(request.without_examples, context),
                    ),
                )
            ),
            timeout=self._b.timeout(context),
        ).concept
        return gateway_pb2.CreateConceptResponse(concept=_concept(saved))

    def _resolved(self, examples, context) -> list[gateway_pb2.Example]:
        """Examples with each region's tenant stated (the one its slide was read from), so that a refit
        outside the caller's request reads the same slide."""
        out = []
        for ex in examples:
            if ex.WhichOneof("example") == "region" and not ex.region.tenant:
                slide = tenants.get_slide(self._b.index, ex.region.slide_id, "", self._b.timeout(context))
                resolved = gateway_pb2.Example()
                resolved.CopyFrom(ex)
                resolved.region.tenant = slide.tenant
                ex = resolved
            out.append(ex)
        return out

    def ListConcepts(self, request, context):
        resp = self._b.index.ListConcepts(
            index_pb2.ListConceptsRequest(model_id=self._q.current_model(context), tenant=tenants.own()),
            timeout=self._b.timeout(context),
        )
        return gateway_pb2.ListConceptsResponse(concepts=[_concept(c) for c in resp.concepts])

    def DeleteConcept(self, request, context):
        requests.concept_name(request)
        self._b.index.DeleteConcept(
            index_pb2.DeleteConceptRequest(
                name=request.name, model_id=self._q.current_model(context), tenant=tenants.own()
            ),
            timeout=self._b.timeout(context),
        )
        return gateway_pb2.DeleteConceptResponse()

    # -- catalogue -----------------------------------------------------------
    def ListSlides(self, request, context):
        keys = requests.list_slides(request, self._search_keys)
        me = tenants.own()
        # The query text is an identifier (an accession number, a barcode): never logged.
        resp = self._b.index.ListSlides(
            index_pb2.ListSlidesRequest(
                page_size=request.page_size,
                page_token=paging.unseal(self._page_key, request.page_token, me),
                tenants=tenants.readable(),
                metadata_keys=keys,
                metadata_prefix=request.metadata_query,
            ),
            timeout=self._b.timeout(context),
        )
        token = paging.seal(self._page_key, resp.next_page_token, me) if resp.next_page_token else ""
        return gateway_pb2.ListSlidesResponse(next_page_token=token, slides=[_slide(s) for s in resp.slides])

    def DeleteSlide(self, request, context):
        requests.slide(request)
        resp = self._b.index.DeleteSlide(
            # Own tenant only: no grant gives write access.
            index_pb2.DeleteSlideRequest(slide_id=request.slide_id, tenant=tenants.own()),
            timeout=self._b.timeout(context),
        )
        return gateway_pb2.DeleteSlideResponse(deleted_tiles=resp.deleted_tiles)

    def GetSlide(self, request, context):
        requests.slide(request)
        timeout = self._b.timeout(context)
        s = tenants.get_slide(self._b.index, request.slide_id, request.tenant, timeout)
        info = self._b.tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=s.source), timeout=timeout).info
        return gateway_pb2.GetSlideResponse(
            slide=_slide(s), width=info.width, height=info.height, mpp=s.slide_mpp or info.mpp_x
        )

    def GetIndexInfo(self, request, context):
        timeout = self._b.timeout(context)
        tiling, recorded = self._tilings.current(timeout)
        info = self._b.index.GetIndexInfo(index_pb2.GetIndexInfoRequest(tenants=tenants.readable()), timeout=timeout)
        out = gateway_pb2.GetIndexInfoResponse(
            model_id=info.model_id,
            tile_count=info.tile_count,
            slide_count=info.slide_count,
            tiling_recorded=recorded,
            tenant=tenants.own(),
            readable_tenants=tenants.readable(),
            case_key=self._case_key,
            slide_search_keys=self._search_keys,
        )
        tiling.to_pb(out.tiling)
        held = self._b.index.ListModels(index_pb2.ListModelsRequest(), timeout=timeout)
        for m in held.models:
            out.models.add(model_id=m.model_id, tile_count=m.tile_count, serving=m.serving)
        migration = self._migrations.anywhere()
        if migration is not None:
            out.migration.CopyFrom(migration)
        return out

    # -- the operator's, across tenants (auth.OPERATOR) -------------------------
    def ListTenants(self, request, context):
        return moves.list_tenants(self._b.index, self._b.timeout(context))

    def MoveSlide(self, request, context):
        requests.move_slide(request)
        slide, moved = moves.move_slide(
            self._b.index,
            self._tilings,
            request.slide_id,
            request.from_tenant,
            request.to_tenant,
            self._b.timeout(context),
        )
        return gateway_pb2.MoveSlideResponse(slide=_slide(slide), moved_tiles=moved)

    # -- model lifecycle (migration.py) ------------------------------------------
    def MigrateIndex(self, request, context):
        requests.migrate_index(request)
        op = self._migrations.start(
            request.model_id,
            request.max_tiles_per_s,
            request.cutover,
            tenant=tenants.own(),
            starter=callers.current().key,
        )
        return gateway_pb2.MigrateIndexResponse(operation=op)

    def CutoverIndex(self, request, context):
        requests.cutover_index(request)
        return self._migrations.cutover(request.model_id, request.allow_missing)

    def DropIndexModel(self, request, context):
        requests.drop_index_model(request)
        return gateway_pb2.DropIndexModelResponse(dropped_tiles=self._migrations.drop(request.model_id))

    def on_close(self, hook) -> None:
        self._close_hooks.append(hook)

    def close(self) -> None:
        for hook in self._close_hooks:
            hook()
        self._readiness.close()
        self._cases.close()
        self._migrations.close()
        self._ingest.close()
        self._fanout.shutdown(wait=False, cancel_futures=True)
        self._searches.close()
        self._b.close()


def registration(settings: Settings) -> Registration:
    guard = Guard(settings)
    servicer = GatewayServicer(settings)
    servicer.on_close(guard.close)  # open view sessions are recorded when the server stops
    return Registration(
        gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
        servicer,
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
        interceptors=(guard,),
    )
