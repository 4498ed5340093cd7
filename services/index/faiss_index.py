"""The in-memory FAISS index over a Storage: load, replay, train, compact, search.

TileIndex is a shard.ShardIndex: one machine's index over its own SQLite record.

Storage (storage.py) is the durable record; this module holds the search.
A FAISS snapshot records the commit sequence it holds, so start-up loads the
snapshot and replays only what storage logged after it; a snapshot that does
not check out is reported and the index rebuilt from storage, never served
partial. commit_slide swaps a slide's old tiles for the new ones in one
storage transaction and one exclusive FAISS update: searches never see a
half-added slide.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from smily.common import tenancy
from smily.common import tiling as tilings
from smily.common.errors import FailedPrecondition, InvalidArgument
from smily.common.limits import MAX_K
from smily.common.rwlock import RWLock
from smily.common.tiling import Tiling
from smily.common.tracing import span

from . import ann, snapshot
from . import rerank as reranking
from .shard import Hit, IndexInfo, Query, TileBatch
from .sqlite_store import SqliteStorage
from .storage import SQL_CHUNK, STALE_STAGED_S, Commit, Slide, Storage

log = logging.getLogger("smily.index")

TRAIN_MAX = 100_000
# Filtered searches over at most this many tiles are scored exactly, from the re-rank vectors.
EXACT_FILTER_MAX = 4096
# Deleted entries past this share of the index trigger a compacting copy.
COMPACT_FRACTION = 0.25
# Most candidates one search re-scores exactly, whatever k * rerank asks.
RERANK_MAX = 4096


@dataclass
class IndexConfig:
    # FAISS factory string used from `ivf_threshold` vectors on; "" = automatic, "Flat" = always exact.
    factory: str = ""
    ivf_threshold: int = 200_000
    nprobe: int = 32
    # ANN candidates per hit re-scored with the re-rank vectors held in RAM; <= 1 turns it off.
    # 100 (1,000 candidates for k=10) kept recall@10 >= 0.99 on 1M vectors in bench/index.py.
    rerank: int = 100
    # The re-rank vectors' form (reranking.FORMS, or reranking.STORAGE): fp16 kept recall@10 at 0.9993 of
    # exact float32 on real embeddings at nprobe 32, sq8 0.986 (bench/rerank.py, docs/benchmarks.md).
    rerank_form: str = reranking.DEFAULT_FORM
    snapshot_interval_s: float = 300.0
    # Owner of the slides of an index written before tenancy (adopted once, on open).
    default_tenant: str = tenancy.DEFAULT


@dataclass
class IndexState:
    factory: str = ann.FLAT
    train_vectors: int = 0
    train_seconds: float = 0.0
    snapshot_seq: int = 0
    removed_since_compaction: int = 0
    load_report: str = ""


def check_stage(batch: TileBatch) -> None:
    n, vectors = len(batch.tiles), batch.vectors
    if not batch.slide_id or not batch.generation:
        raise InvalidArgument("slide_id and generation are required")
    if vectors.ndim != 2 or len(vectors) != n:
        raise InvalidArgument(f"{n} tiles need a [{n}, dim] tensor, got {list(vectors.shape)}")
    if not np.isfinite(vectors).all():
        raise InvalidArgument("embeddings contain NaN or infinity")


def _log_trained(factory: str, train_vectors: int, seconds: float, tiles: int, **more) -> None:
    log.info(
        "index trained",
        extra={
            "factory": factory,
            "train_vectors": train_vectors,
            "train_seconds": round(seconds, 3),
            "tiles": tiles,
            **more,
        },
    )


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
        # Ids of the tiles of some tenants and/or at one resolution, per (seq, tenants, range): searched often.
        self._scoped: dict[tuple, tuple[np.ndarray, Any]] = {}
        self._scoped_seq = -1
        self._faiss: Any = None  # a faiss.Index once loaded
        # The re-rank vectors refining an IVF index (rerank.py); None for an exact index.
        self._refine: Any = None
        self._trainer: threading.Thread | None = None
        self._stop = threading.Event()
        self.state = IndexState()
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
        if not self.dim:
            return
        committed = self.storage.committed_count()
        try:
            self._load_snapshot(committed)
        except snapshot.SnapshotError as exc:
            # Reported loudly, then rebuilt from storage: never served partial.
            log.error("index snapshot unusable, rebuilding from the journal", extra={"reason": str(exc)})
            self._faiss = None
            self.state.load_report = f"rebuilt from the journal: snapshot unusable: {exc}"
        if self._faiss is None:
            self._rebuild(committed)
            self.state.load_report = self.state.load_report or "built from the journal"
        log.info(
            "index loaded",
            extra={
                "tiles": self._faiss.ntotal,
                "model_id": self.model_id,
                "factory": self.state.factory,
                "report": self.state.load_report,
                "stale_staged_dropped": dropped,
            },
        )

    def _load_snapshot(self, committed: int) -> None:
        found = snapshot.read(self._dir)
        if found is None:
            return
        index, man, refine = found
        if (man.get("model_id"), man.get("dim")) != (self.model_id, self.dim):
            raise snapshot.SnapshotError("the snapshot belongs to another model")
        if man["seq"] > self._seq:
            raise snapshot.SnapshotError(
                f"the snapshot is at journal sequence {man['seq']}, the journal only at {self._seq}"
            )
        if man["factory"] != self._factory_for(committed, man["factory"]):
            log.info("index type changed by configuration or size; rebuilding", extra={"was": man["factory"]})
            return
        if refine is not None and (not self._refines(man["factory"]) or reranking.form_of(refine) != self._form):
            refine = None  # re-rank turned off or its form changed: built again below when needed
        gone = self.storage.removed_after(man["seq"])
        if len(gone):
            for held in (index, refine):
                if held is not None:
                    held.remove_ids(faiss.IDSelectorBatch(gone))
        replayed = 0
        for ids, vecs in self.storage.added_after(man["seq"]):
            index.add_with_ids(vecs, ids)
            if refine is not None:
                refine.add_with_ids(vecs, ids)
            replayed += len(ids)
        if refine is None and self._refines(man["factory"]):
            # A snapshot from before re-rank vectors were kept: read them from storage once.
            refine = reranking.build(self.dim, self._form, self._training_sample() if self._form != "fp16" else None)
            self._fill(refine)
        for held in (index, refine):
            if held is not None and held.ntotal != committed:
                raise snapshot.SnapshotError(
                    f"snapshot plus journal replay holds {held.ntotal} vectors, the journal {committed}"
                )
        self._faiss, self._refine = index, refine
        self.state = IndexState(
            man["factory"],
            man.get("train_vectors", 0),
            man.get("train_seconds", 0.0),
            man["seq"],
            load_report=f"snapshot at sequence {man['seq']} plus {replayed} added and "
            f"{len(gone)} removed from the journal",
        )

    def _factory_for(self, n: int, current: str = ann.FLAT) -> str:
        """The index type for n vectors; an IVF index once trained is kept as it is."""
        if self.config.factory == ann.FLAT:
            return ann.FLAT
        if current != ann.FLAT and (not self.config.factory or current == self.config.factory):
            return current
        if n < self.config.ivf_threshold:
            return ann.FLAT
        return self.config.factory or ann.auto_factory(n, self.dim, self.config.ivf_threshold)

    @property
    def _form(self) -> str:
        return self.config.rerank_form

    def _refines(self, factory: str) -> bool:
        """Whether an index of this type is re-ranked (from re-rank vectors in RAM)."""
        return factory != ann.FLAT and self.config.rerank > 1 and self._form != reranking.STORAGE

    def _new_refine(self, factory: str, train: np.ndarray | None) -> Any:
        return reranking.build(self.dim, self._form, train) if self._refines(factory) else None

    def _rebuild(self, committed: int) -> None:
        """A fresh index of the right type from every published vector (training it first if needed).
        Start-up only: a live index trains in the background (_train_and_swap)."""
        factory = self._factory_for(committed)
        train = self._training_sample() if factory != ann.FLAT else None
        index, seconds = ann.build(factory, self.dim, train)
        refine = self._new_refine(factory, train)
        self._fill(index, refine)
        self._faiss, self._refine = index, refine
        self.state = IndexState(
            factory, 0 if train is None else len(train), seconds, load_report=self.state.load_report
        )
        if train is not None:
            _log_trained(factory, len(train), seconds, index.ntotal)

    def _training_sample(self) -> np.ndarray:
        """Up to TRAIN_MAX published vectors, a fixed-seed random sample."""
        ids = self.storage.committed_ids()
        pick = np.sort(np.random.default_rng(0).choice(ids, min(len(ids), TRAIN_MAX), replace=False))
        return np.concatenate(
            [self.storage.vectors(pick[i : i + SQL_CHUNK])[1] for i in range(0, len(pick), SQL_CHUNK)]
        )

    def _fill(self, index, refine=None) -> np.ndarray:
        """Add every published vector to `index` (and `refine`), a chunk per storage read so searches and
        commits interleave; returns the ids added. Tiles committed or removed meanwhile may be
        missed or included: _train_and_swap reconciles by id."""
        added, after = [], 0
        while not self._stop.is_set():
            ids, vecs = self.storage.committed_chunk(after, 8192)
            if not len(ids):
                break
            index.add_with_ids(vecs, ids)
            if refine is not None:
                refine.add_with_ids(vecs, ids)
            added.append(ids)
            after = int(ids[-1])
        return np.concatenate(added) if added else np.empty(0, np.int64)

    def _training(self) -> bool:
        return self._trainer is not None and self._trainer.is_alive()

    def wait_trained(self, timeout: float | None = None) -> bool:
        """Wait for a background training (swap included); True when none is running."""
        trainer = self._trainer
        if trainer is not None:
            trainer.join(timeout)
        return not self._training()

    def _train_and_swap(self, factory: str) -> None:
        """Train and fill the ANN index from storage without the write lock, so searches
        (on the exact index) and commits go on; then, under the write lock, add what was
        committed since, drop what was removed, and swap."""
        try:
            train = self._training_sample()
            index, seconds = ann.build(factory, self.dim, train)
            refine = self._new_refine(factory, train)
            added = self._fill(index, refine)
            if self._stop.is_set():
                return  # closing: the next start-up trains from the journal
            with self._rw.write():
                live = self.storage.committed_ids()
                # Tile ids are never reused, so id sets tell exactly what changed.
                missing = np.setdiff1d(live, added, assume_unique=True)
                for i in range(0, len(missing), SQL_CHUNK):
                    ids, vecs = self.storage.vectors(missing[i : i + SQL_CHUNK])
                    index.add_with_ids(vecs, ids)
                    if refine is not None:
                        refine.add_with_ids(vecs, ids)
                gone = np.setdiff1d(added, live, assume_unique=True)
                if len(gone):
                    for held in (index, refine):
                        if held is not None:
                            held.remove_ids(faiss.IDSelectorBatch(gone))
                self._faiss, self._refine = index, refine
                self.state = IndexState(
                    factory, len(train), seconds, self.state.snapshot_seq, len(gone), self.state.load_report
                )
            _log_trained(factory, len(train), seconds, index.ntotal, caught_up=len(missing), dropped=len(gone))
        except Exception:
            log.exception("index training failed; searches stay exact and the next commit retries")

    # -- snapshots ----------------------------------------------------------
    def _snapshot_loop(self) -> None:
        while not self._stop.wait(self.config.snapshot_interval_s):
            try:
                self.snapshot()
            except Exception:
                log.exception("index snapshot failed; the journal still holds everything")

    def snapshot(self) -> bool:
        """Write a snapshot if the journal moved since the last one. Searches go on; mutations wait."""
        with self._rw.read():
            if self._faiss is None or self._seq == self.state.snapshot_seq:
                return False
            seq = self._seq
            snapshot.write(
                self._dir,
                self._faiss,
                {
                    "seq": seq,
                    "model_id": self.model_id,
                    "dim": self.dim,
                    "factory": self.state.factory,
                    "train_vectors": self.state.train_vectors,
                    "train_seconds": self.state.train_seconds,
                },
                self._refine,
            )
            self.state.snapshot_seq = seq
            self.storage.forget_removed(seq)
        log.info("index snapshot written", extra={"seq": seq})
        return True

    # -- model binding ----------------------------------------------------
    def _check_model(self, model_id: str, dim: int | None = None) -> None:
        self.check_binding((self.model_id, self.dim), model_id, dim)

    @staticmethod
    def check_binding(bound: tuple[str, int], model_id: str, dim: int | None = None) -> None:
        """Refuse a model or dimension other than the (model_id, dim) an index is bound to."""
        if not model_id:
            raise InvalidArgument("model_id is required")
        if bound[0] and model_id != bound[0]:
            raise FailedPrecondition(
                f"this index holds embeddings of model {bound[0]}, not {model_id}: "
                "a new model needs a new index (re-ingest the slides into it)"
            )
        if dim is not None and bound[1] and dim != bound[1]:
            raise InvalidArgument(f"embeddings must have {bound[1]} dimensions, got {dim}")

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
        """Bind an empty index to the model its system of record holds (a replica's first change)."""
        with self._rw.write():
            self._check_model(model_id, dim)
            self._bind(model_id, dim)

    def _bind(self, model_id: str, dim: int) -> None:
        if self.model_id:
            return
        if self.config.factory:
            try:
                ann.validate(self.config.factory, dim)
            except ValueError as exc:
                raise FailedPrecondition(str(exc)) from None
        self.model_id, self.dim = self.storage.bind(model_id, dim)
        self._faiss, _ = ann.build(ann.FLAT, self.dim, None)
        self._check_model(model_id, dim)  # storage may already hold another model's binding
        log.info("index bound to model", extra={"model_id": model_id, "dim": dim})

    # -- writes -------------------------------------------------------------
    def stage(self, batch: TileBatch) -> int:
        check_stage(batch)
        dim = batch.vectors.shape[1]
        with self._rw.write():
            self._check_model(batch.model_id, dim)
            if batch.tiling is not None:
                self._record_tiling(batch.tiling)
            self._bind(batch.model_id, dim)
            # Retried batches are ignored, not duplicated (unique per generation and rect).
            return self.storage.stage(batch.slide_id, batch.generation, batch.tiles, batch.vectors)

    def commit_slide(self, model_id: str, generation: str, slide: Slide, expected_tiles: int) -> tuple[Slide, int]:
        if not slide.slide_id or not generation:
            raise InvalidArgument("slide_id and generation are required")
        with self._rw.write():
            if self.model_id:
                self._check_model(model_id)
            commit = self.storage.commit_slide(generation, slide, expected_tiles)
            self._apply(commit)
        assert commit.slide is not None, "a commit publishes the slide"
        log.info(
            "slide committed",
            extra={"slide_id": slide.slide_id, "tiles": commit.slide.tile_count, "replaced": len(commit.removed)},
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
        if self._faiss is None:
            return
        self._remove(commit.removed)
        if len(commit.ids):
            self._faiss.add_with_ids(commit.vectors, commit.ids)
            if self._refine is not None:
                self._refine.add_with_ids(commit.vectors, commit.ids)
        factory = self._factory_for(self._faiss.ntotal, self.state.factory)
        if factory != self.state.factory and not self._training():
            # Grown past the exact-search threshold: train the ANN index off the write lock.
            self._trainer = threading.Thread(
                target=self._train_and_swap, args=(factory,), name="index-train", daemon=True
            )
            self._trainer.start()

    def _remove(self, ids: list[int]) -> None:
        """Drop ids from FAISS; compact once removals are a large share. Caller holds the write lock."""
        if not len(ids):
            return
        selector = faiss.IDSelectorBatch(np.asarray(ids, np.int64))
        self._faiss.remove_ids(selector)
        if self._refine is not None:
            self._refine.remove_ids(selector)
        self.state.removed_since_compaction += len(ids)
        if self.state.removed_since_compaction > COMPACT_FRACTION * max(self._faiss.ntotal, 1):
            self._compact()

    def _compact(self) -> None:
        # remove_ids shrinks the arrays but keeps their capacity; a copy allocates only what is live.
        self._faiss = faiss.clone_index(self._faiss)
        if self._refine is not None:
            self._refine = faiss.clone_index(self._refine)
        log.info("index compacted", extra={"removed": self.state.removed_since_compaction, "tiles": self._faiss.ntotal})
        self.state.removed_since_compaction = 0

    # -- reads --------------------------------------------------------------
    def search(self, q: Query) -> list[Hit]:
        """Top-k tiles (shard.Query says which); restrictions apply inside FAISS, so k hits come
        back whenever k tiles match."""
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
            self._check_model(q.model_id, query.shape[1])
            if q.tiling is not None:
                tilings.check(self.tiling, q.tiling, "this search")
            tilings.check_mpp(self.tiling, mpp)
            # One resolution indexed: every tile is at it, no restriction needed.
            # (An index written before tiling records has none: its tiles are all searched.)
            mpp_range = None
            if mpp and self.tiling is not None and len(self.tiling.mpps) > 1:
                mpp_range = tilings.mpp_range(self.tiling, mpp)
            exact = ann.is_exact(self._faiss)
            selector, available = None, self._faiss.ntotal
            if slide_ids or filters or mpp_range or tenants:
                if not (slide_ids or filters or exclude_slide_ids or exclude_filters):
                    allowed, selector = self._ids_in(tenants, mpp_range)
                else:
                    allowed = self.storage.select(
                        slide_ids, filters, exclude_slide_ids, exclude_filters, mpp_range, tenants
                    )
                    selector = None
                if not len(allowed):
                    return []
                if not exact and len(allowed) <= EXACT_FILTER_MAX:
                    return self._hits(self._scores(allowed, query), k, query, rescore=False)
                if selector is None:
                    selector = faiss.IDSelectorBatch(allowed)
                available = len(allowed)
            elif exclude_slide_ids or exclude_filters:
                excluded = self.storage.excluded(exclude_slide_ids, exclude_filters)
                if len(excluded):
                    selector, available = (
                        faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded)),
                        available - len(excluded),
                    )
            rescore = not exact and self.config.rerank > 1
            want = min(max(k, min(k * self.config.rerank, RERANK_MAX)) if rescore else k, available)
            nprobe = nprobe or self.config.nprobe
            with span("index.search", candidates=want, exact=exact):
                while True:
                    scores, ids = ann.search(self._faiss, query, max(want, 1), nprobe, selector)
                    found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
                    # A selective filter can leave the probed lists short of hits: probe more, up to all lists.
                    if len(found) >= want or exact or nprobe >= ann.nlist(self._faiss):
                        break
                    nprobe *= 2
            return self._hits(found, k, query, rescore)

    def _ids_in(self, tenants: tuple[str, ...], mpp_range: tuple[float, float] | None) -> tuple[np.ndarray, Any]:
        """Ids of every published tile of the tenants (all: none named) in the resolution range (any:
        None) and their FAISS selector (None for a scope searched exactly), kept until the next commit.
        Every search is scoped to a tenant: building the selector per search cost 10-20 ms at 100k
        tiles (docs/benchmarks.md, the query rows of issue 27). Caller holds the read
        lock (the sequence cannot move meanwhile)."""
        key = (tuple(sorted(set(tenants))), mpp_range)
        if self._scoped_seq != self._seq or len(self._scoped) > 64:  # a commit, or many tenant sets
            self._scoped, self._scoped_seq = {}, self._seq
        scope = self._scoped.get(key)
        if scope is None:
            ids = self.storage.select((), {}, (), {}, mpp_range, tenants)
            scope = self._scoped[key] = (ids, faiss.IDSelectorBatch(ids) if len(ids) > EXACT_FILTER_MAX else None)
        return scope

    def _scores(self, ids: np.ndarray, query: np.ndarray) -> list[tuple[int, float]]:
        """(id, score) of these tiles: from the re-rank vectors in RAM, else (re-rank from
        storage) from storage's rows. Caller holds the read lock."""
        if self._refine is not None:
            try:
                return list(zip(ids.tolist(), reranking.scores(self._refine, ids, query).tolist()))
            except RuntimeError:  # a filter's tile that another writer of a shared store committed, not yet here
                pass
        parts = [self.storage.vectors(ids[i : i + SQL_CHUNK]) for i in range(0, len(ids), SQL_CHUNK)]
        held, vectors = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return list(zip(held.tolist(), (vectors @ query[0]).tolist()))

    def _hits(self, found: list[tuple[int, float]], k: int, query: np.ndarray, rescore: bool) -> list[Hit]:
        """Hits with their records, re-scored from the re-rank vectors when asked; records
        (and their metadata) are read from storage for the k winners alone."""
        if not found:
            return []
        if rescore:
            with span("rerank", candidates=len(found)):
                ids = np.fromiter((f[0] for f in found), np.int64, len(found))
                found = self._scores(ids, query)
        found.sort(key=lambda f: -f[1])
        found = found[:k]
        with span("index.records"):
            records = self.storage.records([i for i, _ in found])
        return [Hit(r[0], r[1], score, r[2]) for i, score in found if (r := records.get(i))]

    def get_slide(self, slide_id: str) -> Slide:
        return self.storage.get_slide(slide_id)

    def list_slides(self, page_size: int, page_token: str, tenants=()) -> tuple[list[Slide], str]:
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        page_size = min(page_size or 100, 1000)
        try:
            after = base64.b64decode(page_token, altchars=b"-_", validate=True).decode() if page_token else ""
        except Exception:
            raise InvalidArgument("page_token is not one this service issued") from None
        rows = self.storage.list_slides(after, page_size + 1, tenants)
        slides = rows[:page_size]
        token = base64.urlsafe_b64encode(slides[-1].slide_id.encode()).decode() if len(rows) > page_size else ""
        return slides, token

    def counts(self, tenants=()) -> tuple[int, int]:
        if tenants:
            return self.storage.tenant_counts(tenants)
        slides = self.storage.slide_count()
        with self._rw.read():
            tiles = self._faiss.ntotal if self._faiss is not None else 0
        return tiles, slides

    def info(self) -> IndexInfo:
        with self._rw.read():
            nlist = ann.nlist(self._faiss) if self._faiss is not None else 0
            return IndexInfo(self._seq, nlist, self.config.nprobe, **dataclasses.asdict(self.state))

    def close(self) -> None:
        self._stop.set()
        if self._snapshotter is not None:
            self._snapshotter.join()
        self.wait_trained()
        self.snapshot()
        with self._rw.write():
            self.storage.close()
