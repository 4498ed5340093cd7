"""Every search mode through the real gateway, tiler, embedder and index:
examples (positive and negative), concepts, pages with a per-slide cap,
whole-slide search, region images and cancelled ingests."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from smily import stack
from smily.client import Client
from smily.gateway.v1 import gateway_pb2

from .conftest import CMU, TEST_SLIDES, rpc_code
from .helpers.wait import pages, wait_done, wait_until


def _region(hit) -> dict:
    return dict(slide_id=hit.slide_id, x=hit.x, y=hit.y, width=hit.width, height=hit.height)


@pytest.fixture(scope="module")
def archive(client, ingested):
    """Cosine similarity of every indexed tile to a few probe regions: search
    with a k above the archive's size returns every tile with its score."""
    total = sum(s.tile_count for s in client.slides())
    assert total < 1000
    probe = client.search(region=dict(slide_id="synth-a", x=900, y=900, width=448, height=448), k=total).hits
    # Probes: the query, a tile half-way down its ranking (another texture
    # that still competes for the top 10) and the tile least like it.
    return dict(
        total=total,
        query=_region(probe[0]),
        mid=_region(probe[12]),
        far=_region(probe[-1]),
        ranked=[_region(h) for h in probe],
    )


def _similarity_to(client, region, total) -> dict:
    return {(h.slide_id, h.x, h.y): h.score for h in client.search(region=region, k=total).hits}


def _mean_sim(hits, sims) -> float:
    return float(np.mean([sims[(h.slide_id, h.x, h.y)] for h in hits]))


def test_negative_examples_push_results_away(client, archive):
    total, q, mid = archive["total"], archive["query"], archive["mid"]
    sims = _similarity_to(client, mid, total)
    plain = client.search(region=q, k=10).hits
    pushed = client.search(region=q, negatives=[mid], k=10).hits
    harder = client.search(region=q, negatives=[mid], negative_weight=1.0, k=10).hits
    assert _mean_sim(harder, sims) <= _mean_sim(pushed, sims) < _mean_sim(plain, sims)
    assert pushed[0].slide_id == q["slide_id"] and (pushed[0].x, pushed[0].y) == (q["x"], q["y"])


def test_positive_examples_pull_results_towards_them(client, archive):
    total, q, far = archive["total"], archive["query"], archive["far"]
    sims = _similarity_to(client, far, total)
    plain = client.search(region=q, k=10).hits
    both = client.search(region=q, positives=[far], k=10).hits
    assert _mean_sim(both, sims) > _mean_sim(plain, sims)
    # The mean of two examples finds each of them.
    found = {(h.slide_id, h.x, h.y) for h in both}
    assert {(q["slide_id"], q["x"], q["y"]), (far["slide_id"], far["x"], far["y"])} <= found


def test_concept_steers_search_both_ways(client, archive):
    total, q = archive["total"], archive["query"]
    ranked = client.search(region=q, k=total).hits
    # "with": the tiles least like the query; "without": the query and its neighbours.
    with_ = [_region(h) for h in ranked[-4:]]
    without = [_region(h) for h in ranked[:4]]
    c = client.create_concept("test-far-texture", with_, without)
    assert c.model_id == "efficientnet-lite0/1" and c.with_examples == 4 and c.train_accuracy == 1.0
    assert "test-far-texture" in {x.name for x in client.concepts()}

    # Steering moves the concept's own examples through the whole ranking: up with a
    # positive weight, not up with a negative one (they start at the bottom). A top-10
    # set alone can stay the same under a moderate weight while every score moves.
    def mean_rank(weight: float) -> float:
        hits = client.search(region=q, concepts={"test-far-texture": weight} if weight else {}, k=total).hits
        order = [(h.slide_id, h.x, h.y) for h in hits]
        return float(np.mean([order.index((r["slide_id"], r["x"], r["y"])) for r in with_]))

    plain, more, less = mean_rank(0), mean_rank(0.5), mean_rank(-0.5)
    assert more < plain <= less
    # Enough of it and the results are the concept's texture.
    strong = client.search(region=q, concepts={"test-far-texture": 1.0}, k=3).hits
    assert all(h.slide_id == with_[0]["slide_id"] for h in strong)
    client.delete_concept("test-far-texture")
    assert rpc_code(client.search, region=q, concepts={"test-far-texture": 1.0}) == grpc.StatusCode.NOT_FOUND


def test_concepts_are_shared_by_gateway_replicas(client, settings, archive):
    running, gw = stack.start(["gateway"], settings.replace(gateway_port=0))
    other = Client(f"127.0.0.1:{gw.gateway.gateway_port}", timeout=60)
    try:
        client.create_concept("shared", [archive["far"]], [archive["query"]])
        assert "shared" in {c.name for c in other.concepts()}
        assert other.search(region=archive["query"], concepts={"shared": 0.3}, k=3).hits
        other.delete_concept("shared")
        assert "shared" not in {c.name for c in client.concepts()}
    finally:
        other.close()
        stack.stop(running, 0)


def test_pages_and_per_slide_cap(client, archive):
    q = archive["query"]
    whole = client.search(region=q, k=30).hits

    def page(token):
        resp = client.search(region=q, k=30, page_size=7, page_token=token)
        return list(resp.hits), resp.next_page_token

    paged = pages(page, max_pages=10)
    assert [len(p) for p in paged] == [7, 7, 7, 7, 2]
    assert [(h.slide_id, h.x, h.y) for p in paged for h in p] == [(h.slide_id, h.x, h.y) for h in whole]
    # A token belongs to its request.
    first = client.search(region=q, k=30, page_size=7)
    assert (
        rpc_code(client.search, region=q, k=20, page_size=7, page_token=first.next_page_token)
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert rpc_code(client.search, region=q, page_token="garbage!") == grpc.StatusCode.INVALID_ARGUMENT

    capped = client.search(region=q, k=8, max_hits_per_slide=2).hits
    per_slide = {}
    for h in capped:
        per_slide[h.slide_id] = per_slide.get(h.slide_id, 0) + 1
    assert len(capped) == 8 and max(per_slide.values()) == 2 and len(per_slide) == 4
    # Without the cap one slide takes more than 2 of the top 8.
    assert max(sum(h.slide_id == s for h in whole[:8]) for s in per_slide) > 2


def test_whole_slide_search(client, ingested):
    # A slide file as the query: the indexed copy of that very slide ranks first.
    resp = client.search_slides(source=TEST_SLIDES[1].name, mosaic_size=8, k=4)
    assert resp.mosaic_size == 8 and resp.model_id == "efficientnet-lite0/1"
    assert resp.slides[0].slide_id == "synth-b" and resp.slides[0].score > 0.99
    scores = [s.score for s in resp.slides]
    assert scores == sorted(scores, reverse=True) and len(resp.slides) == 4
    top = resp.slides[0]
    assert 0 < len(top.regions) <= 3 and top.matched_mosaic_tiles == 8 and top.metadata["file"] == TEST_SLIDES[1].name
    assert top.regions[0].score >= top.regions[-1].score
    # An indexed slide, leaving itself out: the mosaic is cached by content.
    again = client.search_slides(slide_id="synth-b", mosaic_size=8, k=4, exclude_query_slide=True)
    assert again.cached and "synth-b" not in {s.slide_id for s in again.slides}
    assert [s.slide_id for s in again.slides] == [s.slide_id for s in resp.slides[1:]]
    assert rpc_code(client.search_slides, slide_id="nope") == grpc.StatusCode.NOT_FOUND
    assert rpc_code(client.search_slides, source="synth-b.svs", mosaic_size=0) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(client.stub.SearchSlides, gateway_pb2.SearchSlidesRequest()) == grpc.StatusCode.INVALID_ARGUMENT


def test_read_region_for_viewers(client, ingested, archive):
    hit = client.search(region=archive["query"], k=1).hits[0]
    resp = client.read_region(_region(hit))
    img = Image.open(io.BytesIO(resp.image))
    assert img.format == "PNG" and img.size == (resp.width, resp.height) == (224, 224)
    assert resp.mpp == pytest.approx(1.0, rel=0.05)
    big = client.read_region(dict(slide_id="synth-c-40x", x=0, y=0, width=4096, height=3072), max_side=256, jpeg=True)
    assert Image.open(io.BytesIO(big.image)).format == "JPEG" and max(big.width, big.height) == 256
    assert (
        rpc_code(client.read_region, dict(slide_id="synth-a", x=0, y=0, width=10**6, height=10))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        rpc_code(client.read_region, dict(slide_id="nope", x=0, y=0, width=10, height=10)) == grpc.StatusCode.NOT_FOUND
    )


def test_cancel_queued_and_running_ingests(settings, client, ingested):
    # One ingest at a time, one tile per batch: the first runs for a while, the second queues.
    running, gw = stack.start(["gateway"], settings.replace(gateway_port=0, max_concurrent_ingests=1, embed_batch=1))
    c = Client(f"127.0.0.1:{gw.gateway.gateway_port}", timeout=60)
    try:
        first = c.ingest(CMU, "cancel-running")
        second = c.ingest(TEST_SLIDES[0].name, "cancel-queued")
        assert c.cancel(second.operation_id).state == gateway_pb2.OPERATION_STATE_CANCELLED

        def progressed():
            latest = c.operation(first.operation_id)
            return latest if latest.progress.tiles_embedded else None

        op = wait_until("the running ingest embeds tiles", progressed, poll_s=0.01)
        assert op.state == gateway_pb2.OPERATION_STATE_RUNNING and op.progress.tiles_embedded < op.progress.tiles_total
        assert c.cancel(first.operation_id).cancel_requested
        done = wait_done(c, op, poll_s=0.05)
        assert done.state == gateway_pb2.OPERATION_STATE_CANCELLED
        assert done.progress.tiles_indexed < done.progress.tiles_total
        assert not {"cancel-running", "cancel-queued"} & {s.slide_id for s in c.slides()}
        # Cancelling a finished operation changes nothing; an unknown one is NOT_FOUND.
        assert c.cancel(first.operation_id).state == gateway_pb2.OPERATION_STATE_CANCELLED
        assert rpc_code(c.cancel, "nope") == grpc.StatusCode.NOT_FOUND
        # The slide can be ingested after a cancel.
        assert (
            wait_done(c, c.ingest(TEST_SLIDES[0].name, "cancel-queued")).state == gateway_pb2.OPERATION_STATE_SUCCEEDED
        )
        assert c.delete("cancel-queued") > 0
    finally:
        c.close()
        stack.stop(running, 0)
