"""EmbedSlide: the embedder reads a slide's tiles from the tiler itself, so
pixels never pass through the gateway; cancelling it stops the tiler too."""

from __future__ import annotations

import pathlib
import time

import grpc
import numpy as np
import pytest

from smily import stack
from smily.common.channels import channel
from smily.common.server import IN_FLIGHT
from smily.common.tensors import from_tensor
from smily.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc
from smily.types.v1 import types_pb2

from .conftest import CMU, TEST_SLIDES, base_settings, rpc_code, streamed_tiles
from .helpers.pki import CA

PARAMS = tiler_pb2.TilingParams(mpp=1.0, tile_size=224, min_tissue_fraction=0.5)


@pytest.fixture(scope="module")
def embedder(settings):
    return embedder_pb2_grpc.EmbedderServiceStub(channel(settings.embedder.embedder_target))


@pytest.fixture(scope="module")
def tiler(settings):
    return tiler_pb2_grpc.TilerServiceStub(channel(settings.tiler.tiler_target))


def test_same_tiles_and_embeddings_as_streaming_and_embedding_apart(embedder, tiler):
    msgs = list(
        embedder.EmbedSlide(
            embedder_pb2.EmbedSlideRequest(tiles=tiler_pb2.StreamTilesRequest(slide=CMU, params=PARAMS), batch=5)
        )
    )
    tiles = streamed_tiles(
        tiler, tiler_pb2.StreamTilesRequest(slide=CMU, params=PARAMS, encoding=types_pb2.IMAGE_ENCODING_RAW_RGB)
    )
    # Progress first, before any tile is embedded; then batches of 5 without pixels.
    assert not msgs[0].tiles and msgs[0].tiles_total == len(tiles) > 5
    batches = msgs[1:]
    assert [len(m.tiles) for m in batches[:-1]] == [5] * (len(batches) - 1) and 0 < len(batches[-1].tiles) <= 5
    assert all(m.model_id == "efficientnet-lite0/1" and m.tiles_total == len(tiles) for m in batches)
    got = [t for m in batches for t in m.tiles]
    assert not any(t.HasField("image") for t in got)
    assert [(t.x, t.y, t.width, t.mpp) for t in got] == [(t.x, t.y, t.width, t.mpp) for t in tiles]
    vectors = np.concatenate([from_tensor(m.embeddings) for m in batches])
    direct = from_tensor(embedder.Embed(embedder_pb2.EmbedRequest(images=[t.image for t in tiles[:5]])).embeddings)
    assert vectors.shape == (len(tiles), 1280)
    assert np.allclose(vectors[:5], direct, atol=1e-5)


def test_tiler_errors_pass_through(embedder):
    missing = embedder_pb2.EmbedSlideRequest(tiles=tiler_pb2.StreamTilesRequest(slide="nope.svs", params=PARAMS))
    assert rpc_code(lambda: list(embedder.EmbedSlide(missing))) == grpc.StatusCode.NOT_FOUND
    too_big = embedder_pb2.EmbedSlideRequest(tiles=missing.tiles, batch=10_000)
    assert rpc_code(lambda: list(embedder.EmbedSlide(too_big))) == grpc.StatusCode.INVALID_ARGUMENT


def _tiler_in_flight() -> float:
    return IN_FLIGHT.labels("tiler")._value.get()


def test_cancelling_embed_slide_cancels_the_tiler_stream(embedder):
    # Every tile of the 40x slide at its full resolution: far more than one
    # batch, so the tiler is still streaming when the call is cancelled.
    params = tiler_pb2.TilingParams(mpp=0.25, tile_size=224, min_tissue_fraction=0.0)
    call = embedder.EmbedSlide(
        embedder_pb2.EmbedSlideRequest(
            tiles=tiler_pb2.StreamTilesRequest(slide=TEST_SLIDES[2].name, params=params), batch=1
        )
    )
    progress = next(call)
    first = next(call)
    assert progress.tiles_total > 100 and len(first.tiles) == 1
    assert _tiler_in_flight() == 1
    call.cancel()
    assert rpc_code(lambda: list(call)) == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 60  # a bound on the wait, not a speed check
    while _tiler_in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _tiler_in_flight() == 0


@pytest.fixture(scope="module")
def mtls_pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    ca = CA(d)
    return {
        "ca": ca,
        "gateway": ca.issue("smily-gateway"),
        "embedder": ca.issue("smily-embedder"),
        "stranger": ca.issue("stranger"),
    }


def test_under_mtls_the_tiler_admits_the_embedder_identity_only(mtls_pki, slide_dir, model_repo):
    gateway_cert, gateway_key = mtls_pki["gateway"]
    common = dict(
        plaintext=False,
        tls_ca_file=mtls_pki["ca"].path,
        tls_client_auth="require",
        slide_roots=(slide_dir,),
        model_repository=model_repo,
    )
    tiler, s = stack.start(["tiler"], base_settings(tls_cert_file=gateway_cert, tls_key_file=gateway_key, **common))
    try:
        for who, code in (("embedder", grpc.StatusCode.OK), ("stranger", grpc.StatusCode.PERMISSION_DENIED)):
            cert, key = mtls_pki[who]
            emb, s2 = stack.start(["embedder"], s.replace(tls_cert_file=cert, tls_key_file=key))
            try:
                gateway_creds = grpc.ssl_channel_credentials(
                    *(pathlib.Path(p).read_bytes() for p in (mtls_pki["ca"].path, gateway_key, gateway_cert))
                )
                stub = embedder_pb2_grpc.EmbedderServiceStub(channel(s2.embedder.embedder_target, gateway_creds))
                request = embedder_pb2.EmbedSlideRequest(tiles=tiler_pb2.StreamTilesRequest(slide=CMU, params=PARAMS))
                if code == grpc.StatusCode.OK:
                    assert sum(len(m.tiles) for m in stub.EmbedSlide(request, timeout=300)) > 0
                else:
                    assert rpc_code(lambda s=stub, r=request: list(s.EmbedSlide(r, timeout=300))) == code
            finally:
                stack.stop(emb, 0)
    finally:
        stack.stop(tiler, 0)
