"""Bring-your-own model: export two architectures, import, quantize, serve and
search with them through the real services."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from smily import stack
from smily.common.channels import channel
from smily.common.tensors import from_tensor, to_tensor
from smily.embedder.model_repo import load
from smily.embedder.preprocess import Preprocessor
from smily.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from smily.index.v1 import index_pb2, index_pb2_grpc
from smily.types.v1 import types_pb2

from .conftest import ROOT, TEST_SLIDES, base_settings, rpc_code
from .helpers import backbones
from .helpers.wait import wait_done

ARCHITECTURES = {
    # name: (factory, input size)
    "tiny-resnet": ("tests.helpers.backbones:tiny_resnet", 96),
    "lite1-random": ("tests.helpers.backbones:efficientnet_lite1", 240),
}


def smily(*args):
    return subprocess.run(
        [sys.executable, "-m", "smily.cli", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def export(repo, name: str, weights: str, *extra):
    factory, size = ARCHITECTURES[name]
    return smily(
        "model",
        "export",
        "--factory",
        factory,
        "--weights",
        weights,
        "--name",
        name,
        "--version",
        "1",
        "--input-size",
        str(size),
        "--output-dir",
        str(repo),
        *extra,
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A repository holding tiny-resnet/1, exported by the CLI; its PyTorch module rides along."""
    path = tmp_path_factory.mktemp("models")
    weights = str(path / "tiny.pt")
    module = backbones.save_random_weights(backbones.tiny_resnet, weights)
    out = export(path, "tiny-resnet", weights)
    assert out.returncode == 0, out.stderr
    return path, module


def tissue(seed: int, size: int = 224) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR))


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def embed(settings, *rgbs) -> embedder_pb2.EmbedResponse:
    stub = embedder_pb2_grpc.EmbedderServiceStub(channel(settings.embedder.embedder_target))
    return stub.Embed(embedder_pb2.EmbedRequest(images=[types_pb2.Image(data=png(x)) for x in rgbs]))


def serve_embedder(repo, model: str):
    return stack.start(["embedder"], base_settings(model_repository=str(repo), model=model))


def test_exported_model_is_served_with_pytorch_parity(repo):
    path, module = repo
    config, _ = load(str(path), "tiny-resnet/1")
    assert (config.embedding_dim, config.input_size, config.mean) == (64, 96, (0.485, 0.456, 0.406))
    running, settings = serve_embedder(path, "tiny-resnet/1")
    try:
        images = [tissue(1), tissue(2)]
        resp = embed(settings, *images)
        assert resp.model_id == "tiny-resnet/1"
        got = from_tensor(resp.embeddings)
        with torch.no_grad():
            ref = module(torch.from_numpy(Preprocessor(config)(images))).mean(dim=(2, 3)).numpy()
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        assert got.shape == (2, 64)
        assert np.abs(got - ref).max() < 1e-4
    finally:
        stack.stop(running, 0)


def test_second_architecture_exports_and_serves(tmp_path):
    weights = str(tmp_path / "lite1.pt")
    backbones.save_random_weights(backbones.efficientnet_lite1, weights, seed=3)
    out = export(tmp_path, "lite1-random", weights)
    assert out.returncode == 0, out.stderr
    assert "max abs difference to PyTorch" in out.stdout
    running, settings = serve_embedder(tmp_path, "lite1-random/1")
    try:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel(settings.embedder.embedder_target))
        info = stub.GetModelInfo(embedder_pb2.GetModelInfoRequest()).info
        assert (info.model_id, info.embedding_dim, info.input_size) == ("lite1-random/1", 1280, 240)
        v = from_tensor(embed(settings, tissue(3), tissue(4, 300)).embeddings)
        assert v.shape == (2, 1280) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    finally:
        stack.stop(running, 0)


def test_export_rejects_bad_factories_and_weights(tmp_path):
    weights = str(tmp_path / "tiny.pt")
    backbones.save_random_weights(backbones.tiny_resnet, weights)
    out = smily(
        "model",
        "export",
        "--factory",
        "tests.helpers.backbones:efficientnet_lite1",
        "--weights",
        weights,
        "--name",
        "x",
        "--output-dir",
        str(tmp_path),
    )
    assert out.returncode != 0 and "state_dict" in out.stderr  # weights of another architecture
    out = smily(
        "model", "export", "--factory", "tests.helpers.backbones:nothing", "--name", "x", "--output-dir", str(tmp_path)
    )
    assert out.returncode != 0 and "cannot load factory" in out.stderr
    out = export(tmp_path, "tiny-resnet", weights, "--tolerance", "0")  # parity can never be exactly 0 here
    assert out.returncode == 1 and "differs from PyTorch" in out.stderr
    assert not os.path.exists(tmp_path / "tiny-resnet" / "1")


def test_a_second_model_is_searched_end_to_end(repo, slide_dir, tmp_path):
    """tiny-resnet/1 through tiler, embedder, index and gateway, with a fresh index."""
    from smily.client import Client

    path, _ = repo
    settings = base_settings(
        slide_roots=(slide_dir,), model_repository=str(path), model="tiny-resnet/1", index_dir=str(tmp_path / "index")
    )
    running, settings = stack.start(stack.ORDER, settings)
    client = Client(f"127.0.0.1:{settings.gateway.gateway_port}", timeout=300)
    try:
        name = TEST_SLIDES[0].name
        op = wait_done(client, client.ingest(name, "synth-a"))
        assert op.model_id == "tiny-resnet/1" and op.progress.tiles_indexed > 10, op
        index = index_pb2_grpc.IndexServiceStub(channel(settings.index.index_target))
        info = index.GetIndexInfo(index_pb2.GetIndexInfoRequest())
        assert (info.model_id, info.dim) == ("tiny-resnet/1", 64)
        slide = client.slides()[0]
        # Any indexed tile, queried by its own region, finds itself first.
        any_tile = index.Search(
            index_pb2.SearchRequest(model_id="tiny-resnet/1", query=to_tensor(np.ones(64, np.float32) / 8), k=1)
        ).hits[0]
        t = any_tile.tile
        resp = client.search(region=dict(slide_id="synth-a", x=t.x, y=t.y, width=t.width, height=t.height), k=3)
        assert resp.model_id == "tiny-resnet/1" and slide.model_id == "tiny-resnet/1"
        assert (resp.hits[0].x, resp.hits[0].y) == (t.x, t.y) and resp.hits[0].score > 0.999
        # Vectors of another model are refused: changing the model needs a new index.
        other = index_pb2.SearchRequest(
            model_id="efficientnet-lite0/1", query=to_tensor(np.ones(64, np.float32) / 8), k=1
        )
        assert rpc_code(index.Search, other) == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        client.close()
        stack.stop(running, 0)


def write_config(path, **changes) -> str:
    config = dict(
        name="imported",
        version="7",
        input_name="images",
        input_size=96,
        output_name="embeddings",
        embedding_dim=64,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
    )
    config.update(changes)
    with open(path, "w") as fh:
        json.dump(config, fh)
    return str(path)


def test_import_validates_and_registers(repo, tmp_path):
    onnx = str(repo[0] / "tiny-resnet" / "1" / "model.onnx")
    dest = str(tmp_path / "repo")
    for changes, message in [
        (dict(embedding_dim=128), "dry run"),
        (dict(input_size=112), "the config implies"),
        (dict(layout="NHWC"), "shape"),
        (dict(output_name="logits"), "outputs"),
        (dict(std=[0, 1, 1]), "std > 0"),
        (dict(extra=1), "unknown fields"),
    ]:
        out = smily(
            "model",
            "import",
            "--onnx",
            onnx,
            "--config",
            write_config(tmp_path / "c.json", **changes),
            "--output-dir",
            dest,
        )
        assert out.returncode == 1 and message in out.stderr, (changes, out.stderr)
    assert not os.path.exists(os.path.join(dest, "imported"))
    out = smily("model", "import", "--onnx", onnx, "--config", write_config(tmp_path / "c.json"), "--output-dir", dest)
    assert out.returncode == 0, out.stderr
    running, settings = serve_embedder(dest, "imported/7")
    try:
        resp = embed(settings, tissue(5))
        assert resp.model_id == "imported/7" and from_tensor(resp.embeddings).shape == (1, 64)
    finally:
        stack.stop(running, 0)


def test_int8_version_is_served_under_its_own_id(repo, tmp_path):
    path, _ = repo
    calib = tmp_path / "tiles"
    calib.mkdir()
    for i in range(8):
        Image.fromarray(tissue(100 + i, 96)).save(calib / f"t{i}.png")
    out = smily(
        "model", "quantize", "--model", "tiny-resnet/1", "--calibration-dir", str(calib), "--output-dir", str(path)
    )
    assert out.returncode == 0, out.stderr
    config, _ = load(str(path), "tiny-resnet/1-int8")
    assert "INT8" in config.description and "8 operator tiles" in config.description
    vectors = {}
    for model in ("tiny-resnet/1", "tiny-resnet/1-int8"):
        running, settings = serve_embedder(path, model)
        try:
            resp = embed(settings, tissue(6, 96), tissue(7, 96))
            assert resp.model_id == model
            vectors[model] = from_tensor(resp.embeddings)
        finally:
            stack.stop(running, 0)
    cosine = (vectors["tiny-resnet/1"] * vectors["tiny-resnet/1-int8"]).sum(axis=1)
    assert cosine.min() > 0.9, cosine
