"""The SQL of storage.Storage, written once for SQLite and PostgreSQL.

Both stores hold the same tables (sqlite_store.py and pg_store.py create
them) and run the same statements; a Dialect says what differs: the
placeholder, the schema prefix, how a metadata key=value, a metadata value
prefix and an id list are matched, and how metadata is stored. A store
supplies its connection (one call at a time, `_session`), its write
transaction (`_writing`, which also serialises commits) and its step of the
commit sequence (`_next_seq`).
Statements here use `?` for parameters and `{s}` before a table name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from smily.common import tenancy
from smily.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound

from .storage import DROP, SERVE, Commit, MetadataMatch, Slide, Tile, staged_rows, vectors_from

SLIDE_COLUMNS = "slide_id, source, metadata, tile_count, indexed_at, slide_mpp"
# Tiles read per step when replaying the commits after a sequence number.
REPLAY_CHUNK = 8192
# meta keys: "model_id"/"dim" name the serving model (as before models were many); every model held
# has "dim <model id>"; "models" marks a store whose tiles carry their model (done once, on open);
# "first_model" is the model it was first bound to (whose snapshots keep the index directory's top level).
DIM_OF = "dim "


@dataclass(frozen=True)
class Dialect:
    """What SQLite and PostgreSQL spell differently."""

    param: str  # the placeholder: "?" or "%s"
    prefix: str  # before a table name: "" or "shard_0."
    json_param: str  # a metadata value written: "?" (text) or "?::jsonb"
    text_order: str  # byte order of slide ids: "" (SQLite's default) or ' COLLATE "C"'
    in_ids: Callable[[str, list], tuple[str, list]]  # (column, values) -> (condition, args)
    has_pair: Callable[[str, str], tuple[str, list]]  # (key, value) -> condition on s.metadata, args
    # (keys, LIKE pattern with escape \\) -> condition on s.metadata: a value under a key matches, ASCII case ignored
    value_like: Callable[[list[str], str], tuple[str, list]]
    metadata: Callable[[Any], dict]  # the stored metadata column as a dict

    def sql(self, text: str) -> str:
        return text.format(s=self.prefix, json=self.json_param, text_order=self.text_order).replace("?", self.param)


def _missing(slide_key: str) -> NotFound:
    # Names the slide id alone: the tenant is the caller's own, and keys are the index's business.
    return NotFound(f"slide {tenancy.split(slide_key)[1]!r} is not in the index")


def _ids(rows) -> np.ndarray:
    return np.fromiter((r[0] for r in rows), np.int64)


class Sql:
    """Statements in a Dialect, on the connection a subclass supplies."""

    dialect: Dialect

    def _session(self) -> AbstractContextManager:
        """The connection, one call at a time."""
        raise NotImplementedError

    def _writing(self) -> AbstractContextManager:
        """A session in one write transaction."""
        raise NotImplementedError

    def _execute(self, sql: str, args=()) -> Any:
        """A cursor over the result of one statement, already in the dialect."""
        raise NotImplementedError

    def _execute_many(self, sql: str, rows: list) -> None:
        raise NotImplementedError

    def _x(self, sql: str, args=()) -> Any:
        return self._execute(self.dialect.sql(sql), args)

    def _x_many(self, sql: str, rows: list) -> None:
        if rows:
            self._execute_many(self.dialect.sql(sql), rows)


class Journal(Sql):
    """storage.Storage over a Dialect; see the module docstring for what a store supplies."""

    _dim: int = 0
    _model_id: str = ""

    # -- what a store supplies besides its connection ---------------------------
    def _lock_seq(self) -> None:
        """Inside _writing: wait for the other writers' commits, which go one at a time."""

    def _next_seq(self, slide_id: str, event: str = "") -> int:
        """Inside _writing, after _lock_seq: take the next commit sequence number for a change of this
        slide, or (slide "") for a model event ("serve <model>" or "drop <model>")."""
        raise NotImplementedError

    def _published(self, seq: int) -> None:
        """After a commit's transaction: `seq` is durable."""

    # -- rows -----------------------------------------------------------------
    def _slide(self, row) -> Slide:
        return Slide(row[0], row[1], self.dialect.metadata(row[2]), row[3], row[4], row[5])

    def _vectors(self, rows, model_id: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of (id, vector) rows of one model (none: the serving one); inside a session."""
        return _ids(rows), vectors_from([r[1] for r in rows], self._dim_of(model_id) if rows else 0)

    def _dim_of(self, model_id: str) -> int:
        """Inside a session: a held model's dimension (the serving one's for "")."""
        if not model_id:
            return self._d()
        row = self._x("SELECT value FROM {s}meta WHERE key = ?", (DIM_OF + model_id,)).fetchone()
        return int(row[0]) if row else 0

    def _meta(self) -> dict[str, str]:
        return dict(self._x("SELECT key, value FROM {s}meta").fetchall())

    def _d(self) -> int:
        """The bound dimension; another writer may have bound the store since this one read it."""
        if not self._dim:
            self._dim = int(self._meta().get("dim", 0))
        return self._dim

    # -- models ---------------------------------------------------------------
    def binding(self) -> tuple[str, int]:
        with self._session():
            meta = self._meta()
        self._model_id, self._dim = meta.get("model_id", ""), int(meta.get("dim", 0))
        return self._model_id, self._dim

    def bind(self, model_id: str, dim: int) -> tuple[str, int]:
        if not self._model_id:  # bound once: later writes skip the lock
            with self._writing():
                self._lock_seq()
                if not self._x("SELECT 1 FROM {s}meta WHERE key = 'model_id'").fetchone():
                    self._x(
                        "INSERT INTO {s}meta VALUES ('model_id', ?), ('dim', ?), (?, ?), ('first_model', ?)",
                        (model_id, str(dim), DIM_OF + model_id, str(dim), model_id),
                    )
        return self.binding()

    def adopt_models(self) -> None:
        """Once per store: tiles written before models were many belong to the model the store is bound to
        (their vectors stay where they are: no re-ingest)."""
        with self._writing():
            self._lock_seq()
            meta = self._meta()
            if "models" in meta:
                return
            if meta.get("model_id"):
                self._x("UPDATE {s}tiles SET model_id = ? WHERE model_id = ''", (meta["model_id"],))
                self._x(
                    "INSERT INTO {s}meta VALUES (?, ?), ('first_model', ?)",
                    (DIM_OF + meta["model_id"], meta["dim"], meta["model_id"]),
                )
            self._x("INSERT INTO {s}meta VALUES ('models', '1')")

    def first_model(self) -> str:
        with self._session():
            return self._meta().get("first_model", "")

    def models(self) -> dict[str, int]:
        with self._session():
            meta = self._meta()
        return {k[len(DIM_OF) :]: int(v) for k, v in meta.items() if k.startswith(DIM_OF)}

    def add_model(self, model_id: str, dim: int) -> int:
        with self._writing():
            self._lock_seq()
            self._x("INSERT INTO {s}meta VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (DIM_OF + model_id, str(dim)))
            return int(self._x("SELECT value FROM {s}meta WHERE key = ?", (DIM_OF + model_id,)).fetchone()[0])

    def model_counts(self) -> dict[str, int]:
        with self._session():
            rows = self._x("SELECT model_id, COUNT(*) FROM {s}tiles WHERE committed > 0 GROUP BY model_id").fetchall()
        return {m: n for m, n in rows}

    def _lacking(self, model_id: str) -> tuple[str, tuple]:
        """Inside a session: the condition on slides `s` that hold tiles of the serving model and none of
        `model_id` (what a cutover to it would miss), with its args."""
        cond = (
            "EXISTS (SELECT 1 FROM {s}tiles t WHERE t.slide_id = s.slide_id AND t.model_id = ? AND t.committed > 0) "
            "AND NOT EXISTS (SELECT 1 FROM {s}tiles t WHERE t.slide_id = s.slide_id AND t.model_id = ? "
            "AND t.committed > 0)"
        )
        return cond, (self._meta().get("model_id", ""), model_id)

    def lease(self, owner: str, lease_s: float, record: str) -> tuple[bool, str, bool]:
        """The migration lease: `owner` holds it for lease_s from now, with `record` (what the migration is;
        "" with lease_s 0 ends it), unless another owner holds it unexpired. Returns (granted, the record
        in force, whether its lease has expired). owner "" only reads it."""
        with self._writing():
            self._lock_seq()
            row = self._x("SELECT value FROM {s}meta WHERE key = 'migration'").fetchone()
            held: dict[str, Any] = json.loads(row[0]) if row else {"owner": "", "until": 0.0, "record": ""}
            now = time.time()
            expired = float(held["until"]) < now
            if not owner or not (held["owner"] in ("", owner) or expired):
                return False, str(held["record"]), expired
            if not record:
                self._x("DELETE FROM {s}meta WHERE key = 'migration'")
                return True, "", True
            value = json.dumps({"owner": owner, "until": now + lease_s, "record": record})
            self._x(
                "INSERT INTO {s}meta VALUES ('migration', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (value,),
            )
            return True, record, False

    def missing_slides(self, model_id: str, limit: int) -> tuple[list[str], int]:
        """Keys of up to `limit` slides with tiles of the serving model and none of `model_id`, and how many."""
        with self._session():
            cond, args = self._lacking(model_id)
            n = self._x(f"SELECT COUNT(*) FROM {{s}}slides s WHERE {cond}", args).fetchone()[0]
            rows = self._x(
                f"SELECT s.slide_id FROM {{s}}slides s WHERE {cond} ORDER BY s.slide_id{{text_order}} LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [r[0] for r in rows], n

    def _held_dim(self, model_id: str) -> int:
        """Inside _writing: the dimension of a held model; NOT_FOUND for one not held."""
        row = self._x("SELECT value FROM {s}meta WHERE key = ?", (DIM_OF + model_id,)).fetchone()
        if row is None:
            raise NotFound(f"this index holds no vectors of model {model_id}")
        return int(row[0])

    def serve(self, model_id: str) -> Commit:
        with self._writing():
            self._lock_seq()
            dim = self._held_dim(model_id)
            seq = self._next_seq("", f"{SERVE} {model_id}")
            self._set_serving(model_id, dim)
            commit = Commit(seq, None, [], event=SERVE, event_model=model_id)
        self._published(seq)
        self._model_id, self._dim = model_id, dim
        return commit

    def _set_serving(self, model_id: str, dim: int) -> None:
        self._x("UPDATE {s}meta SET value = ? WHERE key = 'model_id'", (model_id,))
        self._x("UPDATE {s}meta SET value = ? WHERE key = 'dim'", (str(dim),))

    def drop_model(self, model_id: str) -> Commit:
        with self._writing():
            self._lock_seq()
            self._held_dim(model_id)
            if model_id == self._meta().get("model_id"):
                raise FailedPrecondition(f"model {model_id} serves searches: cut over to another before dropping it")
            seq = self._next_seq("", f"{DROP} {model_id}")
            ids = self._drop_model(seq, model_id)
            commit = Commit(seq, None, ids, event=DROP, event_model=model_id)
        self._published(seq)
        return commit

    def _drop_model(self, seq: int, model_id: str) -> list[int]:
        """Inside _writing: forget a model's tiles (logged as removed at `seq`) and its dimension."""
        ids = self._drop_tiles("model_id = ?", (model_id,))
        self._journal_removal(seq, ids)
        self._x("DELETE FROM {s}meta WHERE key = ?", (DIM_OF + model_id,))
        return ids

    def tiling(self) -> str:
        with self._session():
            return self._meta().get("tiling", "")

    def record_tiling(self, record: str) -> str:
        # Serialised with the binding and commits: two first ingests with different
        # settings cannot both record theirs.
        with self._writing():
            self._lock_seq()
            self._x("INSERT INTO {s}meta VALUES ('tiling', ?) ON CONFLICT (key) DO NOTHING", (record,))
            return self._x("SELECT value FROM {s}meta WHERE key = 'tiling'").fetchone()[0]

    def adopt_untenanted(self, default_tenant: str, tables: tuple[str, ...] = ("slides", "tiles")) -> int:
        """Once per store: the slides of an index written before tenancy become `default_tenant`'s
        (their keys gain its prefix). Returns how many slides moved."""
        tenancy.tenant(default_tenant, "SMILY_DEFAULT_TENANT")
        with self._writing():
            self._lock_seq()
            if self._x("SELECT 1 FROM {s}meta WHERE key = 'tenancy'").fetchone():
                return 0
            moved = 0
            for table in tables:
                n = self._x(
                    f"UPDATE {{s}}{table} SET slide_id = ? || slide_id WHERE slide_id NOT LIKE ?",
                    (default_tenant + tenancy.SEP, f"%{tenancy.SEP}%"),
                ).rowcount
                moved = n if table == "slides" else moved
            self._x("INSERT INTO {s}meta VALUES ('tenancy', ?)", (default_tenant,))
            return moved

    # -- writes ---------------------------------------------------------------
    def drop_stale_staged(self, older_than: float) -> int:
        with self._session():
            return self._x("DELETE FROM {s}tiles WHERE committed = 0 AND staged_at < ?", (older_than,)).rowcount

    def stage(self, slide_id: str, generation: str, tiles: list[Tile], vectors: np.ndarray, model_id: str) -> int:
        rows = staged_rows(slide_id, generation, tiles, vectors, model_id)
        with self._writing():
            other = self._x(
                "SELECT model_id FROM {s}tiles WHERE slide_id = ? AND generation = ? AND model_id != ? LIMIT 1",
                (slide_id, generation, model_id),
            ).fetchone()
            if other is not None:
                raise InvalidArgument("this generation holds another model's tiles: each model needs its own")
            self._x_many(
                "INSERT INTO {s}tiles (slide_id, generation, x, y, w, h, mpp, tissue, staged_at, vector, model_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                rows,
            )
        return len(rows)

    def _put_slide(self, slide: Slide, generation: str) -> None:
        self._x(
            f"INSERT INTO {{s}}slides ({SLIDE_COLUMNS}, generation) VALUES (?, ?, {{json}}, ?, ?, ?, ?) "
            "ON CONFLICT (slide_id) DO UPDATE SET source = excluded.source, metadata = excluded.metadata, "
            "tile_count = excluded.tile_count, indexed_at = excluded.indexed_at, "
            "slide_mpp = excluded.slide_mpp, generation = excluded.generation",
            (
                slide.slide_id,
                slide.source,
                json.dumps(slide.metadata, sort_keys=True),
                slide.tile_count,
                slide.indexed_at,
                slide.slide_mpp,
                generation,
            ),
        )

    def _drop_tiles(self, where: str, args: tuple) -> list[int]:
        """Delete tiles; returns the ids of those that were published."""
        rows = self._x(f"DELETE FROM {{s}}tiles WHERE {where} RETURNING id, committed", args).fetchall()
        return sorted(r[0] for r in rows if r[1] > 0)

    def _journal_removal(self, seq: int, ids: list[int]) -> None:
        self._x_many("INSERT INTO {s}removed VALUES (?, ?)", [(seq, i) for i in ids])

    def commit_slide(self, generation: str, slide: Slide, expected_tiles: int, model_id: str) -> Commit:
        sid = slide.slide_id
        with self._writing():
            self._lock_seq()
            new = self._x(
                "SELECT id, vector FROM {s}tiles WHERE slide_id = ? AND generation = ? AND model_id = ? "
                "AND committed = 0 ORDER BY id",
                (sid, generation, model_id),
            ).fetchall()
            if not new:
                done = self._already_committed(sid, generation, expected_tiles, model_id)
                if done is not None:
                    return done
            if len(new) != expected_tiles:
                raise Aborted(
                    f"{len(new)} tiles staged for this ingest, {expected_tiles} expected: ingest the slide again"
                )
            serving = model_id == self._meta().get("model_id")
            row = self._x(f"SELECT {SLIDE_COLUMNS} FROM {{s}}slides WHERE slide_id = ?", (sid,)).fetchone()
            if not serving and row is None:
                # Another model's vectors follow the serving one's: never resurrect a deleted slide.
                self._drop_tiles("slide_id = ? AND generation = ?", (sid, generation))
                raise _missing(sid)
            seq = self._next_seq(sid)
            old = self._drop_tiles("slide_id = ? AND generation != ? AND model_id = ?", (sid, generation, model_id))
            self._x("UPDATE {s}tiles SET committed = ? WHERE slide_id = ? AND generation = ?", (seq, sid, generation))
            self._journal_removal(seq, old)
            if serving:
                slide.tile_count, slide.indexed_at = len(new), time.time()
                self._put_slide(slide, generation)
            else:
                slide = self._slide(row)  # the slide is the serving model's record; this adds vectors only
            commit = Commit(seq, slide, old, {model_id: self._vectors(new, model_id)})
        self._published(seq)
        return commit

    def _already_committed(self, slide_id: str, generation: str, expected_tiles: int, model_id: str) -> Commit | None:
        """The earlier commit of this very generation (a retried call), else None."""
        seq, n = self._x(
            "SELECT MAX(committed), COUNT(*) FROM {s}tiles WHERE slide_id = ? AND generation = ? AND model_id = ? "
            "AND committed > 0",
            (slide_id, generation, model_id),
        ).fetchone()
        row = self._x(f"SELECT {SLIDE_COLUMNS} FROM {{s}}slides WHERE slide_id = ?", (slide_id,)).fetchone()
        if row is None or not n or n != expected_tiles:
            return None
        return Commit(seq, self._slide(row), [])

    def delete_slide(self, slide_id: str) -> Commit:
        with self._writing():
            self._lock_seq()
            if not self._x("DELETE FROM {s}slides WHERE slide_id = ?", (slide_id,)).rowcount:
                raise _missing(slide_id)
            seq = self._next_seq(slide_id)
            ids = self._drop_tiles("slide_id = ?", (slide_id,))
            self._journal_removal(seq, ids)
            commit = Commit(seq, None, ids)
        self._published(seq)
        return commit

    # -- reads for a search index -----------------------------------------------
    def committed_count(self, model_id: str) -> int:
        with self._session():
            return self._x(
                "SELECT COUNT(*) FROM {s}tiles WHERE committed > 0 AND model_id = ?", (model_id,)
            ).fetchone()[0]

    def committed_ids(self, model_id: str) -> np.ndarray:
        with self._session():
            return _ids(self._x("SELECT id FROM {s}tiles WHERE committed > 0 AND model_id = ?", (model_id,)))

    def committed_chunk(self, after_id: int, limit: int, model_id: str) -> tuple[np.ndarray, np.ndarray]:
        return self._chunk(0, after_id, limit, model_id)

    def _chunk(self, seq: int, after_id: int, limit: int, model_id: str) -> tuple[np.ndarray, np.ndarray]:
        with self._session():
            rows = self._x(
                "SELECT id, vector FROM {s}tiles WHERE committed > ? AND model_id = ? AND id > ? ORDER BY id LIMIT ?",
                (seq, model_id, after_id, limit),
            ).fetchall()
            return self._vectors(rows, model_id)

    def added_after(self, seq: int, model_id: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        after = 0
        while True:
            ids, vecs = self._chunk(seq, after, REPLAY_CHUNK, model_id)
            if not len(ids):
                return
            after = int(ids[-1])
            yield ids, vecs

    def removed_after(self, seq: int) -> np.ndarray:
        with self._session():
            return _ids(self._x("SELECT tile_id FROM {s}removed WHERE seq > ?", (seq,)))

    def forget_removed(self, seq: int) -> None:
        with self._session():
            self._x("DELETE FROM {s}removed WHERE seq <= ?", (seq,))

    def vectors(self, ids, model_id: str) -> tuple[np.ndarray, np.ndarray]:
        cond, args = self.dialect.in_ids("id", [int(i) for i in ids])
        with self._session():
            return self._vectors(
                self._x(
                    f"SELECT id, vector FROM {{s}}tiles WHERE {cond} AND model_id = ? ORDER BY id", [*args, model_id]
                ).fetchall(),
                model_id,
            )

    @staticmethod
    def _tenant_condition(column: str, tenants) -> tuple[list[str], list]:
        """One condition: the key in `column` is in one of the tenants' key ranges (none: any tenant)."""
        if not tenants:
            return [], []
        ranges = [tenancy.key_range(t) for t in sorted(set(tenants))]
        cond = " OR ".join(f"({column}{{text_order}} >= ? AND {column}{{text_order}} < ?)" for _ in ranges)
        return [f"({cond})"], [bound for r in ranges for bound in r]

    def _slide_conditions(self, slide_ids, pairs: dict) -> tuple[list[str], list]:
        """One SQL condition per slide id list and per metadata key=value, with their args."""
        conds: list[str] = []
        args: list = []
        for cond, cond_args in [
            *([self.dialect.in_ids("s.slide_id", list(slide_ids))] if slide_ids else []),
            *(self.dialect.has_pair(key, value) for key, value in sorted(pairs.items())),
        ]:
            conds.append(cond)
            args += cond_args
        return conds, args

    def _tile_ids(self, conds: list[str], args: list, model_id: str) -> np.ndarray:
        with self._session():
            return _ids(
                self._x(
                    "SELECT t.id FROM {s}tiles t JOIN {s}slides s ON s.slide_id = t.slide_id "
                    f"WHERE {' AND '.join(['t.committed > 0 AND t.model_id = ?', *conds])}",
                    [model_id, *args],
                )
            )

    def select(
        self,
        slide_ids,
        filters: dict,
        exclude,
        exclude_filters: dict,
        mpp_range: tuple[float, float] | None = None,
        tenants=(),
        *,
        model_id: str,
    ) -> np.ndarray:
        conds, args = self._slide_conditions(slide_ids, filters)
        tenant_conds, tenant_args = self._tenant_condition("t.slide_id", tenants)
        conds, args = conds + tenant_conds, args + tenant_args
        if mpp_range is not None:
            conds.append("t.mpp >= ? AND t.mpp < ?")
            args += list(mpp_range)
        excluded, excluded_args = self._slide_conditions(exclude, exclude_filters)
        if excluded:
            conds.append(f"NOT ({' OR '.join(excluded)})")
            args += excluded_args
        return self._tile_ids(conds, args, model_id)

    def excluded(self, exclude, exclude_filters: dict, model_id: str) -> np.ndarray:
        conds, args = self._slide_conditions(exclude, exclude_filters)
        return self._tile_ids([f"({' OR '.join(conds)})"], args, model_id)

    def records(self, ids) -> dict[int, tuple[str, Tile, dict]]:
        cond, args = self.dialect.in_ids("t.id", [int(i) for i in ids])
        with self._session():
            rows = self._x(
                "SELECT t.id, t.slide_id, t.x, t.y, t.w, t.h, t.mpp, t.tissue, s.metadata "
                f"FROM {{s}}tiles t JOIN {{s}}slides s ON s.slide_id = t.slide_id WHERE {cond}",
                args,
            ).fetchall()
        return {r[0]: (r[1], Tile(*r[2:8]), self.dialect.metadata(r[8])) for r in rows}

    # -- slides -----------------------------------------------------------------
    def get_slide(self, slide_id: str) -> Slide:
        with self._session():
            row = self._x(f"SELECT {SLIDE_COLUMNS} FROM {{s}}slides WHERE slide_id = ?", (slide_id,)).fetchone()
        if not row:
            raise _missing(slide_id)
        return self._slide(row)

    def list_slides(
        self, after: str, limit: int, tenants=(), match: MetadataMatch | None = None, lacking: str = ""
    ) -> list[Slide]:
        conds, args = self._tenant_condition("slide_id", tenants)
        if match is not None:
            cond, match_args = self.dialect.value_like(list(match.keys), match.like())
            conds, args = [*conds, cond], [*args, *match_args]
        with self._session():
            if lacking:
                cond, lacking_args = self._lacking(lacking)
                conds, args = [*conds, cond], [*args, *lacking_args]
            rows = self._x(
                f"SELECT {SLIDE_COLUMNS} FROM {{s}}slides s "
                f"WHERE {' AND '.join(['slide_id{text_order} > ?', *conds])} "
                "ORDER BY slide_id{text_order} LIMIT ?",
                (after, *args, limit),
            ).fetchall()
        return [self._slide(r) for r in rows]

    def slide_count(self) -> int:
        with self._session():
            return self._x("SELECT COUNT(*) FROM {s}slides").fetchone()[0]

    def tenant_counts(self, tenants, model_id: str) -> tuple[int, int]:
        slides, slide_args = self._tenant_condition("slide_id", tenants)
        tiles, tile_args = self._tenant_condition("slide_id", tenants)
        with self._session():
            n_slides = self._x(f"SELECT COUNT(*) FROM {{s}}slides WHERE {slides[0]}", slide_args).fetchone()[0]
            n_tiles = self._x(
                f"SELECT COUNT(*) FROM {{s}}tiles WHERE committed > 0 AND model_id = ? AND {tiles[0]}",
                [model_id, *tile_args],
            ).fetchone()[0]
        return n_tiles, n_slides
