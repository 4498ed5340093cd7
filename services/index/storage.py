"""The index's system of record, behind one small interface.

A Storage holds, durably, what a shard serves (slides keyed by
smily.common.tenancy.key, "tenant/slide id"): the models it holds and the
one serving searches, slides, tiles staged per (model, ingest generation) and
published by a commit, and the commit sequence. Every tile row carries the
model that embedded it: a slide has one published generation per model, so
a migration writes a second model's vectors beside the serving one's.
Every commit, delete, switch of the serving model or drop of a model takes
the next sequence number (so every replica switches at the same one);
published tiles carry it, and tile ids removed from the search are logged
with it, so an in-memory index that holds the state at sequence s catches up
by replaying what came after s. Tile ids are never reused.

Implementations, both on the SQL of journal.Journal: sqlite_store.SqliteStorage
(one machine, the default, and a serving replica's local copy) and
pg_store.PgStorage (the cluster's system of record, one schema per shard).
The in-memory FAISS index (faiss_index.TileIndex) talks to storage only
through this interface.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

# Staged tiles never committed are dropped after this long (an abandoned ingest).
STALE_STAGED_S = 24 * 3600
# Ids per query when reading tiles by id.
SQL_CHUNK = 500
# How a tile's vector is stored: float16, the re-rank's form (recall@10 0.9993 vs float32's 1.0, docs/benchmarks.md).
STORED = np.float16
STORED_BYTES = 2


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


@dataclass(frozen=True)
class MetadataMatch:
    """Find slides by metadata: a value under one of `keys` starts with `prefix`, ASCII case ignored."""

    keys: tuple[str, ...]
    prefix: str

    def like(self) -> str:
        """The prefix as a LIKE pattern (escape character \\), in lower case as the SQL compares."""
        text = self.prefix.translate(_ASCII_LOWER)
        return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


SERVE = "serve"  # a Commit's event: `event_model` serves searches from here on
DROP = "drop"  # a Commit's event: `event_model`'s vectors are gone (in `removed`)


@dataclass
class Commit:
    """What one commit, delete or model event changed: the search must drop `removed` and add
    `added`, (ids, vectors) per model."""

    seq: int
    slide: Slide | None
    removed: list[int]
    added: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    event: str = ""  # "", SERVE or DROP
    event_model: str = ""


def vectors_from(blobs, dim: int) -> np.ndarray:
    """float32 [n, dim] from stored vectors: float16 (written since 0.x) or float32 (older stores,
    read as they are: no re-ingest), told apart by their size."""
    sizes = {len(b) for b in blobs}
    if sizes <= {dim * STORED_BYTES}:
        return np.frombuffer(b"".join(blobs), STORED).reshape(len(blobs), dim).astype(np.float32)
    if sizes <= {dim * 4}:
        return np.frombuffer(b"".join(blobs), np.float32).reshape(len(blobs), dim)
    if sizes <= {dim * STORED_BYTES, dim * 4}:
        return np.stack([vectors_from([b], dim)[0] for b in blobs])
    raise RuntimeError("the journal holds a vector of the wrong size: the database is corrupt")


def vector_bytes(vector: np.ndarray) -> bytes:
    """A vector as the stores hold it: float16, the form the re-rank needs, half of float32."""
    return np.ascontiguousarray(vector, STORED).tobytes()


def staged_rows(slide_id: str, generation: str, tiles: list[Tile], vectors: np.ndarray, model_id: str) -> list[tuple]:
    """The tiles table's columns of a staged batch, in both stores' order: slide, generation,
    x, y, w, h, mpp, tissue, staged_at, vector bytes, model."""
    now = time.time()
    return [
        (slide_id, generation, t.x, t.y, t.w, t.h, t.mpp, t.tissue, now, vector_bytes(v), model_id)
        for t, v in zip(tiles, vectors)
    ]


class Storage(Protocol):
    """Durable record of one shard. Every method is thread-safe and each write is one transaction."""

    def binding(self) -> tuple[str, int]:
        """(model_id, dim) of the model serving searches; ("", 0) before the first write."""

    def bind(self, model_id: str, dim: int) -> tuple[str, int]:
        """Bind to a model if unbound; returns the binding in force (which may be another model's)."""

    def first_model(self) -> str:
        """The model the store was first bound to; "" before the first write."""

    def models(self) -> dict[str, int]:
        """Every model the store holds vectors of (or is ready to), and its dimension."""

    def add_model(self, model_id: str, dim: int) -> int:
        """Hold a model beside the serving one (a migration's target); returns its dimension in force."""

    def model_counts(self) -> dict[str, int]:
        """Published tiles per model."""

    def lease(self, owner: str, lease_s: float, record: str) -> tuple[bool, str, bool]:
        """The migration lease (a gateway's, so another resumes the migration if it dies): see journal.py."""

    def missing_slides(self, model_id: str, limit: int) -> tuple[list[str], int]:
        """Keys of up to `limit` slides with tiles of the serving model and none of `model_id`, and how many."""

    def serve(self, model_id: str) -> Commit:
        """Make a held model the one serving searches: a journal entry of its own."""

    def drop_model(self, model_id: str) -> Commit:
        """Forget a model and its vectors (never the serving one): a journal entry of its own."""

    def tiling(self) -> str:
        """The tiling record (smily.common.tiling.Tiling as JSON); "" before the first write."""

    def record_tiling(self, record: str) -> str:
        """Record the tiling if none is; returns the record in force (which may be another's)."""

    def seq(self) -> int:
        """The last commit sequence number."""

    def drop_stale_staged(self, older_than: float) -> int:
        """Forget staged tiles of ingests abandoned before this time; returns how many."""

    def stage(self, slide_id: str, generation: str, tiles: list[Tile], vectors: np.ndarray, model_id: str) -> int:
        """Stage tiles of one ingest generation of a model; a retried batch is ignored, not duplicated."""

    def commit_slide(self, generation: str, slide: Slide, expected_tiles: int, model_id: str) -> Commit:
        """Publish a generation in place of the slide's earlier ones of the same model, in one transaction.
        A model other than the serving one only adds vectors to a slide that is there.

        Raises Aborted unless exactly `expected_tiles` are staged. Committing a
        generation that is already the slide's committed one is success: it
        returns that commit's sequence with nothing to change (a retried call).
        """

    def delete_slide(self, slide_id: str) -> Commit:
        """Drop a slide and its tiles; raises NotFound when it is not there."""

    def committed_count(self, model_id: str) -> int:
        """Published tiles of a model."""

    def committed_ids(self, model_id: str) -> np.ndarray:
        """Ids of every published tile of a model."""

    def committed_chunk(self, after_id: int, limit: int, model_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of up to `limit` published tiles of a model with id > after_id, in id order."""

    def added_after(self, seq: int, model_id: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) chunks of a model's tiles published by commits after `seq`."""

    def removed_after(self, seq: int) -> np.ndarray:
        """Ids dropped from the search by commits and deletes after `seq`."""

    def forget_removed(self, seq: int) -> None:
        """A snapshot holds the state at `seq`: the removals up to it are no longer needed."""

    def vectors(self, ids, model_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of these published tiles of a model, in id order (SQL_CHUNK ids at most)."""

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
        """Ids of a model's published tiles of the slides matching every filter (metadata key=value) and no
        exclusion, with mpp in [lo, hi) when a range is given, of these tenants when any are named."""

    def excluded(self, exclude, exclude_filters: dict, model_id: str) -> np.ndarray:
        """Ids of a model's published tiles of slides left out by id or by any metadata key=value."""

    def records(self, ids) -> dict[int, tuple[str, Tile, dict]]:
        """For these tile ids: (slide id, tile, slide metadata)."""

    def get_slide(self, slide_id: str) -> Slide:
        """Raises NotFound when the slide is not there."""

    def list_slides(
        self, after: str, limit: int, tenants=(), match: MetadataMatch | None = None, lacking: str = ""
    ) -> list[Slide]:
        """Up to `limit` slides with key > after, in key order, of these tenants when any are named,
        matching `match` when given; with `lacking`, only those with tiles of the serving model and
        none of that model (a migration's work)."""

    def adopt_untenanted(self, default_tenant: str) -> int:
        """Once per store: slides written before tenancy become the default tenant's."""

    def slide_count(self) -> int: ...

    def tenant_counts(self, tenants, model_id: str) -> tuple[int, int]:
        """(published tiles of a model, slides) of these tenants (at least one)."""

    def close(self) -> None: ...
