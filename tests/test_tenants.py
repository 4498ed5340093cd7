"""Issue 24 end to end: two tenants and one grant against real servers (tiler, embedder, index,
gateway with OIDC tokens naming the tenant, Redis for the cache and operations).

site-a and site-b each ingest a slide under the same id "s1" (from different files) and site-b one
more; research is granted site-a. Nothing of one tenant may reach another without a grant: no hit,
id, count, metadata, pixel, operation, concept or page token. Another tenant's things are NOT_FOUND.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest

from smily import stack
from smily.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from smily.synthetic import SlideSpec, write_samples

from .conftest import base_settings
from .helpers import oidc
from .helpers.caller import As
from .helpers.orthanc import Orthanc

ROLES = ["smily.search", "smily.ingest", "smily.admin"]
A, B, R = "site-a", "site-b", "research"
# site-a's and site-b's "s1" come from different files; "b2" is site-b's alone.
SLIDES = {A: {"s1": "synth-a.tiff"}, B: {"s1": "synth-b.svs", "b2": "synth-c-40x.svs"}}


@pytest.fixture(scope="module")
def idp():
    p = oidc.IdP()
    yield p
    p.close()


CASE = "ACC-TENANT-1"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding one case of one slide, for IngestCase."""
    work = tmp_path_factory.mktemp("tenant-orthanc")
    spec = SlideSpec("case.tiff", "tiff", 2048, 2048, 0.5, 41)
    (path,) = write_samples(str(tmp_path_factory.mktemp("tenant-case")), (spec,))
    orthanc = Orthanc(str(work))
    orthanc.push_slide(path, spec.width, spec.height, spec.mpp, str(work), AccessionNumber=CASE)
    yield orthanc
    orthanc.stop()


@pytest.fixture(scope="module")
def tenants(idp, slide_dir, model_repo, redis_url, pacs, tmp_path_factory):
    audit_log = str(tmp_path_factory.mktemp("tenant-audit") / "audit.jsonl")
    s = base_settings(
        auth="oidc",
        oidc_issuer=idp.issuer,
        oidc_audience=oidc.AUDIENCE,
        oidc_tenant_claim="org.tenant",  # a dotted path, as Keycloak mappers nest claims
        tenant_grants=f"{R}={A}",
        slide_roots=(slide_dir,),
        model_repository=model_repo,
        index_dir=str(tmp_path_factory.mktemp("tenant-index")),
        redis_url=redis_url,
        audit_log=audit_log,
        dicomweb_url=(f"pacs={pacs.dicomweb}",),
    )
    running, s = stack.start(stack.ORDER, s)
    stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(f"127.0.0.1:{s.gateway.gateway_port}"))
    yield s, stub
    stack.stop(running, 0)


def token(idp, tenant, roles=ROLES, **claims):
    return idp.token(roles, sub=f"user-of-{tenant}", org={"tenant": tenant}, **claims)


def code_of(fn, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(request)
    return info.value.code(), info.value.details()


def wait(caller: As, op):
    while op.state in (gateway_pb2.OPERATION_STATE_QUEUED, gateway_pb2.OPERATION_STATE_RUNNING):
        time.sleep(0.2)
        op = caller.GetOperation(gateway_pb2.GetOperationRequest(operation_id=op.operation_id)).operation
    return op


@pytest.fixture(scope="module")
def world(tenants, idp):
    settings, stub = tenants
    who = {t: As(stub, token(idp, t)) for t in (A, B, R)}
    ops = {}
    for tenant, slides in SLIDES.items():
        for slide_id, source in slides.items():
            req = gateway_pb2.IngestSlideRequest(source=source, slide_id=slide_id, metadata={"site": tenant})
            op = wait(who[tenant], who[tenant].IngestSlide(req).operation)
            assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, (tenant, slide_id, op.error_message)
            assert op.tenant == tenant
            ops[(tenant, slide_id)] = op
    return settings, who, ops


def region(slide_id, tenant=""):
    return gateway_pb2.Region(slide_id=slide_id, tenant=tenant, x=0, y=0, width=512, height=512)


def listed(caller: As) -> set[tuple[str, str, str]]:
    out, page = set(), ""
    while True:
        resp = caller.ListSlides(gateway_pb2.ListSlidesRequest(page_size=1, page_token=page))
        out |= {(s.tenant, s.slide_id, s.metadata["site"]) for s in resp.slides}
        page = resp.next_page_token
        if not page:
            return out


def test_a_token_without_a_valid_tenant_is_refused_and_recorded(tenants, idp):
    settings, stub = tenants
    for bad in (None, "", "x" * 65, "a/b", "a b", 7, ["site-a"]):
        caller = As(stub, idp.token(ROLES, org={"tenant": bad} if bad is not None else {}))
        assert code_of(caller.ListSlides, gateway_pb2.ListSlidesRequest()) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "the token names no tenant",
        ), bad
        with open(settings.auth.audit_log) as fh:
            record = {r["id"]: r for r in map(json.loads, fh)}[caller.last_request_id]
        assert record["outcomeDesc"] == "PERMISSION_DENIED"


def test_listing_getting_and_counting_stay_in_the_readable_tenants(world):
    _, who, _ = world
    assert listed(who[A]) == {(A, "s1", A)}
    assert listed(who[B]) == {(B, "s1", B), (B, "b2", B)}
    assert listed(who[R]) == {(A, "s1", A)}  # granted site-a, not site-b
    assert who[A].GetSlide(gateway_pb2.GetSlideRequest(slide_id="s1")).slide.metadata["site"] == A
    assert who[B].GetSlide(gateway_pb2.GetSlideRequest(slide_id="s1")).slide.metadata["site"] == B
    assert who[R].GetSlide(gateway_pb2.GetSlideRequest(slide_id="s1")).slide.tenant == A
    for caller, slide_id, tenant in ((A, "b2", ""), (A, "b2", B), (R, "b2", ""), (R, "s1", B), (A, "s1", B)):
        got = code_of(who[caller].GetSlide, gateway_pb2.GetSlideRequest(slide_id=slide_id, tenant=tenant))
        assert got[0] == grpc.StatusCode.NOT_FOUND, (caller, slide_id, tenant)
    info = {t: who[t].GetIndexInfo(gateway_pb2.GetIndexInfoRequest()) for t in (A, B, R)}
    assert [info[t].slide_count for t in (A, B, R)] == [1, 2, 1]
    assert info[A].tile_count == info[R].tile_count < info[A].tile_count + info[B].tile_count


def test_searches_return_only_readable_tenants_and_the_cache_is_per_tenant(world):
    _, who, _ = world
    hits = {}
    for t in (A, B, R):
        resp = who[t].Search(gateway_pb2.SearchRequest(region=region("s1"), k=30))
        hits[t] = resp
        assert resp.hits
    assert {(h.tenant, h.metadata["site"]) for h in hits[A].hits} == {(A, A)}
    assert {(h.tenant, h.metadata["site"]) for h in hits[B].hits} == {(B, B)}
    assert {h.tenant for h in hits[R].hits} == {A}
    # The same patch (site-a's s1 region) searched by site-a and by research: research's first
    # search is no cache hit, though site-a's embedding is cached.
    image = who[A].ReadRegion(gateway_pb2.ReadRegionRequest(region=region("s1"))).image
    first = {t: who[t].Search(gateway_pb2.SearchRequest(image=image, k=5)).cached for t in (A, B)}
    assert first == {A: False, B: False}
    assert who[A].Search(gateway_pb2.SearchRequest(image=image, k=5)).cached
    # Filters chosen by the caller cannot widen the scope.
    for t in (A, R):
        resp = who[t].Search(gateway_pb2.SearchRequest(region=region("s1"), k=30, filters={"site": B}))
        assert not resp.hits
        resp = who[t].Search(gateway_pb2.SearchRequest(region=region("s1"), k=30, slide_ids=["b2"]))
        assert not resp.hits


def test_page_tokens_are_bound_to_the_tenant(world):
    _, who, _ = world
    req = gateway_pb2.SearchRequest(region=region("s1"), k=20, page_size=5)
    first = who[A].Search(req)
    assert first.next_page_token
    req.page_token = first.next_page_token
    assert who[A].Search(req).hits  # the owner pages on
    for t in (B, R):  # replayed by another tenant (research even has the same region readable)
        assert code_of(who[t].Search, req)[0] == grpc.StatusCode.NOT_FOUND
    forged = req.page_token[:-1] + ("0" if req.page_token[-1] != "0" else "1")
    req.page_token = forged
    assert code_of(who[A].Search, req)[0] == grpc.StatusCode.NOT_FOUND
    page = who[B].ListSlides(gateway_pb2.ListSlidesRequest(page_size=1)).next_page_token
    assert page
    assert code_of(who[A].ListSlides, gateway_pb2.ListSlidesRequest(page_token=page))[0] == grpc.StatusCode.NOT_FOUND


def test_whole_slide_search_stays_in_the_readable_tenants(world):
    _, who, _ = world
    for t, expected in ((A, {A}), (B, {B}), (R, {A})):
        resp = who[t].SearchSlides(gateway_pb2.SearchSlidesRequest(slide_id="s1", k=5))
        assert resp.slides and {m.tenant for m in resp.slides} == expected
        assert {h.tenant for m in resp.slides for h in m.regions} == expected
    assert code_of(who[A].SearchSlides, gateway_pb2.SearchSlidesRequest(slide_id="b2"))[0] == grpc.StatusCode.NOT_FOUND


def test_pixels_are_read_only_within_the_readable_tenants(world):
    _, who, _ = world
    own = who[A].ReadRegion(gateway_pb2.ReadRegionRequest(region=region("s1"))).image
    granted = who[R].ReadRegion(gateway_pb2.ReadRegionRequest(region=region("s1", A))).image
    assert own == granted
    assert who[B].ReadRegion(gateway_pb2.ReadRegionRequest(region=region("s1"))).image != own  # B's own s1
    for caller, rgn in ((A, region("b2")), (R, region("b2")), (R, region("s1", B)), (A, region("s1", B))):
        assert (
            code_of(who[caller].ReadRegion, gateway_pb2.ReadRegionRequest(region=rgn))[0] == grpc.StatusCode.NOT_FOUND
        )


def test_concepts_are_per_tenant(world):
    _, who, _ = world
    made = gateway_pb2.CreateConceptRequest(
        name="glands",
        with_examples=[gateway_pb2.Example(region=region("s1"))],
        without_examples=[
            gateway_pb2.Example(region=gateway_pb2.Region(slide_id="s1", x=512, y=512, width=512, height=512))
        ],
    )
    who[A].CreateConcept(made)
    assert [c.name for c in who[A].ListConcepts(gateway_pb2.ListConceptsRequest()).concepts] == ["glands"]
    for t in (B, R):
        assert not who[t].ListConcepts(gateway_pb2.ListConceptsRequest()).concepts
        steered = gateway_pb2.SearchRequest(
            region=region("s1"), concepts=[gateway_pb2.WeightedConcept(name="glands", weight=1)]
        )
        assert code_of(who[t].Search, steered)[0] == grpc.StatusCode.NOT_FOUND
        assert (
            code_of(who[t].DeleteConcept, gateway_pb2.DeleteConceptRequest(name="glands"))[0]
            == grpc.StatusCode.NOT_FOUND
        )
    who[A].DeleteConcept(gateway_pb2.DeleteConceptRequest(name="glands"))


def not_their_operation(caller: As, operation_id: str) -> bool:
    """Both GetOperation and CancelOperation answer NOT_FOUND."""
    get = code_of(caller.GetOperation, gateway_pb2.GetOperationRequest(operation_id=operation_id))[0]
    cancel = code_of(caller.CancelOperation, gateway_pb2.CancelOperationRequest(operation_id=operation_id))[0]
    return get == cancel == grpc.StatusCode.NOT_FOUND


def test_operations_belong_to_their_tenant(world):
    _, who, ops = world
    op = ops[(A, "s1")]
    assert who[A].GetOperation(gateway_pb2.GetOperationRequest(operation_id=op.operation_id)).operation.tenant == A
    for t in (B, R):
        assert not_their_operation(who[t], op.operation_id)


def test_a_grant_gives_no_write_and_deletes_stay_in_the_tenant(world, idp, tenants):
    _, who, _ = world
    _, stub = tenants
    assert code_of(who[R].DeleteSlide, gateway_pb2.DeleteSlideRequest(slide_id="s1"))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(who[A].DeleteSlide, gateway_pb2.DeleteSlideRequest(slide_id="b2"))[0] == grpc.StatusCode.NOT_FOUND
    assert listed(who[A]) == {(A, "s1", A)} and (B, "b2", B) in listed(who[B])
    # A third tenant ingests and deletes its own "s1": the others' s1 stay.
    c = As(stub, token(idp, "site-c"))
    op = wait(
        c,
        c.IngestSlide(
            gateway_pb2.IngestSlideRequest(source="synth-a.tiff", slide_id="s1", metadata={"site": "c"})
        ).operation,
    )
    assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED and op.tenant == "site-c"
    assert listed(c) == {("site-c", "s1", "c")}
    assert c.DeleteSlide(gateway_pb2.DeleteSlideRequest(slide_id="s1")).deleted_tiles > 0
    assert listed(who[A]) == {(A, "s1", A)} and (B, "s1", B) in listed(who[B])


def test_every_audit_record_names_the_tenant(world):
    settings, who, _ = world
    who[B].ListSlides(gateway_pb2.ListSlidesRequest())
    with open(settings.auth.audit_log) as fh:
        records = {r["id"]: r for r in map(json.loads, fh)}
    assert records[who[B].last_request_id]["extension"] == [{"url": "urn:smily:tenant", "valueString": B}]


@pytest.fixture(scope="module")
def http(tenants):
    """`smily serve http` in front of the tenants' gateway; it passes each caller's token on."""
    from smily.http.server import Running

    settings, _ = tenants
    server = Running(settings.replace(http_port=0, http_gateway_target=f"127.0.0.1:{settings.gateway.gateway_port}"))
    yield server.url
    server.stop()


def test_http_routes_and_iiif_obey_the_same_rule(world, http, idp):
    import httpx

    def get(path, tenant, **kw):
        return httpx.get(http + path, headers={"authorization": f"Bearer {token(idp, tenant)}"}, timeout=300, **kw)

    assert {(s["tenant"], s["slideId"]) for s in get("/v1/slides", A).json()["slides"]} == {(A, "s1")}
    assert {(s["tenant"], s["slideId"]) for s in get("/v1/slides", R).json()["slides"]} == {(A, "s1")}
    assert get("/v1/slides/b2", A).status_code == 404 and get("/v1/slides/b2", B).status_code == 200
    assert get("/v1/index", A).json()["slideCount"] == "1"
    assert get("/v1/index", R).json()["tenant"] == R and get("/v1/index", R).json()["readableTenants"] == [R, A]
    assert get("/iiif/3/b2/info.json", A).status_code == 404 and get("/iiif/3/b2/info.json", B).status_code == 200
    tile = "/iiif/3/s1/0,0,512,512/256,/0/default.png"
    pixels = {t: get(tile, t) for t in (A, B, R)}
    assert all(r.status_code == 200 for r in pixels.values())
    assert pixels[A].content == pixels[R].content != pixels[B].content  # B's own s1 is another file
    assert get("/iiif/3/b2/0,0,512,512/256,/0/default.png", R).status_code == 404
    search = httpx.post(
        http + "/v1/search",
        json={"region": {"slideId": "b2", "x": 0, "y": 0, "width": 512, "height": 512}},
        headers={"authorization": f"Bearer {token(idp, A)}"},
        timeout=300,
    )
    assert search.status_code == 404
    hits = httpx.post(
        http + "/v1/search",
        json={"region": {"slideId": "s1", "x": 0, "y": 0, "width": 512, "height": 512}, "k": 20},
        headers={"authorization": f"Bearer {token(idp, R)}"},
        timeout=300,
    ).json()["hits"]
    assert hits and {h["tenant"] for h in hits} == {A}


def test_a_case_lands_in_the_callers_tenant_and_its_operation_is_its_own(world, idp, tenants):
    _, who, _ = world
    _, stub = tenants
    d = As(stub, token(idp, "site-d"))
    op = wait(d, d.IngestCase(gateway_pb2.IngestCaseRequest(accession_number=CASE, metadata={"site": "d"})).operation)
    assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED and op.tenant == "site-d", op.error_message
    (series,) = [s.slide_id for s in op.slides]
    assert listed(d) == {("site-d", series, "d")}
    for t in (A, B, R):
        assert all(tenant != "site-d" for tenant, _, _ in listed(who[t]))
        assert code_of(who[t].GetSlide, gateway_pb2.GetSlideRequest(slide_id=series))[0] == grpc.StatusCode.NOT_FOUND
        assert not_their_operation(who[t], op.operation_id)
        assert not_their_operation(who[t], op.slides[0].operation_id)  # the case's slide ingest
