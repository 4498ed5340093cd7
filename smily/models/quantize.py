"""INT8 versions of a model: ONNX Runtime static quantization (QDQ, per-channel
weights), calibrated on tissue tiles, written as a new version of the model.

The INT8 version is served like any other version; its model id differs, so
the index never mixes its vectors with the FP32 model's.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import tempfile

import numpy as np

from smily.common import images
from smily.common.errors import FailedPrecondition
from smily.embedder import model_repo
from smily.embedder.preprocess import Preprocessor


def synthetic_tiles(n: int, seed: int = 0, size: int = 224) -> list[np.ndarray]:
    """n tissue tiles (size x size RGB at 1 um/px) cut from synthetic slides."""
    from smily.synthetic import SlideSpec, render

    tiles: list[np.ndarray] = []
    slide = 0
    while len(tiles) < n:
        # 0.5 um/px level 0, cut 2*size crops and halve them: tiles at 1 um/px as the gateway ingests.
        level0 = render(SlideSpec("calib", "tiff", 2048, 2048, 0.5, 1000 + 97 * seed + slide))
        step = 2 * size
        for y in range(0, level0.shape[0] - step + 1, step):
            for x in range(0, level0.shape[1] - step + 1, step):
                crop = level0[y : y + step, x : x + step]
                if crop.mean() < 215 and len(tiles) < n:  # skip background
                    tiles.append(crop.reshape(size, 2, size, 2, 3).mean(axis=(1, 3)).astype(np.uint8))
        slide += 1
        if slide > 50 and not tiles:
            raise RuntimeError("synthetic slides gave no tissue tiles")
    return tiles


def folder_tiles(folder: str, n: int) -> list[np.ndarray]:
    paths = sorted(p for ext in ("png", "jpg", "jpeg") for p in glob.glob(os.path.join(folder, f"*.{ext}")))
    if not paths:
        raise FailedPrecondition(f"no PNG or JPEG tiles in {folder}")
    out = []
    for p in paths[:n]:
        with open(p, "rb") as fh:
            out.append(images.decode(fh.read()))
    return out


class _Reader:
    """Feeds preprocessed calibration batches to the quantizer."""

    def __init__(self, config: model_repo.ModelConfig, tiles: list[np.ndarray], batch: int = 8):
        pre = Preprocessor(config)
        self._batches = iter([{config.input_name: pre(tiles[i : i + batch])} for i in range(0, len(tiles), batch)])

    def get_next(self):
        return next(self._batches, None)


def leading_convs(onnx_path: str, n: int) -> list[str]:
    """Names of the first n convolutions, kept in FP32.

    The stem sees raw pixels and its rounding error travels through every
    later layer: on EfficientNet-Lite0, keeping the first 3 in FP32 raised
    neighbour recall@10 from 0.89 to 0.94 for a 10% loss of INT8 speed
    (bench/embedder.py, docs/benchmarks.md).
    """
    import onnx

    nodes = onnx.load(onnx_path, load_external_data=False).graph.node
    return [node.name for node in nodes if node.op_type == "Conv"][:n]


def quantize(
    repo: str,
    model_id: str,
    version: str | None = None,
    calibration_dir: str | None = None,
    calibration_tiles: int = 128,
    fp32_convs: int = 3,
) -> model_repo.ModelConfig:
    """Write <name>/<version> (default <source version>-int8) and return its config."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    config, src = model_repo.load(repo, model_id)
    tiles = folder_tiles(calibration_dir, calibration_tiles) if calibration_dir else synthetic_tiles(calibration_tiles)
    source = f"calibrated on {len(tiles)} {'operator' if calibration_dir else 'synthetic'} tiles"
    target = dataclasses.replace(
        config,
        version=version or f"{config.version}-int8",
        description=f"INT8 (static QDQ, per-channel; first {fp32_convs} convolutions FP32) of {model_id}, {source}",
    )
    with tempfile.TemporaryDirectory(prefix="smily-quant-") as tmp:
        prepared, out = os.path.join(tmp, "prepared.onnx"), os.path.join(tmp, model_repo.MODEL_FILE)
        # Shape inference and constant folding first, as ONNX Runtime recommends.
        quant_pre_process(src, prepared, skip_symbolic_shape=True)
        quantize_static(
            prepared,
            out,
            _Reader(config, tiles),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=leading_convs(prepared, fp32_convs),
        )
        model_repo.install(out, target, repo)
    return target
