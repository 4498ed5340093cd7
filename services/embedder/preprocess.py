"""Images -> the model's input tensor, vectorised with numpy."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .model_repo import ModelConfig


def resize(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    resample = Image.Resampling.BOX if min(rgb.shape[:2]) > size else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize((size, size), resample))


class Preprocessor:
    def __init__(self, config: ModelConfig):
        self.size = config.input_size
        mean = np.asarray(config.mean, np.float32) * 255.0
        std = np.asarray(config.std, np.float32) * 255.0
        if config.color_order == "BGR":
            mean, std = mean[::-1], std[::-1]
        self._bgr = config.color_order == "BGR"
        self._nchw = config.layout == "NCHW"
        # One multiply-add per pixel: x * scale + shift == (x - mean) / std.
        # Shaped to broadcast over whole planes: a per-pixel loop of length 3
        # (channels last) is several times slower.
        shape = (1, 3, 1, 1) if self._nchw else (1, 1, 1, 3)
        self._scale = (1.0 / std).astype(np.float32).reshape(shape)
        self._shift = (-mean / std).astype(np.float32).reshape(shape)

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        batch = np.stack([resize(img, self.size) for img in images])  # N,H,W,3 uint8
        if self._bgr:
            batch = batch[..., ::-1]
        if self._nchw:
            batch = batch.transpose(0, 3, 1, 2)  # a view; the multiply below writes contiguously
        out = np.empty(batch.shape, np.float32)
        np.multiply(batch, self._scale, out=out)
        out += self._shift
        return out
