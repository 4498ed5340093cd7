"""What the viewer asks of the gateway, through the real stack: full pages despite
"less like this", polygon queries, the label statistics of the hits, the slide
heatmap, and a search exported as GeoJSON over HTTP."""

from __future__ import annotations

import json

import grpc
import httpx

from smily.gateway.v1 import gateway_pb2

from .conftest import rpc_code

A = {"slide_id": "synth-a", "x": 512, "y": 512, "width": 512, "height": 512}


def region(**r) -> gateway_pb2.Region:
    return gateway_pb2.Region(**{**A, **r})


def test_negative_examples_are_left_out_in_the_gateway_and_pages_stay_full(client, ingested):
    first = client.search(region=A, k=30, page_size=12)
    assert len(first.hits) == 12
    gone = [{k: getattr(h, k) for k in ("slide_id", "x", "y", "width", "height")} for h in first.hits[1:3]]
    again = client.search(region=A, k=30, page_size=12, negatives=gone)
    keys = {(h.slide_id, h.x, h.y) for h in again.hits}
    assert len(again.hits) == 12
    assert not keys & {(g["slide_id"], g["x"], g["y"]) for g in gone}


def test_label_statistics_of_the_top_k(client, ingested):
    resp = client.search(region=A, k=20, page_size=5)
    st = resp.label_stats
    assert st.key == "file" and st.k == 20
    assert sum(label.count for label in st.labels) == 20
    assert abs(sum(label.score_share for label in st.labels) - 1) < 1e-4
    counts = [label.count for label in st.labels]
    assert counts == sorted(counts, reverse=True)
    assert st.majority == st.labels[0].label and st.majority.endswith((".tiff", ".svs"))
    # Every page counts the same top k, not its own page.
    nxt = client.search(region=A, k=20, page_size=5, page_token=resp.next_page_token)
    assert nxt.label_stats == st


def test_a_polygon_query_searches_with_the_tiles_inside_it(client, ingested):
    tri = region(
        x=0,
        y=0,
        width=2048,
        height=2048,
        polygon=[gateway_pb2.Point(x=x, y=y) for x, y in ((0, 0), (2048, 0), (0, 2048))],
    )
    box = region(x=0, y=0, width=2048, height=2048)
    by_polygon = client.stub.Search(gateway_pb2.SearchRequest(region=tri, k=10), timeout=60)
    by_box = client.stub.Search(gateway_pb2.SearchRequest(region=box, k=10), timeout=60)
    assert len(by_polygon.hits) == 10
    assert [h.score for h in by_polygon.hits] != [h.score for h in by_box.hits]
    bad = region(polygon=[gateway_pb2.Point(x=0, y=0), gateway_pb2.Point(x=10, y=10)])
    assert rpc_code(client.stub.Search, gateway_pb2.SearchRequest(region=bad)) == grpc.StatusCode.INVALID_ARGUMENT
    outside = region(
        polygon=[gateway_pb2.Point(x=0, y=0), gateway_pb2.Point(x=600, y=600), gateway_pb2.Point(x=9000, y=600)]
    )
    assert rpc_code(client.stub.Search, gateway_pb2.SearchRequest(region=outside)) == grpc.StatusCode.INVALID_ARGUMENT


def test_slide_heatmap_scores_every_tile_of_one_slide(client, ingested):
    query = gateway_pb2.SearchRequest(region=region())
    heat = client.slide_heatmap("synth-b", query)
    slide = next(s for s in client.slides() if s.slide_id == "synth-b")
    assert 0 < len(heat.tiles) <= slide.tile_count
    scores = [t.score for t in heat.tiles]
    assert scores == sorted(scores, reverse=True)
    assert heat.max_score == scores[0] and heat.min_score == scores[-1]
    # The heatmap's scores are the search's, restricted to the slide.
    best = client.search(region=A, k=1, slide_ids=["synth-b"]).hits[0]
    assert (heat.tiles[0].x, heat.tiles[0].y) == (best.x, best.y)
    assert abs(heat.tiles[0].score - best.score) < 1e-5
    few = client.slide_heatmap("synth-b", query, max_tiles=3)
    assert len(few.tiles) == 3 and few.truncated and not heat.truncated
    assert rpc_code(client.slide_heatmap, "synth-b", query, max_tiles=0) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(client.slide_heatmap, "synth-b", query, max_tiles=1001) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(client.slide_heatmap, "no-such-slide", query) == grpc.StatusCode.NOT_FOUND


def test_export_a_search_as_geojson_over_http(http_url, ingested):
    import geojson as gj

    with httpx.Client(base_url=http_url, timeout=120) as c:
        resp = c.post(
            "/v1/search",
            json={
                "region": {"slideId": "synth-a", "x": 512, "y": 512, "width": 512, "height": 512},
                "k": 15,
                "pageSize": 5,
            },
        )
        assert resp.status_code == 200, resp.text
        search_id = resp.json()["searchId"]
        hits = resp.json()["hits"]
        out = c.get(f"/v1/searches/{search_id}/export", params={"format": "geojson", "slideId": hits[0]["slideId"]})
        assert out.status_code == 200, out.text
        assert out.headers["content-type"].startswith("application/geo+json")
        doc = gj.loads(out.text)
        assert doc.is_valid, doc.errors()
        assert doc["type"] == "FeatureCollection" and doc["features"]
        first = doc["features"][0]
        props = first["properties"]
        assert props["objectType"] == "annotation" and props["classification"]["name"]
        assert props["query_id"] == search_id and props["rank"] == 1
        assert {f["properties"]["slide_id"] for f in doc["features"]} == {hits[0]["slideId"]}
        ring = first["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] == [int(hits[0]["x"]), int(hits[0]["y"])]
        assert abs(props["score"] - hits[0]["score"]) < 1e-5
        whole = json.loads(c.get(f"/v1/searches/{search_id}/export").text)
        assert [f["properties"]["rank"] for f in whole["features"]] == list(range(1, 16))
        # Unknown, malformed and unsupported.
        unknown = c.get(f"/v1/searches/{'0' * 32}/export")
        assert unknown.status_code == 404 and unknown.json()["code"] == "NOT_FOUND"
        assert c.get("/v1/searches/nope/export").status_code == 400
        assert c.get(f"/v1/searches/{search_id}/export", params={"format": "shp"}).status_code == 400
        # DICOM annotations: of one slide, and only of one ingested from a DICOMweb archive.
        no_slide = c.get(f"/v1/searches/{search_id}/export", params={"format": "dicom-ann"})
        assert (no_slide.status_code, no_slide.json()["code"]) == (400, "INVALID_ARGUMENT"), no_slide.text
        assert "slide_id" in no_slide.json()["message"]
        from_file = c.get(
            f"/v1/searches/{search_id}/export", params={"format": "dicom-ann", "slideId": hits[0]["slideId"]}
        )
        assert (from_file.status_code, from_file.json()["code"]) == (400, "FAILED_PRECONDITION"), from_file.text
        assert "DICOMweb" in from_file.json()["message"]
        missing = c.get(f"/v1/searches/{search_id}/export", params={"format": "dicom-ann", "slideId": "no-such"})
        assert (missing.status_code, missing.json()["code"]) == (404, "NOT_FOUND"), missing.text


def test_find_slides_by_metadata_over_http(http_url, ingested):
    with httpx.Client(base_url=http_url, timeout=60) as c:
        got = c.get("/v1/slides", params={"metadataQuery": "Synth-C", "pageSize": 1}).json()
        assert [s["slideId"] for s in got["slides"]] == ["synth-c-40x"] and not got.get("nextPageToken")
        by_key = c.get("/v1/slides", params={"metadataQuery": "te", "metadataKey": "organ", "pageSize": 2}).json()
        assert len(by_key["slides"]) == 2 and by_key["nextPageToken"]
        too_long = c.get("/v1/slides", params={"metadataQuery": "x" * 65})
        assert too_long.status_code == 400 and too_long.json()["code"] == "INVALID_ARGUMENT"
