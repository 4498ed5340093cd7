"""Slides that exist only in a real Orthanc, ingested by accession number and found by a patch."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import sqlite3
import subprocess
import sys
import time

import grpc
import highdicom as hd
import openslide
import pydicom
import pytest
import redis
from dicomweb_client.api import DICOMwebClient

from smily import stack
from smily.client import Client
from smily.common import phi
from smily.common.channels import channel
from smily.common.logs import JsonFormatter
from smily.gateway.v1 import gateway_pb2
from smily.synthetic import SlideSpec, write_samples
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc

from .conftest import archive_settings, rpc_code, streamed_tiles
from .helpers import oidc
from .helpers.httpproc import SMILY, HttpProcess
from .helpers.orthanc import PHI, Orthanc
from .helpers.pki import CA
from .helpers.wait import wait_done

SLIDES = (SlideSpec("case-a.tiff", "tiff", 3072, 3072, 0.5, 31), SlideSpec("case-b.tiff", "tiff", 3072, 3072, 0.5, 32))
CASES = ("ACC-E2E-0001", "ACC-E2E-0002")
VIEWER = "https://viewer.example/wsi?study={study}&series={series}&x={x}&y={y}&w={width}&h={height}"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding the two slides, one case each; the TIFFs stay outside every slide root."""
    work = tmp_path_factory.mktemp("orthanc-e2e")
    files = write_samples(str(tmp_path_factory.mktemp("outside-the-roots")), SLIDES)
    orthanc = Orthanc(str(work))
    uids = [
        orthanc.push_slide(
            path,
            spec.width,
            spec.height,
            spec.mpp,
            str(work),
            AccessionNumber=accession,
            ContainerIdentifier=f"SLIDE-{i}",
        )
        for i, (path, spec, accession) in enumerate(zip(files, SLIDES, CASES))
    ]
    yield orthanc, files, uids
    orthanc.stop()


def _patch(tiler, source: str, tiff: str) -> tuple[bytes, dict]:
    """A 224-px PNG at 1 µm/px cut from the original file, a third of a tile off the indexed grid."""
    tiles = streamed_tiles(
        tiler, tiler_pb2.StreamTilesRequest(slide=source, params=tiler_pb2.TilingParams(min_tissue_fraction=0.9))
    )
    t = tiles[len(tiles) // 2]
    rect = dict(x=t.x + t.width // 3, y=t.y + t.width // 3, width=t.width, height=t.width)
    with openslide.OpenSlide(tiff) as slide:
        img = slide.read_region((rect["x"], rect["y"]), 0, (t.width, t.width)).convert("RGB").resize((224, 224))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue(), rect


def test_case_by_accession_end_to_end(pacs, redis_url, model_repo, tmp_path, capfd):
    orthanc, files, uids = pacs
    (study_a, series_a), (study_b, series_b) = uids
    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    settings = archive_settings(
        tmp_path, model_repo, redis_url, orthanc.dicomweb, viewer_url_template=VIEWER, log_level="DEBUG"
    )
    running, settings = stack.start(stack.ORDER, settings)
    responses = []
    try:
        client = Client(f"127.0.0.1:{settings.gateway.gateway_port}", timeout=300)
        tiler = tiler_pb2_grpc.TilerServiceStub(channel(settings.tiler.tiler_target))

        ops = [wait_done(client, client.ingest_case(accession)) for accession in CASES]
        responses += ops
        for op, (study, series) in zip(ops, uids):
            assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, (op.error_code, op.error_message)
            (entry,) = op.slides
            assert (entry.slide_id, entry.study_instance_uid, entry.series_instance_uid) == (series, study, series)
            assert entry.state == gateway_pb2.OPERATION_STATE_SUCCEEDED
            assert entry.progress.tiles_indexed == entry.progress.tiles_total == op.progress.tiles_indexed > 0

        slides = {s.slide_id: s for s in client.slides()}
        responses += slides.values()
        assert set(slides) == {series_a, series_b}
        for i, (accession, (study, series)) in enumerate(zip(CASES, uids)):
            s = slides[series]
            assert (s.study_instance_uid, s.series_instance_uid) == (study, series)
            assert s.metadata["case_id"] == accession and s.metadata["container_identifier"] == f"SLIDE-{i}"

        # Re-running a case replaces its slides: nothing duplicated.
        again = wait_done(client, client.ingest_case(CASES[0]))
        responses.append(again)
        assert again.state == gateway_pb2.OPERATION_STATE_SUCCEEDED
        assert {s.slide_id: s.tile_count for s in client.slides()} == {k: v.tile_count for k, v in slides.items()}

        png, rect = _patch(tiler, f"dicomweb:pacs/{study_a}/{series_a}", files[0])
        resp = client.search(image=png, k=5)
        responses.append(resp)
        top = resp.hits[0]
        assert (top.slide_id, top.study_instance_uid, top.series_instance_uid) == (series_a, study_a, series_a), [
            (h.slide_id, round(h.score, 3)) for h in resp.hits
        ]
        assert top.viewer_url == (
            f"https://viewer.example/wsi?study={study_a}&series={series_a}"
            f"&x={top.x}&y={top.y}&w={top.width}&h={top.height}"
        )
        assert top.metadata["case_id"] == CASES[0]

        # The hits on the slide as DICOM bulk annotations, built by the stack from the configured
        # archive, got by the CLI from the gateway and stored by it in the archive (--stow).
        ann_file = tmp_path / "hits.dcm"
        cli = [sys.executable, "-m", "smily.cli", "export", resp.search_id, "--format", "dicom-ann"]
        cli += ["--slide-id", series_a, "--dicomweb", orthanc.dicomweb, "--stow", "--output", str(ann_file)]
        cli += ["--gateway", f"127.0.0.1:{settings.gateway.gateway_port}"]
        done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(ann_file))
        assert (ann.StudyInstanceUID, ann.Modality) == (study_a, "ANN")
        assert (ann.PatientID, str(ann.PatientName)) == ("", "")  # the file it got names no one
        assert ann.ReferencedSeriesSequence[0].SeriesInstanceUID == series_a
        (group,) = ann.get_annotation_groups()
        on_slide = [h for h in resp.hits if h.slide_id == series_a]
        assert group.number_of_annotations == len(on_slide)
        first = group.get_graphic_data(ann.AnnotationCoordinateType)[0]
        assert first[0].tolist() == [on_slide[0].x, on_slide[0].y]
        scores = group.get_measurements(name=hd.sr.CodedConcept("score", "99SMILY", "Cosine similarity to the query"))
        assert abs(float(scores[1][0][0]) - on_slide[0].score) < 1e-5
        stored = DICOMwebClient(orthanc.dicomweb).search_for_series(
            study_instance_uid=study_a, search_filters={"Modality": "ANN"}
        )
        assert [pydicom.Dataset.from_json(x).SeriesInstanceUID for x in stored] == [ann.SeriesInstanceUID]
        by_region = client.search(region=dict(slide_id=series_a, **rect), k=3, exclude_query_case=True)
        responses.append(by_region)
        assert by_region.hits and all(h.slide_id == series_b for h in by_region.hits)

        # The archive is searched in the operation, so an unknown case fails there.
        missing = wait_done(client, client.ingest_case("NO-SUCH-CASE"))
        assert (missing.state, missing.error_code, len(missing.slides)) == (
            gateway_pb2.OPERATION_STATE_FAILED,
            "NOT_FOUND",
            0,
        )
        assert rpc_code(client.ingest_case, "ACC*") == grpc.StatusCode.INVALID_ARGUMENT
        client.close()
    finally:
        stack.stop(running, 0)
        root.removeHandler(handler)
        root.setLevel(old_level)

    # No patient attribute reaches a response, a log line (servers and reader
    # processes) or Redis (keys and values).
    captured = capfd.readouterr()
    r = redis.Redis.from_url(redis_url)
    stored = [k + b" " + (r.get(k) or b"") for k in r.scan_iter() if r.type(k) == b"string"]
    # The operation records every gateway reads, in the index's store.
    with contextlib.closing(sqlite3.connect(str(tmp_path / "index" / "operations.sqlite3"))) as db:
        records = [
            b" ".join((i.encode(), r, c))
            for i, r, c in db.execute("SELECT operation_id, record, cancel FROM operations")
        ]
    assert len(records) >= len(CASES)  # the case's operations were published there
    texts = {
        "responses": "".join(str(m) for m in responses),
        "logs": logged.getvalue() + captured.err + captured.out,
        "redis": b"\n".join(stored).decode("latin-1"),
        "operation records": b"\n".join(records).decode("latin-1"),
    }
    assert '"slide_id"' in texts["logs"] and "case ingest started" in texts["logs"]
    for where, text in texts.items():
        assert text.strip(), f"no {where} captured: the PHI check would pass by seeing nothing"
        for value in PHI.values():
            assert value not in text, (where, value)


# -- the same through the HTTP/JSON API, with curl (docs/integration.md's worked example) --

DONE = ("OPERATION_STATE_SUCCEEDED", "OPERATION_STATE_FAILED", "OPERATION_STATE_CANCELLED")
DOC_URL = "http://127.0.0.1:8080"  # the default port, as the transcript shows it


class CurlSession:
    """The real curl binary against `smily serve http`; keeps every body it got and a
    transcript of the calls marked `show` (set PACS_CURL_TRANSCRIPT=FILE to write it out)."""

    def __init__(self, url: str, cwd: str):
        self.url, self.cwd = url, cwd
        self.bodies: list[str] = []
        self.transcript: list[str] = []

    def __call__(self, method: str, path: str, *args: str, show: bool = True) -> dict:
        verb = ["-X", method] if method != "GET" else []
        done = subprocess.run(
            ["curl", "-sS", "--fail-with-body", *verb, self.url + path, *args],
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, (path, done.returncode, done.stdout, done.stderr)
        self.bodies.append(done.stdout)
        body = json.loads(done.stdout)
        if show:
            command = shlex.join(["curl", "-s", *verb, DOC_URL + path])
            if args:  # wrapped as the rest of docs/integration.md
                command += (" \\\n    " if len(command) + len(shlex.join(args)) > 100 else " ") + shlex.join(args)
            self.transcript += ["$ " + command, json.dumps(body, indent=2)]
        return body

    def shell(self, command: str) -> None:
        subprocess.run(["bash", "-c", command], cwd=self.cwd, check=True, timeout=60)
        self.transcript.append("$ " + command)


def test_case_by_accession_over_http_with_curl(pacs, redis_url, model_repo, tmp_path, capfd):
    """A case that exists only in Orthanc, ingested by accession and searched with a patch,
    through `smily serve http` (its own process) and the real curl."""
    orthanc, files, uids = pacs
    (study_a, series_a), (study_b, series_b) = uids
    settings = archive_settings(tmp_path, model_repo, redis_url, orthanc.dicomweb)
    running, settings = stack.start(stack.ORDER, settings)
    http = None
    try:
        http = HttpProcess(f"127.0.0.1:{settings.gateway.gateway_port}", str(tmp_path / "http.log"))
        curl = CurlSession(http.url, str(tmp_path))
        as_json = ("-H", "content-type: application/json", "-d")
        assert curl("GET", "/v1/slides", show=False)["slides"] == []  # the cases exist only in the archive

        for i, (accession, (study, series)) in enumerate(zip(CASES, uids)):
            op = curl("POST", "/v1/cases:ingest", *as_json, json.dumps({"accessionNumber": accession}), show=i == 0)[
                "operation"
            ]
            assert op["state"] in ("OPERATION_STATE_QUEUED", "OPERATION_STATE_RUNNING"), op
            deadline = time.monotonic() + 300
            while op["state"] not in DONE:
                assert time.monotonic() < deadline, op
                time.sleep(0.5)
                op = curl("GET", f"/v1/operations/{op['operationId']}", show=False)["operation"]
            if i == 0:  # the last poll, as the reader sees it
                op = curl("GET", f"/v1/operations/{op['operationId']}")["operation"]
            assert op["state"] == "OPERATION_STATE_SUCCEEDED", op
            (entry,) = op["slides"]
            assert (entry["slideId"], entry["studyInstanceUid"], entry["seriesInstanceUid"]) == (series, study, series)
            assert entry["state"] == "OPERATION_STATE_SUCCEEDED" and int(entry["progress"]["tilesIndexed"]) > 0

        slides = {s["slideId"]: s for s in curl("GET", "/v1/slides?pageSize=10")["slides"]}
        assert set(slides) == {series_a, series_b}
        for accession, (study, series) in zip(CASES, uids):
            s = slides[series]
            assert (s["studyInstanceUid"], s["seriesInstanceUid"], s["metadata"]["case_id"]) == (
                study,
                series,
                accession,
            )

        # A patch of slide B (cut from the original file, off the indexed grid) as base64 PNG in JSON.
        png, _ = _patch(
            tiler_pb2_grpc.TilerServiceStub(channel(settings.tiler.tiler_target)),
            f"dicomweb:pacs/{study_b}/{series_b}",
            files[1],
        )
        (tmp_path / "patch.png").write_bytes(png)
        curl.shell(r'echo "{\"image\": \"$(base64 -w0 patch.png)\", \"k\": 2}" > search.json')
        found = curl("POST", "/v1/search", *as_json, "@search.json")
        hits, search_id = found["hits"], found["searchId"]
        top = hits[0]
        assert (top["slideId"], top["studyInstanceUid"], top["seriesInstanceUid"]) == (series_b, study_b, series_b), [
            (h["slideId"], h["score"]) for h in hits
        ]
        assert top["metadata"]["case_id"] == CASES[1]

        # Slide B's hits as DICOM bulk annotations, built by the stack from the configured
        # archive, then stored in it (STOW-RS) as `smily export --stow` does.
        export = f"/v1/searches/{search_id}/export?format=dicom-ann&slideId={series_b}"
        curl.shell(f"curl -sS --fail-with-body -D ann.headers -o hits.dcm '{http.url}{export}'")
        assert "content-type: application/dicom" in (tmp_path / "ann.headers").read_text().lower()
        ds = pydicom.dcmread(tmp_path / "hits.dcm")
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.91.1"  # Microscopy Bulk Simple Annotations Storage
        ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(ds)
        assert (ann.StudyInstanceUID, ann.ReferencedSeriesSequence[0].SeriesInstanceUID) == (study_b, series_b)
        (group,) = ann.get_annotation_groups()
        on_b = [h for h in hits if h["slideId"] == series_b]
        assert group.number_of_annotations == len(on_b)
        assert group.get_graphic_data(ann.AnnotationCoordinateType)[0][0].tolist() == [
            int(on_b[0]["x"]),
            int(on_b[0]["y"]),
        ]
        # It names no patient, visit or specimen; restored from the archive, as `smily export
        # --stow` does with the user's own access, it files with the slide's study.
        raw = (tmp_path / "hits.dcm").read_bytes()
        for value in PHI.values():
            assert value.encode() not in raw, value
        assert ds.PatientID == "" and ds.get("ContainerIdentifier", phi.WITHHELD) == phi.WITHHELD
        archive = DICOMwebClient(orthanc.dicomweb)
        phi.restore(ds, phi.annotated_image(archive, ds))
        assert str(ds.PatientName) == PHI["PatientName"]
        archive.store_instances([ds])
        stored = archive.search_for_series(study_instance_uid=study_b, search_filters={"Modality": "ANN"})
        assert ann.SeriesInstanceUID in [pydicom.Dataset.from_json(x).SeriesInstanceUID for x in stored]
    finally:
        if http is not None:
            http.stop()
        stack.stop(running, 0)

    if os.environ.get("PACS_CURL_TRANSCRIPT"):
        with open(os.environ["PACS_CURL_TRANSCRIPT"], "w") as fh:
            fh.write("\n".join(curl.transcript) + "\n")
    # No patient attribute in any HTTP response, nor in the HTTP process's or the services' logs.
    captured = capfd.readouterr()
    for where, text in {"responses": "".join(curl.bodies), "logs": http.log() + captured.err + captured.out}.items():
        assert text.strip(), f"no {where} captured: the PHI check would pass by seeing nothing"
        for value in PHI.values():
            assert value not in text, (where, value)


def test_an_lis_with_the_ingest_role_alone_ingests_a_case_with_the_cli(pacs, redis_url, model_repo, tmp_path):
    """Issue 23: `smily ingest-case ACC` with an ingest-only token, against a TLS gateway that
    verifies tokens, follows its case to the end; the same token cannot search."""
    orthanc, _, uids = pacs
    idp = oidc.IdP()
    ca = CA(str(tmp_path / "pki"))
    cert, key = ca.issue("smily-gateway")
    settings = archive_settings(
        tmp_path,
        model_repo,
        redis_url,
        orthanc.dicomweb,
        plaintext=False,
        tls_cert_file=cert,
        tls_key_file=key,
        tls_ca_file=ca.path,
        auth="oidc",
        oidc_issuer=idp.issuer,
        oidc_audience=oidc.AUDIENCE,
        audit_log=str(tmp_path / "audit.jsonl"),
    )
    running, settings = stack.start(stack.ORDER, settings)
    try:
        env = dict(os.environ, SMILY_TOKEN=idp.token(["smily.ingest"], sub="lis"))
        gateway = ["--gateway", f"127.0.0.1:{settings.gateway.gateway_port}", "--tls-ca", ca.path]
        out = subprocess.run(
            [SMILY, "ingest-case", CASES[1], *gateway], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        (study, series) = uids[1]
        assert out.stdout.split("\t")[:2] == [series, "succeeded"] and f"study {study}" in out.stdout
        search = subprocess.run(
            [SMILY, "search", "--slide", series, "--region", "0,0,448,448", *gateway],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert search.returncode != 0 and "smily.search" in search.stderr
    finally:
        stack.stop(running, 0)
        idp.close()
