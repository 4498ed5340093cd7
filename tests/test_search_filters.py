"""Index filters through the real gateway: metadata filters, slide lists,
excluded slides, excluded cases and nprobe validation, on a fresh index with
slides of two organs and two cases (the shared index is left alone)."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image

from smily import stack
from smily.client import Client
from smily.common.config import Settings
from smily.gateway.v1 import gateway_pb2

from .conftest import TEST_SLIDES, rpc_code
from .helpers.wait import wait_done
from .test_cli import smily

# synth-a and synth-b are one case; synth-c-40x is another.
META = {
    "synth-a": {"organ": "breast", "case_id": "case-1"},
    "synth-b": {"organ": "prostate", "case_id": "case-1"},
    "synth-c-40x": {"organ": "breast", "case_id": "case-2"},
}
QUERY = dict(slide_id="synth-b", x=1100, y=800, width=448, height=448)


@pytest.fixture(scope="module")
def cases(settings, tmp_path_factory):
    """A fresh index and gateway on the session's tiler and embedder; yields (client, settings, tiles per slide)."""
    running, fresh = stack.start(
        ["index", "gateway"],
        settings.replace(index_dir=str(tmp_path_factory.mktemp("cases-index")), index_port=0, gateway_port=0),
    )
    c = Client(f"127.0.0.1:{fresh.gateway.gateway_port}", timeout=300)
    try:
        for spec in TEST_SLIDES:
            sid = spec.name.rsplit(".", 1)[0]
            op = wait_done(c, c.ingest(spec.name, sid, META[sid]))
            assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, (sid, op.error_message)
        yield c, fresh, {s.slide_id: s.tile_count for s in c.slides()}
    finally:
        c.close()
        stack.stop(running, 0)


def test_metadata_filter_returns_k_matching_hits(cases):
    c, _, counts = cases
    breast = counts["synth-a"] + counts["synth-c-40x"]
    # Unfiltered, the prostate query slide's own tiles lead the ranking.
    assert c.search(region=QUERY, k=breast).hits[0].slide_id == "synth-b"
    hits = c.search(region=QUERY, k=breast, filters={"organ": "breast"}).hits
    assert len(hits) == breast  # filtered inside the search, not after it
    assert all(h.metadata["organ"] == "breast" for h in hits)
    assert len(c.search(region=QUERY, k=breast + 5, filters={"organ": "breast"}).hits) == breast
    both = c.search(region=QUERY, k=50, filters={"organ": "breast", "case_id": "case-2"}).hits
    assert {h.slide_id for h in both} == {"synth-c-40x"} and len(both) == min(50, counts["synth-c-40x"])
    assert c.search(region=QUERY, k=10, filters={"organ": "lung"}).hits == []


def test_slide_ids_and_excluded_slides(cases):
    c, _, counts = cases
    n = counts["synth-c-40x"]
    only = c.search(region=QUERY, k=n, slide_ids=["synth-c-40x"]).hits
    assert len(only) == n and {h.slide_id for h in only} == {"synth-c-40x"}
    k = counts["synth-a"] + counts["synth-c-40x"]
    rest = c.search(region=QUERY, k=k, exclude_slide_ids=["synth-b"]).hits
    assert len(rest) == k and "synth-b" not in {h.slide_id for h in rest}
    mixed = c.search(region=QUERY, k=k, filters={"organ": "breast"}, exclude_slide_ids=["synth-a"]).hits
    assert len(mixed) == n and {h.slide_id for h in mixed} == {"synth-c-40x"}


def test_exclude_query_case(cases):
    c, _, counts = cases
    total = sum(counts.values())
    hits = c.search(region=QUERY, k=total, exclude_query_case=True).hits
    # Both slides of case-1 are gone, the query's own and its sibling.
    assert len(hits) == counts["synth-c-40x"] and {h.metadata["case_id"] for h in hits} == {"case-2"}
    other = c.search(region=dict(QUERY, slide_id="synth-c-40x", x=900, y=900), k=total, exclude_query_case=True).hits
    assert {h.slide_id for h in other} == {"synth-a", "synth-b"}
    # Paged: the exclusion holds on every page.
    first = c.search(region=QUERY, k=total, exclude_query_case=True, page_size=3)
    second = c.search(region=QUERY, k=total, exclude_query_case=True, page_size=3, page_token=first.next_page_token)
    assert {h.slide_id for h in [*first.hits, *second.hits]} == {"synth-c-40x"}
    png = io.BytesIO()
    Image.fromarray(np.full((224, 224, 3), (200, 120, 170), np.uint8)).save(png, "PNG")
    assert c.search(image=png.getvalue(), k=3).hits  # a valid image query, but it has no case
    assert rpc_code(c.search, image=png.getvalue(), k=3, exclude_query_case=True) == grpc.StatusCode.INVALID_ARGUMENT


def test_case_key_is_configurable(cases):
    """SMILY_CASE_KEY, a gateway setting: the case exclude_query_case leaves out, the key the viewer
    names a hit's case by (GetIndexInfo), and a key ListSlides' metadata_query finds slides by."""
    _, fresh, counts = cases
    env = Settings.from_env({"SMILY_CASE_KEY": "organ", "SMILY_SLIDE_SEARCH_KEYS": "barcode, stain"})
    assert (env.gateway.case_key, env.gateway.slide_search_keys) == ("organ", ("barcode", "stain"))
    running, gw = stack.start(["gateway"], fresh.replace(gateway_port=0, case_key=env.gateway.case_key))
    other = Client(f"127.0.0.1:{gw.gateway.gateway_port}", timeout=60)
    try:
        hits = other.search(region=QUERY, k=sum(counts.values()), exclude_query_case=True).hits
        assert {h.metadata["organ"] for h in hits} == {"breast"}
        info = other.index_info()
        assert info.case_key == "organ" and info.slide_search_keys[0] == "organ"
        assert {s.slide_id for s in other.slides("PROST", "organ")} == {"synth-b"}
    finally:
        other.close()
        stack.stop(running, 0)
    running, gw = stack.start(["gateway"], fresh.replace(gateway_port=0, case_key="patient"))
    other = Client(f"127.0.0.1:{gw.gateway.gateway_port}", timeout=60)
    try:  # no slide has this key: refused, not silently unexcluded
        assert rpc_code(other.search, region=QUERY, k=3, exclude_query_case=True) == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        other.close()
        stack.stop(running, 0)


def test_negative_nprobe_is_invalid(cases):
    c, _, _ = cases
    assert rpc_code(c.search, region=QUERY, k=3, nprobe=-1) == grpc.StatusCode.INVALID_ARGUMENT
    assert len(c.search(region=QUERY, k=3, nprobe=4).hits) == 3  # ignored by exact search


def test_cli_filters(cases):
    _, fresh, counts = cases
    args = ["search", "--slide", "synth-b", "--region", "1100,800,448,448", "--k", "100", "--json"]
    out = smily(fresh, *args, "--filter", "organ=breast", "--exclude-slide", "synth-a")
    assert out.returncode == 0, out.stderr
    assert {h["slide_id"] for h in json.loads(out.stdout)["hits"]} == {"synth-c-40x"}
    out = smily(fresh, *args, "--slide-id", "synth-a", "--slide-id", "synth-b")
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)["hits"]
    assert {h["slide_id"] for h in hits} == {"synth-a", "synth-b"} and len(hits) == counts["synth-a"] + counts[
        "synth-b"
    ]
    out = smily(fresh, *args, "--exclude-query-case")
    assert out.returncode == 0, out.stderr
    assert {h["metadata"]["case_id"] for h in json.loads(out.stdout)["hits"]} == {"case-2"}
    out = smily(fresh, *args, "--filter", "organ")
    assert out.returncode != 0 and "KEY=VALUE" in out.stderr
