"""Three real index shards behind the gateway's router answer exactly as one index holding everything."""

from __future__ import annotations

import numpy as np
import pytest

from smily import stack
from smily.common.channels import channel
from smily.common.tensors import to_tensor
from smily.gateway.shards import ShardedIndex, shard_of
from smily.index.v1 import index_pb2, index_pb2_grpc

from .conftest import base_settings, rpc_code
from .helpers.wait import pages

MODEL = "m/1"
DIM = 16


@pytest.fixture
def indexes(tmp_path):
    running, channels = [], []
    try:
        for i in range(4):
            srv, settings = stack.start(
                ["index"], base_settings(index_dir=str(tmp_path / f"i{i}"), index_snapshot_interval_s=0)
            )
            running.append(srv)
            channels.append(channel(settings.index.index_target))
        stubs = [index_pb2_grpc.IndexServiceStub(c) for c in channels]
        yield ShardedIndex(stubs[:3]), ShardedIndex(stubs[3:]), stubs[:3]
    finally:
        for c in channels:
            c.close()
        for srv in running:
            stack.stop(srv, 0)


def ingest(index, sid, v, meta):
    rects = [index_pb2.TileRect(x=i, y=0, width=1, height=1, mpp=1.0) for i in range(len(v))]
    index.AddTiles(
        index_pb2.AddTilesRequest(model_id=MODEL, slide_id=sid, generation="g", tiles=rects, embeddings=to_tensor(v))
    )
    index.CommitSlide(
        index_pb2.CommitSlideRequest(
            model_id=MODEL,
            generation="g",
            expected_tiles=len(v),
            slide=index_pb2.Slide(slide_id=sid, source="x", metadata=meta),
        )
    )


def search(index, q, k, **kw):
    hits = index.Search(index_pb2.SearchRequest(model_id=MODEL, query=to_tensor(q), k=k, **kw)).hits
    return [(h.slide_id, h.tile.x, round(h.score, 5)) for h in hits]


def test_three_shards_equal_one_index(indexes):
    sharded, single, shards = indexes
    rng = np.random.default_rng(0)
    for i in range(30):
        v = rng.standard_normal((20, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        meta = {"organ": ["lung", "skin", "colon"][i % 3]}
        for index in (sharded, single):
            ingest(index, f"slide-{i:02d}", v, meta)
    per_shard = [s.GetIndexInfo(index_pb2.GetIndexInfoRequest()).slide_count for s in shards]
    assert sum(per_shard) == 30 and min(per_shard) > 0  # every shard owns a part
    assert (
        shards[shard_of("slide-07", 3)].GetSlide(index_pb2.GetSlideRequest(slide_id="slide-07")).slide.tile_count == 20
    )
    for q in rng.standard_normal((10, DIM)).astype(np.float32):
        for kw in (
            {},
            {"filters": {"organ": "skin"}},
            {"exclude_slide_ids": ["slide-00", "slide-05"]},
            {"slide_ids": ["slide-03", "slide-11"]},
        ):
            assert search(sharded, q, 25, **kw) == search(single, q, 25, **kw), kw

    def listing(index, **match):
        def page(token):
            resp = index.ListSlides(index_pb2.ListSlidesRequest(page_size=7, page_token=token, **match))
            return [s.slide_id for s in resp.slides], resp.next_page_token

        return pages(page)

    both = [listing(index) for index in (sharded, single)]
    assert both[0] == both[1] and sum(map(len, both[0])) == 30
    # Finding slides by metadata pages across the shards as one index does.
    skin = [listing(index, metadata_keys=["organ"], metadata_prefix="SK") for index in (sharded, single)]
    assert skin[0] == skin[1] and sum(map(len, skin[0])) == 10
    for index in (sharded, single):
        assert index.DeleteSlide(index_pb2.DeleteSlideRequest(slide_id="slide-07")).deleted_tiles == 20
    assert sharded.GetIndexInfo(index_pb2.GetIndexInfoRequest()).tile_count == 29 * 20
    assert rpc_code(sharded.GetSlide, index_pb2.GetSlideRequest(slide_id="slide-07")).name == "NOT_FOUND"
