"""The gateway's trust boundary end to end: TLS, OIDC tokens, roles, the audit trail.

A real identity provider (tests/helpers/oidc.py) serves its JWKS on loopback; the
backends run mTLS and accept only the gateway's certificate; the gateway
runs TLS and verifies bearer tokens. Every refusal's status is asserted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smily import stack
from smily.client import Client
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
    front, s = stack.start(["gateway"], dataclasses.replace(s, tls_client_auth="none"))
    yield s
    stack.stop(front, 0)
    stack.stop(back, 0)


def gateway(settings, ca_path: str | None = None):
    ca = read(ca_path or settings.tls_ca_file)
    return gateway_pb2_grpc.GatewayServiceStub(
        channel(f"127.0.0.1:{settings.gateway_port}", grpc.ssl_channel_credentials(ca))
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
    with open(settings.audit_log) as fh:
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
    plain = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(f"127.0.0.1:{secured.gateway_port}"))
    assert call(plain.ListSlides, LIST, idp.token(ADMIN))[0] == grpc.StatusCode.UNAVAILABLE


def test_health_needs_no_token(secured):
    ca = read(secured.tls_ca_file)
    ch = channel(f"127.0.0.1:{secured.gateway_port}", grpc.ssl_channel_credentials(ca))
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
        index = index_pb2_grpc.IndexServiceStub(channel(secured.index_target, creds))
        with pytest.raises(grpc.RpcError) as info:
            index.ListSlides(index_pb2.ListSlidesRequest(), timeout=10)
        assert info.value.code() == code


def test_roles_follow_the_rpc_and_each_call_is_audited(secured, idp):
    """Done-when: ingest with smily.ingest, search with smily.search, a search token cannot delete, admin can."""
    ingest_client = Client(
        f"127.0.0.1:{secured.gateway_port}", timeout=300, tls_ca=secured.tls_ca_file, token=idp.token(INGEST + SEARCH)
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

    # A viewer's tiles: one record per slide and view session, not per tile.
    before = len(audit_records(secured))
    tiles = [
        gateway_pb2.ReadRegionRequest(region=gateway_pb2.Region(slide_id="auth-a", x=x, y=0, width=256, height=256))
        for x in (0, 256, 512)
    ]
    first = [call(stub.ReadRegion, t, idp.token(SEARCH), x_smily_view_session="view-1") for t in tiles]
    assert [c for c, _, _ in first] == [grpc.StatusCode.OK] * 3
    assert len(audit_records(secured)) == before + 1 and record_of(secured, first[0][2])["outcomeDesc"] == "OK"
    call(stub.ReadRegion, tiles[0], idp.token(SEARCH), x_smily_view_session="view-2")
    call(stub.ReadRegion, tiles[0], idp.token(SEARCH))  # no session: every read is recorded
    assert len(audit_records(secured)) == before + 3

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
    }
    assert set(calls) == {m.name for m in gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].methods}
    before = len(audit_records(secured))
    for name, request in calls.items():
        code, _, rid = call(getattr(stub, name), request, token)
        rec = record_of(secured, rid)
        assert rec["subtype"][0]["display"] == name and rec["outcomeDesc"] == code.name, name
    assert len(audit_records(secured)) == before + len(calls)


def test_nested_roles_claim(secured, idp):
    """Keycloak puts realm roles under realm_access.roles."""
    running, s = stack.start(
        ["gateway"], dataclasses.replace(secured, gateway_port=0, oidc_roles_claim="realm_access.roles")
    )
    try:
        stub = gateway(s)
        nested = idp.token([], realm_access={"roles": ["smily.search"]})
        assert call(stub.ListSlides, LIST, nested)[0] == grpc.StatusCode.OK
        assert call(stub.ListSlides, LIST, idp.token(SEARCH))[0] == grpc.StatusCode.PERMISSION_DENIED
    finally:
        stack.stop(running, 0)


def test_an_unwritable_audit_trail_fails_the_call(secured, idp, tmp_path):
    path = str(tmp_path / "audit.jsonl")
    running, s = stack.start(["gateway"], dataclasses.replace(secured, gateway_port=0, audit_log=path))
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
        auth.authenticator(dataclasses.replace(base_settings(), auth="oidc"))
