"""The embedder over gRPC: batches, encodings, normalisation, model id."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from smily.common.channels import channel
from smily.common.tensors import from_tensor
from smily.embedder.model_repo import load
from smily.embedder.preprocess import Preprocessor
from smily.embedder.runtime import Model
from smily.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from smily.types.v1 import types_pb2

from .conftest import rpc_code
from .helpers.gpu import expected_providers


@pytest.fixture(scope="module")
def embedder(settings):
    return embedder_pb2_grpc.EmbedderServiceStub(channel(settings.embedder.embedder_target))


def patch(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((224, 224), Image.Resampling.BILINEAR))


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_batch_of_raw_and_png_images(embedder):
    a, b = patch(1), patch(2)
    req = embedder_pb2.EmbedRequest(
        images=[
            types_pb2.Image(data=a.tobytes(), encoding=types_pb2.IMAGE_ENCODING_RAW_RGB, width=224, height=224),
            types_pb2.Image(data=png(a), encoding=types_pb2.IMAGE_ENCODING_PNG),
            types_pb2.Image(data=png(b)),  # encoding sniffed from the bytes
        ]
    )
    resp = embedder.Embed(req)
    assert resp.model_id == "efficientnet-lite0/1"
    v = from_tensor(resp.embeddings)
    assert v.shape == (3, 1280) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert np.allclose(v[0], v[1], atol=1e-5)  # same pixels, either encoding
    assert float(v[0] @ v[2]) < 0.999


def test_model_info(embedder):
    info = embedder.GetModelInfo(embedder_pb2.GetModelInfoRequest()).info
    assert (info.model_id, info.embedding_dim, info.input_size) == ("efficientnet-lite0/1", 1280, 224)
    assert info.l2_normalized and info.execution_provider in expected_providers()


def test_bad_images(embedder):
    def embed(*images):
        return embedder.Embed(embedder_pb2.EmbedRequest(images=list(images)))

    assert rpc_code(embed) == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_code(embed, types_pb2.Image(data=b"GIF89a nonsense")) == grpc.StatusCode.INVALID_ARGUMENT
    raw = types_pb2.Image(data=b"\0" * 10, encoding=types_pb2.IMAGE_ENCODING_RAW_RGB, width=224, height=224)
    code = rpc_code(embed, raw)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_preprocessing_matches_the_config(model_repo):
    config, _ = load(model_repo, "efficientnet-lite0/1")
    x = Preprocessor(config)([np.full((224, 224, 3), 255, np.uint8), np.zeros((300, 200, 3), np.uint8)])
    assert x.shape == (2, 3, 224, 224)
    assert np.allclose(x[0], (1 - 0.498) / 0.502, atol=1e-4)
    assert np.allclose(x[1], (0 - 0.498) / 0.502, atol=1e-4)


def test_fixed_size_runs_give_the_same_vectors(model_repo):
    # What a GPU embedder does with every batch: runs of one size, the last one padded.
    config, path = load(model_repo, "efficientnet-lite0/1")
    fixed = Model(config, path, max_batch=8, fixed_batch=4)
    plain = Model(config, path, max_batch=8, fixed_batch=0)
    x = fixed.preprocess([patch(i) for i in range(6)])  # runs as 4 + (2 and 2 of padding)
    a, b = fixed.embed_tensor(x), plain.embed_tensor(x)
    assert a.shape == b.shape == (6, config.embedding_dim)
    assert np.allclose(a, b, atol=1e-5) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert fixed.embed_tensor(x[:1]).shape == (1, config.embedding_dim)
