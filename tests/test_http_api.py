"""The HTTP/JSON API (`smily serve http`) against the real gateway stack, over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess

import httpx
import pytest
from PIL import Image

from smily import stack
from smily.gateway.v1 import gateway_pb2
from smily.http import openapi, rpc
from smily.http.server import Running

from .conftest import ROOT, base_settings
from .helpers import oidc
from .helpers.wait import wait_until

DONE = ("OPERATION_STATE_SUCCEEDED", "OPERATION_STATE_FAILED", "OPERATION_STATE_CANCELLED")


@pytest.fixture(scope="module")
def api(http_url):
    with httpx.Client(base_url=http_url, timeout=300) as c:
        yield c


def wait(api, op: dict) -> dict:
    """The operation once done, read through the HTTP API; WaitTimeout if it never ends."""

    def done():
        r = api.get(f"/v1/operations/{op['operationId']}")
        assert r.status_code == 200, r.text
        latest = r.json()["operation"]
        return latest if latest["state"] in DONE else None

    return op if op["state"] in DONE else wait_until(f"operation {op['operationId']} done", done)


@pytest.fixture(scope="module")
def http_slide(api):
    """synth-b ingested through the HTTP API (its own slide id)."""
    r = api.post(
        "/v1/slides:ingest",
        json={"source": "synth-b.svs", "slideId": "http-b", "metadata": {"case_id": "case-http", "organ": "test"}},
    )
    assert r.status_code == 200, r.text
    op = r.json()["operation"]
    assert op["slideId"] == "http-b" and op["state"] in ("OPERATION_STATE_QUEUED", "OPERATION_STATE_RUNNING")
    op = wait(api, op)
    assert op["state"] == "OPERATION_STATE_SUCCEEDED", op
    assert int(op["progress"]["tilesIndexed"]) > 0
    yield op
    # The stack is shared by the whole session: leave its index as the other tests expect it.
    assert api.delete("/v1/slides/http-b").status_code == 200


def test_every_gateway_rpc_has_a_route():
    assert {m.name for m in gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].methods} <= set(rpc.RULES)


def test_openapi_is_served_and_checked_in(api):
    served = api.get("/openapi.json").json()
    assert served == openapi.document()
    with open(os.path.join(ROOT, "docs", "openapi.json")) as fh:
        assert json.load(fh) == served, "docs/openapi.json is stale: python -m smily.http.openapi > docs/openapi.json"
    assert served["paths"]["/v1/search"]["post"]["operationId"] == "Search"
    assert "multipart/form-data" in served["paths"]["/v1/search"]["post"]["requestBody"]["content"]
    assert set(served["paths"]["/v1/operations/{operation_id}"]) == {"get"}


def test_health(api):
    assert api.get("/livez").status_code == 200
    assert api.get("/readyz").status_code == 200


def test_ingest_list_and_get_slide(api, http_slide):
    slides = api.get("/v1/slides", params={"pageSize": 100}).json()["slides"]
    mine = [s for s in slides if s["slideId"] == "http-b"]
    assert mine and mine[0]["metadata"] == {"case_id": "case-http", "organ": "test"}
    got = api.get("/v1/slides/http-b").json()
    assert got["slide"]["slideId"] == "http-b"
    assert (int(got["width"]), int(got["height"]), got["mpp"]) == (3072, 2304, 0.5)


@pytest.fixture(scope="module")
def tile(api, http_slide) -> dict:
    """An indexed tile of http-b (a tissue tile), as a Region."""
    r = api.post(
        "/v1/search",
        json={
            "region": {"slideId": "http-b", "x": 0, "y": 0, "width": 1024, "height": 1024},
            "k": 1,
            "slideIds": ["http-b"],
        },
    )
    h = r.json()["hits"][0]
    return {
        "slideId": "http-b",
        "x": int(h["x"]),
        "y": int(h["y"]),
        "width": int(h["width"]),
        "height": int(h["height"]),
    }


def test_the_operator_routes_list_tenants_and_move_a_slide(api, http_slide):
    # SMILY_AUTH=none: the anonymous caller is the default tenant's admin and the operator.
    counts = {t["tenant"]: t for t in api.get("/v1/tenants").json()["tenants"]}
    assert int(counts["default"]["slideCount"]) >= 1 and int(counts["default"]["tileCount"]) > 0
    tiles = api.get("/v1/slides/http-b").json()["slide"]["tileCount"]
    r = api.post("/v1/slides/http-b:move", json={"fromTenant": "default", "toTenant": "elsewhere"})
    assert r.status_code == 200, r.text
    assert r.json()["slide"]["tenant"] == "elsewhere" and r.json()["movedTiles"] == tiles
    assert api.get("/v1/slides/http-b").status_code == 404  # the default tenant's no more
    again = api.post("/v1/slides/http-b:move", json={"fromTenant": "default", "toTenant": "elsewhere"})
    assert again.status_code == 404 and again.json()["code"] == "NOT_FOUND"
    assert int({t["tenant"]: t for t in api.get("/v1/tenants").json()["tenants"]}["elsewhere"]["slideCount"]) == 1
    back = api.post("/v1/slides/http-b:move", json={"fromTenant": "elsewhere", "toTenant": "default"})
    assert back.status_code == 200, back.text
    assert api.get("/v1/slides/http-b").json()["slide"]["tileCount"] == tiles


def test_search_by_region_finds_the_region(api, tile):
    r = api.post("/v1/search", json={"region": tile, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    top = body["hits"][0]
    assert top["score"] > 0.99 and top["slideId"] in ("http-b", "synth-b")  # the same file, twice indexed
    assert set(top) >= {"slideId", "x", "y", "width", "height", "mpp", "score", "metadata"}
    assert (int(top["x"]), int(top["y"])) == (tile["x"], tile["y"])
    assert body["modelId"]


def test_search_by_image_as_base64_and_multipart(api, tile):
    r = api.post("/v1/regions:read", json={"region": tile, "format": "IMAGE_FORMAT_PNG"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"], body["format"]) == (224, 224, "IMAGE_FORMAT_PNG")
    png = base64.b64decode(body["image"])
    assert Image.open(io.BytesIO(png)).size == (224, 224)
    as_json = api.post(
        "/v1/search", json={"image": base64.b64encode(png).decode(), "k": 3, "slideIds": ["http-b"]}
    ).json()
    multipart = api.post(
        "/v1/search",
        files={"image": ("patch.png", png, "image/png")},
        data={"request": json.dumps({"k": 3, "slideIds": ["http-b"]})},
    ).json()
    assert as_json["hits"][0]["slideId"] == "http-b" and as_json["hits"][0]["score"] > 0.99
    assert (as_json["hits"][0]["x"], as_json["hits"][0]["y"]) == (str(tile["x"]), str(tile["y"]))
    assert [h["score"] for h in multipart["hits"]] == pytest.approx([h["score"] for h in as_json["hits"]])
    # An image part beside a region in the JSON is refused, not read as an image query
    # (the part would clear the region, and exclude_query_case would then be blamed).
    both = api.post(
        "/v1/search",
        files={"image": ("patch.png", png, "image/png")},
        data={"request": json.dumps({"region": tile, "excludeQueryCase": True})},
    )
    assert both.status_code == 400 and "at most one of image, region" in both.json()["message"], both.text


def test_search_paging(api, tile):
    first = api.post("/v1/search", json={"region": tile, "k": 6, "pageSize": 4}).json()
    assert len(first["hits"]) == 4 and first["nextPageToken"]
    second = api.post(
        "/v1/search", json={"region": tile, "k": 6, "pageSize": 4, "pageToken": first["nextPageToken"]}
    ).json()
    assert len(second["hits"]) == 2 and second["nextPageToken"] == ""


def test_operations_get_and_cancel(api, http_slide):
    op_id = http_slide["operationId"]
    got = api.get(f"/v1/operations/{op_id}").json()["operation"]
    assert got["state"] == "OPERATION_STATE_SUCCEEDED"
    cancelled = api.post(f"/v1/operations/{op_id}:cancel", json={})
    assert cancelled.status_code == 200
    assert cancelled.json()["operation"]["state"] == "OPERATION_STATE_SUCCEEDED"
    missing = api.get("/v1/operations/no-such-operation")
    assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"


@pytest.mark.parametrize(
    "method,path,kwargs,status,code",
    [
        (
            "post",
            "/v1/search",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "INVALID_ARGUMENT",
        ),
        ("post", "/v1/search", {"json": {"noSuchField": 1}}, 400, "INVALID_ARGUMENT"),
        ("post", "/v1/search", {"json": [1, 2]}, 400, "INVALID_ARGUMENT"),
        (
            "post",
            "/v1/search",
            {"json": {"region": {"slideId": "synth-a", "x": 0, "y": 0, "width": 224, "height": 224}, "k": 0}},
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "post",
            "/v1/search",
            {"json": {"region": {"slideId": "nope", "x": 0, "y": 0, "width": 224, "height": 224}}},
            404,
            "NOT_FOUND",
        ),
        ("post", "/v1/search", {"content": b"k=3", "headers": {"content-type": "text/plain"}}, 415, "INVALID_ARGUMENT"),
        ("delete", "/v1/slides/no-such-slide", {}, 404, "NOT_FOUND"),
        ("get", "/v1/slides", {"params": {"noSuchParam": "1"}}, 400, "INVALID_ARGUMENT"),
        ("get", "/v1/slides", {"params": {"pageSize": "many"}}, 400, "INVALID_ARGUMENT"),
        ("get", "/v1/no-such-route", {}, 404, "NOT_FOUND"),
        ("put", "/v1/search", {}, 405, "UNIMPLEMENTED"),
        ("post", "/v1/slides:ingest", {"json": {"source": "../etc/passwd"}}, 400, "INVALID_ARGUMENT"),
    ],
)
def test_errors_are_code_and_message_with_matching_status(api, ingested, method, path, kwargs, status, code):
    r = getattr(api, method)(path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message"} and body["code"] == code and body["message"]


def test_a_missing_source_fails_the_ingest_call_itself(api):
    # The gateway reads the slide's info before it queues anything: no operation is created.
    r = api.post("/v1/slides:ingest", json={"source": "no-such-file.svs", "slideId": "missing"})
    assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND", r.text


def test_request_body_is_bounded(settings):
    small = Running(
        base_settings(
            http_port=0, http_max_body_bytes=1000, http_gateway_target=f"127.0.0.1:{settings.gateway.gateway_port}"
        )
    )
    try:
        big = {"image": base64.b64encode(os.urandom(2000)).decode()}
        r = httpx.post(f"{small.url}/v1/search", json=big)
        assert r.status_code == 413 and r.json()["code"] == "RESOURCE_EXHAUSTED"

        def chunks():  # no content-length: counted as it streams
            yield b'{"image": "'
            for _ in range(10):
                yield b"A" * 200
            yield b'"}'

        r = httpx.post(f"{small.url}/v1/search", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["code"] == "RESOURCE_EXHAUSTED"
    finally:
        small.stop()


def test_concepts_round_trip(api, tile):
    other = dict(tile, x=tile["x"] + tile["width"])
    r = api.post(
        "/v1/concepts",
        json={"name": "http-concept", "withExamples": [{"region": tile}], "withoutExamples": [{"region": other}]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["concept"]["withExamples"] == 1
    assert "http-concept" in [c["name"] for c in api.get("/v1/concepts").json()["concepts"]]
    assert api.delete("/v1/concepts/http-concept").status_code == 200
    assert "http-concept" not in [c["name"] for c in api.get("/v1/concepts").json()["concepts"]]


def test_search_slides(api, http_slide, ingested):
    r = api.post("/v1/slides:searchSlides", json={"slideId": "http-b", "k": 3, "excludeQuerySlide": True})
    assert r.status_code == 200, r.text
    slides = r.json()["slides"]
    assert slides and "http-b" not in [s["slideId"] for s in slides]
    # synth-b is the same file under the gRPC fixture's id.
    assert slides[0]["slideId"] == "synth-b"


# -- IIIF -----------------------------------------------------------------------


def test_iiif_info_and_tiles(api, http_slide):
    info = api.get("/iiif/3/http-b/info.json").json()
    assert info["type"] == "ImageService3" and info["protocol"] == "http://iiif.io/api/image"
    assert (info["width"], info["height"]) == (3072, 2304)
    assert info["id"].endswith("/iiif/3/http-b")
    assert info["tiles"][0]["scaleFactors"] == [1, 2, 4, 8]
    tile = api.get("/iiif/3/http-b/0,0,1024,1024/256,/0/default.jpg")
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(tile.content)).size == (256, 256)
    # An edge tile is cropped to the image, and keeps its aspect ratio.
    edge = api.get("/iiif/3/http-b/2048,2048,1024,1024/512,/0/default.png")
    assert Image.open(io.BytesIO(edge.content)).size == (512, 128)
    assert api.get("/iiif/3/http-b/0,0,1024,1024/256,/0/default.jpg").content == tile.content  # cached
    full = api.get("/iiif/3/http-b/full/!300,300/0/default.jpg")
    assert Image.open(io.BytesIO(full.content)).size == (300, 225)


@pytest.mark.parametrize(
    "path,status,code",
    [
        ("/iiif/3/nope/info.json", 404, "NOT_FOUND"),
        ("/iiif/3/http-b/0,0,512,512/1024,/0/default.jpg", 400, "INVALID_ARGUMENT"),  # upscaling
        ("/iiif/3/http-b/0,0,512,512/256,/90/default.jpg", 400, "INVALID_ARGUMENT"),
        ("/iiif/3/http-b/9000,0,512,512/256,/0/default.jpg", 400, "INVALID_ARGUMENT"),
        ("/iiif/3/http-b/0,0,512,512/256,/0/default.gif", 400, "INVALID_ARGUMENT"),
    ],
)
def test_iiif_errors(api, http_slide, path, status, code):
    r = api.get(path)
    assert r.status_code == status and r.json()["code"] == code, r.text


# -- what reaches the gateway ----------------------------------------------------


@pytest.fixture(scope="module")
def audited_gateway(services, tmp_path_factory):
    """A second real gateway on the session's backends: OIDC tokens, its audit trail in a file."""
    idp = oidc.IdP()
    settings = services[1].replace(
        gateway_port=0,
        metrics_port=0,
        auth="oidc",
        oidc_issuer=idp.issuer,
        oidc_audience=oidc.AUDIENCE,
        audit_log=str(tmp_path_factory.mktemp("http-audit") / "audit.jsonl"),
    )
    running, settings = stack.start(["gateway"], settings)
    yield idp, settings
    stack.stop(running, 0)
    idp.close()


def test_caller_token_and_address_reach_the_gateway_on_every_call(audited_gateway, ingested):
    idp, gw = audited_gateway
    reader = idp.token(["smily.search"], sub="reader-1")
    other = idp.token(["smily.search"], sub="reader-2")
    http = Running(base_settings(http_port=0, http_gateway_target=f"127.0.0.1:{gw.gateway.gateway_port}"))
    try:
        # A view session the caller names groups nothing (issue 23): only ids the server minted do.
        auth = {"authorization": f"Bearer {reader}", "x-smily-view-session": "view-1"}
        with httpx.Client(base_url=http.url, headers=auth, timeout=300) as c:
            assert c.get("/v1/slides").status_code == 200
            assert c.get("/iiif/3/synth-a/0,0,512,512/256,/0/default.jpg").status_code == 200
            # Another tile of the slide under the caller's made-up session: audited on its own.
            assert c.get("/iiif/3/synth-a/512,0,512,512/256,/0/default.jpg").status_code == 200
            denied = c.delete("/v1/slides/synth-a")
            assert denied.status_code == 403 and denied.json()["code"] == "PERMISSION_DENIED"
            # Another caller's token: the tile is read again for it, never served from the first one's cache.
            c.headers["authorization"] = f"Bearer {other}"
            assert c.get("/iiif/3/synth-a/0,0,512,512/256,/0/default.jpg").status_code == 200
        with open(gw.auth.audit_log) as fh:
            records = [json.loads(line) for line in fh]
        calls = [(r["subtype"][0]["display"], r["agent"][0]["who"]["identifier"]["value"]) for r in records]
        assert calls == [
            ("ListSlides", "reader-1"),
            ("GetSlide", "reader-1"),
            ("ReadRegion", "reader-1"),
            ("ReadRegion", "reader-1"),  # the second tile: the slide's info is cached, the read is not
            ("DeleteSlide", "reader-1"),
            ("GetSlide", "reader-2"),
            ("ReadRegion", "reader-2"),
        ], calls
        for r in records:  # the caller's address, relayed by the HTTP process, which is the second agent
            assert [a["network"]["address"] for a in r["agent"]] == ["127.0.0.1", "127.0.0.1"], r
            assert r["agent"][1]["who"]["display"] == "forwarding proxy", r
        assert records[4]["outcomeDesc"] == "PERMISSION_DENIED"
    finally:
        http.stop()


# -- a curl session, as docs/integration.md shows it ---------------------------------


def curl(url: str, *args: str) -> dict:
    out = subprocess.run(
        ["curl", "-sS", "--fail-with-body", *args, url], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    return json.loads(out)


def test_curl_session(http_url, ingested, tmp_path):
    op = curl(
        f"{http_url}/v1/slides:ingest",
        "-H",
        "content-type: application/json",
        "-d",
        '{"source": "synth-a.tiff", "slideId": "curl-a", "metadata": {"case_id": "C-1"}}',
    )["operation"]

    def done():
        latest = curl(f"{http_url}/v1/operations/{op['operationId']}")["operation"]
        return latest if latest["state"] in DONE else None

    op = wait_until(f"operation {op['operationId']} done", done)
    assert op["state"] == "OPERATION_STATE_SUCCEEDED"
    hits = curl(
        f"{http_url}/v1/search",
        "-H",
        "content-type: application/json",
        "-d",
        '{"region": {"slideId": "curl-a", "x": 0, "y": 0, "width": 1024, "height": 1024}, "k": 3}',
    )["hits"]
    assert hits[0]["slideId"] in ("curl-a", "synth-a")
    h = hits[0]
    patch = tmp_path / "patch.jpg"
    subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            "-o",
            str(patch),
            f"{http_url}/iiif/3/curl-a/{h['x']},{h['y']},{h['width']},{h['height']}/224,/0/default.jpg",
        ],
        check=True,
        timeout=60,
    )
    hits = curl(
        f"{http_url}/v1/search",
        "-F",
        f"image=@{patch};type=image/jpeg",
        "-F",
        'request={"k": 3, "slideIds": ["curl-a"]}',
    )["hits"]
    assert hits[0]["slideId"] == "curl-a"
    assert curl(f"{http_url}/v1/slides/curl-a", "-X", "DELETE")["deletedTiles"]
