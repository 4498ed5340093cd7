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
from smily.common.errors import Aborted, NotFound

from .storage import Commit, MetadataMatch, Slide, Tile, staged_rows, vectors_from

SLIDE_COLUMNS = "slide_id, source, metadata, tile_count, indexed_at, slide_mpp"
# Tiles read per step when replaying the commits after a sequence number.
REPLAY_CHUNK = 8192


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

    def _next_seq(self, slide_id: str) -> int:
        """Inside _writing, after _lock_seq: take the next commit sequence number for a change of this slide."""
        raise NotImplementedError

    def _published(self, seq: int) -> None:
        """After a commit's transaction: `seq` is durable."""

    # -- rows -----------------------------------------------------------------
    def _slide(self, row) -> Slide:
        return Slide(row[0], row[1], self.dialect.metadata(row[2]), row[3], row[4], row[5])

    def _vectors(self, rows) -> tuple[np.ndarray, np.ndarray]:
        return _ids(rows), vectors_from([r[1] for r in rows], self._d())

    def _meta(self) -> dict[str, str]:
        return dict(self._x("SELECT key, value FROM {s}meta").fetchall())

    def _d(self) -> int:
        """The bound dimension; another writer may have bound the store since this one read it."""
        if not self._dim:
            self._dim = int(self._meta().get("dim", 0))
        return self._dim

    # -- binding --------------------------------------------------------------
    def binding(self) -> tuple[str, int]:
        with self._session():
            meta = self._meta()
        self._model_id, self._dim = meta.get("model_id", ""), int(meta.get("dim", 0))
        return self._model_id, self._dim

    def bind(self, model_id: str, dim: int) -> tuple[str, int]:
        if not self._model_id:  # bound once, for good: later writes skip the lock
            with self._writing():
                self._lock_seq()
                if not self._x("SELECT 1 FROM {s}meta WHERE key = 'model_id'").fetchone():
                    self._x("INSERT INTO {s}meta VALUES ('model_id', ?), ('dim', ?)", (model_id, str(dim)))
        return self.binding()

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

    def stage(self, slide_id: str, generation: str, tiles: list[Tile], vectors: np.ndarray) -> int:
        rows = staged_rows(slide_id, generation, tiles, vectors)
        with self._writing():
            self._x_many(
                "INSERT INTO {s}tiles (slide_id, generation, x, y, w, h, mpp, tissue, staged_at, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
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

    def commit_slide(self, generation: str, slide: Slide, expected_tiles: int) -> Commit:
        sid = slide.slide_id
        with self._writing():
            self._lock_seq()
            new = self._x(
                "SELECT id, vector FROM {s}tiles WHERE slide_id = ? AND generation = ? AND committed = 0 ORDER BY id",
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
            old = self._drop_tiles("slide_id = ? AND generation != ?", (sid, generation))
            self._x("UPDATE {s}tiles SET committed = ? WHERE slide_id = ? AND generation = ?", (seq, sid, generation))
            self._journal_removal(seq, old)
            slide.tile_count, slide.indexed_at = len(new), time.time()
            self._put_slide(slide, generation)
            commit = Commit(seq, slide, *self._vectors(new), old)
        self._published(seq)
        return commit

    def _already_committed(self, slide_id: str, generation: str, expected_tiles: int) -> Commit | None:
        """The earlier commit of this very generation (a retried call), else None."""
        row = self._x(
            f"SELECT {SLIDE_COLUMNS} FROM {{s}}slides WHERE slide_id = ? AND generation = ?", (slide_id, generation)
        ).fetchone()
        if row is None or row[3] != expected_tiles:
            return None
        seq = self._x("SELECT MAX(committed) FROM {s}tiles WHERE slide_id = ?", (slide_id,)).fetchone()[0]
        return Commit(seq or 0, self._slide(row), *self._vectors([]), [])

    def delete_slide(self, slide_id: str) -> Commit:
        with self._writing():
            self._lock_seq()
            if not self._x("DELETE FROM {s}slides WHERE slide_id = ?", (slide_id,)).rowcount:
                raise _missing(slide_id)
            seq = self._next_seq(slide_id)
            ids = self._drop_tiles("slide_id = ?", (slide_id,))
            self._journal_removal(seq, ids)
            commit = Commit(seq, None, *self._vectors([]), ids)
        self._published(seq)
        return commit

    # -- reads for a search index -----------------------------------------------
    def committed_count(self) -> int:
        with self._session():
            return self._x("SELECT COUNT(*) FROM {s}tiles WHERE committed > 0").fetchone()[0]

    def committed_ids(self) -> np.ndarray:
        with self._session():
            return _ids(self._x("SELECT id FROM {s}tiles WHERE committed > 0"))

    def committed_chunk(self, after_id: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        return self._chunk(0, after_id, limit)

    def _chunk(self, seq: int, after_id: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        with self._session():
            rows = self._x(
                "SELECT id, vector FROM {s}tiles WHERE committed > ? AND id > ? ORDER BY id LIMIT ?",
                (seq, after_id, limit),
            ).fetchall()
            return self._vectors(rows)

    def added_after(self, seq: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        after = 0
        while True:
            ids, vecs = self._chunk(seq, after, REPLAY_CHUNK)
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

    def vectors(self, ids) -> tuple[np.ndarray, np.ndarray]:
        cond, args = self.dialect.in_ids("id", [int(i) for i in ids])
        with self._session():
            return self._vectors(
                self._x(f"SELECT id, vector FROM {{s}}tiles WHERE {cond} ORDER BY id", args).fetchall()
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

    def _tile_ids(self, conds: list[str], args: list) -> np.ndarray:
        with self._session():
            return _ids(
                self._x(
                    "SELECT t.id FROM {s}tiles t JOIN {s}slides s ON s.slide_id = t.slide_id "
                    f"WHERE {' AND '.join(['t.committed > 0', *conds])}",
                    args,
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
        return self._tile_ids(conds, args)

    def excluded(self, exclude, exclude_filters: dict) -> np.ndarray:
        conds, args = self._slide_conditions(exclude, exclude_filters)
        return self._tile_ids([f"({' OR '.join(conds)})"], args)

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

    def list_slides(self, after: str, limit: int, tenants=(), match: MetadataMatch | None = None) -> list[Slide]:
        conds, args = self._tenant_condition("slide_id", tenants)
        if match is not None:
            cond, match_args = self.dialect.value_like(list(match.keys), match.like())
            conds, args = [*conds, cond], [*args, *match_args]
        with self._session():
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

    def tenant_counts(self, tenants) -> tuple[int, int]:
        slides, slide_args = self._tenant_condition("slide_id", tenants)
        tiles, tile_args = self._tenant_condition("slide_id", tenants)
        with self._session():
            n_slides = self._x(f"SELECT COUNT(*) FROM {{s}}slides WHERE {slides[0]}", slide_args).fetchone()[0]
            n_tiles = self._x(
                f"SELECT COUNT(*) FROM {{s}}tiles WHERE committed > 0 AND {tiles[0]}", tile_args
            ).fetchone()[0]
        return n_tiles, n_slides
