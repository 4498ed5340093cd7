"""Tissue detection on a low-resolution thumbnail.

Tissue is coloured, background (glass) is bright and grey: Otsu's threshold
on HSV saturation separates them; a floor on the threshold keeps a blank
slide from being split into "tissue" noise. Small holes are filled and
specks removed.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

MIN_SATURATION = 0.07


def otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of tissue pixels of an HxWx3 uint8 thumbnail."""
    f = rgb.astype(np.float32) / 255.0
    mx, mn = f.max(axis=2), f.min(axis=2)
    saturation = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0)
    threshold = max(otsu(saturation), MIN_SATURATION)
    mask = (saturation > threshold) & (mx > 0.1)  # black pixels are scanner borders, not tissue
    mask = ndi.binary_opening(mask, iterations=1)
    return ndi.binary_fill_holes(mask)
