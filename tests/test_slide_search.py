"""Find slides by metadata (issue 28): ListSlides' metadata_query, a prefix of a searchable
metadata value, matched in the index's SQL (SQLite and PostgreSQL), paged like the full list and
within the caller's tenants; through real index and gateway servers with OIDC tenants.
"""

from __future__ import annotations

import json
import logging

import grpc
import pytest

from smily import stack
from smily.common.tenancy import key, split
from smily.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from smily.index.faiss_index import IndexConfig, TileIndex
from smily.index.pg_store import PgStorage
from smily.index.shard import TileBatch
from smily.index.storage import MetadataMatch, Slide, Tile
from smily.index.v1 import index_pb2, index_pb2_grpc

from .conftest import base_settings
from .helpers import oidc
from .helpers.pg import fresh_database, postgres  # noqa: F401 (fixture)
from .test_tenants_index import MODEL, vecs

A, B, R = "site-a", "site-b", "research"
ROLES = ["smily.search"]
SEARCHABLE = ("case_id", "container_identifier", "barcode", "organ")
# (tenant, slide id, metadata). "note" is not searchable; b-1 shares a's case prefix.
SLIDES = [
    (A, "a-1", {"case_id": "S24-0101", "organ": "Lung", "container_identifier": "BC-7001"}),
    (A, "a-2", {"case_id": "S24-0102", "organ": "skin"}),
    (A, "a-3", {"case_id": "S24-0201", "organ": "lung", "note": "S24-0101"}),
    (A, "a-4", {"case_id": "S24_0301", "organ": "colon"}),
    (A, "a-5", {"case_id": "S24%0401", "organ": "liver"}),
    (B, "b-1", {"case_id": "S24-0103", "organ": "lung"}),
]
QUERY = "S24-01"
# A barcode's prefix as typed (lower case: the stored value is upper case), which the logs must never hold.
BARCODE = "bc-70"


def fill(index: TileIndex) -> None:
    for n, (tenant, slide_id, metadata) in enumerate(SLIDES):
        k = key(tenant, slide_id)
        tiles = [Tile(i * 10, 0, 10, 10, 1.0, 0.9) for i in range(2)]
        index.stage(TileBatch(MODEL, k, "g-" + k, vecs(2, n), tiles))
        index.commit_slide(MODEL, "g-" + k, Slide(k, "x.svs", metadata), 2)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """The slides in a fresh store: (index directory, PostgreSQL URL or "")."""
    url = fresh_database(request.getfixturevalue("postgres")) if request.param == "postgres" else ""
    index = TileIndex(str(tmp_path), IndexConfig(snapshot_interval_s=0), storage=PgStorage(url) if url else None)
    fill(index)
    index.close()
    return str(tmp_path), url


def found(index: TileIndex, prefix: str, keys=SEARCHABLE, tenants=(A,), page_size: int = 100) -> list[str]:
    out, token = [], ""
    while True:
        page, token = index.list_slides(page_size, token, tenants, MetadataMatch(tuple(keys), prefix))
        out += [split(s.slide_id)[1] for s in page]
        if not token:
            return out


def test_the_sql_matches_a_prefix_of_a_searchable_value_ignoring_ascii_case(store):
    directory, url = store
    index = TileIndex(directory, IndexConfig(snapshot_interval_s=0), storage=PgStorage(url) if url else None)
    try:
        assert found(index, "s24-01") == ["a-1", "a-2"]  # not a-3's unsearchable note, not site-b's b-1
        assert found(index, "LUNG") == ["a-1", "a-3"]
        assert found(index, "lung", keys=("case_id",)) == []
        assert found(index, "bc-70") == ["a-1"]
        # LIKE's wildcards are plain characters: "_" and "%" match themselves alone.
        assert found(index, "S24_") == ["a-4"]
        assert found(index, "S24%") == ["a-5"]
        assert found(index, "S24") == ["a-1", "a-2", "a-3", "a-4", "a-5"]
        # Paging: the same slides, in the same order, whatever the page size.
        for size in (1, 2, 3):
            assert found(index, "S24", page_size=size) == found(index, "S24")
        assert found(index, "s24-01", tenants=(A, B)) == ["a-1", "a-2", "b-1"]
        assert found(index, "s24-01", tenants=(B,)) == ["b-1"]
    finally:
        index.close()


@pytest.fixture(params=["sqlite", "postgres"])
def gateway(request, tmp_path):
    """Real index and gateway servers over a filled store, OIDC tokens naming the tenant
    (research is granted site-a): (stub, IdP, audit log path)."""
    url = fresh_database(request.getfixturevalue("postgres")) if request.param == "postgres" else ""
    index = TileIndex(str(tmp_path), IndexConfig(snapshot_interval_s=0), storage=PgStorage(url) if url else None)
    fill(index)
    index.close()
    idp = oidc.IdP()
    audit_log = str(tmp_path / "audit.jsonl")
    s = base_settings(
        auth="oidc",
        oidc_issuer=idp.issuer,
        oidc_audience=oidc.AUDIENCE,
        oidc_tenant_claim="tenant",
        tenant_grants=f"{R}={A}",
        default_tenant=A,
        index_dir=str(tmp_path),
        index_database_url=url,
        audit_log=audit_log,
    )
    running, s = stack.start(["index", "gateway"], s)
    channel = grpc.insecure_channel(f"127.0.0.1:{s.gateway.gateway_port}")
    yield gateway_pb2_grpc.GatewayServiceStub(channel), idp, audit_log
    channel.close()
    stack.stop(running, 0)
    idp.close()


def lister(stub, idp, tenant):
    md = [("authorization", "Bearer " + idp.token(ROLES, sub="user-of-" + tenant, tenant=tenant))]

    def listed(query: str = "", page_size: int = 0, key_: str = "") -> list[tuple[str, str]]:
        out, token = [], ""
        while True:
            req = gateway_pb2.ListSlidesRequest(
                page_size=page_size, page_token=token, metadata_query=query, metadata_key=key_
            )
            resp = stub.ListSlides(req, metadata=md, timeout=60)
            out += [(s.tenant, s.slide_id) for s in resp.slides]
            token = resp.next_page_token
            if not token:
                return out

    return listed


def test_find_slides_through_the_gateway_within_the_callers_tenants(gateway, caplog):
    stub, idp, audit_log = gateway
    a, b, r = (lister(stub, idp, t) for t in (A, B, R))
    caplog.set_level(logging.DEBUG)
    assert a(QUERY) == [(A, "a-1"), (A, "a-2")]
    for size in (1, 2):
        assert a(QUERY, page_size=size) == a(QUERY)
    # Another tenant's slides never match; a grant reads them.
    assert b(QUERY) == [(B, "b-1")]
    assert b("S24-02") == [] and b("BC-7001") == []
    assert r(QUERY) == [(A, "a-1"), (A, "a-2")]
    # One searchable key.
    assert a("lung", key_="organ") == [(A, "a-1"), (A, "a-3")]
    assert a("lung", key_="case_id") == []
    # Every slide without a query, as before.
    assert len(a()) == 5
    # The query text is an identifier: in no log record and no audit record (which names the
    # case ids of the slides listed, as for any listing).
    assert a(BARCODE) == [(A, "a-1")] and b(BARCODE) == []
    assert BARCODE not in caplog.text
    with open(audit_log) as fh:
        records = [json.loads(line) for line in fh]
    assert records and not any(BARCODE in json.dumps(rec) for rec in records)


def test_bad_metadata_queries_are_invalid_arguments_that_do_not_echo_them(gateway):
    stub, idp, _ = gateway
    md = [("authorization", "Bearer " + idp.token(ROLES, sub="user-of-a", tenant=A))]
    for req in (
        gateway_pb2.ListSlidesRequest(metadata_query="X" * 65),
        gateway_pb2.ListSlidesRequest(metadata_query="S24\x00"),
        gateway_pb2.ListSlidesRequest(metadata_query="S24", metadata_key="note"),
        gateway_pb2.ListSlidesRequest(metadata_key="organ"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.ListSlides(req, metadata=md, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, req
        assert not req.metadata_query or req.metadata_query not in info.value.details()
    info = stub.GetIndexInfo(gateway_pb2.GetIndexInfoRequest(), metadata=md, timeout=60)
    assert info.case_key == "case_id" and tuple(info.slide_search_keys) == SEARCHABLE


def test_the_index_checks_the_match_again(tmp_path):
    """Defence in depth: the index refuses a prefix without keys, keys without a prefix, an
    over-long prefix, as the gateway does."""
    running, s = stack.start(["index"], base_settings(index_dir=str(tmp_path)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.index.index_port}") as channel:
            stub = index_pb2_grpc.IndexServiceStub(channel)
            for req in (
                index_pb2.ListSlidesRequest(metadata_prefix="S24"),
                index_pb2.ListSlidesRequest(metadata_keys=["case_id"]),
                index_pb2.ListSlidesRequest(metadata_prefix="x" * 65, metadata_keys=["case_id"]),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    stub.ListSlides(req, timeout=30)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, req
            ok = index_pb2.ListSlidesRequest(metadata_prefix="S24", metadata_keys=["case_id"])
            assert list(stub.ListSlides(ok, timeout=30).slides) == []
    finally:
        stack.stop(running, 0)
