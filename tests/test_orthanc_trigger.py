"""Orthanc's Lua OnStableSeries callback (deploy/orthanc/smily-ingest.lua) against the real HTTP API.

A slide pushed to Orthanc becomes searchable by its accession number with no
other call: Orthanc runs the script, which calls `smily serve http` (its own
process) with its bearer token; the gateway checks the token with a real OIDC
provider on loopback, audits the call and ingests the case from Orthanc."""

from __future__ import annotations

import json
import os
import time

import httpx

from smily import stack
from smily.localstack import free_port
from smily.synthetic import SlideSpec, write_samples

from .conftest import ROOT, archive_settings
from .helpers import oidc
from .helpers.httpproc import HttpProcess
from .helpers.orthanc import PHI, Orthanc

SCRIPT = os.path.join(ROOT, "deploy", "orthanc", "smily-ingest.lua")
ACCESSION = "ACC-LUA-0001"


def _get(api: httpx.Client, path: str, bodies: list[str]) -> dict:
    r = api.get(path)
    bodies.append(r.text)
    assert r.status_code == 200, r.text
    return r.json()


def _ingest_calls(audit, attempts: bool = False) -> list[dict]:
    """The gateway's audit records of IngestCase calls: their outcomes, or the attempts recorded before them."""
    records = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
    return [
        r for r in records if r["subtype"][0]["display"] == "IngestCase" and r["id"].endswith(".attempt") == attempts
    ]


def test_a_slide_pushed_to_orthanc_becomes_searchable_by_its_accession(redis_url, model_repo, tmp_path, capfd):
    idp = oidc.IdP()
    spec = SlideSpec("trigger.tiff", "tiff", 1024, 1024, 0.5, 41)
    (tiff,) = write_samples(str(tmp_path / "slides"), (spec,))
    (tmp_path / "orthanc").mkdir()
    http_port = free_port()  # Orthanc's configuration names the HTTP API before it runs
    orthanc = Orthanc(
        str(tmp_path / "orthanc"),
        lua=[SCRIPT],
        extra={
            "Smily": {"Url": f"http://127.0.0.1:{http_port}", "Token": idp.token(["smily.ingest"], sub="orthanc-lua")}
        },
    )
    audit = tmp_path / "audit.jsonl"
    settings = archive_settings(
        tmp_path,
        model_repo,
        redis_url,
        orthanc.dicomweb,
        auth="oidc",
        oidc_issuer=idp.issuer,
        oidc_audience=oidc.AUDIENCE,
        audit_log=str(audit),
    )
    running: dict = {}
    http = None
    bodies: list[str] = []
    try:
        running, settings = stack.start(stack.ORDER, settings)
        http = HttpProcess(f"127.0.0.1:{settings.gateway.gateway_port}", str(tmp_path / "http.log"), port=http_port)
        reader = {"Authorization": "Bearer " + idp.token(["smily.search"], sub="lis-reader")}
        with httpx.Client(base_url=http.url, headers=reader, timeout=60) as api:
            assert _get(api, "/v1/slides", bodies)["slides"] == []
            study, series = orthanc.push_slide(
                tiff, spec.width, spec.height, spec.mpp, str(tmp_path), AccessionNumber=ACCESSION
            )
            # Nothing but the push: Orthanc's StableAge is 1 s, then the script asks for the case.
            deadline = time.monotonic() + 300
            while not (slides := _get(api, "/v1/slides", bodies)["slides"]):
                assert time.monotonic() < deadline, f"not ingested; see {tmp_path}/orthanc/orthanc.log and http.log"
                refused = [r for r in _ingest_calls(audit) if r["outcome"] != "0"]
                assert not refused, refused  # e.g. UNAVAILABLE: the archive did not answer while the script waited
                time.sleep(0.5)
            (slide,) = slides
            assert (slide["slideId"], slide["studyInstanceUid"], slide["seriesInstanceUid"]) == (series, study, series)
            assert slide["metadata"]["case_id"] == ACCESSION and int(slide["tileCount"]) > 0

            r = api.post(
                "/v1/search",
                json={
                    "region": {"slideId": series, "x": 0, "y": 0, "width": 1024, "height": 1024},
                    "filters": {"case_id": ACCESSION},
                    "k": 1,
                },
            )
            bodies.append(r.text)
            assert r.status_code == 200, r.text
            (hit,) = r.json()["hits"]
            assert (hit["studyInstanceUid"], hit["seriesInstanceUid"]) == (study, series)
    finally:
        if http is not None:
            http.stop()
        stack.stop(running, 0)
        orthanc.stop()
        idp.close()

    # One IngestCase per series, by the script's token, relayed by the HTTP API.
    (ingest,) = _ingest_calls(audit)
    assert ingest["outcome"] == "0"
    (attempt,) = _ingest_calls(audit, attempts=True)  # recorded before the case was started
    assert attempt["id"] == ingest["id"] + ".attempt" and attempt["outcomeDesc"] == "ATTEMPTED"
    assert ingest["agent"][0]["who"]["identifier"] == {"system": idp.issuer, "value": "orthanc-lua"}
    assert ingest["agent"][1]["who"]["display"] == "forwarding proxy"
    captured = capfd.readouterr()
    for where, text in {"responses": "".join(bodies), "logs": http.log() + captured.err + captured.out}.items():
        assert text.strip(), f"no {where} captured: the PHI check would pass by seeing nothing"
        for value in PHI.values():
            assert value not in text, (where, value)
