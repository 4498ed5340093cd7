"""Issue 24, the operator: `smily.operator` lists tenants and moves a slide between them, a
tenant's admin may not; and per-tenant ingest queue slots. Against real servers (tiler, embedder,
index on SQLite and on PostgreSQL, gateway with OIDC tokens naming the tenant, Redis), and a
move between two real index shards placed by (tenant, slide id).
"""

from __future__ import annotations

import json
import time

import grpc
import pytest

from smily import stack
from smily.common.placement import shard_of_slide
from smily.common.tiling import Tiling
from smily.gateway import moves
from smily.gateway.backends import Backend
from smily.gateway.shards import connect
from smily.gateway.tilings import IndexTiling
from smily.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from smily.index.v1 import index_pb2

from .conftest import base_settings
from .helpers import oidc
from .helpers.caller import As
from .helpers.pg import fresh_database, postgres  # noqa: F401 (fixture)

TENANT_ROLES = ["smily.search", "smily.ingest", "smily.admin"]
OPERATOR = ["smily.operator"]
A, B, C, D = "site-a", "site-b", "site-c", "site-d"
# site-a: s1 and m1 (the one moved); site-b: s1 (so a move of site-a's s1 to site-b collides).
SLIDES = {A: {"s1": "synth-a.tiff", "m1": "synth-c-40x.svs"}, B: {"s1": "synth-b.svs"}}


@pytest.fixture(scope="module")
def idp():
    p = oidc.IdP()
    yield p
    p.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def deployment(request, idp, slide_dir, model_repo, redis_url, tmp_path_factory):
    url = fresh_database(request.getfixturevalue("postgres")) if request.param == "postgres" else ""
    audit_log = str(tmp_path_factory.mktemp("operator-audit") / "audit.jsonl")
    s = base_settings(
        auth="oidc",
        oidc_issuer=idp.issuer,
        oidc_audience=oidc.AUDIENCE,
        oidc_tenant_claim="tenant",
        slide_roots=(slide_dir,),
        model_repository=model_repo,
        index_dir=str(tmp_path_factory.mktemp("operator-index")),
        index_database_url=url,
        redis_url=redis_url,
        audit_log=audit_log,
        max_concurrent_ingests=1,
        max_queued_ingests_per_tenant=1,
    )
    running, s = stack.start(stack.ORDER, s)
    stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(f"127.0.0.1:{s.gateway.gateway_port}"))
    yield s, stub
    stack.stop(running, 0)


def caller(idp, stub, tenant: str, roles) -> As:
    return As(stub, idp.token(roles, sub=f"{'-'.join(roles)}-of-{tenant}", tenant=tenant))


def code_of(fn, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn(request)
    return info.value.code()


def wait(who: As, op):
    deadline = time.monotonic() + 300
    while op.state in (gateway_pb2.OPERATION_STATE_QUEUED, gateway_pb2.OPERATION_STATE_RUNNING):
        assert time.monotonic() < deadline, f"ingest {op.operation_id} did not finish"
        time.sleep(0.2)
        op = who.GetOperation(gateway_pb2.GetOperationRequest(operation_id=op.operation_id)).operation
    return op


def records(settings, request_id: str) -> dict[str, dict]:
    """The audit records of one call: its outcome record, and a write's attempt record."""
    with open(settings.auth.audit_log) as fh:
        return {r["id"]: r for r in map(json.loads, fh) if r["id"].split(".")[0] == request_id}


def extensions(record: dict) -> dict[str, str]:
    return {e["url"]: e["valueString"] for e in record["extension"]}


@pytest.fixture(scope="module")
def world(deployment, idp):
    settings, stub = deployment
    who = {t: caller(idp, stub, t, TENANT_ROLES) for t in (A, B)}
    for tenant, slides in SLIDES.items():
        for slide_id, source in slides.items():
            req = gateway_pb2.IngestSlideRequest(source=source, slide_id=slide_id)
            op = wait(who[tenant], who[tenant].IngestSlide(req).operation)
            assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, (tenant, slide_id, op.error_message)
    ops = caller(idp, stub, "ops", OPERATOR)
    return settings, stub, who, ops


def listed(who: As) -> dict[str, gateway_pb2.Slide]:
    return {s.slide_id: s for s in who.ListSlides(gateway_pb2.ListSlidesRequest(page_size=100)).slides}


def region(slide_id: str) -> gateway_pb2.Region:
    return gateway_pb2.Region(slide_id=slide_id, x=0, y=0, width=448, height=448)


def test_a_tenants_admin_may_not_call_the_operators_rpcs_and_the_operator_nothing_else(world, idp):
    settings, stub, who, ops = world
    move = gateway_pb2.MoveSlideRequest(slide_id="m1", from_tenant=A, to_tenant=B)
    for fn, req in ((who[A].ListTenants, gateway_pb2.ListTenantsRequest()), (who[A].MoveSlide, move)):
        assert code_of(fn, req) == grpc.StatusCode.PERMISSION_DENIED
        (record,) = records(settings, who[A].last_request_id).values()  # refused before any attempt
        assert record["outcomeDesc"] == "PERMISSION_DENIED" and extensions(record)["urn:smily:tenant"] == A
    assert "m1" in listed(who[A])  # nothing moved
    # The operator role reads and writes no tenant's slides.
    for name, req in (
        ("ListSlides", gateway_pb2.ListSlidesRequest()),
        ("GetSlide", gateway_pb2.GetSlideRequest(slide_id="s1")),
        ("Search", gateway_pb2.SearchRequest(region=region("s1"), k=5)),
        ("IngestSlide", gateway_pb2.IngestSlideRequest(source="synth-a.tiff", slide_id="x")),
        ("DeleteSlide", gateway_pb2.DeleteSlideRequest(slide_id="s1")),
    ):
        assert code_of(getattr(ops, name), req) == grpc.StatusCode.PERMISSION_DENIED, name


def test_the_operator_lists_every_tenant_with_its_counts(world):
    _, _, who, ops = world
    got = {t.tenant: (t.slide_count, t.tile_count) for t in ops.ListTenants(gateway_pb2.ListTenantsRequest()).tenants}
    for t in (A, B):  # as each tenant counts its own
        own = listed(who[t])
        assert got[t] == (len(own), sum(s.tile_count for s in own.values()))
    assert got[A][0] == 2 and got[B][0] == 1


def test_a_move_is_refused_without_changing_anything_when_it_cannot_be_done(world):
    _, _, who, ops = world
    before = {t: listed(who[t]) for t in (A, B)}
    cases = [
        (gateway_pb2.MoveSlideRequest(slide_id="nope", from_tenant=A, to_tenant=B), grpc.StatusCode.NOT_FOUND),
        (gateway_pb2.MoveSlideRequest(slide_id="m1", from_tenant=B, to_tenant=A), grpc.StatusCode.NOT_FOUND),
        (gateway_pb2.MoveSlideRequest(slide_id="s1", from_tenant=A, to_tenant=B), grpc.StatusCode.ALREADY_EXISTS),
        (gateway_pb2.MoveSlideRequest(slide_id="m1", from_tenant=A, to_tenant=A), grpc.StatusCode.ALREADY_EXISTS),
        (gateway_pb2.MoveSlideRequest(slide_id="m1", from_tenant=A, to_tenant="a/b"), grpc.StatusCode.INVALID_ARGUMENT),
        (gateway_pb2.MoveSlideRequest(slide_id="a/b", from_tenant=A, to_tenant=B), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for req, code in cases:
        assert code_of(ops.MoveSlide, req) == code, req
    assert {t: listed(who[t]) for t in (A, B)} == before


def test_a_moved_slide_is_the_new_tenants_with_every_tile_and_the_old_tenants_no_more(world):
    settings, _, who, ops = world
    old = who[A].GetSlide(gateway_pb2.GetSlideRequest(slide_id="m1")).slide
    query = gateway_pb2.SearchRequest(region=region("m1"), k=50, slide_ids=["m1"])
    first = who[A].Search(query)
    assert who[A].Search(query).cached  # site-a's region query is in the cache now

    def tiles(resp):
        return [(h.x, h.y, h.width, h.height, round(h.score, 4)) for h in resp.hits]

    moved = ops.MoveSlide(gateway_pb2.MoveSlideRequest(slide_id="m1", from_tenant=A, to_tenant=B))
    assert moved.moved_tiles == old.tile_count > 0
    assert (moved.slide.tenant, moved.slide.slide_id, moved.slide.tile_count) == (B, "m1", old.tile_count)

    # The audit trail names the caller's tenant and both tenants of the move, attempt and outcome.
    got = records(settings, ops.last_request_id)
    outcome, attempt = got[ops.last_request_id], got[ops.last_request_id + ".attempt"]
    assert outcome["outcomeDesc"] == "OK" and attempt["outcomeDesc"] == "ATTEMPTED"
    for record in (outcome, attempt):
        assert extensions(record) == {"urn:smily:tenant": "ops", "urn:smily:tenant:from": A, "urn:smily:tenant:to": B}
        assert {e["what"]["identifier"]["value"] for e in record["entity"]} >= {"m1"}

    # site-a: gone everywhere, its cached query included.
    assert "m1" not in listed(who[A])
    assert code_of(who[A].GetSlide, gateway_pb2.GetSlideRequest(slide_id="m1")) == grpc.StatusCode.NOT_FOUND
    assert code_of(who[A].Search, query) == grpc.StatusCode.NOT_FOUND
    image = who[B].ReadRegion(gateway_pb2.ReadRegionRequest(region=region("m1"))).image
    hits_a = who[A].Search(gateway_pb2.SearchRequest(image=image, k=50)).hits
    assert hits_a and {(h.tenant, h.slide_id) for h in hits_a} == {(A, "s1")}

    # site-b: the same slide, every tile with its embedding (the same region finds the same tiles,
    # scored alike), computed afresh for site-b rather than served from site-a's cache entry.
    assert listed(who[B])["m1"].tile_count == old.tile_count
    assert who[B].GetSlide(gateway_pb2.GetSlideRequest(slide_id="m1")).slide.tenant == B
    after = who[B].Search(query)
    assert not after.cached and {h.tenant for h in after.hits} == {B}
    assert tiles(after) == tiles(first)
    info = {t: who[t].GetIndexInfo(gateway_pb2.GetIndexInfoRequest()) for t in (A, B)}
    counts = {t.tenant: t for t in ops.ListTenants(gateway_pb2.ListTenantsRequest()).tenants}
    assert (info[B].slide_count, info[A].slide_count) == (counts[B].slide_count, counts[A].slide_count) == (2, 1)
    assert info[B].tile_count == counts[B].tile_count


def test_one_tenants_full_ingest_queue_leaves_another_tenant_ingesting_and_searching(world, idp):
    settings, stub, who, _ = world
    c, d = (caller(idp, stub, t, TENANT_ROLES) for t in (C, D))
    # One ingest worker and one queue slot per tenant: site-c's second waiting ingest is one too many.
    started, refused = [], None
    for n in range(10):
        try:
            started.append(c.IngestSlide(gateway_pb2.IngestSlideRequest(source="synth-c-40x.svs", slide_id=f"c{n}")))
        except grpc.RpcError as exc:
            refused = exc
            break
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ingests of this tenant are waiting" in refused.details()
    # site-d is not held back by site-c's queue: its ingest is taken and finishes, and site-a still searches.
    op = d.IngestSlide(gateway_pb2.IngestSlideRequest(source="synth-a.tiff", slide_id="d1")).operation
    assert who[A].Search(gateway_pb2.SearchRequest(region=region("s1"), k=5)).hits
    assert wait(d, op).state == gateway_pb2.OPERATION_STATE_SUCCEEDED
    assert [s.slide_id for s in d.ListSlides(gateway_pb2.ListSlidesRequest()).slides] == ["d1"]
    hits = d.Search(gateway_pb2.SearchRequest(region=region("d1"), k=5)).hits
    assert hits and {(h.tenant, h.slide_id) for h in hits} == {(D, "d1")}
    for resp in started:  # site-c's own ingests were not harmed either
        assert wait(c, resp.operation).state == gateway_pb2.OPERATION_STATE_SUCCEEDED


@pytest.fixture
def two_shards(model_repo, tmp_path):
    """Two real index servers, the gateway's view of them (placement by tenant and slide id)."""
    running = []
    targets = []
    for n in range(2):
        r, s = stack.start(["index"], base_settings(index_dir=str(tmp_path / f"shard-{n}")))
        running.append(r)
        targets.append(f"127.0.0.1:{s.index.index_port}")
    router, _ = connect(targets)
    yield Backend("index", router), router
    router.close()
    for r in running:
        stack.stop(r, 0)


def test_a_move_lands_on_the_shard_placement_names_for_the_new_tenant(two_shards):
    import numpy as np

    from smily.common.tensors import from_tensor, to_tensor

    index, router = two_shards
    # An id whose shard differs between the two tenants, so the move crosses shards.
    slide_id = next(f"x{i}" for i in range(100) if shard_of_slide(A, f"x{i}", 2) != shard_of_slide(B, f"x{i}", 2))
    tiling = Tiling.from_settings(base_settings().gateway)
    vectors = np.random.default_rng(5).standard_normal((1500, 16)).astype(np.float32)  # more than one page
    rects = [index_pb2.TileRect(x=i * 10, y=0, width=10, height=10, mpp=tiling.mpps[0]) for i in range(len(vectors))]
    add = index_pb2.AddTilesRequest(
        model_id="m/1", tenant=A, slide_id=slide_id, generation="g", tiles=rects, embeddings=to_tensor(vectors)
    )
    tiling.to_pb(add.tiling)
    index.AddTiles(add)
    index.CommitSlide(
        index_pb2.CommitSlideRequest(
            model_id="m/1",
            generation="g",
            expected_tiles=len(vectors),
            slide=index_pb2.Slide(slide_id=slide_id, tenant=A, source="x.svs", metadata={"k": "v"}),
        )
    )
    slide, moved = moves.move_slide(index, IndexTiling(index, tiling), slide_id, A, B, 30)
    assert (slide.tenant, slide.tile_count, moved, dict(slide.metadata)) == (B, len(vectors), len(vectors), {"k": "v"})
    placed = shard_of_slide(B, slide_id, 2)
    for n, shard in enumerate(router.shards):
        held = {s.tenant for s in shard.call("ListTenants", index_pb2.ListTenantsRequest()).tenants}
        assert held == ({B} if n == placed else set()), n
    # Every tile and embedding, as it was.
    got, after = [], 0
    while True:
        page = index.ReadSlideTiles(index_pb2.ReadSlideTilesRequest(slide_id=slide_id, tenant=B, after=after))
        got.append((list(page.tiles), from_tensor(page.embeddings)))
        after = page.next_after
        if not after:
            break
    assert [t.x for tiles, _ in got for t in tiles] == [r.x for r in rects]
    stored = np.concatenate([v for _, v in got if len(v)])
    assert np.allclose(stored, vectors.astype(np.float16).astype(np.float32))
