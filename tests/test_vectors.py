"""Query arithmetic and paging helpers, without servers."""

from __future__ import annotations

from types import SimpleNamespace as NS

import grpc
import numpy as np
import pytest

from smily.common.errors import InvalidArgument
from smily.gateway import paging, vectors
from smily.gateway.v1 import gateway_pb2

pytestmark = pytest.mark.unit


def _unit_rows(rng, n, dim=32):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_combine_is_rocchio_renormalised():
    a, b, c = np.eye(3, dtype=np.float32)
    q = vectors.combine([a, b], [c], 0.5, [(0.25, a)])
    expected = 0.5 * (a + b) - 0.5 * c + 0.25 * a
    assert np.allclose(q, expected / np.linalg.norm(expected))
    with pytest.raises(InvalidArgument):
        vectors.combine([a], [a], 1.0)


def test_concept_vector_separates_the_classes():
    rng = np.random.default_rng(0)
    centre = _unit_rows(rng, 1)[0]
    axis = _unit_rows(rng, 1)[0]
    with_ = centre + 0.3 * axis + 0.05 * rng.standard_normal((20, 32))
    without = centre - 0.3 * axis + 0.05 * rng.standard_normal((20, 32))
    v, acc = vectors.concept_vector(with_, without)
    assert acc == 1.0 and np.isclose(np.linalg.norm(v), 1.0)
    assert float(v @ axis) > 0.8


def test_mosaic_picks_one_real_tile_per_cluster():
    rng = np.random.default_rng(1)
    centres = _unit_rows(rng, 4)
    tiles = np.concatenate([c + 0.01 * rng.standard_normal((25, 32)) for c in centres]).astype(np.float32)
    picked = vectors.mosaic(tiles, 4)
    assert sorted(int(i) // 25 for i in picked) == [0, 1, 2, 3]
    assert list(vectors.mosaic(tiles[:3], 8)) == [0, 1, 2]


def test_rank_slides_uses_the_median_of_best_matches():
    def h(s, score):
        return NS(slide_id=s, score=score)

    per_tile = [
        [h("a", 0.9), h("a", 0.8), h("b", 0.7)],
        [h("b", 0.95), h("a", 0.6)],
        [h("a", 0.85), h("c", 0.5)],
    ]
    ranked = vectors.rank_slides(per_tile)
    # a: median(0.9, 0.6, 0.85) = 0.85; b: median(0.7, 0.95, at most 0.5) = 0.7; c: median(0.7, 0.6, 0.5) = 0.6.
    # Slides are (tenant, slide id); these hits name no tenant.
    assert [(s, round(score, 3), n) for (_, s), score, n, _ in ranked] == [("a", 0.85, 3), ("b", 0.7, 2), ("c", 0.6, 1)]
    assert [x.score for x in ranked[0][3]] == [0.9, 0.85, 0.8, 0.6]


def test_top_hits_overfetches_for_the_cap():
    hits = [NS(slide_id="a") for _ in range(50)] + [NS(slide_id=s) for s in "bcdef"]
    asked = []

    def search(n):
        asked.append(n)
        return hits[:n]

    got = paging.top_hits(search, 4, 1)
    assert [x.slide_id for x in got] == ["a", "b", "c", "d"] and asked == [16, 64]
    assert len(paging.top_hits(lambda n: hits[:n], 10, 0)) == 10


def test_page_tokens_belong_to_their_request():
    req = gateway_pb2.SearchRequest(image=b"x", k=30, page_size=5)
    fp = paging.fingerprint(req)
    token = paging.make_token(5, fp)
    assert (
        paging.read_token(token, paging.fingerprint(gateway_pb2.SearchRequest(image=b"x", k=30, page_token=token))) == 5
    )
    other = paging.fingerprint(gateway_pb2.SearchRequest(image=b"y", k=30))
    for bad, fingerprint in ((token, other), ("%%%", fp), ("bm9jb2xvbg==", fp)):
        with pytest.raises(InvalidArgument) as info:
            paging.read_token(bad, fingerprint)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
