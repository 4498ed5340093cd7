"""Index cluster at scale, on a real PostgreSQL with replica processes:

- the public API through the real gateway with a shard down: UNAVAILABLE naming
  the shard by default, `partial` + `missing_shards` when the request allows it
  (Search and SearchSlides);
- hedging: a replica frozen with SIGSTOP fails no search, the shard's other
  replica answers the hedge, and hedges stay within their budget; the same with
  one multi-address target per shard (as a dns:/// name of a headless Service);
- resharding 2 -> 3 while searches run: no search fails, and every search sees
  every slide exactly once, during the move and after it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from smily import stack
from smily.common.channels import channel
from smily.common.placement import shard_of_slide
from smily.common.tensors import to_tensor
from smily.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from smily.gateway import shards as shards_module
from smily.gateway.shards import connect
from smily.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from smily.index import reshard as resharding
from smily.index.reshard import reshard
from smily.index.v1 import index_pb2
from smily.synthetic import SlideSpec, write_samples

from .conftest import base_settings
from .helpers.pg import fresh_database, postgres  # noqa: F401 (fixture)
from .helpers.wait import wait_until
from .test_index_cluster import DIM, MODEL, Cluster, ingest, search, vectors

QUERIES = np.random.default_rng(7).standard_normal((4, DIM)).astype(np.float32)


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


# -- the public API with a shard down ---------------------------------------------


@pytest.fixture(scope="module")
def gateway(postgres, model_repo, tmp_path_factory):  # noqa: F811
    """2 shards x 1 replica behind a real gateway (with tiler and embedder), holding
    slides of the embedder's model."""
    root = str(tmp_path_factory.mktemp("gw"))
    write_samples(root, (SlideSpec("q.tiff", "tiff", 2048, 1536, 0.5, 21),))
    c = Cluster(fresh_database(postgres), root, shards=2, replicas=1)
    backends, settings = stack.start(
        ["tiler", "embedder"], base_settings(slide_roots=(root,), model_repository=model_repo)
    )
    gw = None
    try:
        emb = embedder_pb2_grpc.EmbedderServiceStub(ch := channel(settings.embedder.embedder_target))
        info = emb.GetModelInfo(embedder_pb2.GetModelInfoRequest()).info
        ch.close()
        rng = np.random.default_rng(3)
        for i in range(12):
            v = rng.standard_normal((8, info.embedding_dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            rects = [index_pb2.TileRect(x=j, y=0, width=1, height=1, mpp=1.0) for j in range(8)]
            c.index.AddTiles(
                index_pb2.AddTilesRequest(
                    model_id=info.model_id, slide_id=f"g-{i:02d}", generation="g", tiles=rects, embeddings=to_tensor(v)
                )
            )
            c.index.CommitSlide(
                index_pb2.CommitSlideRequest(
                    model_id=info.model_id,
                    generation="g",
                    expected_tiles=8,
                    slide=index_pb2.Slide(slide_id=f"g-{i:02d}", source="x"),
                )
            )
        gw, gs = stack.start(["gateway"], settings.replace(index_targets=tuple(t[0] for t in c.targets)))
        c.gateway = f"127.0.0.1:{gs.gateway.gateway_port}"  # for the CLI
        ch = channel(c.gateway)
        yield c, gateway_pb2_grpc.GatewayServiceStub(ch)
        ch.close()
    finally:
        if gw:
            stack.stop(gw, 0)
        stack.stop(backends, 0)
        c.close()


def smily_cli(gateway: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smily.cli", *args, "--gateway", gateway], capture_output=True, text=True, timeout=120
    )


def cli_partial(gateway: str, tmp_path) -> None:
    """With shard 1 down: the CLI names the shard (no "is the stack up?": the gateway answered);
    --partial answers from shard 0 and names the missing shard."""
    image = tmp_path / "q.png"
    image.write_bytes(png(1))
    out = smily_cli(gateway, "search", "--image", str(image), "--k", "5")
    assert out.returncode == 2 and "index shard 1 has no live replica" in out.stderr
    assert "Is the stack up" not in out.stderr and "Traceback" not in out.stderr
    out = smily_cli(gateway, "search", "--image", str(image), "--k", "5", "--partial")
    assert out.returncode == 0, out.stderr
    assert "5 hits" in out.stdout and "partial answer: index shard(s) 1 did not answer" in out.stderr
    out = smily_cli(gateway, "search", "--image", str(image), "--k", "5", "--partial", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["missing_shards"] == [1]


def test_gateway_names_a_missing_shard_or_answers_partially(gateway, tmp_path):
    c, gw = gateway
    whole = gw.Search(gateway_pb2.SearchRequest(image=png(1), k=50))
    assert not whole.partial and not whole.missing_shards
    assert {shard_of_slide(h.tenant, h.slide_id, 2) for h in whole.hits} == {0, 1}
    slides = gw.SearchSlides(gateway_pb2.SearchSlidesRequest(source="q.tiff", k=20, partial=True))
    assert not slides.partial and {shard_of_slide(s.tenant, s.slide_id, 2) for s in slides.slides} == {0, 1}

    c.kill(1, 0)
    try:
        for call, request in (
            (gw.Search, gateway_pb2.SearchRequest(image=png(1), k=50)),
            (gw.SearchSlides, gateway_pb2.SearchSlidesRequest(source="q.tiff", k=20)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(request)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "index shard 1 has no live replica" in err.value.details()
            assert "127.0.0.1" not in err.value.details()

        part = gw.Search(gateway_pb2.SearchRequest(image=png(1), k=50, partial=True))
        assert part.partial and list(part.missing_shards) == [1]
        expected = [(h.slide_id, h.x) for h in whole.hits if shard_of_slide(h.tenant, h.slide_id, 2) == 0]
        # Shard 0's best hits, in the order the whole index ranks them (then more of shard 0's).
        assert [(h.slide_id, h.x) for h in part.hits][: len(expected)] == expected
        assert all(shard_of_slide(h.tenant, h.slide_id, 2) == 0 for h in part.hits)
        part = gw.SearchSlides(gateway_pb2.SearchSlidesRequest(source="q.tiff", k=20, partial=True))
        assert part.partial and list(part.missing_shards) == [1]
        assert part.slides and all(shard_of_slide(s.tenant, s.slide_id, 2) == 0 for s in part.slides)
        cli_partial(c.gateway, tmp_path)
    finally:
        c.restart(1, 0)
    again = gw.Search(gateway_pb2.SearchRequest(image=png(1), k=50, partial=True))
    assert not again.partial and [(h.slide_id, h.x) for h in again.hits] == [(h.slide_id, h.x) for h in whole.hits]


# -- hedging -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(postgres, tmp_path_factory):  # noqa: F811
    """One shard of two replicas, holding 8 slides."""
    c = Cluster(fresh_database(postgres), str(tmp_path_factory.mktemp("pair")), shards=1, replicas=2)
    try:
        for i in range(8):
            ingest(c.index, f"h-{i}", vectors(i), {})
        yield c
    finally:
        c.close()


def frozen(c: Cluster, shard: int, r: int):
    """SIGSTOP a replica for the block: it keeps its connections open and answers nothing."""

    class Frozen:
        def __enter__(self):
            os.kill(c.procs[shard, r].pid, signal.SIGSTOP)

        def __exit__(self, *exc):
            os.kill(c.procs[shard, r].pid, signal.SIGCONT)

    return Frozen()


def test_a_frozen_replica_is_hedged_around(pair):
    c = pair
    shard = c.index.shards[0]
    expected = [search(c.index, q) for q in QUERIES]
    for n in range(shards_module.LATENCY_MIN_SAMPLES + 10):  # the shard's p95 is learnt
        search(c.index, QUERIES[n % len(QUERIES)])
    assert shard.hedge_delay() is not None
    before = shard.hedges
    calls = 40
    with frozen(c, 0, 1):
        # Without a hedge a search sent to the frozen replica would wait for its whole deadline and fail.
        for n in range(calls):
            hits = c.index.Search(
                index_pb2.SearchRequest(model_id=MODEL, query=to_tensor(QUERIES[n % len(QUERIES)]), k=25), timeout=120
            ).hits
            assert [(h.slide_id, h.tile.x, round(h.score, 5)) for h in hits] == expected[n % len(QUERIES)]
    hedges = shard.hedges - before
    # At least one hedge; bounded by the budget, and the frozen replica is then passed over, not hedged every time.
    assert 1 <= hedges <= shards_module.HEDGE_BURST + shards_module.HEDGE_RATIO * calls
    assert hedges < calls / 2


def test_one_multi_address_target_per_shard(pair):
    """A shard given as one target that resolves to all its replicas (in Kubernetes, dns:/// of a
    per-shard headless Service; here gRPC's ipv4: list): round_robin spreads calls, a hedge through
    the same channel reaches the other replica."""
    c = pair
    expected = [search(c.index, q) for q in QUERIES]
    ports = [t.rsplit(":", 1)[1] for t in c.targets[0]]
    index, chans = connect(["ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)])
    dns, dns_chans = connect([f"dns:///localhost:{ports[0]}"])
    try:
        assert index.shards[0].balanced == [True]
        for n in range(shards_module.LATENCY_MIN_SAMPLES + 10):
            assert search(index, QUERIES[n % len(QUERIES)]) == expected[n % len(QUERIES)]
            assert search(dns, QUERIES[n % len(QUERIES)]) == expected[n % len(QUERIES)]
        with frozen(c, 0, 1):
            # Every other call lands on the frozen replica; the hedge budget's burst covers these few.
            for n in range(6):
                hits = index.Search(
                    index_pb2.SearchRequest(model_id=MODEL, query=to_tensor(QUERIES[n % 4]), k=25), timeout=120
                ).hits
                assert [(h.slide_id, h.tile.x, round(h.score, 5)) for h in hits] == expected[n % 4]
        assert index.shards[0].hedges >= 1
    finally:
        for idx, groups in ((index, chans), (dns, dns_chans)):
            idx.close()
            for ch in groups[0]:
                ch.close()


# -- resharding while searches run ----------------------------------------------------


def test_reshard_two_to_three_during_searches(postgres, tmp_path, monkeypatch):  # noqa: F811
    url = fresh_database(postgres)
    c = Cluster(url, str(tmp_path), shards=3, replicas=1)
    try:
        # Ingested while there were 2 shards: shard 2 is new and empty.
        two, two_chans = connect(["|".join(t) for t in c.targets[:2]])
        for i in range(24):
            ingest(two, f"m-{i:02d}", vectors(100 + i), {})
        two.close()
        for ch in (ch for g in two_chans for ch in g):
            ch.close()
        everyone = sorted(f"m-{i:02d}" for i in range(24))
        stop, failures, seen, listings = threading.Event(), [], [], []

        def loop():  # a bounded search loop over all three shards, as the reconfigured gateway sends
            n = 0
            while not stop.is_set() and n < 20000:
                n += 1
                try:
                    hits = c.index.Search(
                        index_pb2.SearchRequest(model_id=MODEL, query=to_tensor(QUERIES[n % 4]), k=1000), timeout=60
                    ).hits
                except grpc.RpcError as exc:
                    failures.append(exc.code())
                    continue
                tiles = [(h.slide_id, h.tile.x) for h in hits]
                seen.append((len(tiles) == len(set(tiles)) == 240, sorted({h.slide_id for h in hits}) == everyone))
                # A listing, paged across the moving slides, names each slide once.
                listed, token = [], ""
                while True:
                    page = c.index.ListSlides(index_pb2.ListSlidesRequest(page_size=5, page_token=token), timeout=60)
                    listed += [s.slide_id for s in page.slides]
                    if not (token := page.next_page_token):
                        break
                listings.append(listed == everyone)

        def after_searches(step):
            """Each copy and drop of the reshard waits for two more searches: every phase is searched."""

            def gated(*args):
                done = len(seen) + len(failures)
                wait_until("searches between reshard steps", lambda: len(seen) + len(failures) >= done + 2)
                return step(*args)

            return gated

        monkeypatch.setattr(resharding, "_copy", after_searches(resharding._copy))
        monkeypatch.setattr(resharding, "_drop", after_searches(resharding._drop))
        searcher = threading.Thread(target=loop)
        searcher.start()
        try:
            moved = reshard(url, 2, 3, batch=4)
        finally:
            stop.set()
            searcher.join()
        assert 0 < moved < 24
        assert not failures
        assert len(seen) >= 4 * moved and all(once and complete for once, complete in seen), (
            f"{sum(1 for s in seen if s != (True, True))} of {len(seen)} searches saw a slide twice or not at all"
        )
        assert all(listings), f"{listings.count(False)} of {len(listings)} listings named a slide twice or missed one"
        # Each replica ends with exactly the slides placed on its shard (once it has followed the last drops).
        # Slides written without a tenant are the default tenant's, placed by that key.
        placed = [sum(1 for s in everyone if shard_of_slide("default", s, 3) == k) for k in range(3)]
        replicas = [c.replica(s, 0) for s in range(3)]
        deadline = time.monotonic() + 60
        while True:
            counts = [r.GetIndexInfo(index_pb2.GetIndexInfoRequest()).slide_count for r in replicas]
            if counts == placed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert counts == placed
        for q in QUERIES:
            hits = search(c.index, q, k=1000)
            assert sorted({h[0] for h in hits}) == everyone and len(hits) == 240
    finally:
        c.close()
