"""SMILY_VIEWER_URL_TEMPLATE: links per hit, only with every field known."""

from __future__ import annotations

import pytest

from smily.gateway.dicom import ViewerLinks

pytestmark = pytest.mark.unit


def test_fills_and_quotes_fields():
    links = ViewerLinks("https://v.example/?s={study}&r={series}&id={slide_id}&x={x}&y={y}&w={width}&h={height}")
    meta = {"study_instance_uid": "1.2.3", "series_instance_uid": "4.5.6"}
    assert links.link("a b", meta, 10, 20, 30, 40) == "https://v.example/?s=1.2.3&r=4.5.6&id=a%20b&x=10&y=20&w=30&h=40"
    assert links.link("file-slide", {}, 1, 2, 3, 4) == ""  # no UIDs: no link
    assert ViewerLinks("").link("x", meta) == ""


@pytest.mark.parametrize("template", ["https://v/{patient}", "https://v/{study!r}", "https://v/{x:>5}"])
def test_unknown_fields_are_refused(template):
    with pytest.raises(ValueError):
        ViewerLinks(template)
