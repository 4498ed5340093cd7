"""Issue 24 in the index: a slide is (tenant, slide id), searches select their tenants inside
FAISS, and an index written before tenancy belongs to the default tenant (SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlite3

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smily.common.errors import NotFound
from smily.common.tenancy import key, split
from smily.index.faiss_index import IndexConfig, TileIndex
from smily.index.pg_store import PgStorage
from smily.index.shard import Query, TileBatch
from smily.index.storage import Slide, Tile

from .helpers.pg import fresh_database, postgres  # noqa: F401 (fixture)

MODEL = "m/1"
DIM = 8


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    """(open(default_tenant) -> TileIndex, raw SQL runner) on one test's store."""
    url = fresh_database(request.getfixturevalue("postgres")) if request.param == "postgres" else ""

    def open_index(default_tenant: str = "default", factory: str = "") -> TileIndex:
        config = IndexConfig(default_tenant=default_tenant, factory=factory, ivf_threshold=256, snapshot_interval_s=0)
        return TileIndex(str(tmp_path), config, storage=PgStorage(url) if url else None)

    def sql(statement: str) -> None:
        if url:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(statement.format(s="shard_0."))
        else:
            with sqlite3.connect(tmp_path / "index.sqlite3") as conn:
                conn.execute(statement.format(s=""))

    return open_index, sql


def vecs(n, seed):
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def put(index: TileIndex, tenant: str, slide_id: str, vectors, metadata=None) -> None:
    k = key(tenant, slide_id)
    tiles = [Tile(i * 10, 0, 10, 10, 1.0, 0.9) for i in range(len(vectors))]
    index.stage(TileBatch(MODEL, k, "g-" + k, vectors, tiles))
    index.commit_slide(MODEL, "g-" + k, Slide(k, "x.svs", metadata or {}), len(vectors))


def test_the_same_id_in_two_tenants_is_two_slides_and_searches_stay_in_their_tenants(backend):
    open_index, _ = backend
    index = open_index()
    a, b = vecs(6, 1), vecs(6, 2)
    put(index, "site-a", "s1", a, {"organ": "lung"})
    put(index, "site-b", "s1", b, {"organ": "skin"})
    assert index.counts() == (12, 2) and index.counts(["site-a"]) == (6, 1)
    # b's own tile, searched by site-a: site-a's tiles only, and k of them.
    hits = index.search(Query(MODEL, b[0], 5, tenants=["site-a"]))
    assert len(hits) == 5 and {split(h.slide_id) for h in hits} == {("site-a", "s1")}
    assert all(h.metadata == {"organ": "lung"} for h in hits)
    both = index.search(Query(MODEL, b[0], 12, tenants=["site-a", "site-b"]))
    assert len(both) == 12 and split(both[0].slide_id) == ("site-b", "s1")
    # Filters and slide ids combine with the tenant: skin is site-b's metadata.
    assert index.search(Query(MODEL, b[0], 5, filters={"organ": "skin"}, tenants=["site-a"])) == []
    assert index.search(Query(MODEL, b[0], 5, slide_ids=[key("site-b", "s1")], tenants=["site-a"])) == []
    assert [s.slide_id for s in index.list_slides(10, "", ["site-b"])[0]] == [key("site-b", "s1")]
    assert index.get_slide(key("site-a", "s1")).metadata == {"organ": "lung"}
    index.delete_slide(key("site-a", "s1"))
    with pytest.raises(NotFound):
        index.get_slide(key("site-a", "s1"))
    assert index.get_slide(key("site-b", "s1")).metadata == {"organ": "skin"}
    assert index.search(Query(MODEL, a[0], 3, tenants=["site-a"])) == []


def test_an_index_written_before_tenancy_belongs_to_the_default_tenant(backend):
    open_index, sql = backend
    index = open_index()
    v = vecs(4, 3)
    # Written as before tenancy: bare slide ids, no tenancy record.
    index.stage(TileBatch(MODEL, "old", "g", v, [Tile(i, 0, 1, 1, 1.0) for i in range(4)]))
    index.commit_slide(MODEL, "g", Slide("old", "old.svs", {"k": "v"}), 4)
    index.close()
    sql("DELETE FROM {s}meta WHERE key = 'tenancy'")
    reopened = open_index("clinic")
    assert reopened.get_slide(key("clinic", "old")).metadata == {"k": "v"}
    hits = reopened.search(Query(MODEL, v[1], 2, tenants=["clinic"]))
    assert [split(h.slide_id) for h in hits] == [("clinic", "old")] * 2
    assert reopened.search(Query(MODEL, v[1], 2, tenants=["default"])) == []
    reopened.close()
    # Once: a later open with another default tenant moves nothing.
    again = open_index("other")
    assert [s.slide_id for s in again.list_slides(10, "")[0]] == [key("clinic", "old")]
    again.close()


def test_an_ivf_index_returns_k_hits_of_the_tenant_whenever_k_exist(backend):
    open_index, _ = backend
    index = open_index(factory="IVF4,Flat")
    for t in range(4):
        put(index, f"t{t}", "s", vecs(100, 10 + t))
    assert index.wait_trained(60)
    assert index.info().factory == "IVF4,Flat"
    for t in range(4):
        query = vecs(100, 10 + (t + 1) % 4)[0]  # another tenant's tile
        hits = index.search(Query(MODEL, query, 50, nprobe=1, tenants=[f"t{t}"]))
        assert len(hits) == 50 and {split(h.slide_id)[0] for h in hits} == {f"t{t}"}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    slides=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c.d", "e_f-1"]), st.sampled_from(["s1", "s2", "x"]), st.booleans()),
        min_size=1,
        max_size=8,
        unique_by=lambda s: (s[0], s[1]),
    ),
    readable=st.sets(st.sampled_from(["a", "b", "c.d", "e_f-1"]), min_size=1),
    filtered=st.booleans(),
    k=st.integers(1, 20),
    seed=st.integers(0, 1000),
)
def test_a_search_returns_the_exact_top_k_of_its_tenants_and_nothing_else(
    tmp_path_factory, slides, readable, filtered, k, seed
):
    index = TileIndex(str(tmp_path_factory.mktemp("idx")), IndexConfig(snapshot_interval_s=0))
    expected = []
    for n, (tenant, slide_id, red) in enumerate(slides):
        v = vecs(3, seed + n)
        put(index, tenant, slide_id, v, {"stain": "red" if red else "blue"})
        if tenant in readable and (red or not filtered):
            expected += list(v)
    query = vecs(1, seed + 999)[0]
    hits = index.search(Query(MODEL, query, k, filters={"stain": "red"} if filtered else {}, tenants=sorted(readable)))
    assert all(split(h.slide_id)[0] in readable for h in hits)
    best = sorted((float(v @ query) for v in expected), reverse=True)[:k]
    # Filtered searches score from the stored vectors, which are float16 (issue 27).
    assert [h.score for h in hits] == pytest.approx(best, abs=2e-3)
    index.close()
