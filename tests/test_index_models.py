"""Several models in one index (a migration's target beside the serving model), over SQLite and
PostgreSQL: vectors per (model, tile), one FAISS index per model, the serving model switched by a
journal entry that replicas apply at the same sequence number, drop refused for the serving model,
and a store written when an index held one model adopted without re-ingest."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from smily.common.errors import FailedPrecondition, NotFound
from smily.index.faiss_index import IndexConfig, TileIndex
from smily.index.pg_store import PgStorage
from smily.index.replica import Replica
from smily.index.shard import Query, TileBatch
from smily.index.storage import Slide, Tile, vector_bytes

from .helpers.pg import fresh_database, postgres  # noqa: F401 (fixture)
from .helpers.wait import wait_until

OLD, NEW = "m/1", "m/1-int8"


@pytest.fixture(params=["sqlite", "postgres"])
def make(request, tmp_path):
    url = fresh_database(request.getfixturevalue("postgres")) if request.param == "postgres" else ""
    return lambda: TileIndex(str(tmp_path), IndexConfig(snapshot_interval_s=0), PgStorage(url) if url else None)


def vecs(n, dim, seed):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def tiles(n):
    return [Tile(i * 10, 0, 10, 10, 1.0, 0.9) for i in range(n)]


def put(store, model, slide_id, vectors, generation, register=False):
    store.stage(TileBatch(model, slide_id, generation, vectors, tiles(len(vectors)), register_model=register))
    return store.commit_slide(model, generation, Slide(slide_id, f"{slide_id}.svs", {"k": slide_id}), len(vectors))


def test_two_models_side_by_side_then_cutover_rollback_and_drop(make):
    store = make()
    old = {s: vecs(4, 8, seed) for seed, s in enumerate("ab")}
    new = {s: vecs(4, 6, 10 + seed) for seed, s in enumerate("ab")}  # another dimension too
    for s in "ab":
        put(store, OLD, s, old[s], f"g-{s}")
    # Another model's tiles are refused unless a migration registers it.
    with pytest.raises(FailedPrecondition):
        put(store, NEW, "a", new["a"], "n-a")
    put(store, NEW, "a", new["a"], "n-a", register=True)
    assert store.missing_slides(NEW, 10) == (["b"], 1)  # what a cutover now would miss
    put(store, NEW, "b", new["b"], "n-b")  # held now: no flag needed
    assert store.models() == {OLD: (8, 8), NEW: (6, 8)}
    # Each model's search is its own: a query of either model finds its own vectors alone.
    hit = store.search(Query(OLD, old["b"][2], 1))[0]
    assert (hit.slide_id, hit.tile.x) == ("b", 20)
    hit = store.search(Query(NEW, new["a"][1], 1))[0]
    assert (hit.slide_id, hit.tile.x) == ("a", 10) and hit.score == pytest.approx(1.0, abs=1e-3)
    assert (store.model_id, store.dim, store.counts()) == (OLD, 8, (8, 2))
    # The new model's vectors never publish a slide the serving model does not hold.
    store.stage(TileBatch(NEW, "ghost", "n-ghost", new["a"], tiles(4)))
    with pytest.raises(NotFound):
        store.commit_slide(NEW, "n-ghost", Slide("ghost", "ghost.svs"), 4)
    assert [s.slide_id for s in store.list_slides(10, "")[0]] == ["a", "b"]

    seq = store.info().journal_seq
    assert store.serve(NEW) == seq + 1
    assert (store.model_id, store.dim, store.counts()) == (NEW, 6, (8, 2))
    with pytest.raises(FailedPrecondition):
        store.drop_model(NEW)  # the serving model
    store.close()
    store = make()  # the switch is durable
    assert store.model_id == NEW and store.models() == {OLD: (8, 8), NEW: (6, 8)}
    store.serve(OLD)  # rollback
    assert store.model_id == OLD
    store.serve(NEW)  # and cutover again
    # A delete removes the slide from every model; nothing of it comes back.
    store.delete_slide("a")
    assert store.models() == {OLD: (8, 4), NEW: (6, 4)}
    assert {h.slide_id for h in store.search(Query(OLD, old["a"][0], 8))} == {"b"}
    assert store.drop_model(OLD) == 4
    assert store.models() == {NEW: (6, 4)}
    with pytest.raises(FailedPrecondition):
        store.search(Query(OLD, old["b"][0], 1))
    with pytest.raises(NotFound):
        store.serve(OLD)
    store.close()
    store = make()
    assert store.models() == {NEW: (6, 4)} and store.model_id == NEW
    store.close()


OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE slides (
  slide_id TEXT PRIMARY KEY, source TEXT NOT NULL, metadata TEXT NOT NULL,
  generation TEXT NOT NULL, tile_count INTEGER NOT NULL, indexed_at REAL NOT NULL,
  slide_mpp REAL NOT NULL DEFAULT 0);
CREATE TABLE tiles (
  id INTEGER PRIMARY KEY AUTOINCREMENT, slide_id TEXT NOT NULL, generation TEXT NOT NULL,
  x INTEGER NOT NULL, y INTEGER NOT NULL, w INTEGER NOT NULL, h INTEGER NOT NULL,
  mpp REAL NOT NULL, tissue REAL NOT NULL, committed INTEGER NOT NULL DEFAULT 0,
  staged_at REAL NOT NULL, vector BLOB NOT NULL,
  UNIQUE (slide_id, generation, x, y, w, h, mpp));
CREATE TABLE removed (seq INTEGER NOT NULL, tile_id INTEGER NOT NULL);
"""


def test_a_store_of_one_model_is_adopted_without_reingest(tmp_path):
    """An index written when an index held one model: its vectors are the bound model's, searchable as
    they are, and a migration's model goes beside them."""
    v = vecs(3, 8, 0)
    db = sqlite3.connect(tmp_path / "index.sqlite3")
    db.executescript(OLD_SCHEMA)
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)", [("model_id", OLD), ("dim", "8"), ("seq", "1"), ("tenancy", "default")]
    )
    db.execute("INSERT INTO slides VALUES ('default/a', 'a.svs', '{}', 'g', 3, 0, 0)")
    db.executemany(
        "INSERT INTO tiles (slide_id, generation, x, y, w, h, mpp, tissue, committed, staged_at, vector) "
        "VALUES ('default/a', 'g', ?, 0, 10, 10, 1.0, 0.9, 1, 0, ?)",
        [(i * 10, vector_bytes(x)) for i, x in enumerate(v)],
    )
    db.commit()
    db.close()
    store = TileIndex(str(tmp_path), IndexConfig(snapshot_interval_s=0))
    assert store.models() == {OLD: (8, 3)} and store.model_id == OLD
    assert store.search(Query(OLD, v[1], 1))[0].tile.x == 10
    put(store, NEW, "default/a", vecs(3, 4, 1), "n", register=True)
    assert store.models() == {OLD: (8, 3), NEW: (4, 3)}
    store.close()


def test_replicas_switch_models_at_one_sequence_number(postgres, tmp_path):  # noqa: F811
    url = fresh_database(postgres)
    config = IndexConfig(snapshot_interval_s=0)
    a = Replica(str(tmp_path / "a"), config, url, 0, follow_interval_s=0.05)
    b = Replica(str(tmp_path / "b"), config, url, 0, follow_interval_s=0.05)
    try:
        old, new = vecs(4, 8, 0), vecs(4, 6, 1)
        put(a, OLD, "s", old, "g")
        put(a, NEW, "s", new, "n", register=True)  # written on one replica
        wait_until("replica b holds both models", lambda: b.models() == {OLD: (8, 4), NEW: (6, 4)}, 30)
        assert b.search(Query(NEW, new[3], 1))[0].tile.x == 30
        seq = a.serve(NEW)
        wait_until("replica b reaches the switch", lambda: b.info().journal_seq >= seq, 30)
        assert (a.model_id, b.model_id) == (NEW, NEW)
        with pytest.raises(FailedPrecondition):
            b.drop_model(NEW)
        assert b.drop_model(OLD) == 4
        wait_until("replica a drops the old model", lambda: a.models() == {NEW: (6, 4)}, 30)
        a.delete_slide("s")
        wait_until("replica b deletes the slide", lambda: b.models() == {NEW: (6, 0)}, 30)
    finally:
        a.close()
        b.close()
