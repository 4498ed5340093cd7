"""The one face of a shard's index, whichever process holds its record.

A ShardIndex is what the servicer calls: faiss_index.TileIndex (one
machine: the search over its own SQLite record) and replica.Replica (a
serving replica: writes to PostgreSQL, searches its local copy) both are
one. Stages and searches travel as values (TileBatch, Query), so the two
and this Protocol name their fields once. Slides are named by their key,
smily.common.tenancy.key(tenant, slide id); the servicer makes and splits keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from smily.common.tiling import Tiling

from .storage import MetadataMatch, Slide, Tile


@dataclass(frozen=True)
class TileBatch:
    """Tiles of one ingest generation of a slide and their embeddings, [len(tiles), dim].
    `tiling` (how they were cut) is recorded by the index's first write and checked after.
    A model the index does not hold is refused unless `register_model` (a migration adds it)."""

    model_id: str
    slide_id: str
    generation: str
    vectors: np.ndarray
    tiles: list[Tile]
    tiling: Tiling | None = None
    register_model: bool = False


@dataclass(frozen=True)
class Query:
    """Top-k tiles near `vector`. slide_ids / filters (metadata key=value, all must hold) /
    exclude_slide_ids / exclude_filters (metadata key=value, any drops the slide) / mpp (tiles
    at that indexed resolution) restrict the search; nprobe 0 is the index's default. A stated
    `tiling` must be the index's record."""

    model_id: str
    vector: np.ndarray
    k: int
    exclude_slide_ids: Sequence[str] = ()
    slide_ids: Sequence[str] = ()
    filters: Mapping[str, str] = field(default_factory=dict)
    nprobe: int = 0
    exclude_filters: Mapping[str, str] = field(default_factory=dict)
    tiling: Tiling | None = None
    mpp: float = 0.0
    # Only slides of these tenants (empty: every tenant); slide ids here are index keys (tenancy.key).
    tenants: Sequence[str] = ()


@dataclass
class Hit:
    slide_id: str
    tile: Tile
    score: float
    metadata: dict


@dataclass(frozen=True)
class IndexInfo:
    """How the index searches and how far it holds the journal (from journal_seq on, faiss_index.IndexState)."""

    journal_seq: int
    nlist: int
    nprobe: int
    factory: str
    train_vectors: int
    train_seconds: float
    snapshot_seq: int
    removed_since_compaction: int
    load_report: str


class ShardIndex(Protocol):
    """A shard's index as the servicer uses it; every method is thread-safe."""

    @property
    def model_id(self) -> str:
        """The model serving searches; "" before the first write."""

    @property
    def dim(self) -> int: ...

    @property
    def tiling(self) -> Tiling | None:
        """How its tiles were cut; None before the first write (or for an index older than records)."""

    def stage(self, batch: TileBatch) -> int:
        """Stage a batch; a retried one is ignored, not duplicated. Returns how many tiles it holds."""

    def commit_slide(self, model_id: str, generation: str, slide: Slide, expected_tiles: int) -> tuple[Slide, int]:
        """Publish a staged generation in place of the slide's earlier one; (the slide, tiles replaced)."""

    def delete_slide(self, slide_id: str) -> int:
        """Drop a slide; returns how many tiles went. NotFound when it is not there."""

    def search(self, query: Query) -> list[Hit]:
        """Hits among the tiles of the query's model (any model held; one model per search)."""

    def serve(self, model_id: str) -> int:
        """Make a held model the serving one at the next journal sequence number, which it returns."""

    def drop_model(self, model_id: str) -> int:
        """Forget a model other than the serving one and its vectors; returns how many tiles went."""

    def models(self) -> dict[str, tuple[int, int]]:
        """(dimension, tiles searched) of every model held."""

    def lease(self, owner: str, lease_s: float, record: str) -> tuple[bool, str, bool]:
        """The migration lease in the system of record: (granted, record in force, expired)."""

    def missing_slides(self, model_id: str, limit: int) -> tuple[list[str], int]:
        """Keys of up to `limit` slides the serving model holds tiles of and `model_id` none, and how many."""

    def get_slide(self, slide_id: str) -> Slide: ...

    def list_slides(
        self,
        page_size: int,
        page_token: str,
        tenants: Sequence[str] = (),
        match: MetadataMatch | None = None,
        lacking: str = "",
    ) -> tuple[list[Slide], str]:
        """A page of slides (of these tenants; none named: all; matching `match` when given) in key
        order and the next page's token ("" after the last); with `lacking`, only slides the serving
        model holds tiles of and it none."""

    def slide_tiles(self, slide_id: str, after: int, limit: int) -> tuple[np.ndarray, list[Tile], np.ndarray]:
        """Up to `limit` published tiles of a slide with tile id > after, in id order:
        (ids, tiles, embeddings [n, dim])."""

    def add_model(self, model_id: str, dim: int) -> None:
        """Hold a model beside the serving one, before any of its tiles (a migration's start)."""

    def counts(self, tenants: Sequence[str] = ()) -> tuple[int, int]:
        """(tiles searched, slides), of these tenants when any are named."""

    def info(self) -> IndexInfo: ...

    def close(self) -> None: ...
