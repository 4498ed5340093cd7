"""IndexService: stage, commit, search, list and delete tile embeddings."""

from __future__ import annotations

from smily.common import limits, tenancy
from smily.common.config import Settings
from smily.common.errors import InvalidArgument
from smily.common.server import Registration, Servicer
from smily.common.tensors import from_tensor, to_tensor
from smily.common.tiling import Tiling
from smily.index.v1 import index_pb2, index_pb2_grpc

from .concepts import MAX_CONCEPT_EXAMPLE_BYTES, Concept, ConceptStore, Example, check_name
from .faiss_index import IndexConfig, TileIndex
from .operations import OperationStore
from .pg_store import PgConcepts, PgOperations
from .replica import Replica
from .shard import Query, ShardIndex, TileBatch
from .storage import MetadataMatch, Slide, Tile

# ReadSlideTiles: tiles per page when none is asked, and the most.
TILE_PAGE, MAX_TILE_PAGE = 512, 4096

# How long a gateway operation's record is kept at most (the gateway keeps a week).
OPERATION_KEEP_MAX_S = 90 * 24 * 3600.0

# Slides a ListModels names of those a model lacks; the count says how many in all.
MISSING_LISTED = 100


def _slide_pb(s: Slide, model_id: str) -> index_pb2.Slide:
    tenant, slide_id = tenancy.split(s.slide_id)
    return index_pb2.Slide(
        tenant=tenant,
        slide_id=slide_id,
        source=s.source,
        metadata=s.metadata,
        tile_count=s.tile_count,
        model_id=model_id,
        indexed_at=s.indexed_at,
        slide_mpp=s.slide_mpp,
    )


class IndexServicer(index_pb2_grpc.IndexServiceServicer, Servicer):
    def __init__(self, settings: Settings):
        config = IndexConfig(
            factory=settings.index.index_factory,
            ivf_threshold=settings.index.index_ivf_threshold,
            nprobe=settings.index.index_nprobe,
            rerank=settings.index.index_rerank,
            rerank_form=settings.index.index_rerank_form,
            snapshot_interval_s=settings.index.index_snapshot_interval_s,
            default_tenant=settings.auth.default_tenant,
        )
        self.default_tenant = tenancy.tenant(settings.auth.default_tenant, "SMILY_DEFAULT_TENANT")
        # One face whichever holds the record: mypy checks that both are a ShardIndex.
        self.store: ShardIndex
        self.concepts: PgConcepts | ConceptStore
        self.operations: PgOperations | OperationStore
        if settings.index.index_database_url:
            self.store = Replica(
                settings.index.index_dir, config, settings.index.index_database_url, settings.index.index_shard
            )
            self.concepts = PgConcepts(settings.index.index_database_url, settings.index.index_shard)
            self.operations = PgOperations(settings.index.index_database_url, settings.index.index_shard)
        else:
            self.store = TileIndex(settings.index.index_dir, config)
            self.concepts = ConceptStore(settings.index.index_dir)
            self.operations = OperationStore(settings.index.index_dir)
        self.concepts.adopt_untenanted(self.default_tenant)

    def _key(self, tenant: str, slide_id: str) -> str:
        """The index key of a slide named in a request (tenant empty: the default tenant)."""
        return tenancy.key(tenancy.tenant(tenant) if tenant else self.default_tenant, limits.slide_id(slide_id))

    def _tenants(self, tenants) -> list[str]:
        """The tenants a search or listing covers; none named: the default tenant (as before tenancy)."""
        return [tenancy.tenant(t, "tenants") for t in tenants] or [self.default_tenant]

    def AddTiles(self, request, context):
        key = self._key(request.tenant, request.slide_id)
        tiles = [Tile(t.x, t.y, t.width, t.height, t.mpp, t.tissue_fraction) for t in request.tiles]
        tiling = Tiling.from_pb(request.tiling)
        n = self.store.stage(
            TileBatch(
                request.model_id,
                key,
                request.generation,
                from_tensor(request.embeddings),
                tiles,
                tiling and tiling.validate(),
                request.register_model,
            )
        )
        return index_pb2.AddTilesResponse(staged=n)

    def CommitSlide(self, request, context):
        s = request.slide
        key = self._key(s.tenant, s.slide_id)  # the gateway checks these too: defence in depth
        limits.metadata(s.metadata)
        slide, replaced = self.store.commit_slide(
            request.model_id,
            request.generation,
            Slide(key, s.source, dict(s.metadata), slide_mpp=s.slide_mpp),
            request.expected_tiles,
        )
        return index_pb2.CommitSlideResponse(
            slide=_slide_pb(slide, self.store.model_id), replaced=replaced, journal_seq=self.store.info().journal_seq
        )

    def Search(self, request, context):
        limits.filters(request.filters)
        limits.filters(request.exclude_filters, "exclude_filters")
        limits.slide_ids(request.slide_ids, "slide_ids")
        limits.slide_ids(request.exclude_slide_ids, "exclude_slide_ids")
        tenants = self._tenants(request.tenants)
        hits = self.store.search(
            Query(
                request.model_id,
                from_tensor(request.query),
                request.k,
                [tenancy.key(t, i) for i in request.exclude_slide_ids for t in tenants],
                [tenancy.key(t, i) for i in request.slide_ids for t in tenants],
                dict(request.filters),
                request.nprobe,
                dict(request.exclude_filters),
                Tiling.from_pb(request.tiling),
                request.mpp,
                tenants,
            )
        )
        return index_pb2.SearchResponse(
            # The model searched: the query's (a search never mixes models), "" before the first write.
            model_id=request.model_id if self.store.model_id else "",
            hits=[
                index_pb2.Hit(
                    tenant=tenancy.split(h.slide_id)[0],
                    slide_id=tenancy.split(h.slide_id)[1],
                    score=h.score,
                    metadata=h.metadata,
                    tile=index_pb2.TileRect(
                        x=h.tile.x,
                        y=h.tile.y,
                        width=h.tile.w,
                        height=h.tile.h,
                        mpp=h.tile.mpp,
                        tissue_fraction=h.tile.tissue,
                    ),
                )
                for h in hits
            ],
        )

    def GetSlide(self, request, context):
        key = self._key(request.tenant, request.slide_id)
        return index_pb2.GetSlideResponse(slide=_slide_pb(self.store.get_slide(key), self.store.model_id))

    def ListSlides(self, request, context):
        keys, prefix = limits.metadata_query(request.metadata_prefix, request.metadata_keys, "metadata_prefix")
        slides, token = self.store.list_slides(
            request.page_size,
            request.page_token,
            () if request.all_tenants else self._tenants(request.tenants),
            MetadataMatch(keys, prefix) if prefix else None,
            request.lacking_model_id,
        )
        return index_pb2.ListSlidesResponse(
            slides=[_slide_pb(s, self.store.model_id) for s in slides], next_page_token=token
        )

    def DeleteSlide(self, request, context):
        key = self._key(request.tenant, request.slide_id)
        return index_pb2.DeleteSlideResponse(deleted_tiles=self.store.delete_slide(key))

    def GetIndexInfo(self, request, context):
        tiles, slides = self.store.counts([tenancy.tenant(t, "tenants") for t in request.tenants])
        info = self.store.info()
        out = index_pb2.GetIndexInfoResponse(
            model_id=self.store.model_id,
            dim=self.store.dim,
            tile_count=tiles,
            slide_count=slides,
            index_type=info.factory,
            train_vectors=info.train_vectors,
            train_seconds=info.train_seconds,
            nlist=info.nlist,
            default_nprobe=info.nprobe,
            journal_seq=info.journal_seq,
            snapshot_seq=info.snapshot_seq,
            load_report=info.load_report,
        )
        if self.store.tiling is not None:
            self.store.tiling.to_pb(out.tiling)
        return out

    # -- models (see faiss_index.py) ------------------------------------------
    def SetServingModel(self, request, context):
        if not request.model_id:
            raise InvalidArgument("model_id is required")
        return index_pb2.SetServingModelResponse(journal_seq=self.store.serve(request.model_id))

    def AddModel(self, request, context):
        if not request.model_id or request.dim <= 0:
            raise InvalidArgument("model_id and a positive dim are required")
        self.store.add_model(request.model_id, request.dim)
        return index_pb2.AddModelResponse()

    def LeaseMigration(self, request, context):
        if request.lease_s < 0 or (request.record and not request.owner):
            raise InvalidArgument("lease_s must not be negative, and a record needs its owner")
        granted, record, expired = self.store.lease(request.owner, request.lease_s, request.record)
        return index_pb2.LeaseMigrationResponse(granted=granted, record=record, expired=expired)

    def DropModel(self, request, context):
        if not request.model_id:
            raise InvalidArgument("model_id is required")
        dropped = self.store.drop_model(request.model_id)
        return index_pb2.DropModelResponse(dropped_tiles=dropped, journal_seq=self.store.info().journal_seq)

    def ListModels(self, request, context):
        serving = self.store.model_id
        out = index_pb2.ListModelsResponse(
            models=[
                index_pb2.HeldModel(model_id=m, dim=dim, tile_count=tiles, serving=m == serving)
                for m, (dim, tiles) in sorted(self.store.models().items())
            ],
            serving_model_id=serving,
            journal_seq=self.store.info().journal_seq,
        )
        if request.missing_model_id:
            keys, out.missing_count = self.store.missing_slides(request.missing_model_id, MISSING_LISTED)
            for key in keys:
                tenant, slide_id = tenancy.split(key)
                out.missing_slides.add(tenant=tenant, slide_id=slide_id)
        return out

    # -- gateway operations (their own table; see operations.py) ---------------
    def _operation_id(self, operation_id: str) -> str:
        if not operation_id:
            raise InvalidArgument("operation_id is required")
        return limits.text(operation_id, "operation_id", limits.MAX_TOKEN_CHARS)  # as the gateway bounds it

    def PutOperationRecord(self, request, context):
        operation_id = self._operation_id(request.operation_id)
        if not (request.record or request.cancel) or not 0 < request.keep_s <= OPERATION_KEEP_MAX_S:
            raise InvalidArgument(f"a record or a cancel mark is required, and keep_s in (0, {OPERATION_KEEP_MAX_S}]")
        self.operations.put(operation_id, request.record, request.cancel, request.keep_s)
        return index_pb2.PutOperationRecordResponse()

    def GetOperationRecord(self, request, context):
        found = self.operations.get(self._operation_id(request.operation_id))
        if found is None:
            return index_pb2.GetOperationRecordResponse()
        return index_pb2.GetOperationRecordResponse(found=True, record=found[0], cancel=found[1])

    # -- concepts (their own table; see concepts.py) -------------------------
    # Concepts are per tenant: stored under tenancy.key(tenant, name).
    def _concept_key(self, tenant: str, name: str) -> str:
        check_name(name)
        return tenancy.key(self._tenants([tenant] if tenant else [])[0], name)

    def PutConcept(self, request, context):
        c = request.concept
        key = self._concept_key(c.tenant, c.name)
        examples = [
            Example(e.positive, e.region if e.WhichOneof("example") == "region" else None, e.image or None)
            for e in c.examples
        ]
        if sum(len(e.region or e.image or b"") for e in examples) > MAX_CONCEPT_EXAMPLE_BYTES:
            raise InvalidArgument(f"a concept's examples are at most {MAX_CONCEPT_EXAMPLE_BYTES} bytes in all")
        saved = self.concepts.put(
            Concept(
                key,
                c.model_id,
                from_tensor(c.vector),
                c.with_examples,
                c.without_examples,
                c.train_accuracy,
                examples=examples or None,
            )
        )
        return index_pb2.PutConceptResponse(concept=_concept_pb(saved))

    def GetConcept(self, request, context):
        key = self._concept_key(request.tenant, request.name)
        return index_pb2.GetConceptResponse(
            concept=_concept_pb(self.concepts.get(key, request.model_id, request.with_examples))
        )

    def ListConcepts(self, request, context):
        tenant = None if request.all_tenants else self._tenants([request.tenant] if request.tenant else [])[0]
        return index_pb2.ListConceptsResponse(
            concepts=[_concept_pb(c) for c in self.concepts.list(request.model_id, tenant)]
        )

    def DeleteConcept(self, request, context):
        self.concepts.delete(self._concept_key(request.tenant, request.name), request.model_id)
        return index_pb2.DeleteConceptResponse()

    # -- the operator's (issue 24) ------------------------------------------------
    def ListTenants(self, request, context):
        counts: dict[str, list[int]] = {}
        token = ""
        while True:  # every slide of every tenant: an operator's call, not a search's
            slides, token = self.store.list_slides(1000, token, ())
            for s in slides:
                c = counts.setdefault(tenancy.split(s.slide_id)[0], [0, 0])
                c[0], c[1] = c[0] + 1, c[1] + s.tile_count
            if not token:
                break
        return index_pb2.ListTenantsResponse(
            tenants=[
                index_pb2.TenantCount(tenant=t, slide_count=n, tile_count=k) for t, (n, k) in sorted(counts.items())
            ]
        )

    def ReadSlideTiles(self, request, context):
        key = self._key(request.tenant, request.slide_id)
        if request.after < 0 or not 0 <= request.page_size <= MAX_TILE_PAGE:
            raise InvalidArgument(f"after must not be negative and page_size must be in 0..{MAX_TILE_PAGE}")
        self.store.get_slide(key)  # NOT_FOUND when it is not here
        size = request.page_size or TILE_PAGE
        ids, tiles, vectors = self.store.slide_tiles(key, request.after, size)
        return index_pb2.ReadSlideTilesResponse(
            tiles=[
                index_pb2.TileRect(x=t.x, y=t.y, width=t.w, height=t.h, mpp=t.mpp, tissue_fraction=t.tissue)
                for t in tiles
            ],
            embeddings=to_tensor(vectors),
            next_after=int(ids[-1]) if len(ids) == size else 0,
        )

    def close(self) -> None:
        self.store.close()
        self.concepts.close()
        self.operations.close()


def _concept_pb(c: Concept) -> index_pb2.Concept:
    tenant, name = tenancy.split(c.name)
    return index_pb2.Concept(
        tenant=tenant,
        name=name,
        model_id=c.model_id,
        vector=None if c.vector is None else to_tensor(c.vector),  # listed without
        with_examples=c.with_examples,
        without_examples=c.without_examples,
        train_accuracy=c.train_accuracy,
        created_at=c.created_at,
        examples=[
            index_pb2.ConceptExample(positive=e.positive, region=e.region)
            if e.region is not None
            else index_pb2.ConceptExample(positive=e.positive, image=e.image)
            for e in c.examples or ()
        ],
    )


def registration(settings: Settings) -> Registration:
    return Registration(
        index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name,
        IndexServicer(settings),
        index_pb2_grpc.add_IndexServiceServicer_to_server,
    )
