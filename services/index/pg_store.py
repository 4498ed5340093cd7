"""PostgreSQL storage: the cluster's system of record, one schema per shard.

The same tables as SQLite (storage.py says what they mean) plus `commits`,
one row per commit or delete naming its slide (or, slide "", a model event:
"serve M" or "drop M"), which the serving replicas follow by sequence. Commits take the next sequence number by updating the
shard's one `seq` row: its row lock serialises them, so sequence order is
commit order and a replica reading "commits after s" never misses one that
commits later with a smaller number. A lost connection is UNAVAILABLE and
is reopened on the next call.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from dataclasses import dataclass

import psycopg

from smily.common.errors import INDEX_DATABASE_UNREACHABLE, Unavailable

from .concepts import ConceptTable
from .journal import SLIDE_COLUMNS, Dialect, Journal, Sql
from .operations import OperationTable
from .storage import Slide, Tile

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
ALTER TABLE {s}.tiles ADD COLUMN IF NOT EXISTS model_id TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS tiles_by_model ON {s}.tiles (model_id, committed);
ALTER TABLE {s}.commits ADD COLUMN IF NOT EXISTS event TEXT NOT NULL DEFAULT '';
"""
TILE_COLUMNS = "id, model_id, generation, x, y, w, h, mpp, tissue, vector"
# Lock key under which schemas are created: replicas starting together would race on CREATE SCHEMA.
SCHEMA_LOCK = 0x5311_7001


def schema(shard: int) -> str:
    return f"shard_{int(shard)}"


@dataclass
class SlideState:
    """A slide as the store holds it after commit `seq`: None when deleted; rows are (id, model id, generation,
    Tile, vector) of every model. A model event (storage.SERVE or DROP of `event_model`) has no slide."""

    seq: int
    slide_id: str
    slide: Slide | None
    generation: str
    rows: list
    event: str = ""
    event_model: str = ""


def _in_ids(column: str, values: list) -> tuple[str, list]:
    return f"{column} = ANY(?)", [values]


def _has_pair(key: str, value: str) -> tuple[str, list]:
    return "s.metadata @> ?::jsonb", [json.dumps({key: value})]


def _value_like(keys: list, pattern: str) -> tuple[str, list]:
    # lower() under the "C" collation folds ASCII letters only, as SQLite's does and the pattern is.
    return (
        "EXISTS (SELECT 1 FROM jsonb_each_text(s.metadata) j WHERE j.key = ANY(?) "
        "AND lower(j.value COLLATE \"C\") LIKE ? ESCAPE '\\')",
        [keys, pattern],
    )


def dialect(shard: int) -> Dialect:
    # JSONB reads back as a dict already.
    return Dialect("%s", f"{schema(shard)}.", "?::jsonb", ' COLLATE "C"', _in_ids, _has_pair, _value_like, dict)


class _OnSchema(Sql):
    """One connection to a shard's schema, used one call at a time (`_session` opens and reopens it)."""

    def __init__(self, url: str, shard: int, connect_timeout_s: float):
        self._url, self._timeout = url, connect_timeout_s
        self.s = schema(shard)
        self.dialect = dialect(shard)
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None

    @contextlib.contextmanager
    def _session(self):
        """One call at a time on the connection, reopened after a failure; a lost database is UNAVAILABLE."""
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=max(1, int(self._timeout)))
                yield
            except psycopg.OperationalError:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                raise Unavailable(INDEX_DATABASE_UNREACHABLE) from None

    @contextlib.contextmanager
    def _writing(self):
        with self._session(), self.conn.transaction():
            yield

    def _execute(self, sql: str, args=()):
        return self.conn.execute(sql, args)

    def _execute_many(self, sql: str, rows: list) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql, rows)

    @property
    def conn(self) -> psycopg.Connection:
        assert self._conn is not None, "only used in a _session, which opens it"
        return self._conn

    def _q(self, sql: str, args=()):
        return self.conn.execute(sql.format(s=self.s), args)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _db(method):
    """The method in one _session."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._session():
            return method(self, *args, **kwargs)

    return call


class PgStorage(_OnSchema, Journal):
    """storage.Storage on shard `shard`'s schema of a PostgreSQL database."""

    def __init__(self, url: str, shard: int = 0, connect_timeout_s: float = 5.0):
        super().__init__(url, shard, connect_timeout_s)
        self._create()
        self.adopt_models()
        self.binding()

    @_db
    def _create(self) -> None:
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in SCHEMA.format(s=self.s).split(";"):
                if statement.strip():
                    self.conn.execute(statement)

    def adopt_untenanted(self, default_tenant: str, tables: tuple[str, ...] = ("slides", "tiles", "commits")) -> int:
        # The commit log names slides too: replicas follow it by key.
        return super().adopt_untenanted(default_tenant, tables)

    # -- Journal's hooks ----------------------------------------------------
    def _lock_seq(self) -> None:
        # The seq row's lock: sequence order is commit order (see the module docstring).
        self._q("SELECT value FROM {s}.seq FOR UPDATE")

    def _next_seq(self, slide_id: str, event: str = "") -> int:
        seq = self._q("UPDATE {s}.seq SET value = value + 1 RETURNING value").fetchone()[0]
        self._q("INSERT INTO {s}.commits (seq, slide_id, event) VALUES (%s, %s, %s)", (seq, slide_id, event))
        return seq

    @_db
    def seq(self) -> int:
        return self._q("SELECT value FROM {s}.seq").fetchone()[0]

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
        ordered by its last commit's sequence; read in one snapshot of the database. A model event
        comes alone, after the slides before it: it is applied at its own sequence number."""
        with self.conn.transaction():
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            commits = self._q(
                "SELECT seq, slide_id, event FROM {s}.commits WHERE seq > %s ORDER BY seq LIMIT %s", (seq, limit)
            ).fetchall()
            events = [i for i, c in enumerate(commits) if c[2]]
            if events and events[0] == 0:
                event, model = commits[0][2].split(" ", 1)
                return [SlideState(commits[0][0], "", None, "", [], event, model)]
            last = {sid: s for s, sid, _ in commits[: events[0] if events else len(commits)]}
            states = []
            for sid, s in sorted(last.items(), key=lambda kv: kv[1]):
                row = self._q(
                    f"SELECT {SLIDE_COLUMNS}, generation FROM {{s}}.slides WHERE slide_id = %s", (sid,)
                ).fetchone()
                rows = (
                    []
                    if row is None
                    else [
                        (r[0], r[1], r[2], Tile(*r[3:9]), bytes(r[9]))
                        for r in self._q(
                            f"SELECT {TILE_COLUMNS} FROM {{s}}.tiles WHERE slide_id = %s AND committed > 0 ORDER BY id",
                            (sid,),
                        )
                    ]
                )
                states.append(
                    SlideState(s, sid, None if row is None else self._slide(row), "" if row is None else row[6], rows)
                )
        return states


class PgConcepts(_OnSchema, ConceptTable):
    """concepts.ConceptStore on the shard's schema, so every replica reads the same concepts."""

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
            self._q(
                "CREATE TABLE IF NOT EXISTS {s}.concept_examples (name TEXT NOT NULL, position INTEGER NOT NULL, "
                "positive INTEGER NOT NULL, region BYTEA, image_sha256 TEXT, PRIMARY KEY (name, position))"
            )
            self._q("CREATE TABLE IF NOT EXISTS {s}.concept_patches (sha256 TEXT PRIMARY KEY, data BYTEA NOT NULL)")


class PgOperations(_OnSchema, OperationTable):
    """operations.OperationTable on the shard's schema (the first shard's holds them all), so every
    replica, and through it every gateway, reads the same records."""

    def __init__(self, url: str, shard: int = 0):
        super().__init__(url, shard, 5.0)
        self._create()

    @_db
    def _create(self) -> None:
        with self.conn.transaction():  # under the schema lock, as PgConcepts' tables
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            self._q(
                "CREATE TABLE IF NOT EXISTS {s}.operations (operation_id TEXT PRIMARY KEY, record BYTEA NOT NULL, "
                "cancel BYTEA NOT NULL, expires_at DOUBLE PRECISION NOT NULL)"
            )
            self._q("CREATE INDEX IF NOT EXISTS operations_by_expiry ON {s}.operations (expires_at)")
