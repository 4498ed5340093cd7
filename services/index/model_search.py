"""One model's FAISS index over a shard's storage: load, replay, train, compact, search.

A shard holds one ModelSearch per model it has vectors of (faiss_index.TileIndex
keeps them): the serving model's, and a migration's target filling beside it.
Each reads only its model's tiles from storage. A FAISS snapshot records the
commit sequence it holds, so start-up loads the snapshot and replays only
what storage logged after it; a snapshot that does not check out is reported
and the index rebuilt from storage, never served partial.

The caller (TileIndex) holds its read/write lock around every call here but
the background training, which takes the write lock itself to swap.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from smily.common import tenancy
from smily.common.rwlock import RWLock
from smily.common.tracing import span

from . import ann, snapshot
from . import rerank as reranking
from .shard import Hit
from .storage import SQL_CHUNK, Storage

log = logging.getLogger("smily.index")

TRAIN_MAX = 100_000
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


class ModelSearch:
    """The search over one model's published tiles; snapshots go to `directory`."""

    def __init__(
        self,
        storage: Storage,
        config: IndexConfig,
        model_id: str,
        dim: int,
        directory: str,
        rw: RWLock,
        stop: threading.Event,
    ):
        self.storage, self.config, self.model_id, self.dim = storage, config, model_id, dim
        self.directory, self._rw, self._stop = directory, rw, stop
        self.faiss: Any = None  # a faiss.Index once loaded
        # The re-rank vectors refining an IVF index (rerank.py); None for an exact index.
        self.refine: Any = None
        self._positions = reranking.Positions()  # where each tile's codes sit in `refine`
        self._trainer: threading.Thread | None = None
        self.state = IndexState()

    # -- start-up ---------------------------------------------------------
    def load(self, seq: int) -> None:
        """From the snapshot plus the journal after it, or from storage alone; `seq` is the journal's."""
        committed = self.storage.committed_count(self.model_id)
        try:
            self._load_snapshot(committed, seq)
        except snapshot.SnapshotError as exc:
            # Reported loudly, then rebuilt from storage: never served partial.
            log.error("index snapshot unusable, rebuilding from the journal", extra={"reason": str(exc)})
            self.faiss = None
            self.state.load_report = f"rebuilt from the journal: snapshot unusable: {exc}"
        if self.faiss is None:
            self._rebuild(committed)
            self.state.load_report = self.state.load_report or "built from the journal"
        log.info(
            "index loaded",
            extra={
                "tiles": self.faiss.ntotal,
                "model_id": self.model_id,
                "factory": self.state.factory,
                "report": self.state.load_report,
            },
        )

    def empty(self) -> None:
        """A new model's index: exact, nothing in it yet."""
        self.faiss, _ = ann.build(ann.FLAT, self.dim, None)

    def _load_snapshot(self, committed: int, seq: int) -> None:
        found = snapshot.read(self.directory)
        if found is None:
            return
        index, man, refine = found
        if (man.get("model_id"), man.get("dim")) != (self.model_id, self.dim):
            raise snapshot.SnapshotError("the snapshot belongs to another model")
        if man["seq"] > seq:
            raise snapshot.SnapshotError(f"the snapshot is at journal sequence {man['seq']}, the journal only at {seq}")
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
        for ids, vecs in self.storage.added_after(man["seq"], self.model_id):
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
        self.faiss, self.refine = index, refine
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
        self.faiss, self.refine = index, refine
        self.state = IndexState(
            factory, 0 if train is None else len(train), seconds, load_report=self.state.load_report
        )
        if train is not None:
            _log_trained(factory, len(train), seconds, index.ntotal)

    def _training_sample(self) -> np.ndarray:
        """Up to TRAIN_MAX published vectors, a fixed-seed random sample."""
        ids = self.storage.committed_ids(self.model_id)
        pick = np.sort(np.random.default_rng(0).choice(ids, min(len(ids), TRAIN_MAX), replace=False))
        return np.concatenate(
            [self.storage.vectors(pick[i : i + SQL_CHUNK], self.model_id)[1] for i in range(0, len(pick), SQL_CHUNK)]
        )

    def _fill(self, index, refine=None) -> np.ndarray:
        """Add every published vector to `index` (and `refine`), a chunk per storage read so searches and
        commits interleave; returns the ids added. Tiles committed or removed meanwhile may be
        missed or included: _train_and_swap reconciles by id."""
        added, after = [], 0
        while not self._stop.is_set():
            ids, vecs = self.storage.committed_chunk(after, 8192, self.model_id)
            if not len(ids):
                break
            index.add_with_ids(vecs, ids)
            if refine is not None:
                refine.add_with_ids(vecs, ids)
            added.append(ids)
            after = int(ids[-1])
        return np.concatenate(added) if added else np.empty(0, np.int64)

    def training(self) -> bool:
        return self._trainer is not None and self._trainer.is_alive()

    def wait_trained(self, timeout: float | None = None) -> bool:
        """Wait for a background training (swap included); True when none is running."""
        trainer = self._trainer
        if trainer is not None:
            trainer.join(timeout)
        return not self.training()

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
                live = self.storage.committed_ids(self.model_id)
                # Tile ids are never reused, so id sets tell exactly what changed.
                missing = np.setdiff1d(live, added, assume_unique=True)
                for i in range(0, len(missing), SQL_CHUNK):
                    ids, vecs = self.storage.vectors(missing[i : i + SQL_CHUNK], self.model_id)
                    index.add_with_ids(vecs, ids)
                    if refine is not None:
                        refine.add_with_ids(vecs, ids)
                gone = np.setdiff1d(added, live, assume_unique=True)
                if len(gone):
                    for held in (index, refine):
                        if held is not None:
                            held.remove_ids(faiss.IDSelectorBatch(gone))
                self.faiss, self.refine = index, refine
                self.state = IndexState(
                    factory, len(train), seconds, self.state.snapshot_seq, len(gone), self.state.load_report
                )
            _log_trained(factory, len(train), seconds, index.ntotal, caught_up=len(missing), dropped=len(gone))
        except Exception:
            log.exception("index training failed; searches stay exact and the next commit retries")

    # -- snapshots ----------------------------------------------------------
    def snapshot(self, seq: int) -> None:
        """Write a snapshot at journal sequence `seq`. Caller holds the read lock."""
        snapshot.write(
            self.directory,
            self.faiss,
            {
                "seq": seq,
                "model_id": self.model_id,
                "dim": self.dim,
                "factory": self.state.factory,
                "train_vectors": self.state.train_vectors,
                "train_seconds": self.state.train_seconds,
            },
            self.refine,
        )
        self.state.snapshot_seq = seq

    # -- writes (caller holds the write lock) -----------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.faiss.add_with_ids(vectors, ids)
            if self.refine is not None:
                self.refine.add_with_ids(vectors, ids)
        factory = self._factory_for(self.faiss.ntotal, self.state.factory)
        if factory != self.state.factory and not self.training():
            # Grown past the exact-search threshold: train the ANN index off the write lock.
            self._trainer = threading.Thread(
                target=self._train_and_swap, args=(factory,), name="index-train", daemon=True
            )
            self._trainer.start()

    def remove(self, ids: list[int]) -> None:
        """Drop ids (of any model: others' are not here) from FAISS; compact once removals are a large share."""
        if not len(ids):
            return
        selector = faiss.IDSelectorBatch(np.asarray(ids, np.int64))
        removed = self.faiss.remove_ids(selector)
        if self.refine is not None:
            self.refine.remove_ids(selector)
        self.state.removed_since_compaction += removed
        if self.state.removed_since_compaction > COMPACT_FRACTION * max(self.faiss.ntotal, 1):
            self._compact()

    def _compact(self) -> None:
        # remove_ids shrinks the arrays but keeps their capacity; a copy allocates only what is live.
        self.faiss = faiss.clone_index(self.faiss)
        if self.refine is not None:
            self.refine = faiss.clone_index(self.refine)
        log.info("index compacted", extra={"removed": self.state.removed_since_compaction, "tiles": self.faiss.ntotal})
        self.state.removed_since_compaction = 0

    # -- reads (caller holds the read lock) ----------------------------------------
    def search(self, query: np.ndarray, k: int, nprobe: int, selector, available: int) -> list[Hit]:
        """Top-k hits among `available` tiles (those `selector` lets through; None: all)."""
        exact = ann.is_exact(self.faiss)
        rescore = not exact and self.config.rerank > 1
        want = min(max(k, min(k * self.config.rerank, RERANK_MAX)) if rescore else k, available)
        nprobe = nprobe or self.config.nprobe
        with span("index.search", candidates=want, exact=exact):
            while True:
                scores, ids = ann.search(self.faiss, query, max(want, 1), nprobe, selector)
                found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
                # A selective filter can leave the probed lists short of hits: probe more, up to all lists.
                if len(found) >= want or exact or nprobe >= ann.nlist(self.faiss):
                    break
                nprobe *= 2
        return self.hits(found, k, query, rescore)

    def scores(self, ids: np.ndarray, query: np.ndarray) -> list[tuple[int, float]]:
        """(id, score) of these tiles: from the re-rank vectors in RAM, else (re-rank from
        storage) from storage's rows."""
        if self.refine is not None:
            try:
                return list(zip(ids.tolist(), reranking.scores(self.refine, ids, query, self._positions).tolist()))
            except RuntimeError:  # a filter's tile that another writer of a shared store committed, not yet here
                pass
        parts = [self.storage.vectors(ids[i : i + SQL_CHUNK], self.model_id) for i in range(0, len(ids), SQL_CHUNK)]
        held, vectors = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return list(zip(held.tolist(), (vectors @ query[0]).tolist()))

    def hits(self, found: list[tuple[int, float]], k: int, query: np.ndarray, rescore: bool) -> list[Hit]:
        """Hits with their records, re-scored from the re-rank vectors when asked; records
        (and their metadata) are read from storage for the k winners alone."""
        if not found:
            return []
        if rescore:
            with span("rerank", candidates=len(found)):
                ids = np.fromiter((f[0] for f in found), np.int64, len(found))
                found = self.scores(ids, query)
        found.sort(key=lambda f: -f[1])
        found = found[:k]
        with span("index.records"):
            records = self.storage.records([i for i, _ in found])
        return [Hit(r[0], r[1], score, r[2]) for i, score in found if (r := records.get(i))]

    def is_exact(self) -> bool:
        return ann.is_exact(self.faiss)

    def count(self) -> int:
        return self.faiss.ntotal if self.faiss is not None else 0
