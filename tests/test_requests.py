"""The gateway's request checks (services/gateway/requests.py) without any server:
every caller-input rule refuses on its own, so a bad request never reaches a backend,
and the handlers hold no rule of their own."""

from __future__ import annotations

import ast
import io
import os

import pytest
from PIL import Image

from smily.common import limits
from smily.common.errors import InvalidArgument
from smily.gateway import requests
from smily.gateway.v1 import gateway_pb2 as g

from .conftest import ROOT


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 150)).save(out, format="PNG")
    return out.getvalue()


REGION = g.Region(slide_id="s", x=0, y=0, width=10, height=10)


@pytest.mark.parametrize(
    "request_, message",
    [
        (g.SearchRequest(), "needs an image or a region"),
        (g.SearchRequest(region=REGION, k=limits.MAX_K + 1), "k must be in 1..1000"),
        (g.SearchRequest(region=REGION, negative_weight=1.5), "negative_weight must be in 0..1"),
        (g.SearchRequest(region=g.Region(slide_id="s", width=0, height=4)), "width and height must be positive"),
        (g.SearchRequest(region=g.Region(slide_id="a/b", width=4, height=4)), "path syntax"),
        (g.SearchRequest(image=b"not an image"), "image"),
        (g.SearchRequest(image=_png(), exclude_query_case=True), "exclude_query_case needs a region query"),
        (g.SearchRequest(region=REGION, page_size=-1), "page_size must not be negative"),
        (g.SearchRequest(region=REGION, page_token="forged"), "page_token"),
        (g.SearchRequest(region=REGION, image_mpp=500), "image_mpp"),
        (g.SearchRequest(region=REGION, concepts=[g.WeightedConcept(name="ok", weight=11)]), "concept weight"),
        (g.SearchRequest(region=REGION, concepts=[g.WeightedConcept(name="no/slash", weight=1)]), "concept name"),
        (g.SearchRequest(region=REGION, negatives=[g.Example()]), "needs an image or a region"),
        (g.SearchSlidesRequest(), "needs a slide_id or a source"),
        (g.SearchSlidesRequest(slide_id="s", mosaic_size=limits.MAX_MOSAIC + 1), "mosaic_size"),
        (g.ReadRegionRequest(region=REGION, max_side=limits.MAX_SIDE + 1), "max_side"),
        (g.ReadRegionRequest(region=REGION, mpp=float("nan")), "mpp"),
        (g.ReadRegionRequest(), "slide_id is required"),
        (g.IngestSlideRequest(), "source"),
        (g.IngestSlideRequest(source="a.svs", slide_mpp=99), "slide_mpp"),
        (g.IngestCaseRequest(accession_number="ACC*"), "wildcards"),
        (g.CreateConceptRequest(name="c"), "at least one example"),
        (g.DeleteConceptRequest(name=""), "concept name"),
        (g.ListSlidesRequest(page_size=-1), "page_size"),
        (g.ListSlidesRequest(metadata_query="x" * 65), "metadata_query is longer than 64"),
        (g.ListSlidesRequest(metadata_query="x", metadata_key="stain"), "one of the searchable keys: case_id"),
        (g.ListSlidesRequest(metadata_key="case_id"), "metadata_key needs a metadata_query"),
        (g.GetSlideRequest(), "slide_id is required"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v[:24],
)
def test_each_rule_refuses(request_, message):
    check = {
        g.SearchRequest: requests.search,
        g.SearchSlidesRequest: requests.search_slides,
        g.ReadRegionRequest: requests.read_region,
        g.IngestSlideRequest: requests.ingest_slide,
        g.IngestCaseRequest: requests.ingest_case,
        g.CreateConceptRequest: requests.create_concept,
        g.DeleteConceptRequest: requests.concept_name,
        g.ListSlidesRequest: lambda r: requests.list_slides(r, ("case_id", "organ")),
        g.GetSlideRequest: requests.slide,
    }[type(request_)]
    with pytest.raises(InvalidArgument, match=message):
        check(request_)


def test_valid_requests_pass_with_their_defaults():
    args = requests.search(g.SearchRequest(image=_png()))
    assert (args.k, args.offset, args.negative_weight) == (limits.DEFAULT_K, 0, 0.5)
    assert requests.read_region(g.ReadRegionRequest(region=REGION)) == (limits.DEFAULT_MAX_SIDE, g.IMAGE_FORMAT_PNG)
    slides = requests.search_slides(g.SearchSlidesRequest(source="a.svs"))
    assert (slides.k, slides.mosaic_size) == (limits.DEFAULT_SLIDE_MATCHES, limits.DEFAULT_MOSAIC)


@pytest.mark.parametrize("module", ["server.py", "query.py"])
def test_handlers_hold_no_rule_of_their_own(module):
    """One place per rule: the handlers and the query engine call requests.py, never require() or limits."""
    with open(os.path.join(ROOT, "services", "gateway", module)) as fh:
        tree = ast.parse(fh.read())
    called = {
        ast.unparse(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute)
    }
    assert not {c for c in called if c == "require" or c.startswith("limits.")}, called
