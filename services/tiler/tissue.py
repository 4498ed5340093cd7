"""Tissue detection on a low-resolution thumbnail.

Tissue is coloured, background (glass) is bright and grey: Otsu's threshold
on HSV saturation separates them; a floor on the threshold keeps a blank
slide from being split into "tissue" noise. Pen marks are removed first, so
they neither count as tissue nor pull the threshold: H&E stains are pink to
purple, while the green and blue inks pathologists circle lesions with have
hues H&E never has, and black ink is darker than any stained tissue. Small
holes are then filled and specks removed.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

MIN_SATURATION = 0.07
# Hue band (degrees) of green and blue pen ink; haematoxylin sits near 260-300.
PEN_HUE = (70.0, 235.0)
PEN_MIN_SATURATION = 0.2
# Black ink and scanner borders: no stained tissue is this dark on a thumbnail.
MIN_BRIGHTNESS = 0.2


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


def hue_degrees(f: np.ndarray, mx: np.ndarray, mn: np.ndarray) -> np.ndarray:
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return h * 60.0


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of green, blue or black pen ink."""
    f = rgb.astype(np.float32) / 255.0
    mx, mn = f.max(axis=2), f.min(axis=2)
    saturation = (mx - mn) / np.maximum(mx, 1e-6)
    hue = hue_degrees(f, mx, mn)
    coloured = (saturation > PEN_MIN_SATURATION) & (hue >= PEN_HUE[0]) & (hue <= PEN_HUE[1])
    return coloured | (mx < MIN_BRIGHTNESS)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of tissue pixels of an HxWx3 uint8 thumbnail."""
    f = rgb.astype(np.float32) / 255.0
    mx, mn = f.max(axis=2), f.min(axis=2)
    saturation = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0)
    pen = pen_mask(rgb)
    candidates = saturation[~pen]
    threshold = max(otsu(candidates) if candidates.size else 1.0, MIN_SATURATION)
    mask = (saturation > threshold) & ~pen
    mask = ndi.binary_opening(mask, iterations=1)
    # Holes are filled, but ink drawn over tissue stays out: its pixels are not tissue.
    return ndi.binary_fill_holes(mask) & ~pen
