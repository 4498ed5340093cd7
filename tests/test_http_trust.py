"""The HTTP front end's side of the trust boundary (issue 23), against `smily serve http` as its
own process, a gateway that verifies OIDC tokens and writes its audit trail, and the shared backends.

Each test reproduces an attack the outside review ran, and asserts the refusal or the record."""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import httpx
import pytest

from smily import stack
from smily.common import viewsession
from smily.common.channels import channel
from smily.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from smily.http.server import Running
from smily.localstack import free_port

from .conftest import base_settings
from .helpers import oidc
from .helpers.httpproc import HttpProcess
from .helpers.wait import wait_done

SEARCH, INGEST, ADMIN = ["smily.search"], ["smily.ingest"], ["smily.admin"]
KEY = "trust-view-session-key"
CHECK_S = 1.0  # how stale the front end's view of a slide may get


@pytest.fixture(scope="module")
def idp():
    p = oidc.IdP()
    yield p
    p.close()


class Stack:
    """A token-checking gateway on the shared backends, with its own audit file, and the HTTP process."""

    def __init__(self, settings, idp, tmp_path, **http_env):
        tmp_path.mkdir(exist_ok=True)
        self.audit_log = str(tmp_path / "audit.jsonl")
        self.running, self.gateway = stack.start(
            ["gateway"],
            settings.replace(
                gateway_port=0,
                auth="oidc",
                oidc_issuer=idp.issuer,
                oidc_audience=oidc.AUDIENCE,
                audit_log=self.audit_log,
                view_session_key=KEY,
            ),
        )
        self.target = f"127.0.0.1:{self.gateway.gateway.gateway_port}"
        env = {
            "SMILY_VIEW_SESSION_KEY": KEY,
            "SMILY_HTTP_SLIDE_CHECK_S": str(CHECK_S),
            "SMILY_VIEWER_OIDC_ISSUER": idp.issuer,
            **http_env,
        }
        self.http = HttpProcess(self.target, str(tmp_path / "http.log"), env=env)
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.http.stop()
            stack.stop(self.running, 0)

    def records(self) -> list[dict]:
        with open(self.audit_log) as fh:
            return [json.loads(line) for line in fh]


@pytest.fixture
def front(settings, idp, tmp_path):
    s = Stack(settings, idp, tmp_path)
    yield s
    s.stop()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def reads_of(records: list[dict], slide_id: str) -> list[dict]:
    return [
        r
        for r in records
        if r["subtype"][0]["display"] == "ReadRegion" and r["entity"][0]["what"]["identifier"]["value"] == slide_id
    ]


def test_a_cached_tile_is_not_served_past_the_tokens_exp_nor_to_another_token(front, idp, ingested):
    exp = int(time.time()) + 3
    token = idp.token(SEARCH, exp=exp)
    tile = "/iiif/3/synth-a/0,0,512,512/256,/0/default.jpg"
    with httpx.Client(base_url=front.http.url, timeout=60) as c:
        info = c.get("/iiif/3/synth-a/info.json", headers=bearer(token))
        assert info.status_code == 200
        session = {viewsession.HEADER: info.headers[viewsession.HEADER], **bearer(token)}
        first = c.get(tile, headers=session)
        assert first.status_code == 200
        # Private, and never cacheable beyond the token's lifetime.
        directives = dict(d.strip().partition("=")[::2] for d in first.headers["cache-control"].split(","))
        assert "private" in directives and int(directives["max-age"]) <= exp - int(time.time()) + 1
        assert c.get(tile, headers=session).content == first.content  # from the cache
        assert len(reads_of(front.records(), "synth-a")) == 1
        # Another token of the same person, whose roles no longer allow reading: refused, not served.
        ingest_only = bearer(idp.token(INGEST, exp=exp))
        assert c.get(tile, headers={**session, **ingest_only}).status_code == 403
        while time.time() <= exp:
            time.sleep(0.2)
        # Past exp the cache serves nothing: the read goes to the gateway, which decides (the IdP's
        # clock skew allowed, it answers 401 from then on) and counts it into the session.
        assert c.get(tile, headers=session).status_code == 200
    front.stop()
    (view,) = [r for r in front.records() if r["subtype"][0]["display"] == "ViewSession"]
    # The first read, the cache hit (reported with the next check of the slide), and the read after
    # exp; had that one come from the cache it would be reported nowhere: 2.
    assert {d["type"]: d["valueString"] for d in view["entity"][0]["detail"]}["reads"] == "3"


def test_a_deleted_slides_tiles_are_dropped_and_cache_hits_are_recorded_in_the_session(front, idp, client):
    # Ingested and deleted through the suite's gateway (no tokens), on the same index.
    assert wait_done(client, client.ingest("synth-a.tiff", "trust-del")).state == gateway_pb2.OPERATION_STATE_SUCCEEDED
    reader = bearer(idp.token(SEARCH))
    tiles = [f"/iiif/3/trust-del/{x},{y},512,512/256,/0/default.jpg" for x in (0, 512) for y in (0, 512)]
    with httpx.Client(base_url=front.http.url, timeout=60) as c:
        info = c.get("/iiif/3/trust-del/info.json", headers=reader)
        session = {viewsession.HEADER: info.headers[viewsession.HEADER], **reader}
        for _ in range(3):  # the first round reads through the gateway, the others come from the cache
            assert all(c.get(t, headers=session).status_code == 200 for t in tiles)
        assert len(reads_of(front.records(), "trust-del")) == 1  # the session's first read
        time.sleep(CHECK_S)
        assert c.get("/iiif/3/trust-del/info.json", headers=session).status_code == 200  # reports the cache hits
        client.delete("trust-del")
        time.sleep(CHECK_S)
        # The slide is gone: its cached tiles with it.
        gone = c.get(tiles[0], headers=session)
        assert gone.status_code == 404 and gone.json()["code"] == "NOT_FOUND"
    front.stop()  # the gateway records its open sessions as it stops
    (view,) = [r for r in front.records() if r["subtype"][0]["display"] == "ViewSession"]
    detail = {d["type"]: d["valueString"] for d in view["entity"][0]["detail"]}
    assert view["entity"][0]["what"]["identifier"]["value"] == "trust-del"
    assert detail == {"reads": "12", "boundingRegion": "0,0,1024,1024"}


def test_a_made_up_view_session_thins_nothing(front, idp, ingested):
    """The review's attack: one caller-chosen session id over 16 reads of different regions."""
    reader = bearer(idp.token(SEARCH))
    made_up = {viewsession.HEADER: f"{int(time.time())}.AAAA", **reader}
    with httpx.Client(base_url=front.http.url, timeout=60) as c:
        for x in range(4):
            for y in range(4):
                assert c.get(f"/iiif/3/synth-b/{x * 256},{y * 256},256,256/128,/0/default.jpg", headers=made_up)
    assert len(reads_of(front.records(), "synth-b")) == 16


def test_forwarded_addresses_are_believed_from_trusted_proxies_only(settings, idp, ingested, tmp_path):
    reader = bearer(idp.token(SEARCH))
    direct = Stack(settings, idp, tmp_path / "direct")
    try:
        httpx.get(f"{direct.http.url}/v1/slides", headers={**reader, "x-forwarded-for": "198.51.100.7"})
        (rec,) = [r for r in direct.records() if r["subtype"][0]["display"] == "ListSlides"]
        assert rec["agent"][0]["network"]["address"] == "127.0.0.1"  # a forged header is not the client
    finally:
        direct.stop()
    behind = Stack(settings, idp, tmp_path / "behind", SMILY_HTTP_TRUSTED_PROXIES="127.0.0.0/8,10.0.0.0/8")
    try:
        for chain in ("203.0.113.9, 198.51.100.7", "203.0.113.9, 198.51.100.7, 10.1.2.3"):
            httpx.get(f"{behind.http.url}/v1/slides", headers={**reader, "x-forwarded-for": chain})
        got = [
            r["agent"][0]["network"]["address"] for r in behind.records() if r["subtype"][0]["display"] == "ListSlides"
        ]
        # The rightmost address no trusted proxy added; the left of it is the client's to forge.
        assert got == ["198.51.100.7", "198.51.100.7"]
    finally:
        behind.stop()


def test_security_headers_and_public_ids(settings, idp, ingested, tmp_path):
    s = Stack(settings, idp, tmp_path, SMILY_HTTP_PUBLIC_URL="https://smily.example/")
    try:
        page = httpx.get(s.http.url + "/")
        csp = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
        assert csp["script-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
        assert csp["connect-src"] == f"'self' http://{urlsplit(idp.issuer).netloc}"  # the API and the login
        assert "unsafe-inline" not in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
        assert "<script>" not in page.text and " style=" not in page.text
        info = httpx.get(
            s.http.url + "/iiif/3/synth-a/info.json", headers={**bearer(idp.token(SEARCH)), "host": "evil.example"}
        )
        assert info.json()["id"] == "https://smily.example/iiif/3/synth-a"
        assert info.headers["x-content-type-options"] == "nosniff"
    finally:
        s.stop()


@pytest.mark.parametrize(
    "kwargs,status",
    [
        ({"content": b'{"k": 3}'}, 415),  # no content type
        ({"content": b'{"k": 3}', "headers": {"content-type": "text/plain"}}, 415),
        ({"content": b"k=3", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415),
        ({"files": {"request": (None, '{"k": 3}')}}, 415),  # multipart where the request has no bytes field
        ({"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}}, 400),
        ({"content": b'{"a":' * 40 + b"1" + b"}" * 40, "headers": {"content-type": "application/json"}}, 400),
    ],
)
def test_bodies_are_json_of_bounded_depth(http_url, kwargs, status):
    r = httpx.post(f"{http_url}/v1/concepts", **kwargs)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"code", "message"}


def test_errors_name_the_gateway_never_its_address():
    dead = f"127.0.0.1:{free_port()}"
    http = Running(base_settings(http_port=0, http_gateway_target=dead, http_timeout_s=5))
    try:
        r = httpx.get(f"{http.url}/v1/slides", timeout=30)
        assert r.status_code == 503 and r.json() == {"code": "UNAVAILABLE", "message": "gateway: UNAVAILABLE"}
        assert dead not in r.text and "ipv4" not in r.text
    finally:
        http.stop()


def test_a_grpc_caller_cannot_claim_a_session_minted_for_another(front, idp, ingested):
    """The gateway checks the id belongs to the caller and the slide, whoever relays it."""
    theirs = viewsession.mint(KEY.encode(), "user-2", "synth-a")
    stub = gateway_pb2_grpc.GatewayServiceStub(channel(front.target))
    region = gateway_pb2.Region(slide_id="synth-a", x=0, y=0, width=256, height=256)
    for _ in range(3):  # user-1 relaying user-2's session
        stub.ReadRegion(
            gateway_pb2.ReadRegionRequest(region=region),
            metadata=[(viewsession.HEADER, theirs), ("authorization", f"Bearer {idp.token(SEARCH)}")],
            timeout=60,
        )
    assert len(reads_of(front.records(), "synth-a")) == 3
