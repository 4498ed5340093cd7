"""Slides that exist only in a real Orthanc, ingested by accession number and found by a patch."""
from __future__ import annotations

import io
import logging

import grpc
import openslide
import pytest
import redis

from smily import stack
from smily.client import Client
from smily.common.channels import channel
from smily.common.logs import JsonFormatter
from smily.gateway.v1 import gateway_pb2
from smily.synthetic import SlideSpec, write_samples
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc

from .conftest import base_settings, rpc_code, streamed_tiles
from .orthanc import PHI, Orthanc

SLIDES = (SlideSpec("case-a.tiff", "tiff", 3072, 3072, 0.5, 31), SlideSpec("case-b.tiff", "tiff", 3072, 3072, 0.5, 32))
CASES = ("ACC-E2E-0001", "ACC-E2E-0002")
VIEWER = "https://viewer.example/wsi?study={study}&series={series}&x={x}&y={y}&w={width}&h={height}"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding the two slides, one case each; the TIFFs stay outside every slide root."""
    work = tmp_path_factory.mktemp("orthanc-e2e")
    files = write_samples(str(tmp_path_factory.mktemp("outside-the-roots")), SLIDES)
    orthanc = Orthanc(str(work))
    uids = [orthanc.push_slide(path, spec.width, spec.height, spec.mpp, str(work), AccessionNumber=accession,
                               ContainerIdentifier=f"SLIDE-{i}")
            for i, (path, spec, accession) in enumerate(zip(files, SLIDES, CASES))]
    yield orthanc, files, uids
    orthanc.stop()


def _patch(tiler, source: str, tiff: str) -> tuple[bytes, dict]:
    """A 224-px PNG at 1 µm/px cut from the original file, a third of a tile off the indexed grid."""
    tiles = streamed_tiles(tiler, tiler_pb2.StreamTilesRequest(
        slide=source, params=tiler_pb2.TilingParams(min_tissue_fraction=0.9)))
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
    (tmp_path / "roots").mkdir()
    settings = base_settings(slide_roots=(str(tmp_path / "roots"),), model_repository=model_repo,
                             index_dir=str(tmp_path / "index"), redis_url=redis_url, tiler_readers=1,
                             dicomweb_url=(f"pacs={orthanc.dicomweb}",), viewer_url_template=VIEWER,
                             log_level="DEBUG")
    running, settings = stack.start(stack.ORDER, settings)
    responses = []
    try:
        client = Client(f"127.0.0.1:{settings.gateway_port}", timeout=300)
        tiler = tiler_pb2_grpc.TilerServiceStub(channel(settings.tiler_target))

        ops = [client.wait(client.ingest_case(accession)) for accession in CASES]
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
        again = client.wait(client.ingest_case(CASES[0]))
        responses.append(again)
        assert again.state == gateway_pb2.OPERATION_STATE_SUCCEEDED
        assert {s.slide_id: s.tile_count for s in client.slides()} == {k: v.tile_count for k, v in slides.items()}

        png, rect = _patch(tiler, f"dicomweb:pacs/{study_a}/{series_a}", files[0])
        resp = client.search(image=png, k=5)
        responses.append(resp)
        top = resp.hits[0]
        assert (top.slide_id, top.study_instance_uid, top.series_instance_uid) == (series_a, study_a, series_a), [
            (h.slide_id, round(h.score, 3)) for h in resp.hits]
        assert top.viewer_url == (f"https://viewer.example/wsi?study={study_a}&series={series_a}"
                                  f"&x={top.x}&y={top.y}&w={top.width}&h={top.height}")
        assert top.metadata["case_id"] == CASES[0]
        by_region = client.search(region=dict(slide_id=series_a, **rect), k=3, exclude_query_case=True)
        responses.append(by_region)
        assert by_region.hits and all(h.slide_id == series_b for h in by_region.hits)

        assert rpc_code(client.ingest_case, "NO-SUCH-CASE") == grpc.StatusCode.NOT_FOUND
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
    assert any(s.startswith(b"smily:op:") for s in stored)  # the case's operations were published there
    texts = {"responses": "".join(str(m) for m in responses), "logs": logged.getvalue() + captured.err + captured.out,
             "redis": b"\n".join(stored).decode("latin-1")}
    assert '"slide_id"' in texts["logs"] and "case ingest started" in texts["logs"]
    for where, text in texts.items():
        for value in PHI.values():
            assert value not in text, (where, value)
