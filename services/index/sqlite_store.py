"""SQLite storage: the embedded system of record for one machine.

Every vector is written to SQLite (WAL, synchronous=FULL: fsynced, with
checksummed frames) before a call is acknowledged. Published tiles carry the
sequence number of their commit in `committed` (0 while staged); removed
tile ids are logged in `removed` until a snapshot holds that state.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading

from .journal import DIM_OF, Dialect, Journal, Sql
from .storage import DROP, SERVE, Commit, Slide

PAGE_BYTES = 8192

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
  -- The model that embedded the vector (a generation holds one model's tiles).
  model_id TEXT NOT NULL DEFAULT '',
  UNIQUE (slide_id, generation, x, y, w, h, mpp));
CREATE INDEX IF NOT EXISTS tiles_by_slide ON tiles (slide_id, generation);
CREATE INDEX IF NOT EXISTS tiles_by_commit ON tiles (committed);
-- Tiles dropped from the search by a commit or delete; pruned once a snapshot holds that state.
CREATE TABLE IF NOT EXISTS removed (seq INTEGER NOT NULL, tile_id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS removed_by_seq ON removed (seq);
"""


def _in_ids(column: str, values: list) -> tuple[str, list]:
    return f"{column} IN ({','.join('?' * len(values))})", values


def _has_pair(key: str, value: str) -> tuple[str, list]:
    return "EXISTS (SELECT 1 FROM json_each(s.metadata) j WHERE j.key = ? AND j.value = ?)", [key, value]


def _value_like(keys: list, pattern: str) -> tuple[str, list]:
    # SQLite's lower() folds ASCII letters only, as the pattern is folded.
    return (
        f"EXISTS (SELECT 1 FROM json_each(s.metadata) j WHERE j.key IN ({','.join('?' * len(keys))}) "
        "AND lower(j.value) LIKE ? ESCAPE '\\')",
        [*keys, pattern],
    )


DIALECT = Dialect("?", "", "?", "", _in_ids, _has_pair, _value_like, json.loads)

# The most of the file read through a memory map (SQLite caps it at its build's limit).
MMAP_BYTES = 1 << 40


class OnFile(Sql):
    """One SQLite file opened for durable writes from any thread (WAL, every commit fsynced),
    used one call at a time."""

    dialect = DIALECT

    def __init__(self, path: str, schema: str):
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # A new database only (an existing one keeps its pages): a float16 row of 1280-d is
        # ~2.6 KB, so 4 KiB pages held one row each, 8 KiB pages hold three (4.2 -> ~2.8 KB a tile).
        self._db.execute(f"PRAGMA page_size={PAGE_BYTES}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(schema)
        self._lock = threading.Lock()

    def _session(self):
        return self._lock

    @contextlib.contextmanager
    def _writing(self):
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception; it serialises the writers."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _execute(self, sql: str, args=()):
        return self._db.execute(sql, args)

    def _execute_many(self, sql: str, rows: list) -> None:
        self._db.executemany(sql, rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SqliteStorage(OnFile, Journal):
    """storage.Storage on one SQLite file in `directory`."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        super().__init__(os.path.join(directory, "index.sqlite3"), SCHEMA)
        # Reads through a memory map, not a read() per 4 KiB page: a search's
        # re-rank reads ~1,000 vectors of 5 KiB at random (10 vs 18 ms at 100k tiles).
        self._db.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
        if "slide_mpp" not in {r[1] for r in self._db.execute("PRAGMA table_info(slides)")}:
            # Indexes written before slides could state their resolution.
            self._db.execute("ALTER TABLE slides ADD COLUMN slide_mpp REAL NOT NULL DEFAULT 0")
        if "model_id" not in {r[1] for r in self._db.execute("PRAGMA table_info(tiles)")}:
            # Indexes written when an index held one model: adopt_models says whose their vectors are.
            self._db.execute("ALTER TABLE tiles ADD COLUMN model_id TEXT NOT NULL DEFAULT ''")
        self._db.execute("CREATE INDEX IF NOT EXISTS tiles_by_model ON tiles (model_id, committed)")
        self.adopt_models()
        self.binding()
        self._seq = max(
            int(self._meta().get("seq", 0)),
            self._db.execute("SELECT COALESCE(MAX(committed), 0) FROM tiles").fetchone()[0],
        )

    # -- Journal's hooks ----------------------------------------------------
    def _record_seq(self, seq: int) -> None:
        self._x("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (str(seq),))

    def _next_seq(self, slide_id: str, event: str = "") -> int:
        self._record_seq(self._seq + 1)
        return self._seq + 1

    def _published(self, seq: int) -> None:
        self._seq = seq

    def seq(self) -> int:
        return self._seq

    # -- a serving replica's local copy -------------------------------------
    def mirror(self, seq: int, slide_id: str, slide: Slide | None, generation: str, rows: list) -> Commit:
        """Make a slide what the system of record holds after commit `seq` (None: deleted); rows are
        (id, model id, generation, Tile, vector bytes) with the record's ids, of every model. A serving replica's
        local copy is kept so."""
        with self._writing():
            old = {r[0] for r in self._db.execute("SELECT id FROM tiles WHERE slide_id = ?", (slide_id,))}
            keep = {r[0] for r in rows}
            removed = sorted(old - keep)
            added = [r for r in rows if r[0] not in old]
            self._db.executemany("DELETE FROM tiles WHERE id = ?", [(i,) for i in removed])
            self._db.executemany(
                "INSERT INTO tiles (id, slide_id, generation, x, y, w, h, mpp, tissue, committed, staged_at, vector, "
                "model_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(i, slide_id, g, t.x, t.y, t.w, t.h, t.mpp, t.tissue, seq, 0.0, v, m) for i, m, g, t, v in added],
            )
            if slide is None:
                self._db.execute("DELETE FROM slides WHERE slide_id = ?", (slide_id,))
            else:
                self._put_slide(slide, generation)
            self._journal_removal(seq, removed)
            self._record_seq(seq)
            by_model = {m: self._vectors([(r[0], r[4]) for r in added if r[1] == m], m) for m in {r[1] for r in added}}
            commit = Commit(seq, slide, removed, by_model)
        self._published(seq)
        return commit

    def mirror_event(self, seq: int, event: str, model_id: str, dim: int) -> Commit:
        """Apply a model event of the system of record at `seq` (SERVE or DROP) to the local copy."""
        with self._writing():
            removed: list[int] = []
            if event == SERVE:
                self.add_model_here(model_id, dim)
                self._set_serving(model_id, dim)
            elif event == DROP:
                removed = self._drop_model(seq, model_id)
            self._record_seq(seq)
            commit = Commit(seq, None, removed, event=event, event_model=model_id)
        self._published(seq)
        if event == SERVE:
            self._model_id, self._dim = model_id, dim
        return commit

    def add_model_here(self, model_id: str, dim: int) -> None:
        """Inside _writing: hold a model (its dimension) if not yet held."""
        self._x("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (DIM_OF + model_id, str(dim)))
