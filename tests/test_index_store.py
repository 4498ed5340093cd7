"""The index over each storage backend (SQLite, PostgreSQL): staging, atomic replace, model binding,
durability, idempotent commits."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from smily.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from smily.common.tenancy import key
from smily.common.tiling import Tiling
from smily.index.concepts import Concept, ConceptStore, Example
from smily.index.faiss_index import IndexConfig, TileIndex
from smily.index.pg_store import PgConcepts, PgStorage
from smily.index.replica import Replica
from smily.index.shard import Query, TileBatch
from smily.index.storage import Slide, Tile

from .helpers.pg import fresh_database, postgres  # noqa: F401 (fixture)

MODEL = "m/1"


@pytest.fixture(params=["sqlite", "postgres"])
def make(request, tmp_path):
    """Opens a TileIndex in tmp_path over the backend; every call on one test's database."""
    url = fresh_database(request.getfixturevalue("postgres")) if request.param == "postgres" else ""
    return lambda: TileIndex(str(tmp_path), storage=PgStorage(url) if url else None)


def vecs(n, dim=8, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def tiles(n, offset=0):
    return [Tile(offset + i * 10, 0, 10, 10, 1.0, 0.9) for i in range(n)]


def put(store, slide_id, vectors, generation="g1", offset=0):
    store.stage(TileBatch(MODEL, slide_id, generation, vectors, tiles(len(vectors), offset)))
    return store.commit_slide(MODEL, generation, Slide(slide_id, f"{slide_id}.svs", {"k": slide_id}), len(vectors))


def test_staged_tiles_are_invisible_until_commit(make):
    store = make()
    v = vecs(5)
    store.stage(TileBatch(MODEL, "a", "g1", v, tiles(5)))
    assert store.search(Query(MODEL, v[0], 3)) == []
    store.commit_slide(MODEL, "g1", Slide("a", "a.svs"), 5)
    hits = store.search(Query(MODEL, v[2], 3))
    # Stored as float16: the self-score is 1 to float16's precision (~5e-4 relative per component).
    assert hits[0].slide_id == "a" and hits[0].tile.x == 20 and hits[0].score == pytest.approx(1.0, abs=1e-3)


def test_recommit_replaces_and_survives_restart(make):
    store = make()
    put(store, "a", vecs(5, seed=1))
    put(store, "b", vecs(3, seed=2))
    _, replaced = put(store, "a", vecs(4, seed=3), generation="g2")
    assert replaced == 5
    assert store.counts() == (7, 2)
    store.close()
    reopened = make()
    assert reopened.counts() == (7, 2)
    assert reopened.model_id == MODEL and reopened.dim == 8
    hit = reopened.search(Query(MODEL, vecs(4, seed=3)[1], 1))[0]
    assert (hit.slide_id, hit.tile.x, hit.metadata) == ("a", 10, {"k": "a"})


def test_model_binding(make):
    store = make()
    put(store, "a", vecs(2))
    with pytest.raises(FailedPrecondition):
        store.stage(TileBatch("other/1", "b", "g", vecs(2), tiles(2)))
    with pytest.raises(FailedPrecondition):
        store.search(Query("other/1", vecs(1)[0], 1))
    with pytest.raises(InvalidArgument):
        store.stage(TileBatch(MODEL, "b", "g", vecs(2, dim=4), tiles(2)))


def test_incomplete_generation_is_not_published(make):
    store = make()
    put(store, "a", vecs(3))
    store.stage(TileBatch(MODEL, "a", "g2", vecs(2, seed=5), tiles(2)))
    with pytest.raises(Aborted):
        store.commit_slide(MODEL, "g2", Slide("a", "a.svs"), 4)
    assert store.counts() == (3, 1)  # the old version still serves


def test_retried_batch_is_not_duplicated(make):
    store = make()
    v = vecs(4)
    store.stage(TileBatch(MODEL, "a", "g1", v, tiles(4)))
    store.stage(TileBatch(MODEL, "a", "g1", v, tiles(4)))
    store.commit_slide(MODEL, "g1", Slide("a", "a.svs"), 4)
    assert store.counts() == (4, 1)


def test_exclude_delete_and_pages(make):
    store = make()
    for i, name in enumerate("abcde"):
        put(store, name, vecs(2, seed=i))
    q = vecs(2, seed=0)[0]
    assert store.search(Query(MODEL, q, 1))[0].slide_id == "a"
    assert all(h.slide_id != "a" for h in store.search(Query(MODEL, q, 10, ["a"])))
    assert len(store.search(Query(MODEL, q, 10, ["a"]))) == 8
    assert store.delete_slide("a") == 2
    with pytest.raises(NotFound):
        store.delete_slide("a")
    page, token = store.list_slides(3, "")
    rest, end = store.list_slides(3, token)
    assert [s.slide_id for s in page + rest] == list("bcde") and end == ""
    with pytest.raises(InvalidArgument):
        store.search(Query(MODEL, q, 0))
    with pytest.raises(InvalidArgument):
        store.list_slides(3, "%%%")


def test_stated_resolution_is_kept_and_old_indexes_gain_the_column(tmp_path):
    store = TileIndex(str(tmp_path))
    put(store, "a", vecs(2, seed=4))
    store.stage(TileBatch(MODEL, "b", "g1", vecs(2, seed=5), tiles(2)))
    store.commit_slide(MODEL, "g1", Slide("b", "b.tiff", slide_mpp=0.5), 2)
    store.close()
    # An index written before slides had a stated resolution: the column is added on open.
    db = sqlite3.connect(str(tmp_path / "index.sqlite3"))
    db.execute("ALTER TABLE slides DROP COLUMN slide_mpp")
    db.commit()
    db.close()
    reopened = TileIndex(str(tmp_path))
    assert reopened.get_slide("a").slide_mpp == 0 and reopened.get_slide("b").slide_mpp == 0
    reopened.stage(TileBatch(MODEL, "b", "g2", vecs(2, seed=5), tiles(2)))
    reopened.commit_slide(MODEL, "g2", Slide("b", "b.tiff", slide_mpp=0.25), 2)
    listed, _ = reopened.list_slides(10, "")
    assert {s.slide_id: s.slide_mpp for s in listed} == {"a": 0, "b": 0.25}


def test_retried_commit_is_success(make):
    """A CommitSlide retried after a lost reply finds its generation committed: success, nothing changes."""
    store = make()
    put(store, "a", vecs(3, seed=1))
    slide, replaced = put(store, "a", vecs(4, seed=2), generation="g2")
    seq = store.info().journal_seq
    again, replaced_again = store.commit_slide(MODEL, "g2", Slide("a", "a.svs", {"k": "a"}), 4)
    assert (again.slide_id, again.tile_count, replaced, replaced_again) == ("a", 4, 3, 0)
    assert store.info().journal_seq == seq and store.counts() == (4, 1)
    with pytest.raises(Aborted):  # a different tile count is not the same commit
        store.commit_slide(MODEL, "g2", Slide("a", "a.svs"), 5)
    with pytest.raises(Aborted):  # an older generation is no longer staged
        store.commit_slide(MODEL, "g1", Slide("a", "a.svs"), 3)


# -- issue 16: one record of the tiling settings ------------------------------------------------
TILING = Tiling((1.0,), 224, 1.0, 0.5)
OTHER = Tiling((0.5,), 224, 1.0, 0.5)


def test_first_write_records_the_tiling_and_later_ones_are_checked(make):
    store = make()
    assert store.tiling is None
    store.stage(TileBatch(MODEL, "a", "g1", vecs(2), tiles(2), TILING))
    store.commit_slide(MODEL, "g1", Slide("a", "a.svs"), 2)
    assert store.tiling == TILING
    with pytest.raises(FailedPrecondition) as refused:
        store.stage(TileBatch(MODEL, "b", "g1", vecs(2), tiles(2), OTHER))
    # The message names both settings, so the operator sees what differs.
    assert "1 µm/px" in str(refused.value) and "0.5 µm/px" in str(refused.value)
    store.stage(TileBatch(MODEL, "b", "g1", vecs(2), tiles(2), TILING))  # the recorded settings pass
    store.close()
    reopened = make()
    assert reopened.tiling == TILING  # durable, next to the model id
    with pytest.raises(FailedPrecondition):
        reopened.stage(TileBatch(MODEL, "c", "g1", vecs(2), tiles(2), Tiling((1.0,), 224, 0.5, 0.5)))


def test_searches_are_checked_against_the_tiling_record(make):
    store = make()
    v = vecs(3)
    store.stage(TileBatch(MODEL, "a", "g1", v, tiles(3), TILING))
    store.commit_slide(MODEL, "g1", Slide("a", "a.svs"), 3)
    assert store.search(Query(MODEL, v[0], 1, tiling=TILING, mpp=1.0))[0].tile.x == 0
    with pytest.raises(FailedPrecondition) as refused:
        store.search(Query(MODEL, v[0], 1, tiling=OTHER))
    assert "0.5 µm/px" in str(refused.value) and "1 µm/px" in str(refused.value)
    with pytest.raises(FailedPrecondition):
        store.search(Query(MODEL, v[0], 1, mpp=2.0))  # a resolution the index does not hold


def test_search_at_one_resolution_of_several(make):
    store = make()
    multi = Tiling((0.5, 1.0, 2.0), 224, 1.0, 0.5)
    v = vecs(6)
    # Tiles are cut at the slide's nearest whole pixel count: 0.998 is the 1.0 resolution.
    rects = [Tile(i * 10, 0, 10, 10, m, 0.9) for i, m in enumerate((0.5, 0.5, 0.998, 1.0, 2.01, 2.0))]
    store.stage(TileBatch(MODEL, "a", "g1", v, rects, multi))
    store.commit_slide(MODEL, "g1", Slide("a", "a.svs"), 6)
    hits = store.search(Query(MODEL, v[0], 6, mpp=1.0))
    assert sorted(h.tile.mpp for h in hits) == [0.998, 1.0]
    assert sorted(h.tile.mpp for h in store.search(Query(MODEL, v[0], 6, slide_ids=["a"], mpp=2.0))) == [2.0, 2.01]
    assert len(store.search(Query(MODEL, v[0], 6))) == 6  # no resolution stated: every tile
    store.stage(TileBatch(MODEL, "b", "g1", vecs(1), tiles(1), multi))
    store.commit_slide(MODEL, "g1", Slide("b", "b.svs"), 1)  # a commit refreshes the per-resolution ids
    assert {h.slide_id for h in store.search(Query(MODEL, v[0], 6, mpp=1.0))} == {"a", "b"}


def test_replicas_share_the_tiling_record(postgres, tmp_path):  # noqa: F811 (fixture)
    url = fresh_database(postgres)
    config = IndexConfig(snapshot_interval_s=0)
    first = Replica(str(tmp_path / "r1"), config, url, 0)
    second = Replica(str(tmp_path / "r2"), config, url, 0)
    try:
        first.stage(TileBatch(MODEL, "a", "g1", vecs(2), tiles(2), TILING))
        first.commit_slide(MODEL, "g1", Slide("a", "a.svs"), 2)
        second.catch_up()
        assert second.tiling == TILING  # served from its local copy, as searches are
        with pytest.raises(FailedPrecondition):
            second.stage(TileBatch(MODEL, "b", "g1", vecs(2), tiles(2), OTHER))
        with pytest.raises(FailedPrecondition):
            second.search(Query(MODEL, vecs(1)[0], 1, tiling=OTHER))
    finally:
        first.close()
        second.close()


def test_an_index_without_a_record_is_searched_whole_and_records_on_its_next_write(make):
    store = make()
    v = vecs(2)
    store.stage(TileBatch(MODEL, "a", "g1", v, tiles(2)))  # written before tiling records existed
    store.commit_slide(MODEL, "g1", Slide("a", "a.svs"), 2)
    assert store.tiling is None and len(store.search(Query(MODEL, v[0], 2, tiling=TILING, mpp=1.0))) == 2
    store.stage(TileBatch(MODEL, "b", "g1", vecs(1), tiles(1), TILING))
    assert store.tiling == TILING


@pytest.fixture(params=["sqlite", "postgres"])
def concepts(request, tmp_path):
    """The concepts table over the backend."""
    if request.param == "sqlite":
        table = ConceptStore(str(tmp_path))
    else:
        url = fresh_database(request.getfixturevalue("postgres"))
        PgStorage(url).close()  # the shard's schema, which the index creates before its concepts
        table = PgConcepts(url)
    yield table
    table.close()


def test_concepts_are_kept_per_model_and_tenant_and_listed_in_byte_order(concepts):
    b, B = key("t", "b"), key("t", "B")
    concepts.put(Concept(b, MODEL, np.array([3.0, 4.0])))
    concepts.put(Concept(B, MODEL, np.array([1.0, 0.0]), with_examples=2))
    concepts.put(Concept(b, "other/1", np.array([0.0, 2.0])))
    concepts.put(Concept(key("t2", "c"), MODEL, np.array([0.0, 2.0])))  # another tenant's
    got = concepts.get(b, MODEL)
    assert got.vector.tolist() == pytest.approx([0.6, 0.8]) and got.created_at > 0  # stored unit length
    assert [(c.name, c.with_examples, c.vector) for c in concepts.list(MODEL, "t")] == [(B, 2, None), (b, 0, None)]
    concepts.put(Concept(b, MODEL, np.array([0.0, -1.0]), without_examples=5))  # replaces
    assert concepts.get(b, MODEL).vector.tolist() == [0.0, -1.0] and concepts.get(b, MODEL).without_examples == 5
    assert concepts.get(b, "other/1").vector.tolist() == [0.0, 1.0]
    with pytest.raises(NotFound):
        concepts.get(key("t", "c"), MODEL)  # t2's concept is not t's
    # Held for other models only: refused as fitted for them, not as missing.
    with pytest.raises(FailedPrecondition, match=f"fitted for model {MODEL}, other/1, not third/1"):
        concepts.get(b, "third/1")
    # Deleted, a concept is gone for every model (a rollback must not bring back an old fit).
    concepts.delete(b, MODEL)
    for model in (MODEL, "other/1"):
        with pytest.raises(NotFound):
            concepts.get(b, model)
    with pytest.raises(NotFound):
        concepts.delete(b, MODEL)


def test_a_concepts_examples_are_kept_with_it_and_patches_stored_once_by_content(concepts):
    a, b = key("t", "a"), key("t", "b")
    region, patch = b"a serialised region", b"\x89PNG patch bytes"
    examples = [Example(True, region=region), Example(False, image=patch)]
    concepts.put(Concept(a, MODEL, np.array([1.0, 0.0]), examples=examples))
    concepts.put(Concept(b, MODEL, np.array([0.0, 1.0]), examples=[Example(True, image=patch)]))
    assert concepts.get(a, MODEL).examples is None  # unless asked for
    assert concepts.get(a, MODEL, with_examples=True).examples == examples
    # Refitted for another model (no examples given): the stored ones are kept, whatever the model.
    concepts.put(Concept(a, "other/1", np.array([1.0, 1.0])))
    assert concepts.get(a, "other/1", with_examples=True).examples == examples

    def patches() -> int:
        with concepts._session():
            return concepts._x("SELECT COUNT(*) FROM {s}concept_patches").fetchone()[0]

    assert patches() == 1  # the same bytes in two concepts
    concepts.delete(a, MODEL)
    assert patches() == 1 and concepts.get(b, MODEL, with_examples=True).examples == [Example(True, image=patch)]
    concepts.put(Concept(b, MODEL, np.array([0.0, 1.0]), examples=[Example(True, region=region)]))
    assert patches() == 0  # referenced by no example any more
