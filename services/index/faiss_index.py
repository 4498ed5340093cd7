"""The in-memory search of a shard over its Storage: one FAISS index per model it holds.

TileIndex is a shard.ShardIndex: one machine's index over its own SQLite record
(and, inside replica.Replica, over a serving replica's local copy).

Storage (storage.py) is the durable record; this module holds the search.
A shard holds vectors of one or more models (a migration fills a second one
beside the serving one); each has its own FAISS index (model_search.ModelSearch),
and a search runs on the one index of the model its query was embedded with,
so no search mixes models. Which model serves is a journal entry: applied
here at its sequence number like a commit. commit_slide swaps a slide's old
tiles for the new ones in one storage transaction and one exclusive FAISS
update: searches never see a half-added slide.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from smily.common import tiling as tilings
from smily.common.errors import FailedPrecondition, InvalidArgument
from smily.common.limits import MAX_K
from smily.common.rwlock import RWLock
from smily.common.tiling import Tiling

from . import ann, snapshot
from . import rerank as reranking
from .model_search import IndexConfig, IndexState, ModelSearch
from .shard import Hit, IndexInfo, Query, TileBatch
from .sqlite_store import SqliteStorage
from .storage import DROP, SERVE, SQL_CHUNK, STALE_STAGED_S, Commit, MetadataMatch, Slide, Storage, Tile

__all__ = ["IndexConfig", "TileIndex", "check_model", "check_stage"]

log = logging.getLogger("smily.index")

# Filtered searches over at most this many tiles are scored exactly, from the re-rank vectors.
EXACT_FILTER_MAX = 4096


def check_stage(batch: TileBatch) -> None:
    n, vectors = len(batch.tiles), batch.vectors
    if not batch.slide_id or not batch.generation:
        raise InvalidArgument("slide_id and generation are required")
    if vectors.ndim != 2 or len(vectors) != n:
        raise InvalidArgument(f"{n} tiles need a [{n}, dim] tensor, got {list(vectors.shape)}")
    if not np.isfinite(vectors).all():
        raise InvalidArgument("embeddings contain NaN or infinity")


def check_model(
    models: dict[str, int], serving: str, model_id: str, dim: int | None = None, register: bool = False
) -> None:
    """Refuse a model the index does not hold (unless `register`: a migration adds it), or the wrong dimension."""
    if not model_id:
        raise InvalidArgument("model_id is required")
    held = models.get(model_id)
    if held is None:
        if serving and not register:
            raise FailedPrecondition(
                f"this index holds embeddings of model {serving}, not {model_id}: "
                f"migrate the index to it (smily index migrate --to {model_id}) or re-ingest into a new index"
            )
        return
    if dim is not None and dim != held:
        raise InvalidArgument(f"embeddings must have {held} dimensions, got {dim}")


class TileIndex:
    """The search over `storage`; snapshots go to `directory`. Default storage: SQLite in `directory`."""

    def __init__(self, directory: str, config: IndexConfig | None = None, storage: Storage | None = None):
        self._dir = directory
        self.config = config or IndexConfig()
        self.storage = storage if storage is not None else SqliteStorage(directory)
        self.storage.adopt_untenanted(self.config.default_tenant)
        self._rw = RWLock()
        self.model_id, self.dim = self.storage.binding()
        self.tiling = Tiling.from_json(self.storage.tiling())
        self._seq = self.storage.seq()
        self._snapshot_seq = 0
        # Ids of the tiles of some tenants and/or at one resolution, and their FAISS selector, per
        # (model, tenants, range): searched often.
        self._scoped: dict[tuple, tuple[np.ndarray, Any, bool]] = {}
        self._scoped_seq = -1
        self._stop = threading.Event()
        self._searches: dict[str, ModelSearch] = {}
        if self.config.factory and self.dim:
            ann.validate(self.config.factory, self.dim)
        if self.config.rerank_form not in (*reranking.FORMS, reranking.STORAGE):
            raise ValueError(
                f"SMILY_INDEX_RERANK_FORM must be one of {sorted(reranking.FORMS)} or {reranking.STORAGE!r}, "
                f"got {self.config.rerank_form!r}"
            )
        self._load()
        self._snapshotter = None
        if self.config.snapshot_interval_s > 0:
            self._snapshotter = threading.Thread(target=self._snapshot_loop, name="index-snapshot", daemon=True)
            self._snapshotter.start()

    # -- start-up ---------------------------------------------------------
    def _load(self) -> None:
        dropped = self.storage.drop_stale_staged(time.time() - STALE_STAGED_S)
        if dropped:
            log.info("stale staged tiles dropped", extra={"tiles": dropped})
        for model_id, dim in self.storage.models().items():
            search = self._search_for(model_id, dim)
            search.load(self._seq)
            self._searches[model_id] = search
        self._snapshot_seq = min((s.state.snapshot_seq for s in self._searches.values()), default=0)

    def _search_for(self, model_id: str, dim: int) -> ModelSearch:
        return ModelSearch(self.storage, self.config, model_id, dim, self._snapshot_dir(model_id), self._rw, self._stop)

    def _snapshot_dir(self, model_id: str) -> str:
        """Where a model's snapshots go: the directory itself for the first model (as before models were
        many), a folder per model under models/ for the others."""
        if model_id == self.storage.first_model():
            return self._dir
        path = os.path.join(self._dir, "models", hashlib.sha256(model_id.encode()).hexdigest()[:16])
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def serving(self) -> ModelSearch | None:
        """The serving model's search; None before the first write."""
        return self._searches.get(self.model_id)

    def wait_trained(self, timeout: float | None = None) -> bool:
        """Wait for every model's background training (swap included); True when none is running."""
        return all(s.wait_trained(timeout) for s in list(self._searches.values()))

    # -- snapshots ----------------------------------------------------------
    def _snapshot_loop(self) -> None:
        while not self._stop.wait(self.config.snapshot_interval_s):
            try:
                self.snapshot()
            except Exception:
                log.exception("index snapshot failed; the journal still holds everything")

    def snapshot(self) -> bool:
        """Write every model's snapshot if the journal moved since the last one. Searches go on; mutations wait."""
        with self._rw.read():
            if not self._searches or self._seq == self._snapshot_seq:
                return False
            seq = self._seq
            for search in self._searches.values():
                search.snapshot(seq)
            self._snapshot_seq = seq
            self.storage.forget_removed(seq)
        log.info("index snapshot written", extra={"seq": seq})
        return True

    # -- models -------------------------------------------------------------
    def _models(self) -> dict[str, int]:
        return {m: s.dim for m, s in self._searches.items()}

    def record_tiling(self, tiling: Tiling) -> None:
        """Record the tiling if none is, else check it (FAILED_PRECONDITION on a mismatch)."""
        with self._rw.write():
            self._record_tiling(tiling)

    def _record_tiling(self, tiling: Tiling) -> None:
        tilings.check(self.tiling, tiling)
        if self.tiling is None:
            self.tiling = Tiling.from_json(self.storage.record_tiling(tiling.to_json()))
            tilings.check(self.tiling, tiling)  # storage may hold another writer's record

    def bind(self, model_id: str, dim: int) -> None:
        """Bind an empty index to the model its system of record serves (a replica's first change)."""
        with self._rw.write():
            check_model(self._models(), self.model_id, model_id, dim)
            self._bind(model_id, dim)

    def _bind(self, model_id: str, dim: int) -> None:
        if self.model_id:
            return
        self._check_factory(dim)
        self.model_id, self.dim = self.storage.bind(model_id, dim)
        check_model(self.storage.models(), self.model_id, model_id, dim)  # storage may hold another binding
        self._add_search(model_id, dim)
        log.info("index bound to model", extra={"model_id": model_id, "dim": dim})

    def hold(self, model_id: str, dim: int) -> None:
        """Hold vectors of a model beside the serving one (a migration's target, or a replica following one)."""
        if model_id in self._searches:  # held already: the follower asks on every poll
            return
        with self._rw.write():
            self._hold(model_id, dim)

    def _hold(self, model_id: str, dim: int) -> None:
        if model_id in self._searches:
            return
        self._check_factory(dim)
        if self.storage.add_model(model_id, dim) != dim:
            raise InvalidArgument(
                f"embeddings of model {model_id} must have {self.storage.models()[model_id]} dimensions"
            )
        self._add_search(model_id, dim)
        log.info("index holds another model", extra={"model_id": model_id, "dim": dim, "serving": self.model_id})

    def _check_factory(self, dim: int) -> None:
        if self.config.factory:
            try:
                ann.validate(self.config.factory, dim)
            except ValueError as exc:
                raise FailedPrecondition(str(exc)) from None

    def _add_search(self, model_id: str, dim: int) -> None:
        search = self._search_for(model_id, dim)
        search.empty()
        self._searches[model_id] = search

    def serve(self, model_id: str) -> int:
        """Make a held model the serving one, at the next journal sequence number; returns it."""
        with self._rw.write():
            commit = self.storage.serve(model_id)
            self._apply(commit)
        log.info("serving model switched", extra={"model_id": model_id, "seq": commit.seq})
        return commit.seq

    def drop_model(self, model_id: str) -> int:
        """Forget a model other than the serving one and its vectors; returns how many tiles went."""
        with self._rw.write():
            commit = self.storage.drop_model(model_id)
            self._apply(commit)
        log.info("model dropped", extra={"model_id": model_id, "tiles": len(commit.removed)})
        return len(commit.removed)

    def models(self) -> dict[str, tuple[int, int]]:
        """(dimension, tiles searched) of every model held."""
        with self._rw.read():
            return {m: (s.dim, s.count()) for m, s in self._searches.items()}

    def missing_slides(self, model_id: str, limit: int) -> tuple[list[str], int]:
        return self.storage.missing_slides(model_id, limit)

    def lease(self, owner: str, lease_s: float, record: str) -> tuple[bool, str, bool]:
        return self.storage.lease(owner, lease_s, record)

    def add_model(self, model_id: str, dim: int) -> None:
        if not self.model_id:
            raise FailedPrecondition("the index holds nothing yet: ingest slides, which bind it to their model")
        check_model(self._models(), self.model_id, model_id, dim, register=True)
        self.hold(model_id, dim)

    # -- writes -------------------------------------------------------------
    def stage(self, batch: TileBatch) -> int:
        check_stage(batch)
        dim = batch.vectors.shape[1]
        with self._rw.write():
            check_model(self._models(), self.model_id, batch.model_id, dim, batch.register_model)
            if batch.tiling is not None:
                self._record_tiling(batch.tiling)
            if not self.model_id:
                self._bind(batch.model_id, dim)
            self._hold(batch.model_id, dim)
            # Retried batches are ignored, not duplicated (unique per generation and rect).
            return self.storage.stage(batch.slide_id, batch.generation, batch.tiles, batch.vectors, batch.model_id)

    def commit_slide(self, model_id: str, generation: str, slide: Slide, expected_tiles: int) -> tuple[Slide, int]:
        if not slide.slide_id or not generation:
            raise InvalidArgument("slide_id and generation are required")
        with self._rw.write():
            if self.model_id:
                check_model(self._models(), self.model_id, model_id)
            commit = self.storage.commit_slide(generation, slide, expected_tiles, model_id)
            self._apply(commit)
        assert commit.slide is not None, "a commit publishes the slide"
        log.info(
            "slide committed",
            extra={
                "slide_id": slide.slide_id,
                "model_id": model_id,
                "tiles": sum(len(ids) for ids, _ in commit.added.values()),
                "replaced": len(commit.removed),
            },
        )
        return commit.slide, len(commit.removed)

    def delete_slide(self, slide_id: str) -> int:
        with self._rw.write():
            commit = self.storage.delete_slide(slide_id)
            self._apply(commit)
        log.info("slide deleted", extra={"slide_id": slide_id, "tiles": len(commit.removed)})
        return len(commit.removed)

    def apply(self, write: Callable[[], Commit]) -> Commit:
        """Run a storage write and bring the search to its state, one step as searches see it."""
        with self._rw.write():
            commit = write()
            self._apply(commit)
        return commit

    def _apply(self, commit: Commit) -> None:
        """Bring FAISS to a commit's state; one already held (a retried commit) changes nothing.
        Caller holds the write lock."""
        if commit.seq <= self._seq:
            return
        self._seq = commit.seq
        if commit.event == SERVE:
            self.model_id, self.dim = commit.event_model, self._searches[commit.event_model].dim
        elif commit.event == DROP and (gone := self._searches.pop(commit.event_model, None)) is not None:
            _forget_snapshots(gone.directory)
            return
        for search in self._searches.values():
            if search.faiss is not None:
                search.remove(commit.removed)
        for model_id, (ids, vectors) in commit.added.items():
            adding = self._searches.get(model_id)
            if adding is not None and adding.faiss is not None:
                adding.add(ids, vectors)

    # -- reads --------------------------------------------------------------
    def search(self, q: Query) -> list[Hit]:
        """Top-k tiles (shard.Query says which) of the query's model; restrictions apply inside FAISS,
        so k hits come back whenever k tiles match."""
        k, nprobe, mpp = q.k, q.nprobe, q.mpp
        slide_ids, exclude_slide_ids, tenants = list(q.slide_ids), list(q.exclude_slide_ids), tuple(q.tenants)
        filters, exclude_filters = dict(q.filters), dict(q.exclude_filters)
        if not 0 < k <= MAX_K:
            raise InvalidArgument(f"k must be in 1..{MAX_K}, got {k}")
        if nprobe < 0:
            raise InvalidArgument("nprobe must not be negative")
        query = q.vector.reshape(1, -1) if q.vector.ndim == 1 else q.vector
        if query.shape[0] != 1:
            raise InvalidArgument(f"one query vector expected, got shape {list(query.shape)}")
        query = np.ascontiguousarray(query, np.float32)
        with self._rw.read():
            if not self.model_id:
                return []  # nothing indexed yet
            check_model(self._models(), self.model_id, q.model_id, query.shape[1])
            search = self._searches[q.model_id]
            if q.tiling is not None:
                tilings.check(self.tiling, q.tiling, "this search")
            tilings.check_mpp(self.tiling, mpp)
            # One resolution indexed: every tile is at it, no restriction needed.
            # (An index written before tiling records has none: its tiles are all searched.)
            mpp_range = None
            if mpp and self.tiling is not None and len(self.tiling.mpps) > 1:
                mpp_range = tilings.mpp_range(self.tiling, mpp)
            selector, available = None, search.count()
            if slide_ids or filters or mpp_range or tenants:
                if not (slide_ids or filters or exclude_slide_ids or exclude_filters):
                    allowed, selector, whole = self._ids_in(q.model_id, tenants, mpp_range)
                    if whole:  # the scope is every tile (one tenant, say): no check per scanned code
                        return search.search(query, k, nprobe, None, available)
                else:
                    allowed = self.storage.select(
                        slide_ids, filters, exclude_slide_ids, exclude_filters, mpp_range, tenants, model_id=q.model_id
                    )
                    selector = None
                if not len(allowed):
                    return []
                if not search.is_exact() and len(allowed) <= EXACT_FILTER_MAX:
                    return search.hits(search.scores(allowed, query), k, query, rescore=False)
                if selector is None:
                    selector = faiss.IDSelectorBatch(allowed)
                available = len(allowed)
            elif exclude_slide_ids or exclude_filters:
                excluded = self.storage.excluded(exclude_slide_ids, exclude_filters, q.model_id)
                if len(excluded):
                    selector, available = (
                        faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded)),
                        available - len(excluded),
                    )
            return search.search(query, k, nprobe, selector, available)

    def _ids_in(
        self, model_id: str, tenants: tuple[str, ...], mpp_range: tuple[float, float] | None
    ) -> tuple[np.ndarray, Any, bool]:
        """Ids of a model's published tiles of the tenants (all: none named) in the resolution range
        (any: None), their FAISS selector (None for a scope searched exactly) and whether they are all
        the model's tiles (then no selector is needed), kept until the next commit. Every search is
        scoped to a tenant: building the selector per search cost 10-20 ms at 100k tiles, and checking
        it per scanned code ~3 ms (docs/benchmarks.md, the query rows of issue 27). Caller holds the
        read lock (the sequence cannot move meanwhile)."""
        key = (model_id, tuple(sorted(set(tenants))), mpp_range)
        if self._scoped_seq != self._seq or len(self._scoped) > 64:  # a commit, or many tenant sets
            self._scoped, self._scoped_seq = {}, self._seq
        scope = self._scoped.get(key)
        if scope is None:
            ids = self.storage.select((), {}, (), {}, mpp_range, tenants, model_id=model_id)
            if len(ids) == self.storage.committed_count(model_id):
                scope = (ids, None, True)
            else:
                scope = (ids, faiss.IDSelectorBatch(ids) if len(ids) > EXACT_FILTER_MAX else None, False)
            self._scoped[key] = scope
        return scope

    def get_slide(self, slide_id: str) -> Slide:
        return self.storage.get_slide(slide_id)

    def slide_tiles(self, slide_id: str, after: int, limit: int) -> tuple[np.ndarray, list[Tile], np.ndarray]:
        ids = np.sort(self.storage.select([slide_id], {}, (), {}, model_id=self.model_id))
        ids = ids[ids > after][:limit]
        parts = [self.storage.vectors(ids[i : i + SQL_CHUNK], self.model_id) for i in range(0, len(ids), SQL_CHUNK)]
        records = self.storage.records(ids.tolist())
        vectors = np.concatenate([p[1] for p in parts]) if parts else np.empty((0, self.dim), np.float32)
        return ids, [records[int(i)][1] for i in ids], vectors

    def list_slides(
        self, page_size: int, page_token: str, tenants=(), match: MetadataMatch | None = None, lacking: str = ""
    ) -> tuple[list[Slide], str]:
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        page_size = min(page_size or 100, 1000)
        try:
            after = base64.b64decode(page_token, altchars=b"-_", validate=True).decode() if page_token else ""
        except Exception:
            raise InvalidArgument("page_token is not one this service issued") from None
        rows = self.storage.list_slides(after, page_size + 1, tenants, match, lacking)
        slides = rows[:page_size]
        token = base64.urlsafe_b64encode(slides[-1].slide_id.encode()).decode() if len(rows) > page_size else ""
        return slides, token

    def counts(self, tenants=()) -> tuple[int, int]:
        if tenants:
            return self.storage.tenant_counts(tenants, self.model_id)
        slides = self.storage.slide_count()
        with self._rw.read():
            serving = self.serving
            tiles = serving.count() if serving is not None else 0
        return tiles, slides

    def info(self) -> IndexInfo:
        with self._rw.read():
            serving = self.serving
            faiss_index = serving.faiss if serving is not None else None
            nlist = ann.nlist(faiss_index) if faiss_index is not None else 0
            state = serving.state if serving is not None else IndexState()
            return IndexInfo(self._seq, nlist, self.config.nprobe, **dataclasses.asdict(state))

    def close(self) -> None:
        self._stop.set()
        if self._snapshotter is not None:
            self._snapshotter.join()
        self.wait_trained()
        self.snapshot()
        with self._rw.write():
            self.storage.close()


def _forget_snapshots(directory: str) -> None:
    """A dropped model's snapshot files: its manifest first, so no half-removed snapshot is vouched for."""
    manifest = os.path.join(directory, snapshot.MANIFEST)
    if os.path.exists(manifest):
        os.remove(manifest)
    for path in glob.glob(os.path.join(directory, "snapshot-*.faiss")) + glob.glob(
        os.path.join(directory, "refine-*.faiss")
    ):
        os.remove(path)
