"""Tile embeddings and records: SQLite is the durable truth, FAISS the search.

Every vector is written to SQLite (WAL, synchronous=FULL) before a call is
acknowledged; the FAISS index is rebuilt from it at start-up, so a crash
loses nothing acknowledged and never leaves a half-written index file.
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

import faiss
import numpy as np

from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from services.common.rwlock import RWLock

log = logging.getLogger("smily.index")

STALE_STAGED_S = 24 * 3600
MAX_K = 1000

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slides (
  slide_id TEXT PRIMARY KEY, source TEXT NOT NULL, metadata TEXT NOT NULL,
  generation TEXT NOT NULL, tile_count INTEGER NOT NULL, indexed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tiles (
  id INTEGER PRIMARY KEY AUTOINCREMENT, slide_id TEXT NOT NULL, generation TEXT NOT NULL,
  x INTEGER NOT NULL, y INTEGER NOT NULL, w INTEGER NOT NULL, h INTEGER NOT NULL,
  mpp REAL NOT NULL, tissue REAL NOT NULL, committed INTEGER NOT NULL DEFAULT 0,
  staged_at REAL NOT NULL, vector BLOB NOT NULL,
  UNIQUE (slide_id, generation, x, y, w, h, mpp));
CREATE INDEX IF NOT EXISTS tiles_by_slide ON tiles (slide_id, generation);
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


@dataclass
class Hit:
    slide_id: str
    tile: Tile
    score: float
    metadata: dict


class TileStore:
    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self._db = sqlite3.connect(os.path.join(directory, "index.sqlite3"), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._db_lock = threading.Lock()
        self._rw = RWLock()
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        self.model_id: str = meta.get("model_id", "")
        self.dim: int = int(meta.get("dim", 0))
        self._faiss = None
        self._load()

    # -- start-up ---------------------------------------------------------
    def _load(self) -> None:
        with self._db_lock:
            dropped = self._db.execute(
                "DELETE FROM tiles WHERE committed = 0 AND staged_at < ?", (time.time() - STALE_STAGED_S,)
            ).rowcount
        if not self.dim:
            return
        self._faiss = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        cursor = self._db.execute("SELECT id, vector FROM tiles WHERE committed = 1 ORDER BY id")
        while rows := cursor.fetchmany(8192):
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), self.dim)
            self._faiss.add_with_ids(vecs, ids)
        log.info("index loaded", extra={"tiles": self._faiss.ntotal, "model_id": self.model_id, "stale_staged_dropped": dropped})

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
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [("model_id", model_id), ("dim", str(dim))])
            self._db.execute("COMMIT")
        self.model_id, self.dim = model_id, dim
        self._faiss = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
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

    def commit_slide(self, model_id: str, generation: str, slide: Slide, expected_tiles: int) -> tuple[Slide, int]:
        if not slide.slide_id or not generation:
            raise InvalidArgument("slide_id and generation are required")
        with self._rw.write():
            if self.model_id:
                self._check_model(model_id)
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
                        "SELECT id FROM tiles WHERE slide_id = ? AND generation != ? AND committed = 1",
                        (slide.slide_id, generation))]
                    self._db.execute("DELETE FROM tiles WHERE slide_id = ? AND generation != ?", (slide.slide_id, generation))
                    self._db.execute("UPDATE tiles SET committed = 1 WHERE slide_id = ? AND generation = ?",
                                     (slide.slide_id, generation))
                    slide.tile_count, slide.indexed_at = len(new), time.time()
                    self._db.execute(
                        "INSERT OR REPLACE INTO slides VALUES (?, ?, ?, ?, ?, ?)",
                        (slide.slide_id, slide.source, json.dumps(slide.metadata, sort_keys=True), generation,
                         slide.tile_count, slide.indexed_at))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            if self._faiss is not None:
                if old:
                    self._faiss.remove_ids(np.asarray(old, np.int64))
                if new:
                    ids = np.fromiter((r[0] for r in new), np.int64, len(new))
                    vecs = np.frombuffer(b"".join(r[1] for r in new), np.float32).reshape(len(new), self.dim)
                    self._faiss.add_with_ids(vecs, ids)
        log.info("slide committed", extra={"slide_id": slide.slide_id, "tiles": len(new), "replaced": len(old)})
        return slide, len(old)

    def delete_slide(self, slide_id: str) -> int:
        with self._rw.write():
            with self._db_lock:
                self._db.execute("BEGIN IMMEDIATE")
                if not self._db.execute("SELECT 1 FROM slides WHERE slide_id = ?", (slide_id,)).fetchone():
                    self._db.execute("ROLLBACK")
                    raise NotFound(f"slide {slide_id!r} is not in the index")
                ids = [r[0] for r in self._db.execute(
                    "SELECT id FROM tiles WHERE slide_id = ? AND committed = 1", (slide_id,))]
                self._db.execute("DELETE FROM tiles WHERE slide_id = ?", (slide_id,))
                self._db.execute("DELETE FROM slides WHERE slide_id = ?", (slide_id,))
                self._db.execute("COMMIT")
            if ids and self._faiss is not None:
                self._faiss.remove_ids(np.asarray(ids, np.int64))
        log.info("slide deleted", extra={"slide_id": slide_id, "tiles": len(ids)})
        return len(ids)

    # -- reads --------------------------------------------------------------
    def search(self, model_id: str, query: np.ndarray, k: int, exclude_slide_ids=()) -> list[Hit]:
        if not 0 < k <= MAX_K:
            raise InvalidArgument(f"k must be in 1..{MAX_K}, got {k}")
        query = query.reshape(1, -1) if query.ndim == 1 else query
        if query.shape[0] != 1:
            raise InvalidArgument(f"one query vector expected, got shape {list(query.shape)}")
        with self._rw.read():
            if not self.model_id:
                return []  # nothing indexed yet
            self._check_model(model_id, query.shape[1])
            params = None
            if exclude_slide_ids:
                with self._db_lock:
                    marks = ",".join("?" * len(exclude_slide_ids))
                    excluded = np.fromiter((r[0] for r in self._db.execute(
                        f"SELECT id FROM tiles WHERE committed = 1 AND slide_id IN ({marks})", list(exclude_slide_ids))), np.int64)
                if len(excluded):
                    params = faiss.SearchParameters(sel=faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded)))
            scores, ids = self._faiss.search(np.ascontiguousarray(query, np.float32), k, params=params)
            found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
            if not found:
                return []
            with self._db_lock:
                marks = ",".join("?" * len(found))
                rows = {r[0]: r for r in self._db.execute(
                    f"SELECT t.id, t.slide_id, t.x, t.y, t.w, t.h, t.mpp, t.tissue, s.metadata "
                    f"FROM tiles t JOIN slides s ON s.slide_id = t.slide_id WHERE t.id IN ({marks})",
                    [i for i, _ in found])}
        return [
            Hit(r[1], Tile(r[2], r[3], r[4], r[5], r[6], r[7]), score, json.loads(r[8]))
            for i, score in found if (r := rows.get(i))
        ]

    def get_slide(self, slide_id: str) -> Slide:
        with self._db_lock:
            row = self._db.execute(
                "SELECT slide_id, source, metadata, tile_count, indexed_at FROM slides WHERE slide_id = ?",
                (slide_id,)).fetchone()
        if not row:
            raise NotFound(f"slide {slide_id!r} is not in the index")
        return Slide(row[0], row[1], json.loads(row[2]), row[3], row[4])

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
                "SELECT slide_id, source, metadata, tile_count, indexed_at FROM slides "
                "WHERE slide_id > ? ORDER BY slide_id LIMIT ?", (after, page_size + 1)).fetchall()
        slides = [Slide(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows[:page_size]]
        token = base64.urlsafe_b64encode(slides[-1].slide_id.encode()).decode() if len(rows) > page_size else ""
        return slides, token

    def counts(self) -> tuple[int, int]:
        with self._db_lock:
            slides = self._db.execute("SELECT COUNT(*) FROM slides").fetchone()[0]
        with self._rw.read():
            tiles = self._faiss.ntotal if self._faiss is not None else 0
        return tiles, slides

    def close(self) -> None:
        with self._rw.write(), self._db_lock:
            self._db.close()
