"""Re-ranking from the re-rank vectors held in RAM, and vectors stored as float16.

An IVF index's candidates are re-scored from a FAISS scalar-quantizer store
kept beside it (services/index/rerank.py): filters, deletes, compaction and
snapshots must keep the two in step. Stores written before vectors were kept
as float16 (float32 rows) must open and serve without a re-ingest.
"""

from __future__ import annotations

import glob
import json
import os

import faiss
import numpy as np
import pytest

from smily.index import rerank
from smily.index.faiss_index import IndexConfig, TileIndex
from smily.index.pg_store import PgStorage
from smily.index.shard import Query

from .helpers.pg import fresh_database, postgres  # noqa: F401 (fixture)
from .test_index_ann import clustered, fill
from .test_index_ann import ivf_config as _ivf_config
from .test_index_store import MODEL, put, vecs


def fp16_scores(q, slide_vectors, xs):
    return sorted((float(v.astype(np.float16).astype(np.float32) @ q) for v in slide_vectors[xs]), reverse=True)


def ivf_config(**kw):
    """An IVF index that trains in a moment (4-bit PQ codes): what the tests check is the re-rank."""
    return _ivf_config(**{"factory": "IVF16,PQ4x4", **kw})


@pytest.mark.parametrize("form", sorted(rerank.FORMS))
def test_ivf_candidates_are_rescored_from_ram(tmp_path, form):
    store = TileIndex(str(tmp_path), ivf_config(rerank_form=form))
    fill(store)
    assert store.info().factory.startswith("IVF")
    assert (
        store.serving.refine is not None
        and store.serving.refine.ntotal == 1200
        and rerank.form_of(store.serving.refine) == form
    )
    # Re-scoring reads no vectors from storage: it would fail now.
    store.storage.vectors = None
    q = clustered(1, 4)[0]
    hits = store.search(Query(MODEL, q, 10))
    assert len(hits) == 10 and all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    # The scores are those of the stored vectors, to the form's precision, not the PQ codes' estimates.
    tol = 2e-3 if form == "fp16" else 5e-2
    for h in hits:
        v = clustered(100, int(h.slide_id[1:]))[h.tile.x // 10]
        assert abs(h.score - float(v @ q)) < tol
    # A filter small enough to score exactly scores from RAM too.
    few = store.search(Query(MODEL, q, 5, slide_ids=["s03"]))
    assert {h.slide_id for h in few} == {"s03"}
    assert [round(h.score, 2) for h in few] == [round(s, 2) for s in fp16_scores(q, clustered(100, 3), slice(None))[:5]]


def test_an_exact_index_keeps_no_rerank_vectors(tmp_path):
    store = TileIndex(str(tmp_path), IndexConfig(snapshot_interval_s=0))
    fill(store, slides=3)
    assert store.info().factory == "Flat" and store.serving.refine is None
    off = TileIndex(str(tmp_path / "off"), ivf_config(rerank=1))
    fill(off)
    assert off.info().factory.startswith("IVF") and off.serving.refine is None
    # "storage": none in RAM, the candidates re-scored from storage's rows.
    lean = TileIndex(str(tmp_path / "lean"), ivf_config(rerank_form="storage"))
    fill(lean)
    assert lean.info().factory.startswith("IVF") and lean.serving.refine is None
    q = clustered(1, 4)[0]
    for h in lean.search(Query(MODEL, q, 5)):
        v = clustered(100, int(h.slide_id[1:]))[h.tile.x // 10]
        assert abs(h.score - float(v.astype(np.float16).astype(np.float32) @ q)) < 1e-5  # the stored row's score


def test_filters_deletes_and_compaction_keep_the_rerank_vectors_in_step(tmp_path):
    store = TileIndex(str(tmp_path), ivf_config())
    fill(store)
    q = clustered(1, 0)[0]
    lung = store.search(Query(MODEL, q, 1000, filters={"organ": "lung"}))
    assert len(lung) == 800 and {h.metadata["organ"] for h in lung} == {"lung"}
    rest = store.search(Query(MODEL, q, 50, exclude_slide_ids=["s00", "s01"]))
    assert len(rest) == 50 and not {"s00", "s01"} & {h.slide_id for h in rest}
    for i in range(3):
        store.delete_slide(f"s{i:02d}")  # past the compaction share: both are copied
    assert store.info().removed_since_compaction == 0
    assert store.serving.refine.ntotal == store.serving.faiss.ntotal == 900
    put(store, "late", clustered(30, 50))
    assert store.serving.refine.ntotal == store.serving.faiss.ntotal == 930
    hits = store.search(Query(MODEL, clustered(1, 50)[0], 1000))
    assert len(hits) == 930 and not {"s00", "s01", "s02"} & {h.slide_id for h in hits}
    exact = TileIndex(str(tmp_path / "exact"), IndexConfig(factory="Flat", snapshot_interval_s=0))
    fill(exact)
    for i in range(3):
        exact.delete_slide(f"s{i:02d}")
    put(exact, "late", clustered(30, 50))
    # Every list probed: the re-ranked answer is the exact one.
    for q in clustered(5, 70):
        want = [(h.slide_id, h.tile.x) for h in exact.search(Query(MODEL, q, 10))]
        assert [(h.slide_id, h.tile.x) for h in store.search(Query(MODEL, q, 10, nprobe=10_000))] == want


def test_snapshot_round_trip_keeps_the_rerank_vectors(tmp_path):
    store = TileIndex(str(tmp_path), ivf_config())
    fill(store)
    store.snapshot()
    store.delete_slide("s05")
    put(store, "after", clustered(20, 60))
    q = clustered(1, 2)[0]
    before = [(h.slide_id, h.tile.x, round(h.score, 5)) for h in store.search(Query(MODEL, q, 20))]
    store._stop.set()  # no snapshot at close: start-up replays the journal into both
    with store._rw.write():
        store.storage.close()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["refine"]["count"] == 1200 and os.path.exists(tmp_path / manifest["refine"]["file"])
    again = TileIndex(str(tmp_path), ivf_config())
    assert "snapshot at sequence" in again.info().load_report
    assert again.serving.refine.ntotal == again.serving.faiss.ntotal == 1120
    assert [(h.slide_id, h.tile.x, round(h.score, 5)) for h in again.search(Query(MODEL, q, 20))] == before
    again.close()
    # A damaged re-rank file is caught like a damaged index file.
    refine_file = glob.glob(str(tmp_path / "refine-*.faiss"))[0]
    with open(refine_file, "r+b") as f:
        f.truncate(os.path.getsize(refine_file) - 10)
    third = TileIndex(str(tmp_path), ivf_config())
    assert third.info().load_report.startswith("rebuilt from the journal: snapshot unusable")
    assert [(h.slide_id, h.tile.x, round(h.score, 5)) for h in third.search(Query(MODEL, q, 20))][:5] == before[:5]


def test_a_snapshot_without_rerank_vectors_loads_and_reads_them_once(tmp_path):
    """A snapshot written before re-rank vectors were kept: the IVF index is kept, the vectors read from storage."""
    store = TileIndex(str(tmp_path), ivf_config())
    fill(store)
    q = clustered(1, 7)[0]
    before = [(h.slide_id, h.tile.x, round(h.score, 5)) for h in store.search(Query(MODEL, q, 10))]
    store.close()
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    os.remove(tmp_path / manifest.pop("refine")["file"])
    path.write_text(json.dumps(manifest))
    again = TileIndex(str(tmp_path), ivf_config())
    assert "snapshot at sequence" in again.info().load_report and again.info().train_vectors == 1000
    assert again.serving.refine.ntotal == 1200
    assert [(h.slide_id, h.tile.x, round(h.score, 5)) for h in again.search(Query(MODEL, q, 10))] == before


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    url = fresh_database(request.getfixturevalue("postgres")) if request.param == "postgres" else ""
    return lambda: TileIndex(str(tmp_path), IndexConfig(snapshot_interval_s=0), PgStorage(url) if url else None)


def _raw_vectors(store) -> list[bytes]:
    with store.storage._session():
        return [bytes(r[0]) for r in store.storage._x("SELECT vector FROM {s}tiles ORDER BY id").fetchall()]


def test_vectors_are_stored_as_float16_at_the_models_dimension(backend):
    store = backend()
    put(store, "a", vecs(5))
    assert {len(b) for b in _raw_vectors(store)} == {8 * 2}
    if not isinstance(store.storage, PgStorage):  # pages that hold several 1280-d float16 rows
        with store.storage._session():
            assert store.storage._x("PRAGMA page_size").fetchone()[0] == 8192
    store.close()


def test_a_float32_store_opens_and_serves_without_reingest(backend):
    """Rows written by an older version (float32) are read as they are, beside newer float16 rows."""
    store = backend()
    old = vecs(6, seed=1)
    put(store, "old", old)
    # Rewrite the rows as an older version stored them: float32.
    with store.storage._session():
        ids = [r[0] for r in store.storage._x("SELECT id FROM {s}tiles ORDER BY id").fetchall()]
        for i, v in zip(ids, old):
            store.storage._x("UPDATE {s}tiles SET vector = ? WHERE id = ?", (v.astype(np.float32).tobytes(), i))
    for f in glob.glob(os.path.join(store._dir, "*.faiss")) + glob.glob(os.path.join(store._dir, "manifest.json")):
        os.remove(f)  # no snapshot: the index is built from the old rows
    store._stop.set()
    with store._rw.write():
        store.storage.close()
    again = backend()
    assert {len(b) for b in _raw_vectors(again)} == {8 * 4}
    put(again, "new", vecs(4, seed=2))  # a new slide beside them, stored as float16
    assert sorted({len(b) for b in _raw_vectors(again)}) == [8 * 2, 8 * 4]
    q = old[2]
    hits = again.search(Query(MODEL, q, 10))
    assert len(hits) == 10 and hits[0].slide_id == "old" and hits[0].tile.x == 20
    assert abs(hits[0].score - float(old[2] @ q)) < 1e-6  # the float32 row, exactly
    ids, vectors = again.storage.vectors(again.storage.committed_ids(MODEL), MODEL)
    assert vectors.dtype == np.float32 and vectors.shape == (10, 8)
    again.close()


def test_a_wrong_rerank_form_is_refused(tmp_path):
    with pytest.raises(ValueError, match="SMILY_INDEX_RERANK_FORM"):
        TileIndex(str(tmp_path), IndexConfig(rerank_form="pq", snapshot_interval_s=0))


@pytest.mark.unit
@pytest.mark.parametrize("form", sorted(rerank.FORMS))
def test_candidates_are_found_by_position_after_writes_in_any_order(form):
    """Scores come from the codes at each tile's position: out-of-order adds (concurrent
    commits), removals (which shift positions) and ids never held must not mislead the lookup."""
    rng = np.random.default_rng(7)
    dim = 32
    unit = rng.standard_normal((400, dim)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)  # as embeddings are
    vectors = {i + 1: v for i, v in enumerate(unit)}
    store, at = rerank.build(dim, form, np.stack(list(vectors.values()))), rerank.Positions()
    query = vectors[7]
    tol = 2e-3 if form == "fp16" else 5e-2

    def check(ids):
        got = rerank.scores(store, np.array(ids), query, at)
        want = np.array([vectors[i] @ query for i in ids])
        assert np.allclose(got, want, atol=tol), form

    def add(ids):
        store.add_with_ids(np.stack([vectors[i] for i in ids]), np.array(ids, np.int64))

    add(list(range(1, 201)))  # in order
    check([5, 150, 2, 200])
    add(list(range(301, 401)))
    add(list(range(201, 301)))  # a later commit of earlier ids: the id map is no longer sorted
    check([350, 250, 1, 399, 201])
    store.remove_ids(faiss.IDSelectorBatch(np.arange(1, 100, 2, dtype=np.int64)))  # positions shift
    check([2, 100, 399, 250])
    with pytest.raises(RuntimeError):
        rerank.scores(store, np.array([2, 3]), query, at)  # 3 was removed
    assert rerank.scores(store, np.array([], np.int64), query, at).shape == (0,)
