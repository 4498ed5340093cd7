"""PostgreSQL storage: the cluster's system of record, one schema per shard.

The same tables as SQLite (storage.py says what they mean) plus `commits`,
one row per commit or delete naming its slide, which the serving replicas
follow by sequence. Commits take the next sequence number by updating the
shard's one `seq` row: its row lock serialises them, so sequence order is
commit order and a replica reading "commits after s" never misses one that
commits later with a smaller number. A lost connection is UNAVAILABLE and
is reopened on the next call.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from dataclasses import dataclass

import numpy as np
import psycopg

from smily.common.errors import Aborted, NotFound, Unavailable

from .concepts import Concept, normalised, vector_bytes
from .storage import Commit, Slide, Tile, staged_rows, vectors_from

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.seq (one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), value BIGINT NOT NULL);
INSERT INTO {s}.seq VALUES (TRUE, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS {s}.slides (
  slide_id TEXT PRIMARY KEY, source TEXT NOT NULL, metadata JSONB NOT NULL, generation TEXT NOT NULL,
  tile_count INTEGER NOT NULL, indexed_at DOUBLE PRECISION NOT NULL, slide_mpp DOUBLE PRECISION NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS slides_by_metadata ON {s}.slides USING GIN (metadata jsonb_path_ops);
CREATE TABLE IF NOT EXISTS {s}.tiles (
  id BIGSERIAL PRIMARY KEY, slide_id TEXT NOT NULL, generation TEXT NOT NULL,
  x INTEGER NOT NULL, y INTEGER NOT NULL, w INTEGER NOT NULL, h INTEGER NOT NULL,
  mpp DOUBLE PRECISION NOT NULL, tissue DOUBLE PRECISION NOT NULL, committed BIGINT NOT NULL DEFAULT 0,
  staged_at DOUBLE PRECISION NOT NULL, vector BYTEA NOT NULL,
  UNIQUE (slide_id, generation, x, y, w, h, mpp));
CREATE INDEX IF NOT EXISTS tiles_by_commit ON {s}.tiles (committed);
CREATE TABLE IF NOT EXISTS {s}.removed (seq BIGINT NOT NULL, tile_id BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS removed_by_seq ON {s}.removed (seq);
CREATE TABLE IF NOT EXISTS {s}.commits (seq BIGINT PRIMARY KEY, slide_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.replicas (name TEXT PRIMARY KEY, seq BIGINT NOT NULL, seen_at DOUBLE PRECISION NOT NULL);
"""
SLIDE_COLUMNS = "slide_id, source, metadata, tile_count, indexed_at, slide_mpp"
TILE_COLUMNS = "id, x, y, w, h, mpp, tissue, vector"
# Lock key under which schemas are created: replicas starting together would race on CREATE SCHEMA.
SCHEMA_LOCK = 0x5311_7001


def schema(shard: int) -> str:
    return f"shard_{int(shard)}"


@dataclass
class SlideState:
    """A slide as the store holds it after commit `seq`: None when deleted; rows are (id, Tile, vector)."""

    seq: int
    slide_id: str
    slide: Slide | None
    generation: str
    rows: list


def _slide(row) -> Slide:
    return Slide(row[0], row[1], row[2], row[3], row[4], row[5])


def _ids(rows) -> np.ndarray:
    return np.fromiter((r[0] for r in rows), np.int64)


def _db(method):
    """One call at a time on the connection, reopened after a failure; a lost database is UNAVAILABLE."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                return method(self, *args, **kwargs)
            except psycopg.OperationalError:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                raise Unavailable("the index database is unavailable") from None

    return call


class _OnSchema:
    """One connection to a shard's schema, used one call at a time (@_db opens and reopens it)."""

    def __init__(self, url: str, shard: int, connect_timeout_s: float):
        self._url, self._timeout = url, connect_timeout_s
        self.s = schema(shard)
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self._url, autocommit=True, connect_timeout=max(1, int(self._timeout)))

    @property
    def conn(self) -> psycopg.Connection:
        assert self._conn is not None, "only called under @_db, which opens it"
        return self._conn

    def _q(self, sql: str, args=()):
        return self.conn.execute(sql.format(s=self.s), args)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class PgStorage(_OnSchema):
    """storage.Storage on shard `shard`'s schema of a PostgreSQL database."""

    def __init__(self, url: str, shard: int = 0, connect_timeout_s: float = 5.0):
        super().__init__(url, shard, connect_timeout_s)
        self._dim = 0
        self._create()
        self._model_id, self._dim = self.binding()

    @_db
    def _create(self) -> None:
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in SCHEMA.format(s=self.s).split(";"):
                if statement.strip():
                    self.conn.execute(statement)

    def _d(self) -> int:
        """The bound dimension; another replica may have bound the store since this one read it."""
        if not self._dim:
            self._dim = int(dict(self._q("SELECT key, value FROM {s}.meta").fetchall()).get("dim", 0))
        return self._dim

    # -- binding and sequence ---------------------------------------------
    @_db
    def binding(self) -> tuple[str, int]:
        meta = dict(self._q("SELECT key, value FROM {s}.meta").fetchall())
        self._model_id, self._dim = meta.get("model_id", ""), int(meta.get("dim", 0))
        return self._model_id, self._dim

    def bind(self, model_id: str, dim: int) -> tuple[str, int]:
        if not self._model_id:
            self._insert_binding(model_id, dim)
        return self.binding()

    @_db
    def _insert_binding(self, model_id: str, dim: int) -> None:
        with self.conn.transaction():
            self._q("SELECT value FROM {s}.seq FOR UPDATE")
            if not self._q("SELECT 1 FROM {s}.meta WHERE key = 'model_id'").fetchone():
                self._q("INSERT INTO {s}.meta VALUES ('model_id', %s), ('dim', %s)", (model_id, str(dim)))

    @_db
    def tiling(self) -> str:
        row = self._q("SELECT value FROM {s}.meta WHERE key = 'tiling'").fetchone()
        return row[0] if row else ""

    @_db
    def record_tiling(self, record: str) -> str:
        # Serialised with the binding and commits by the seq row lock: two first ingests
        # with different settings cannot both record theirs.
        with self.conn.transaction():
            self._q("SELECT value FROM {s}.seq FOR UPDATE")
            self._q("INSERT INTO {s}.meta VALUES ('tiling', %s) ON CONFLICT (key) DO NOTHING", (record,))
            return self._q("SELECT value FROM {s}.meta WHERE key = 'tiling'").fetchone()[0]

    @_db
    def seq(self) -> int:
        return self._q("SELECT value FROM {s}.seq").fetchone()[0]

    # -- writes -------------------------------------------------------------
    @_db
    def drop_stale_staged(self, older_than: float) -> int:
        return self._q("DELETE FROM {s}.tiles WHERE committed = 0 AND staged_at < %s", (older_than,)).rowcount

    @_db
    def stage(self, slide_id: str, generation: str, tiles: list[Tile], vectors: np.ndarray) -> int:
        rows = staged_rows(slide_id, generation, tiles, vectors)
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {self.s}.tiles (slide_id, generation, x, y, w, h, mpp, tissue, staged_at, vector) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                rows,
            )
        return len(rows)

    def _next_seq(self, slide_id: str) -> int:
        seq = self._q("UPDATE {s}.seq SET value = value + 1 RETURNING value").fetchone()[0]
        self._q("INSERT INTO {s}.commits VALUES (%s, %s)", (seq, slide_id))
        return seq

    def _journal_removal(self, seq: int, ids: list[int]) -> None:
        if ids:
            with self.conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {self.s}.removed VALUES (%s, %s)", [(seq, i) for i in ids])

    @_db
    def commit_slide(self, generation: str, slide: Slide, expected_tiles: int) -> Commit:
        sid = slide.slide_id
        with self.conn.transaction():
            self._q("SELECT value FROM {s}.seq FOR UPDATE")  # commits of this shard go one at a time
            new = self._q(
                "SELECT id, vector FROM {s}.tiles WHERE slide_id = %s AND generation = %s AND committed = 0 "
                "ORDER BY id",
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
            seq = self._next_seq(sid)
            old = [
                r[0]
                for r in self._q(
                    "DELETE FROM {s}.tiles WHERE slide_id = %s AND generation != %s RETURNING id, committed",
                    (sid, generation),
                )
                if r[1] > 0
            ]
            self._q(
                "UPDATE {s}.tiles SET committed = %s WHERE slide_id = %s AND generation = %s", (seq, sid, generation)
            )
            self._journal_removal(seq, old)
            slide.tile_count, slide.indexed_at = len(new), time.time()
            self._q(
                f"INSERT INTO {{s}}.slides ({SLIDE_COLUMNS}, generation) VALUES (%s, %s, %s::jsonb, %s, %s, %s, %s) "
                "ON CONFLICT (slide_id) DO UPDATE SET source = excluded.source, metadata = excluded.metadata, "
                "tile_count = excluded.tile_count, indexed_at = excluded.indexed_at, "
                "slide_mpp = excluded.slide_mpp, generation = excluded.generation",
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
        return Commit(seq, slide, _ids(new), vectors_from([bytes(r[1]) for r in new], self._d()), old)

    def _already_committed(self, slide_id: str, generation: str, expected_tiles: int) -> Commit | None:
        row = self._q(
            f"SELECT {SLIDE_COLUMNS} FROM {{s}}.slides WHERE slide_id = %s AND generation = %s", (slide_id, generation)
        ).fetchone()
        if row is None or row[3] != expected_tiles:
            return None
        seq = self._q("SELECT MAX(committed) FROM {s}.tiles WHERE slide_id = %s", (slide_id,)).fetchone()[0]
        return Commit(seq or 0, _slide(row), np.empty(0, np.int64), np.empty((0, self._d()), np.float32), [])

    @_db
    def delete_slide(self, slide_id: str) -> Commit:
        with self.conn.transaction():
            self._q("SELECT value FROM {s}.seq FOR UPDATE")
            if not self._q("DELETE FROM {s}.slides WHERE slide_id = %s", (slide_id,)).rowcount:
                raise NotFound(f"slide {slide_id!r} is not in the index")
            seq = self._next_seq(slide_id)
            ids = [
                r[0]
                for r in self._q("DELETE FROM {s}.tiles WHERE slide_id = %s RETURNING id, committed", (slide_id,))
                if r[1] > 0
            ]
            self._journal_removal(seq, ids)
        return Commit(seq, None, np.empty(0, np.int64), np.empty((0, self._d()), np.float32), ids)

    # -- reads for a search index -------------------------------------------
    @_db
    def committed_count(self) -> int:
        return self._q("SELECT COUNT(*) FROM {s}.tiles WHERE committed > 0").fetchone()[0]

    @_db
    def committed_ids(self) -> np.ndarray:
        return _ids(self._q("SELECT id FROM {s}.tiles WHERE committed > 0"))

    @_db
    def committed_chunk(self, after_id: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._q(
            "SELECT id, vector FROM {s}.tiles WHERE committed > 0 AND id > %s ORDER BY id LIMIT %s", (after_id, limit)
        ).fetchall()
        return _ids(rows), vectors_from([bytes(r[1]) for r in rows], self._d())

    def added_after(self, seq: int):
        after = 0
        while True:
            ids, vecs = self._added_chunk(seq, after)
            if not len(ids):
                return
            after = int(ids[-1])
            yield ids, vecs

    @_db
    def _added_chunk(self, seq: int, after: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._q(
            "SELECT id, vector FROM {s}.tiles WHERE committed > %s AND id > %s ORDER BY id LIMIT 8192", (seq, after)
        ).fetchall()
        return _ids(rows), vectors_from([bytes(r[1]) for r in rows], self._d())

    @_db
    def removed_after(self, seq: int) -> np.ndarray:
        return _ids(self._q("SELECT tile_id FROM {s}.removed WHERE seq > %s", (seq,)))

    @_db
    def forget_removed(self, seq: int) -> None:
        self._q("DELETE FROM {s}.removed WHERE seq <= %s", (seq,))

    @_db
    def vectors(self, ids) -> tuple[np.ndarray, np.ndarray]:
        rows = self._q(
            "SELECT id, vector FROM {s}.tiles WHERE id = ANY(%s) ORDER BY id", ([int(i) for i in ids],)
        ).fetchall()
        return _ids(rows), vectors_from([bytes(r[1]) for r in rows], self._d())

    @staticmethod
    def _slide_conditions(slide_ids, pairs: dict) -> tuple[list[str], list]:
        conds: list[str] = []
        args: list = []
        if slide_ids:
            conds.append("s.slide_id = ANY(%s)")
            args.append(list(slide_ids))
        for key, value in sorted(pairs.items()):
            conds.append("s.metadata @> %s::jsonb")
            args.append(json.dumps({key: value}))
        return conds, args

    def _tile_ids(self, conds: list[str], args: list) -> np.ndarray:
        return _ids(
            self._q(
                "SELECT t.id FROM {s}.tiles t JOIN {s}.slides s ON s.slide_id = t.slide_id "
                f"WHERE {' AND '.join(['t.committed > 0', *conds])}",
                args,
            )
        )

    @_db
    def select(
        self, slide_ids, filters: dict, exclude, exclude_filters: dict, mpp_range: tuple[float, float] | None = None
    ) -> np.ndarray:
        conds, args = self._slide_conditions(slide_ids, filters)
        if mpp_range is not None:
            conds.append("t.mpp >= %s AND t.mpp < %s")
            args += list(mpp_range)
        excluded, excluded_args = self._slide_conditions(exclude, exclude_filters)
        if excluded:
            conds.append(f"NOT ({' OR '.join(excluded)})")
            args += excluded_args
        return self._tile_ids(conds, args)

    @_db
    def excluded(self, exclude, exclude_filters: dict) -> np.ndarray:
        conds, args = self._slide_conditions(exclude, exclude_filters)
        return self._tile_ids([f"({' OR '.join(conds)})"], args)

    @_db
    def records(self, ids) -> dict[int, tuple[str, Tile, dict]]:
        rows = self._q(
            "SELECT t.id, t.slide_id, t.x, t.y, t.w, t.h, t.mpp, t.tissue, s.metadata "
            "FROM {s}.tiles t JOIN {s}.slides s ON s.slide_id = t.slide_id WHERE t.id = ANY(%s)",
            ([int(i) for i in ids],),
        ).fetchall()
        return {r[0]: (r[1], Tile(*r[2:8]), r[8]) for r in rows}

    # -- slides -------------------------------------------------------------
    @_db
    def get_slide(self, slide_id: str) -> Slide:
        row = self._q(f"SELECT {SLIDE_COLUMNS} FROM {{s}}.slides WHERE slide_id = %s", (slide_id,)).fetchone()
        if not row:
            raise NotFound(f"slide {slide_id!r} is not in the index")
        return _slide(row)

    @_db
    def list_slides(self, after: str, limit: int) -> list[Slide]:
        rows = self._q(
            f'SELECT {SLIDE_COLUMNS} FROM {{s}}.slides WHERE slide_id COLLATE "C" > %s '
            'ORDER BY slide_id COLLATE "C" '
            "LIMIT %s",
            (after, limit),
        ).fetchall()
        return [_slide(r) for r in rows]

    @_db
    def slide_count(self) -> int:
        return self._q("SELECT COUNT(*) FROM {s}.slides").fetchone()[0]

    # -- following, for serving replicas --------------------------------------
    @_db
    def report_served(self, name: str, seq: int) -> None:
        """Record that replica `name` serves up to `seq`, on the database's clock (reshard waits on it)."""
        self._q(
            "INSERT INTO {s}.replicas VALUES (%s, %s, EXTRACT(EPOCH FROM now())) ON CONFLICT (name) DO UPDATE "
            "SET seq = excluded.seq, seen_at = excluded.seen_at",
            (name, seq),
        )

    @_db
    def changes_after(self, seq: int, limit: int = 256) -> list[SlideState]:
        """The current state of each slide changed by the next `limit` commits after `seq`,
        ordered by its last commit's sequence; read in one snapshot of the database."""
        with self.conn.transaction():
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            commits = self._q(
                "SELECT seq, slide_id FROM {s}.commits WHERE seq > %s ORDER BY seq LIMIT %s", (seq, limit)
            ).fetchall()
            last = {sid: s for s, sid in commits}
            states = []
            for sid, s in sorted(last.items(), key=lambda kv: kv[1]):
                row = self._q(
                    f"SELECT {SLIDE_COLUMNS}, generation FROM {{s}}.slides WHERE slide_id = %s", (sid,)
                ).fetchone()
                rows = (
                    []
                    if row is None
                    else [
                        (r[0], Tile(*r[1:7]), bytes(r[7]))
                        for r in self._q(
                            f"SELECT {TILE_COLUMNS} FROM {{s}}.tiles WHERE slide_id = %s AND generation = %s "
                            "AND committed > 0 ORDER BY id",
                            (sid, row[6]),
                        )
                    ]
                )
                states.append(
                    SlideState(s, sid, None if row is None else _slide(row), "" if row is None else row[6], rows)
                )
        return states


class PgConcepts(_OnSchema):
    """concepts.ConceptStore's calls on the shard's schema, so every replica reads the same concepts."""

    def __init__(self, url: str, shard: int = 0):
        super().__init__(url, shard, 5.0)
        self._create()

    @_db
    def _create(self) -> None:
        # Under the schema lock, as PgStorage's tables: two replicas starting at once would
        # otherwise race in CREATE TABLE IF NOT EXISTS (a unique violation in pg_type).
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            self._q(
                "CREATE TABLE IF NOT EXISTS {s}.concepts (name TEXT NOT NULL, model_id TEXT NOT NULL, "
                "vector BYTEA NOT NULL, with_examples INTEGER NOT NULL, without_examples INTEGER NOT NULL, "
                "train_accuracy DOUBLE PRECISION NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
                "PRIMARY KEY (name, model_id))"
            )

    def put(self, c: Concept) -> Concept:
        c = normalised(c)
        self._put(c)
        return c

    @_db
    def _put(self, c: Concept) -> None:
        self._q(
            "INSERT INTO {s}.concepts VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name, model_id) DO UPDATE "
            "SET vector = excluded.vector, with_examples = excluded.with_examples, "
            "without_examples = excluded.without_examples, train_accuracy = excluded.train_accuracy, "
            "created_at = excluded.created_at",
            (c.name, c.model_id, vector_bytes(c), c.with_examples, c.without_examples, c.train_accuracy, c.created_at),
        )

    @_db
    def get(self, name: str, model_id: str) -> Concept:
        row = self._q(
            "SELECT name, model_id, vector, with_examples, without_examples, train_accuracy, created_at "
            "FROM {s}.concepts WHERE name = %s AND model_id = %s",
            (name, model_id),
        ).fetchone()
        if not row:
            raise NotFound(f"no concept {name!r} for model {model_id}")
        return Concept(row[0], row[1], np.frombuffer(bytes(row[2]), np.float32), *row[3:])

    @_db
    def list(self, model_id: str) -> list[Concept]:
        rows = self._q(
            "SELECT name, model_id, with_examples, without_examples, train_accuracy, created_at "
            'FROM {s}.concepts WHERE model_id = %s ORDER BY name COLLATE "C"',
            (model_id,),
        ).fetchall()
        return [Concept(r[0], r[1], None, *r[2:]) for r in rows]

    @_db
    def delete(self, name: str, model_id: str) -> None:
        if not self._q("DELETE FROM {s}.concepts WHERE name = %s AND model_id = %s", (name, model_id)).rowcount:
            raise NotFound(f"no concept {name!r} for model {model_id}")
