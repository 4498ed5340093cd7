"""The gateway's trust boundary end to end: TLS, OIDC tokens, roles, the audit trail.

A real identity provider (tests/helpers/oidc.py) serves its JWKS on loopback; the
backends run mTLS and accept only the gateway's certificate; the gateway
runs TLS and verifies bearer tokens. Every refusal's status is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smily import stack
from smily.client import Client
from smily.common import viewsession
from smily.common.channels import channel
from smily.gateway import auth
from smily.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from smily.index.v1 import index_pb2, index_pb2_grpc

from .conftest import base_settings
from .helpers import oidc
from .helpers.pki import CA
from .helpers.wait import wait_done
from .test_tls import read

SEARCH, INGEST, ADMIN = ["smily.search"], ["smily.ingest"], ["smily.admin"]


@pytest.fixture(scope="module")
def idp():
    p = oidc.IdP()
    yield p
    p.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("auth-pki"))
    ca = CA(d)
    return {"ca": ca, "gateway": ca.issue("smily-gateway"), "stranger": ca.issue("stranger")}


@pytest.fixture(scope="module")
def secured(idp, pki, slide_dir, model_repo, tmp_path_factory):
    """Backends under mTLS, the gateway under TLS + OIDC, its audit trail in a file."""
    cert, key = pki["gateway"]
    audit_log = str(tmp_path_factory.mktemp("audit") / "audit.jsonl")
    s = base_settings(
        plaintext=False,
        auth="oidc",
        tls_cert_file=cert,
        tls_key_file=key,
        tls_ca_file=pki["ca"].path,
        tls_client_auth="require",
        slide_roots=(slide_dir,),
        model_repository=model_repo,
        index_dir=str(tmp_path_factory.mktemp("auth-index")),
        oidc_issuer=idp.issuer,
        oidc_audience=oidc.AUDIENCE,
        audit_log=audit_log,
    )
    back, s = stack.start(["tiler", "embedder", "index"], s)
    # Callers of the gateway need TLS and a token, not a client certificate.
    front, s = stack.start(["gateway"], s.replace(tls_client_auth="none"))
    yield s
    stack.stop(front, 0)
    stack.stop(back, 0)


def gateway(settings, ca_path: str | None = None):
    ca = read(ca_path or settings.tls.tls_ca_file)
    return gateway_pb2_grpc.GatewayServiceStub(
        channel(f"127.0.0.1:{settings.gateway.gateway_port}", grpc.ssl_channel_credentials(ca))
    )


def call(fn, request, token: str | None = None, **metadata) -> tuple[grpc.StatusCode, str, str]:
    """(status, details, request id) of one call with an optional bearer token."""
    rid = uuid.uuid4().hex
    md = [("x-request-id", rid)] + [(k.replace("_", "-"), v) for k, v in metadata.items()]
    if token is not None:
        md.append(("authorization", f"Bearer {token}"))
    try:
        fn(request, metadata=md, timeout=120)
        return grpc.StatusCode.OK, "", rid
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), rid


def audit_records(settings) -> dict[str, dict]:
    with open(settings.auth.audit_log) as fh:
        return {r["id"]: r for r in map(json.loads, fh)}


def record_of(settings, rid: str) -> dict:
    return audit_records(settings)[rid]


LIST = gateway_pb2.ListSlidesRequest(page_size=10)


def refusals(idp):
    """Every bad credential, and what the gateway must answer."""
    U = grpc.StatusCode.UNAUTHENTICATED
    good = idp.token(SEARCH)
    idp.add_key("rsa-unpublished", publish=False)
    return {
        "missing header": (None, U, "missing bearer token"),
        "not a JWT": ("not-a-jwt", U, "malformed token"),
        "expired": (
            idp.token(SEARCH, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200, nbf=int(time.time()) - 7200),
            U,
            "token expired",
        ),
        "not yet valid": (idp.token(SEARCH, nbf=int(time.time()) + 3600), U, "token not yet valid"),
        "wrong audience": (idp.token(SEARCH, aud="another-app"), U, "invalid token"),
        "wrong issuer": (idp.token(SEARCH, iss="https://evil.example/realms/test"), U, "invalid token"),
        "no exp claim": (idp.token(SEARCH, exp=None), U, "invalid token"),
        "unknown kid": (idp.token(SEARCH, kid="rsa-unpublished"), U, "invalid token"),
        "tampered signature": (oidc.tampered(good), U, "invalid token"),
        "roles rewritten under the signature": (oidc.escalated(good), U, "invalid token"),
        "alg none": (idp.unsigned(ADMIN), U, "invalid token"),
        "HS256 signed with the public key": (idp.hs256_with_public_key(ADMIN), U, "invalid token"),
        "ingest role on a search RPC": (
            idp.token(INGEST),
            grpc.StatusCode.PERMISSION_DENIED,
            "this call needs the role smily.search",
        ),
        "no roles": (idp.token([]), grpc.StatusCode.PERMISSION_DENIED, "this call needs the role smily.search"),
    }


def test_every_bad_credential_is_refused_with_its_status_and_recorded(secured, idp):
    stub = gateway(secured)
    outcomes = {}
    for case, (token, code, message) in refusals(idp).items():
        got, details, rid = call(stub.ListSlides, LIST, token)
        outcomes[case] = got.name
        assert (got, details) == (code, message), case
        rec = record_of(secured, rid)
        assert rec["outcomeDesc"] == code.name and rec["outcome"] == "4", case
        assert rec["subtype"][0]["display"] == "ListSlides"
    print("\nrefusals:", json.dumps(outcomes, indent=1))


def test_a_valid_token_of_each_role(secured, idp):
    stub = gateway(secured)
    for roles, expected in (
        (SEARCH, grpc.StatusCode.OK),
        (ADMIN, grpc.StatusCode.OK),
        (INGEST, grpc.StatusCode.PERMISSION_DENIED),
    ):
        assert call(stub.ListSlides, LIST, idp.token(roles))[0] == expected, roles
    # An EC key from the same JWKS verifies too.
    assert call(stub.ListSlides, LIST, idp.token(SEARCH, kid="ec-1"))[0] == grpc.StatusCode.OK
    # The ingest role's own RPCs: authorised, so an unknown concept is the index's NOT_FOUND.
    code, _, _ = call(stub.DeleteConcept, gateway_pb2.DeleteConceptRequest(name="nothing"), idp.token(INGEST))
    assert code == grpc.StatusCode.NOT_FOUND
    assert (
        call(stub.DeleteConcept, gateway_pb2.DeleteConceptRequest(name="x"), idp.token(SEARCH))[0]
        == grpc.StatusCode.PERMISSION_DENIED
    )


def test_a_plaintext_client_fails(secured, idp):
    plain = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(f"127.0.0.1:{secured.gateway.gateway_port}"))
    assert call(plain.ListSlides, LIST, idp.token(ADMIN))[0] == grpc.StatusCode.UNAVAILABLE


def test_health_needs_no_token(secured):
    ca = read(secured.tls.tls_ca_file)
    ch = channel(f"127.0.0.1:{secured.gateway.gateway_port}", grpc.ssl_channel_credentials(ca))
    health = health_pb2_grpc.HealthStub(ch)
    assert (
        health.Check(health_pb2.HealthCheckRequest(service="smily.gateway.v1.GatewayService"), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )


def test_a_backend_called_without_the_gateway_certificate_is_refused(secured, pki):
    ca = read(pki["ca"].path)
    cert, key = pki["stranger"]
    stranger = grpc.ssl_channel_credentials(ca, read(key), read(cert))
    for creds, code in (
        (None, grpc.StatusCode.UNAVAILABLE),
        (grpc.ssl_channel_credentials(ca), grpc.StatusCode.UNAVAILABLE),
        (stranger, grpc.StatusCode.PERMISSION_DENIED),
    ):
        index = index_pb2_grpc.IndexServiceStub(channel(secured.index.index_target, creds))
        with pytest.raises(grpc.RpcError) as info:
            index.ListSlides(index_pb2.ListSlidesRequest(), timeout=10)
        assert info.value.code() == code


def test_roles_follow_the_rpc_and_each_call_is_audited(secured, idp):
    """Done-when: ingest with smily.ingest, search with smily.search, a search token cannot delete, admin can."""
    ingest_client = Client(
        f"127.0.0.1:{secured.gateway.gateway_port}",
        timeout=300,
        tls_ca=secured.tls.tls_ca_file,
        token=idp.token(INGEST + SEARCH),
    )
    op = wait_done(ingest_client, ingest_client.ingest("synth-a.tiff", "auth-a", {"case_id": "CASE-7"}))
    assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED
    ingest_client.close()
    stub = gateway(secured)
    region = gateway_pb2.Region(slide_id="auth-a", x=600, y=600, width=448, height=448)

    code, _, rid = call(
        stub.Search, gateway_pb2.SearchRequest(region=region, k=3), idp.token(SEARCH), x_forwarded_for="198.51.100.7"
    )
    assert code == grpc.StatusCode.OK
    rec = record_of(secured, rid)
    assert rec["resourceType"] == "AuditEvent" and rec["action"] == "E" and rec["outcome"] == "0"
    assert rec["type"]["code"] == "110112"
    assert rec["agent"][0]["who"]["identifier"] == {"system": idp.issuer, "value": "user-1"}
    assert rec["agent"][0]["network"]["address"] == "198.51.100.7"  # the forwarded client
    assert rec["agent"][1]["network"]["address"] == "127.0.0.1"  # the front end that forwarded it
    returned = {
        (e["what"]["identifier"]["system"], e["what"]["identifier"]["value"])
        for e in rec["entity"]
        if e["description"] == "returned"
    }
    assert ("urn:smily:slide", "auth-a") in returned and ("urn:smily:case", "CASE-7") in returned
    assert all("synth-a" not in json.dumps(r) for r in audit_records(secured).values()), "a file name leaked"

    # A session id the caller made up covers nothing: every read is recorded on its own.
    before = len(audit_records(secured))
    tiles = [
        gateway_pb2.ReadRegionRequest(region=gateway_pb2.Region(slide_id="auth-a", x=x, y=0, width=256, height=256))
        for x in (0, 256, 512)
    ]
    made_up = f"{int(time.time())}.bm90LW1pbnRlZC1ieS10aGUtc2VydmVy"
    for session in ("view-1", made_up):
        reads = [call(stub.ReadRegion, t, idp.token(SEARCH), x_smily_view_session=session) for t in tiles]
        assert [c for c, _, _ in reads] == [grpc.StatusCode.OK] * 3
    assert len(audit_records(secured)) == before + 6

    code, details, rid = call(stub.DeleteSlide, gateway_pb2.DeleteSlideRequest(slide_id="auth-a"), idp.token(SEARCH))
    assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, "this call needs the role smily.admin")
    rec = record_of(secured, rid)
    assert rec["outcomeDesc"] == "PERMISSION_DENIED" and rec["action"] == "D"
    assert {e["what"]["identifier"]["value"] for e in rec["entity"]} == {"auth-a"}

    code, _, rid = call(stub.DeleteSlide, gateway_pb2.DeleteSlideRequest(slide_id="auth-a"), idp.token(ADMIN))
    assert code == grpc.StatusCode.OK
    rec = record_of(secured, rid)
    assert rec["outcomeDesc"] == "OK" and rec["entity"][0]["description"] == "written"
    assert "forwarding proxy" not in json.dumps(rec["agent"])

    code, _, rid = call(stub.DeleteSlide, gateway_pb2.DeleteSlideRequest(slide_id="auth-a"), None)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert record_of(secured, rid)["agent"][0]["who"]["identifier"]["value"] == "anonymous"


def test_every_rpc_writes_one_record(secured, idp):
    stub = gateway(secured)
    token = idp.token(ADMIN)
    calls = {
        "IngestSlide": gateway_pb2.IngestSlideRequest(),
        "GetOperation": gateway_pb2.GetOperationRequest(operation_id="nope"),
        "CancelOperation": gateway_pb2.CancelOperationRequest(operation_id="nope"),
        "Search": gateway_pb2.SearchRequest(),
        "SearchSlides": gateway_pb2.SearchSlidesRequest(slide_id="missing"),
        "ReadRegion": gateway_pb2.ReadRegionRequest(region=gateway_pb2.Region(slide_id="missing", width=8, height=8)),
        "CreateConcept": gateway_pb2.CreateConceptRequest(name="c"),
        "ListConcepts": gateway_pb2.ListConceptsRequest(),
        "DeleteConcept": gateway_pb2.DeleteConceptRequest(name="c"),
        "ListSlides": LIST,
        "DeleteSlide": gateway_pb2.DeleteSlideRequest(slide_id="missing"),
        "IngestCase": gateway_pb2.IngestCaseRequest(accession_number="NO-SUCH-CASE"),
        "GetSlide": gateway_pb2.GetSlideRequest(slide_id="missing"),
        "GetIndexInfo": gateway_pb2.GetIndexInfoRequest(),
        "GetSlideHeatmap": gateway_pb2.GetSlideHeatmapRequest(slide_id="missing"),
        "ExportSearch": gateway_pb2.ExportSearchRequest(search_id="0" * 32, format="geojson"),
        # The operator's: refused to a tenant's admin, so this write is never attempted.
        "ListTenants": gateway_pb2.ListTenantsRequest(),
        "MoveSlide": gateway_pb2.MoveSlideRequest(slide_id="missing", from_tenant="a", to_tenant="b"),
        # The model lifecycle's, to a model no embedder serves or the index does not hold.
        "MigrateIndex": gateway_pb2.MigrateIndexRequest(model_id="no-such/1"),
        "CutoverIndex": gateway_pb2.CutoverIndexRequest(model_id="no-such/1"),
        "DropIndexModel": gateway_pb2.DropIndexModelRequest(model_id="no-such/1"),
    }
    assert set(calls) == {m.name for m in gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].methods}
    writes = {"IngestSlide", "IngestCase", "CancelOperation", "CreateConcept", "DeleteConcept", "DeleteSlide"}
    writes |= {"MigrateIndex", "CutoverIndex", "DropIndexModel"}
    before = len(audit_records(secured))
    for name, request in calls.items():
        code, _, rid = call(getattr(stub, name), request, token)
        rec = record_of(secured, rid)
        assert rec["subtype"][0]["display"] == name and rec["outcomeDesc"] == code.name, name
        # A write was recorded as attempted, before it acted; a read was not.
        attempt = audit_records(secured).get(f"{rid}.attempt")
        assert (attempt is not None) == (name in writes), name
        if attempt:
            assert attempt["outcomeDesc"] == "ATTEMPTED" and "outcome" not in attempt
            assert attempt["action"] == rec["action"] and attempt["entity"] == [
                e for e in rec["entity"] if e["description"] != "returned"
            ]
    assert len(audit_records(secured)) == before + len(calls) + len(writes)


def test_nested_roles_claim(secured, idp):
    """Keycloak puts realm roles under realm_access.roles."""
    running, s = stack.start(["gateway"], secured.replace(gateway_port=0, oidc_roles_claim="realm_access.roles"))
    try:
        stub = gateway(s)
        nested = idp.token([], realm_access={"roles": ["smily.search"]})
        assert call(stub.ListSlides, LIST, nested)[0] == grpc.StatusCode.OK
        assert call(stub.ListSlides, LIST, idp.token(SEARCH))[0] == grpc.StatusCode.PERMISSION_DENIED
    finally:
        stack.stop(running, 0)


def test_an_unwritable_audit_trail_fails_the_call(secured, idp, tmp_path):
    path = str(tmp_path / "audit.jsonl")
    running, s = stack.start(["gateway"], secured.replace(gateway_port=0, audit_log=path))
    try:
        stub = gateway(s)
        assert call(stub.ListSlides, LIST, idp.token(SEARCH))[0] == grpc.StatusCode.OK
        os.remove(path)
        os.mkdir(path)  # the sink is now a directory: nothing can be appended
        code, details, _ = call(stub.DeleteSlide, gateway_pb2.DeleteSlideRequest(slide_id="x"), idp.token(ADMIN))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "audit" in details
        os.rmdir(path)
        assert call(stub.ListSlides, LIST, idp.token(SEARCH))[0] == grpc.StatusCode.OK
    finally:
        stack.stop(running, 0)


# -- the verifier alone: key rotation and the refetch limit ------------------------------
def test_a_rotated_key_is_fetched_once_and_unknown_kids_cannot_hammer_the_idp(idp):
    v = auth.OidcVerifier(idp.issuer, oidc.AUDIENCE)
    assert v.verify(idp.token(SEARCH)).roles == frozenset(SEARCH)
    fetches = idp.jwks_fetches
    idp.add_key("rsa-2")  # the IdP rotates: a new kid appears in its JWKS
    assert v.verify(idp.token(ADMIN, kid="rsa-2")).subject == "user-1"
    assert idp.jwks_fetches == fetches + 1
    idp.add_key("rsa-ghost", publish=False)
    for _ in range(5):
        with pytest.raises(auth.Unauthenticated):
            v.verify(idp.token(SEARCH, kid="rsa-ghost"))
    assert idp.jwks_fetches <= fetches + 2


def test_oidc_without_issuer_refuses_to_start():
    with pytest.raises(ValueError, match="SMILY_OIDC_ISSUER"):
        auth.authenticator(base_settings().replace(auth="oidc").auth)


# -- issue 23: the audit trail cannot be dodged, view sessions, integrations -------------------


def _slide_ids(stub, token) -> set[str]:
    return {
        s.slide_id for s in stub.ListSlides(LIST, metadata=[("authorization", f"Bearer {token}")], timeout=30).slides
    }


def _readonly(path: str) -> None:
    """A fresh audit file that cannot be written, as after a rotation onto a read-only file."""
    os.rename(path, path + ".1")
    with open(path, "w"):
        pass
    os.chmod(path, 0o444)
    if os.geteuid() == 0:  # root writes through file modes; not through the immutable flag
        subprocess.run(["chattr", "+i", path], check=True)


@pytest.mark.parametrize("sink", ["full device", "read-only file"])
def test_a_write_whose_attempt_cannot_be_recorded_is_refused_and_changes_nothing(secured, idp, tmp_path, sink):
    admin = idp.token(ADMIN)
    main = gateway(secured)
    client = Client(
        f"127.0.0.1:{secured.gateway.gateway_port}", timeout=300, tls_ca=secured.tls.tls_ca_file, token=admin
    )
    slide = f"audit-keep-{sink[0]}"
    assert wait_done(client, client.ingest("synth-a.tiff", slide)).state == gateway_pb2.OPERATION_STATE_SUCCEEDED
    client.close()
    path = "/dev/full" if sink == "full device" else str(tmp_path / "audit.jsonl")
    running, s = stack.start(["gateway"], secured.replace(gateway_port=0, audit_log=path))
    try:
        stub = gateway(s)
        if sink == "read-only file":
            assert call(stub.ListSlides, LIST, idp.token(SEARCH))[0] == grpc.StatusCode.OK
            _readonly(path)
        before = _slide_ids(main, admin)
        for name, request in (
            ("DeleteSlide", gateway_pb2.DeleteSlideRequest(slide_id=slide)),
            ("IngestSlide", gateway_pb2.IngestSlideRequest(source="synth-b.svs", slide_id="audit-never")),
            ("ListSlides", LIST),  # a read whose record cannot be written is refused too
        ):
            code, details, _ = call(getattr(stub, name), request, admin)
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "audit" in details, (sink, name)
        assert _slide_ids(main, admin) == before and slide in before
    finally:
        stack.stop(running, 0)
        if sink == "read-only file" and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", path], check=True)
    assert "audit-never" not in _slide_ids(main, admin)
    assert call(main.DeleteSlide, gateway_pb2.DeleteSlideRequest(slide_id=slide), admin)[0] == grpc.StatusCode.OK


def test_a_view_session_is_the_servers_and_its_record_counts_its_reads(secured, idp, tmp_path):
    path = str(tmp_path / "audit.jsonl")
    running, s = stack.start(["gateway"], secured.replace(gateway_port=0, audit_log=path))
    admin, reader = idp.token(ADMIN), idp.token(SEARCH)
    try:
        client = Client(f"127.0.0.1:{s.gateway.gateway_port}", timeout=300, tls_ca=s.tls.tls_ca_file, token=admin)
        assert (
            wait_done(client, client.ingest("synth-a.tiff", "auth-view")).state == gateway_pb2.OPERATION_STATE_SUCCEEDED
        )
        client.close()
        stub = gateway(s)

        def read(x, y, token, session):
            region = gateway_pb2.Region(slide_id="auth-view", x=x, y=y, width=256, height=256)
            code, _, rid = call(
                stub.ReadRegion, gateway_pb2.ReadRegionRequest(region=region), token, x_smily_view_session=session
            )
            assert code == grpc.StatusCode.OK
            return rid

        key = viewsession.key(s)
        session = viewsession.mint(key, "user-1", "auth-view")
        first = [read(x, y, reader, session) for x in (0, 256, 512, 768) for y in (0, 256, 512, 768)][0]
        # The same id from another caller, an id for another slide, an expired one: each read on its own.
        read(0, 0, idp.token(SEARCH, sub="user-2"), session)
        read(0, 0, reader, viewsession.mint(key, "user-1", "another-slide"))
        read(
            0, 0, reader, viewsession.mint(key, "user-1", "auth-view", now=time.time() - s.auth.view_session_ttl_s - 60)
        )
        assert (
            call(stub.DeleteSlide, gateway_pb2.DeleteSlideRequest(slide_id="auth-view"), admin)[0] == grpc.StatusCode.OK
        )
    finally:
        stack.stop(running, 0)  # open sessions are recorded as the gateway stops
    with open(path) as fh:
        records = [json.loads(line) for line in fh]
    reads = [r for r in records if r["subtype"][0]["display"] == "ReadRegion"]
    assert [r["id"] for r in reads][0] == first and len(reads) == 4
    (view,) = [r for r in records if r["subtype"][0]["display"] == "ViewSession"]
    assert view["agent"][0]["who"]["identifier"]["value"] == "user-1" and view["outcome"] == "0"
    (entity,) = view["entity"]
    assert entity["what"]["identifier"]["value"] == "auth-view"
    assert {d["type"]: d["valueString"] for d in entity["detail"]} == {"reads": "16", "boundingRegion": "0,0,1024,1024"}


def test_an_ingest_only_caller_follows_the_ingests_it_started(secured, idp):
    """An LIS holding smily.ingest alone: `smily ingest` succeeds; others' operations stay closed to it."""
    lis, other = idp.token(INGEST, sub="lis-1"), idp.token(INGEST, sub="lis-2")
    target = f"127.0.0.1:{secured.gateway.gateway_port}"
    smily = os.path.join(os.path.dirname(sys.executable), "smily")
    out = subprocess.run(
        [
            smily,
            "ingest",
            "synth-b.svs",
            "--slide-id",
            "auth-lis",
            "--gateway",
            target,
            "--tls-ca",
            secured.tls.tls_ca_file,
        ],
        env=dict(os.environ, SMILY_TOKEN=lis),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ingested auth-lis: ") and " 0 tiles" not in out.stdout

    stub = gateway(secured)
    started = stub.IngestSlide(
        gateway_pb2.IngestSlideRequest(source="synth-b.svs", slide_id="auth-lis-2"),
        metadata=[("authorization", f"Bearer {lis}")],
        timeout=60,
    ).operation
    get = gateway_pb2.GetOperationRequest(operation_id=started.operation_id)
    cancel = gateway_pb2.CancelOperationRequest(operation_id=started.operation_id)
    assert call(stub.GetOperation, get, lis)[0] == grpc.StatusCode.OK
    assert call(stub.GetOperation, get, idp.token(SEARCH))[0] == grpc.StatusCode.OK  # search: any, as before
    for fn, request in ((stub.GetOperation, get), (stub.CancelOperation, cancel)):
        code, details, _ = call(fn, request, other)
        assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, "this operation was started by another caller")
    assert call(stub.CancelOperation, cancel, idp.token(SEARCH))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert call(stub.CancelOperation, cancel, lis)[0] == grpc.StatusCode.OK
    # The roles still part: search cannot ingest, ingest cannot search.
    ingest = gateway_pb2.IngestSlideRequest(source="synth-b.svs", slide_id="auth-never")
    assert call(stub.IngestSlide, ingest, idp.token(SEARCH))[:2] == (
        grpc.StatusCode.PERMISSION_DENIED,
        "this call needs the role smily.ingest",
    )
    region = gateway_pb2.Region(slide_id="auth-lis", x=0, y=0, width=448, height=448)
    assert call(stub.Search, gateway_pb2.SearchRequest(region=region, k=3), lis)[:2] == (
        grpc.StatusCode.PERMISSION_DENIED,
        "this call needs the role smily.search",
    )
    admin = idp.token(ADMIN)
    wait_done(Client(target, timeout=300, tls_ca=secured.tls.tls_ca_file, token=admin), started)
    for slide in ("auth-lis", "auth-lis-2"):
        call(stub.DeleteSlide, gateway_pb2.DeleteSlideRequest(slide_id=slide), admin)
