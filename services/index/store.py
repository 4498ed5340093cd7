"""Tile embeddings and records: SQLite is the durable journal, FAISS the search.

Every vector is written to SQLite (WAL, synchronous=FULL: fsynced, with
checksummed frames) before a call is acknowledged. Each commit or delete
takes the next journal sequence number: published tiles carry it in
`committed`, removed tile ids are logged in `removed`. A FAISS snapshot
records the sequence it holds, so start-up loads the snapshot and replays
only the journal after it; a snapshot that does not check out is reported
and the index rebuilt from the journal, never served partial.
Tiles are staged per ingest generation and published by commit_slide,
which swaps a slide's old tiles for the new ones in one transaction and
one exclusive FAISS update: searches never see a half-added slide.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from smily.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from smily.common.rwlock import RWLock

from . import ann, snapshot

log = logging.getLogger("smily.index")

STALE_STAGED_S = 24 * 3600
MAX_K = 1000
TRAIN_MAX = 100_000
# Filtered searches over at most this many tiles are scored exactly from SQLite.
EXACT_FILTER_MAX = 4096
# Deleted entries past this share of the index trigger a compacting copy.
COMPACT_FRACTION = 0.25
SQL_CHUNK = 500
# Most candidates one search re-scores exactly, whatever k * rerank asks.
RERANK_MAX = 4096

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slides (
  slide_id TEXT PRIMARY KEY, source TEXT NOT NULL, metadata TEXT NOT NULL,
  generation TEXT NOT NULL, tile_count INTEGER NOT NULL, indexed_at REAL NOT NULL,
  slide_mpp REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS tiles (
  id INTEGER PRIMARY KEY AUTOINCREMENT, slide_id TEXT NOT NULL, generation TEXT NOT NULL,
  x INTEGER NOT NULL, y INTEGER NOT NULL, w INTEGER NOT NULL, h INTEGER NOT NULL,
  -- 0 while staged, then the journal sequence number of the commit that published it.
  mpp REAL NOT NULL, tissue REAL NOT NULL, committed INTEGER NOT NULL DEFAULT 0,
  staged_at REAL NOT NULL, vector BLOB NOT NULL,
  UNIQUE (slide_id, generation, x, y, w, h, mpp));
CREATE INDEX IF NOT EXISTS tiles_by_slide ON tiles (slide_id, generation);
CREATE INDEX IF NOT EXISTS tiles_by_commit ON tiles (committed);
-- Tiles dropped from the search by a commit or delete; pruned once a snapshot holds that state.
CREATE TABLE IF NOT EXISTS removed (seq INTEGER NOT NULL, tile_id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS removed_by_seq ON removed (seq);
"""


@dataclass
class Tile:
    x: int
    y: int
    w: int
    h: int
    mpp: float
    tissue: float = 0.0


@dataclass
class Slide:
    slide_id: str
    source: str
    metadata: dict = field(default_factory=dict)
    tile_count: int = 0
    indexed_at: float = 0.0
    slide_mpp: float = 0.0  # stated at ingest; 0: the file's own


@dataclass
class Hit:
    slide_id: str
    tile: Tile
    score: float
    metadata: dict


@dataclass
class IndexConfig:
    # FAISS factory string used from `ivf_threshold` vectors on; "" = automatic, "Flat" = always exact.
    factory: str = ""
    ivf_threshold: int = 200_000
    nprobe: int = 32
    # ANN candidates per hit re-scored with the exact vectors from SQLite; <= 1 turns it off.
    # 100 (1,000 candidates for k=10) kept recall@10 >= 0.99 on 1M vectors in bench/index.py.
    rerank: int = 100
    snapshot_interval_s: float = 300.0


@dataclass
class IndexState:
    factory: str = ann.FLAT
    train_vectors: int = 0
    train_seconds: float = 0.0
    snapshot_seq: int = 0
    removed_since_compaction: int = 0
    load_report: str = ""


def _vectors(blobs, dim: int) -> np.ndarray:
    data = b"".join(blobs)
    if len(data) != len(blobs) * dim * 4:
        raise RuntimeError("the journal holds a vector of the wrong size: the database is corrupt")
    return np.frombuffer(data, np.float32).reshape(len(blobs), dim)


class TileStore:
    def __init__(self, directory: str, config: IndexConfig | None = None):
        os.makedirs(directory, exist_ok=True)
        self._dir = directory
        self.config = config or IndexConfig()
        self._db = sqlite3.connect(os.path.join(directory, "index.sqlite3"), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        if "slide_mpp" not in {r[1] for r in self._db.execute("PRAGMA table_info(slides)")}:
            # Indexes written before slides could state their resolution.
            self._db.execute("ALTER TABLE slides ADD COLUMN slide_mpp REAL NOT NULL DEFAULT 0")
        self._db_lock = threading.Lock()
        self._rw = RWLock()
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        self.model_id: str = meta.get("model_id", "")
        self.dim: int = int(meta.get("dim", 0))
        self._seq = max(int(meta.get("seq", 0)), self._db.execute("SELECT COALESCE(MAX(committed), 0) FROM tiles").fetchone()[0])
        self._faiss: Any = None  # a faiss.Index once loaded
        self._trainer: threading.Thread | None = None
        self._stop = threading.Event()
        self.state = IndexState()
        if self.config.factory and self.dim:
            ann.validate(self.config.factory, self.dim)
        self._load()
        self._snapshotter = None
        if self.config.snapshot_interval_s > 0:
            self._snapshotter = threading.Thread(target=self._snapshot_loop, name="index-snapshot", daemon=True)
            self._snapshotter.start()

    # -- start-up ---------------------------------------------------------
    def _load(self) -> None:
        with self._db_lock:
            dropped = self._db.execute(
                "DELETE FROM tiles WHERE committed = 0 AND staged_at < ?", (time.time() - STALE_STAGED_S,)
            ).rowcount
        if not self.dim:
            return
        committed = self._db.execute("SELECT COUNT(*) FROM tiles WHERE committed > 0").fetchone()[0]
        try:
            self._load_snapshot(committed)
        except snapshot.SnapshotError as exc:
            # Reported loudly, then rebuilt from the journal: never served partial.
            log.error("index snapshot unusable, rebuilding from the journal", extra={"reason": str(exc)})
            self._faiss = None
            self.state.load_report = f"rebuilt from the journal: snapshot unusable: {exc}"
        if self._faiss is None:
            self._rebuild(committed)
            self.state.load_report = self.state.load_report or "built from the journal"
        log.info("index loaded", extra={"tiles": self._faiss.ntotal, "model_id": self.model_id, "factory": self.state.factory,
                                        "report": self.state.load_report, "stale_staged_dropped": dropped})

    def _load_snapshot(self, committed: int) -> None:
        found = snapshot.read(self._dir)
        if found is None:
            return
        index, man = found
        if (man.get("model_id"), man.get("dim")) != (self.model_id, self.dim):
            raise snapshot.SnapshotError("the snapshot belongs to another model")
        if man["seq"] > self._seq:
            raise snapshot.SnapshotError(f"the snapshot is at journal sequence {man['seq']}, the journal only at {self._seq}")
        if man["factory"] != self._factory_for(committed, man["factory"]):
            log.info("index type changed by configuration or size; rebuilding", extra={"was": man["factory"]})
            return
        with self._db_lock:
            gone = np.fromiter((r[0] for r in self._db.execute(
                "SELECT tile_id FROM removed WHERE seq > ?", (man["seq"],))), np.int64)
            if len(gone):
                index.remove_ids(faiss.IDSelectorBatch(gone))
            replayed = self._add_rows(index, self._db.execute(
                "SELECT id, vector FROM tiles WHERE committed > ? ORDER BY id", (man["seq"],)))
        if index.ntotal != committed:
            raise snapshot.SnapshotError(
                f"snapshot plus journal replay holds {index.ntotal} vectors, the journal {committed}")
        self._faiss = index
        self.state = IndexState(man["factory"], man.get("train_vectors", 0), man.get("train_seconds", 0.0), man["seq"],
                                load_report=f"snapshot at sequence {man['seq']} plus {replayed} added and "
                                            f"{len(gone)} removed from the journal")

    def _add_rows(self, index, cursor) -> int:
        added = 0
        while rows := cursor.fetchmany(8192):
            index.add_with_ids(_vectors([r[1] for r in rows], self.dim), np.fromiter((r[0] for r in rows), np.int64, len(rows)))
            added += len(rows)
        return added

    def _factory_for(self, n: int, current: str = ann.FLAT) -> str:
        """The index type for n vectors; an IVF index once trained is kept as it is."""
        if self.config.factory == ann.FLAT:
            return ann.FLAT
        if current != ann.FLAT and (not self.config.factory or current == self.config.factory):
            return current
        if n < self.config.ivf_threshold:
            return ann.FLAT
        return self.config.factory or ann.auto_factory(n, self.dim, self.config.ivf_threshold)

    def _rebuild(self, committed: int) -> None:
        """A fresh index of the right type from every published vector (training it first if needed).
        Start-up only: a live store trains in the background (_train_and_swap)."""
        factory = self._factory_for(committed)
        train = self._training_sample() if factory != ann.FLAT else None
        index, seconds = ann.build(factory, self.dim, train)
        self._fill(index)
        self._faiss = index
        self.state = IndexState(factory, 0 if train is None else len(train), seconds, load_report=self.state.load_report)
        if train is not None:
            log.info("index trained", extra={"factory": factory, "train_vectors": len(train),
                                             "train_seconds": round(seconds, 3), "tiles": index.ntotal})

    def _training_sample(self) -> np.ndarray:
        """Up to TRAIN_MAX published vectors, a fixed-seed random sample."""
        with self._db_lock:
            ids = np.fromiter((r[0] for r in self._db.execute("SELECT id FROM tiles WHERE committed > 0")), np.int64)
            pick = np.sort(np.random.default_rng(0).choice(ids, min(len(ids), TRAIN_MAX), replace=False))
            return np.concatenate([self._fetch_vectors(pick[i:i + SQL_CHUNK])[1] for i in range(0, len(pick), SQL_CHUNK)])

    def _fill(self, index) -> np.ndarray:
        """Add every published vector to `index`, a chunk per _db_lock hold so searches and
        commits interleave; returns the ids added. Tiles committed or removed meanwhile may be
        missed or included: _train_and_swap reconciles by id."""
        added, after = [], 0
        while not self._stop.is_set():
            with self._db_lock:
                rows = self._db.execute("SELECT id, vector FROM tiles WHERE committed > 0 AND id > ? ORDER BY id LIMIT 8192",
                                        (after,)).fetchall()
            if not rows:
                break
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            index.add_with_ids(_vectors([r[1] for r in rows], self.dim), ids)
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
        """Train and fill the ANN index from the journal without the write lock, so searches
        (on the exact index) and commits go on; then, under the write lock, add what was
        committed since, drop what was removed, and swap."""
        try:
            train = self._training_sample()
            index, seconds = ann.build(factory, self.dim, train)
            added = self._fill(index)
            if self._stop.is_set():
                return  # closing: the next start-up trains from the journal
            with self._rw.write():
                with self._db_lock:
                    live = np.fromiter((r[0] for r in self._db.execute("SELECT id FROM tiles WHERE committed > 0")),
                                       np.int64)
                    # Tile ids are never reused (AUTOINCREMENT), so id sets tell exactly what changed.
                    missing = np.setdiff1d(live, added, assume_unique=True)
                    for i in range(0, len(missing), SQL_CHUNK):
                        ids, vecs = self._fetch_vectors(missing[i:i + SQL_CHUNK])
                        index.add_with_ids(vecs, ids)
                gone = np.setdiff1d(added, live, assume_unique=True)
                if len(gone):
                    index.remove_ids(faiss.IDSelectorBatch(gone))
                self._faiss = index
                self.state = IndexState(factory, len(train), seconds, self.state.snapshot_seq, len(gone),
                                        self.state.load_report)
            log.info("index trained", extra={"factory": factory, "train_vectors": len(train),
                                             "train_seconds": round(seconds, 3), "tiles": index.ntotal,
                                             "caught_up": len(missing), "dropped": len(gone)})
        except Exception:
            log.exception("index training failed; searches stay exact and the next commit retries")

    def _fetch_vectors(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of these tiles, in id order; caller holds _db_lock."""
        ids = [int(i) for i in ids]
        rows = self._db.execute(
            f"SELECT id, vector FROM tiles WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids).fetchall()
        return np.fromiter((r[0] for r in rows), np.int64, len(rows)), _vectors([r[1] for r in rows], self.dim)

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
            snapshot.write(self._dir, self._faiss, {
                "seq": seq, "model_id": self.model_id, "dim": self.dim, "factory": self.state.factory,
                "train_vectors": self.state.train_vectors, "train_seconds": self.state.train_seconds})
            self.state.snapshot_seq = seq
            with self._db_lock:
                self._db.execute("DELETE FROM removed WHERE seq <= ?", (seq,))
        log.info("index snapshot written", extra={"seq": seq})
        return True

    # -- model binding ----------------------------------------------------
    def _check_model(self, model_id: str, dim: int | None = None) -> None:
        if not model_id:
            raise InvalidArgument("model_id is required")
        if self.model_id and model_id != self.model_id:
            raise FailedPrecondition(
                f"this index holds embeddings of model {self.model_id}, not {model_id}: "
                "a new model needs a new index (re-ingest the slides into it)"
            )
        if dim is not None and self.dim and dim != self.dim:
            raise InvalidArgument(f"embeddings must have {self.dim} dimensions, got {dim}")

    def _bind(self, model_id: str, dim: int) -> None:
        if self.model_id:
            return
        if self.config.factory:
            try:
                ann.validate(self.config.factory, dim)
            except ValueError as exc:
                raise FailedPrecondition(str(exc)) from None
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [("model_id", model_id), ("dim", str(dim))])
            self._db.execute("COMMIT")
        self.model_id, self.dim = model_id, dim
        self._faiss, _ = ann.build(ann.FLAT, dim, None)
        log.info("index bound to model", extra={"model_id": model_id, "dim": dim})

    # -- writes -------------------------------------------------------------
    def stage(self, model_id: str, slide_id: str, generation: str, vectors: np.ndarray, tiles: list[Tile]) -> int:
        if not slide_id or not generation:
            raise InvalidArgument("slide_id and generation are required")
        if vectors.ndim != 2 or len(vectors) != len(tiles):
            raise InvalidArgument(f"{len(tiles)} tiles need a [{len(tiles)}, dim] tensor, got {list(vectors.shape)}")
        if not np.isfinite(vectors).all():
            raise InvalidArgument("embeddings contain NaN or infinity")
        with self._rw.write():
            self._check_model(model_id, vectors.shape[1])
            self._bind(model_id, vectors.shape[1])
            now = time.time()
            rows = [
                (slide_id, generation, t.x, t.y, t.w, t.h, t.mpp, t.tissue, now, np.ascontiguousarray(v, np.float32).tobytes())
                for t, v in zip(tiles, vectors)
            ]
            with self._db_lock:
                self._db.execute("BEGIN IMMEDIATE")
                # Retried batches are ignored, not duplicated (unique per generation and rect).
                self._db.executemany(
                    "INSERT OR IGNORE INTO tiles (slide_id, generation, x, y, w, h, mpp, tissue, staged_at, vector) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
        return len(rows)

    def _journal_removal(self, seq: int, ids: list[int]) -> None:
        self._db.executemany("INSERT INTO removed VALUES (?, ?)", [(seq, i) for i in ids])
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (str(seq),))

    def commit_slide(self, model_id: str, generation: str, slide: Slide, expected_tiles: int) -> tuple[Slide, int]:
        if not slide.slide_id or not generation:
            raise InvalidArgument("slide_id and generation are required")
        with self._rw.write():
            if self.model_id:
                self._check_model(model_id)
            seq = self._seq + 1
            with self._db_lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    new = self._db.execute(
                        "SELECT id, vector FROM tiles WHERE slide_id = ? AND generation = ? AND committed = 0",
                        (slide.slide_id, generation)).fetchall()
                    if len(new) != expected_tiles:
                        raise Aborted(
                            f"{len(new)} tiles staged for this ingest, {expected_tiles} expected: ingest the slide again")
                    old = [r[0] for r in self._db.execute(
                        "SELECT id FROM tiles WHERE slide_id = ? AND generation != ? AND committed > 0",
                        (slide.slide_id, generation))]
                    self._db.execute("DELETE FROM tiles WHERE slide_id = ? AND generation != ?", (slide.slide_id, generation))
                    self._db.execute("UPDATE tiles SET committed = ? WHERE slide_id = ? AND generation = ?",
                                     (seq, slide.slide_id, generation))
                    self._journal_removal(seq, old)
                    slide.tile_count, slide.indexed_at = len(new), time.time()
                    self._db.execute(
                        "INSERT OR REPLACE INTO slides (slide_id, source, metadata, generation, tile_count, "
                        "indexed_at, slide_mpp) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (slide.slide_id, slide.source, json.dumps(slide.metadata, sort_keys=True), generation,
                         slide.tile_count, slide.indexed_at, slide.slide_mpp))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            self._seq = seq
            if self._faiss is not None:
                self._remove(old)
                if new:
                    ids = np.fromiter((r[0] for r in new), np.int64, len(new))
                    self._faiss.add_with_ids(_vectors([r[1] for r in new], self.dim), ids)
                factory = self._factory_for(self._faiss.ntotal, self.state.factory)
                if factory != self.state.factory and not self._training():
                    # Grown past the exact-search threshold: train the ANN index off the write lock.
                    self._trainer = threading.Thread(target=self._train_and_swap, args=(factory,), name="index-train",
                                                     daemon=True)
                    self._trainer.start()
        log.info("slide committed", extra={"slide_id": slide.slide_id, "tiles": len(new), "replaced": len(old)})
        return slide, len(old)

    def delete_slide(self, slide_id: str) -> int:
        with self._rw.write():
            seq = self._seq + 1
            with self._db_lock:
                self._db.execute("BEGIN IMMEDIATE")
                if not self._db.execute("SELECT 1 FROM slides WHERE slide_id = ?", (slide_id,)).fetchone():
                    self._db.execute("ROLLBACK")
                    raise NotFound(f"slide {slide_id!r} is not in the index")
                ids = [r[0] for r in self._db.execute(
                    "SELECT id FROM tiles WHERE slide_id = ? AND committed > 0", (slide_id,))]
                self._db.execute("DELETE FROM tiles WHERE slide_id = ?", (slide_id,))
                self._db.execute("DELETE FROM slides WHERE slide_id = ?", (slide_id,))
                self._journal_removal(seq, ids)
                self._db.execute("COMMIT")
            self._seq = seq
            if self._faiss is not None:
                self._remove(ids)
        log.info("slide deleted", extra={"slide_id": slide_id, "tiles": len(ids)})
        return len(ids)

    def _remove(self, ids: list[int]) -> None:
        """Drop ids from FAISS; compact once removals are a large share. Caller holds the write lock."""
        if not ids:
            return
        self._faiss.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, np.int64)))
        self.state.removed_since_compaction += len(ids)
        if self.state.removed_since_compaction > COMPACT_FRACTION * max(self._faiss.ntotal, 1):
            self._compact()

    def _compact(self) -> None:
        # remove_ids shrinks the arrays but keeps their capacity; a copy allocates only what is live.
        self._faiss = faiss.clone_index(self._faiss)
        log.info("index compacted", extra={"removed": self.state.removed_since_compaction, "tiles": self._faiss.ntotal})
        self.state.removed_since_compaction = 0

    def compact(self) -> None:
        with self._rw.write():
            if self._faiss is not None:
                self._compact()

    # -- reads --------------------------------------------------------------
    @staticmethod
    def _slide_conditions(slide_ids, pairs: dict) -> tuple[list[str], list]:
        """One SQL condition per slide id list and per metadata key=value, with their args."""
        conds, args = [], []
        if slide_ids:
            conds.append(f"s.slide_id IN ({','.join('?' * len(slide_ids))})")
            args += list(slide_ids)
        for key, value in sorted(pairs.items()):
            conds.append("EXISTS (SELECT 1 FROM json_each(s.metadata) j WHERE j.key = ? AND j.value = ?)")
            args += [key, value]
        return conds, args

    def _excluded(self, exclude, exclude_filters: dict) -> tuple[str, list]:
        """SQL condition (and its args) true for slides left out by id or by any metadata key=value."""
        conds, args = self._slide_conditions(exclude, exclude_filters)
        return " OR ".join(conds), args

    def _tile_ids(self, conds: list[str], args: list) -> np.ndarray:
        """Ids of published tiles whose slide meets every condition; caller holds _db_lock."""
        return np.fromiter((r[0] for r in self._db.execute(
            f"SELECT t.id FROM tiles t JOIN slides s ON s.slide_id = t.slide_id "
            f"WHERE {' AND '.join(['t.committed > 0', *conds])}", args)), np.int64)

    def _selected_tiles(self, slide_ids, filters: dict, exclude, exclude_filters: dict) -> np.ndarray:
        """Ids of published tiles of the slides matching every filter and no exclusion; caller holds _db_lock."""
        conds, args = self._slide_conditions(slide_ids, filters)
        excluded, excluded_args = self._excluded(exclude, exclude_filters)
        if excluded:
            conds.append(f"NOT ({excluded})")
            args += excluded_args
        return self._tile_ids(conds, args)

    def search(self, model_id: str, query: np.ndarray, k: int, exclude_slide_ids=(), slide_ids=(),
               filters: dict | None = None, nprobe: int = 0, exclude_filters: dict | None = None) -> list[Hit]:
        """Top-k tiles; slide_ids / filters (metadata key=value, all must hold) / exclude_slide_ids /
        exclude_filters (metadata key=value, any drops the slide) restrict the search inside FAISS,
        so k hits come back whenever k tiles match."""
        if not 0 < k <= MAX_K:
            raise InvalidArgument(f"k must be in 1..{MAX_K}, got {k}")
        if nprobe < 0:
            raise InvalidArgument("nprobe must not be negative")
        query = query.reshape(1, -1) if query.ndim == 1 else query
        if query.shape[0] != 1:
            raise InvalidArgument(f"one query vector expected, got shape {list(query.shape)}")
        query = np.ascontiguousarray(query, np.float32)
        filters, exclude_filters = filters or {}, exclude_filters or {}
        with self._rw.read():
            if not self.model_id:
                return []  # nothing indexed yet
            self._check_model(model_id, query.shape[1])
            exact = ann.is_exact(self._faiss)
            selector, available = None, self._faiss.ntotal
            if slide_ids or filters:
                with self._db_lock:
                    allowed = self._selected_tiles(slide_ids, filters, exclude_slide_ids, exclude_filters)
                if not len(allowed):
                    return []
                if not exact and len(allowed) <= EXACT_FILTER_MAX:
                    with self._db_lock:
                        ids, vecs = self._fetch_vectors(allowed)
                    return self._hits(list(zip(ids.tolist(), (vecs @ query[0]).tolist())), k, query, rescore=False)
                selector, available = faiss.IDSelectorBatch(allowed), len(allowed)
            elif exclude_slide_ids or exclude_filters:
                cond, args = self._excluded(exclude_slide_ids, exclude_filters)
                with self._db_lock:
                    excluded = self._tile_ids([f"({cond})"], args)
                if len(excluded):
                    selector, available = faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded)), available - len(excluded)
            rescore = not exact and self.config.rerank > 1
            want = min(max(k, min(k * self.config.rerank, RERANK_MAX)) if rescore else k, available)
            nprobe = nprobe or self.config.nprobe
            while True:
                scores, ids = ann.search(self._faiss, query, max(want, 1), nprobe, selector)
                found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
                # A selective filter can leave the probed lists short of hits: probe more, up to all lists.
                if len(found) >= want or exact or nprobe >= ann.nlist(self._faiss):
                    break
                nprobe *= 2
            return self._hits(found, k, query, rescore)

    def _hits(self, found: list[tuple[int, float]], k: int, query: np.ndarray, rescore: bool) -> list[Hit]:
        """Hits with their records, re-scored exactly from the journal's vectors when asked.

        Re-scoring reads only ids and vectors of the candidates; records (and
        their metadata) are read for the k winners alone.
        """
        if not found:
            return []
        if rescore:
            with self._db_lock:
                parts = [self._fetch_vectors([f[0] for f in found[i:i + SQL_CHUNK]])
                         for i in range(0, len(found), SQL_CHUNK)]
            ids = np.concatenate([p[0] for p in parts])
            scores = np.concatenate([p[1] for p in parts]) @ query[0]
            found = list(zip(ids.tolist(), scores.tolist()))
        found.sort(key=lambda f: -f[1])
        found = found[:k]
        with self._db_lock:
            rows = {r[0]: r for r in self._db.execute(
                f"SELECT t.id, t.slide_id, t.x, t.y, t.w, t.h, t.mpp, t.tissue, s.metadata "
                f"FROM tiles t JOIN slides s ON s.slide_id = t.slide_id WHERE t.id IN ({','.join('?' * len(found))})",
                [i for i, _ in found])}
        return [Hit(r[1], Tile(r[2], r[3], r[4], r[5], r[6], r[7]), score, json.loads(r[8]))
                for i, score in found if (r := rows.get(i))]

    def get_slide(self, slide_id: str) -> Slide:
        with self._db_lock:
            row = self._db.execute(
                "SELECT slide_id, source, metadata, tile_count, indexed_at, slide_mpp FROM slides WHERE slide_id = ?",
                (slide_id,)).fetchone()
        if not row:
            raise NotFound(f"slide {slide_id!r} is not in the index")
        return Slide(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5])

    def list_slides(self, page_size: int, page_token: str) -> tuple[list[Slide], str]:
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        page_size = min(page_size or 100, 1000)
        try:
            after = base64.b64decode(page_token, altchars=b"-_", validate=True).decode() if page_token else ""
        except Exception:
            raise InvalidArgument("page_token is not one this service issued") from None
        with self._db_lock:
            rows = self._db.execute(
                "SELECT slide_id, source, metadata, tile_count, indexed_at, slide_mpp FROM slides "
                "WHERE slide_id > ? ORDER BY slide_id LIMIT ?", (after, page_size + 1)).fetchall()
        slides = [Slide(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5]) for r in rows[:page_size]]
        token = base64.urlsafe_b64encode(slides[-1].slide_id.encode()).decode() if len(rows) > page_size else ""
        return slides, token

    def counts(self) -> tuple[int, int]:
        with self._db_lock:
            slides = self._db.execute("SELECT COUNT(*) FROM slides").fetchone()[0]
        with self._rw.read():
            tiles = self._faiss.ntotal if self._faiss is not None else 0
        return tiles, slides

    def info(self) -> dict:
        with self._rw.read():
            return {"journal_seq": self._seq, "nlist": ann.nlist(self._faiss) if self._faiss is not None else 0,
                    "nprobe": self.config.nprobe, **vars(self.state)}

    def close(self) -> None:
        self._stop.set()
        if self._snapshotter is not None:
            self._snapshotter.join()
        self.wait_trained()
        self.snapshot()
        with self._rw.write(), self._db_lock:
            self._db.close()
