"""SQLite storage: the embedded system of record for one machine.

Every vector is written to SQLite (WAL, synchronous=FULL: fsynced, with
checksummed frames) before a call is acknowledged. Published tiles carry the
sequence number of their commit in `committed` (0 while staged); removed
tile ids are logged in `removed` until a snapshot holds that state.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time

import numpy as np

from smily.common.errors import Aborted, NotFound

from .storage import Commit, Slide, Tile, staged_rows, vectors_from

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
SLIDE_COLUMNS = "slide_id, source, metadata, tile_count, indexed_at, slide_mpp"


def _slide(row) -> Slide:
    return Slide(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5])


def _ids(rows) -> np.ndarray:
    return np.fromiter((r[0] for r in rows), np.int64)


# The most of the file read through a memory map (SQLite caps it at its build's limit).
MMAP_BYTES = 1 << 40


class SqliteStorage:
    """storage.Storage on one SQLite file in `directory`."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self._db = sqlite3.connect(
            os.path.join(directory, "index.sqlite3"), check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # Reads through a memory map, not a read() per 4 KiB page: a search's
        # re-rank reads ~1,000 vectors of 5 KiB at random (10 vs 18 ms at 100k tiles).
        self._db.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
        self._db.executescript(SCHEMA)
        if "slide_mpp" not in {r[1] for r in self._db.execute("PRAGMA table_info(slides)")}:
            # Indexes written before slides could state their resolution.
            self._db.execute("ALTER TABLE slides ADD COLUMN slide_mpp REAL NOT NULL DEFAULT 0")
        self._lock = threading.Lock()
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        self._model_id, self._dim = meta.get("model_id", ""), int(meta.get("dim", 0))
        self._tiling = meta.get("tiling", "")
        self._seq = max(
            int(meta.get("seq", 0)), self._db.execute("SELECT COALESCE(MAX(committed), 0) FROM tiles").fetchone()[0]
        )

    def _transaction(self):
        return _Transaction(self._db)

    # -- binding and sequence ---------------------------------------------
    def binding(self) -> tuple[str, int]:
        return self._model_id, self._dim

    def bind(self, model_id: str, dim: int) -> tuple[str, int]:
        with self._lock:
            if not self._model_id:
                with self._transaction():
                    self._db.executemany(
                        "INSERT OR REPLACE INTO meta VALUES (?, ?)", [("model_id", model_id), ("dim", str(dim))]
                    )
                self._model_id, self._dim = model_id, dim
            return self._model_id, self._dim

    def tiling(self) -> str:
        return self._tiling

    def record_tiling(self, record: str) -> str:
        with self._lock:
            if not self._tiling:
                with self._transaction():
                    self._db.execute("INSERT OR REPLACE INTO meta VALUES ('tiling', ?)", (record,))
                self._tiling = record
            return self._tiling

    def seq(self) -> int:
        return self._seq

    # -- writes -------------------------------------------------------------
    def drop_stale_staged(self, older_than: float) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM tiles WHERE committed = 0 AND staged_at < ?", (older_than,)).rowcount

    def stage(self, slide_id: str, generation: str, tiles: list[Tile], vectors: np.ndarray) -> int:
        rows = staged_rows(slide_id, generation, tiles, vectors)
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO tiles (slide_id, generation, x, y, w, h, mpp, tissue, staged_at, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return len(rows)

    def _journal_removal(self, seq: int, ids: list[int]) -> None:
        self._db.executemany("INSERT INTO removed VALUES (?, ?)", [(seq, i) for i in ids])
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (str(seq),))

    def commit_slide(self, generation: str, slide: Slide, expected_tiles: int) -> Commit:
        sid = slide.slide_id
        with self._lock, self._transaction():
            new = self._db.execute(
                "SELECT id, vector FROM tiles WHERE slide_id = ? AND generation = ? AND committed = 0",
                (sid, generation),
            ).fetchall()
            if not new:
                done = self._already_committed(sid, generation, expected_tiles)
                if done is not None:
                    return done
            if len(new) != expected_tiles:
                raise Aborted(
                    f"{len(new)} tiles staged for this ingest, {expected_tiles} expected: ingest the slide again"
                )
            seq = self._seq + 1
            old = [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM tiles WHERE slide_id = ? AND generation != ? AND committed > 0", (sid, generation)
                )
            ]
            self._db.execute("DELETE FROM tiles WHERE slide_id = ? AND generation != ?", (sid, generation))
            self._db.execute(
                "UPDATE tiles SET committed = ? WHERE slide_id = ? AND generation = ?", (seq, sid, generation)
            )
            self._journal_removal(seq, old)
            slide.tile_count, slide.indexed_at = len(new), time.time()
            self._db.execute(
                f"INSERT OR REPLACE INTO slides ({SLIDE_COLUMNS}, generation) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    sid,
                    slide.source,
                    json.dumps(slide.metadata, sort_keys=True),
                    slide.tile_count,
                    slide.indexed_at,
                    slide.slide_mpp,
                    generation,
                ),
            )
        self._seq = seq
        return Commit(
            seq,
            slide,
            np.fromiter((r[0] for r in new), np.int64, len(new)),
            vectors_from([r[1] for r in new], self._dim),
            old,
        )

    def _already_committed(self, slide_id: str, generation: str, expected_tiles: int) -> Commit | None:
        """The earlier commit of this very generation (a retried call), else None."""
        row = self._db.execute(
            f"SELECT {SLIDE_COLUMNS} FROM slides WHERE slide_id = ? AND generation = ?", (slide_id, generation)
        ).fetchone()
        if row is None or row[3] != expected_tiles:
            return None
        seq = self._db.execute("SELECT MAX(committed) FROM tiles WHERE slide_id = ?", (slide_id,)).fetchone()[0]
        return Commit(seq or 0, _slide(row), np.empty(0, np.int64), np.empty((0, self._dim), np.float32), [])

    def delete_slide(self, slide_id: str) -> Commit:
        with self._lock, self._transaction():
            if not self._db.execute("SELECT 1 FROM slides WHERE slide_id = ?", (slide_id,)).fetchone():
                raise NotFound(f"slide {slide_id!r} is not in the index")
            seq = self._seq + 1
            ids = [
                r[0] for r in self._db.execute("SELECT id FROM tiles WHERE slide_id = ? AND committed > 0", (slide_id,))
            ]
            self._db.execute("DELETE FROM tiles WHERE slide_id = ?", (slide_id,))
            self._db.execute("DELETE FROM slides WHERE slide_id = ?", (slide_id,))
            self._journal_removal(seq, ids)
        self._seq = seq
        return Commit(seq, None, np.empty(0, np.int64), np.empty((0, self._dim), np.float32), ids)

    def mirror(self, seq: int, slide_id: str, slide: Slide | None, generation: str, rows: list) -> Commit:
        """Make a slide what the system of record holds after commit `seq` (None: deleted); rows are
        (id, Tile, vector bytes) with the record's ids. A serving replica's local copy is kept so."""
        with self._lock, self._transaction():
            old = {r[0] for r in self._db.execute("SELECT id FROM tiles WHERE slide_id = ?", (slide_id,))}
            keep = {r[0] for r in rows}
            removed = sorted(old - keep)
            added = [r for r in rows if r[0] not in old]
            self._db.executemany("DELETE FROM tiles WHERE id = ?", [(i,) for i in removed])
            self._db.executemany(
                "INSERT INTO tiles (id, slide_id, generation, x, y, w, h, mpp, tissue, committed, staged_at, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(i, slide_id, generation, t.x, t.y, t.w, t.h, t.mpp, t.tissue, seq, 0.0, v) for i, t, v in added],
            )
            if slide is None:
                self._db.execute("DELETE FROM slides WHERE slide_id = ?", (slide_id,))
            else:
                self._db.execute(
                    f"INSERT OR REPLACE INTO slides ({SLIDE_COLUMNS}, generation) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        slide_id,
                        slide.source,
                        json.dumps(slide.metadata, sort_keys=True),
                        slide.tile_count,
                        slide.indexed_at,
                        slide.slide_mpp,
                        generation,
                    ),
                )
            self._journal_removal(seq, removed)
        self._seq = seq
        return Commit(
            seq,
            slide,
            np.fromiter((r[0] for r in added), np.int64, len(added)),
            vectors_from([r[2] for r in added], self._dim),
            removed,
        )

    # -- reads for the search index -------------------------------------------
    def committed_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM tiles WHERE committed > 0").fetchone()[0]

    def committed_ids(self) -> np.ndarray:
        with self._lock:
            return _ids(self._db.execute("SELECT id FROM tiles WHERE committed > 0"))

    def committed_chunk(self, after_id: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, vector FROM tiles WHERE committed > 0 AND id > ? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
        return _ids(rows), vectors_from([r[1] for r in rows], self._dim)

    def added_after(self, seq: int):
        after = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, vector FROM tiles WHERE committed > ? AND id > ? ORDER BY id LIMIT 8192", (seq, after)
                ).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            yield _ids(rows), vectors_from([r[1] for r in rows], self._dim)

    def removed_after(self, seq: int) -> np.ndarray:
        with self._lock:
            return _ids(self._db.execute("SELECT tile_id FROM removed WHERE seq > ?", (seq,)))

    def forget_removed(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM removed WHERE seq <= ?", (seq,))

    def vectors(self, ids) -> tuple[np.ndarray, np.ndarray]:
        ids = [int(i) for i in ids]
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, vector FROM tiles WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids
            ).fetchall()
        return _ids(rows), vectors_from([r[1] for r in rows], self._dim)

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

    def _tile_ids(self, conds: list[str], args: list) -> np.ndarray:
        with self._lock:
            return _ids(
                self._db.execute(
                    f"SELECT t.id FROM tiles t JOIN slides s ON s.slide_id = t.slide_id "
                    f"WHERE {' AND '.join(['t.committed > 0', *conds])}",
                    args,
                )
            )

    def select(
        self, slide_ids, filters: dict, exclude, exclude_filters: dict, mpp_range: tuple[float, float] | None = None
    ) -> np.ndarray:
        conds, args = self._slide_conditions(slide_ids, filters)
        if mpp_range is not None:
            conds.append("t.mpp >= ? AND t.mpp < ?")
            args += list(mpp_range)
        excluded, excluded_args = self._slide_conditions(exclude, exclude_filters)
        if excluded:
            conds.append(f"NOT ({' OR '.join(excluded)})")
            args += excluded_args
        return self._tile_ids(conds, args)

    def excluded(self, exclude, exclude_filters: dict) -> np.ndarray:
        conds, args = self._slide_conditions(exclude, exclude_filters)
        return self._tile_ids([f"({' OR '.join(conds)})"], args)

    def records(self, ids) -> dict[int, tuple[str, Tile, dict]]:
        ids = [int(i) for i in ids]
        with self._lock:
            rows = self._db.execute(
                f"SELECT t.id, t.slide_id, t.x, t.y, t.w, t.h, t.mpp, t.tissue, s.metadata "
                f"FROM tiles t JOIN slides s ON s.slide_id = t.slide_id WHERE t.id IN ({','.join('?' * len(ids))})",
                ids,
            ).fetchall()
        return {r[0]: (r[1], Tile(*r[2:8]), json.loads(r[8])) for r in rows}

    # -- slides -------------------------------------------------------------
    def get_slide(self, slide_id: str) -> Slide:
        with self._lock:
            row = self._db.execute(f"SELECT {SLIDE_COLUMNS} FROM slides WHERE slide_id = ?", (slide_id,)).fetchone()
        if not row:
            raise NotFound(f"slide {slide_id!r} is not in the index")
        return _slide(row)

    def list_slides(self, after: str, limit: int) -> list[Slide]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {SLIDE_COLUMNS} FROM slides WHERE slide_id > ? ORDER BY slide_id LIMIT ?", (after, limit)
            ).fetchall()
        return [_slide(r) for r in rows]

    def slide_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM slides").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, exc, tb):
        self._db.execute("ROLLBACK" if kind else "COMMIT")
        return False
