"""Pixel positives of a tile: what changes between two scans of the same tissue
and must not change its embedding.

- the 8 dihedral transforms (tissue has no up: PathDino's HistoRotate);
- HED stain jitter (Tellez et al. 2018; the same as the evaluation's, so
  one definition of a stain shift serves both);
- JPEG re-encoding at quality 50-95 (scanners and PACS compress);
- mild Gaussian blur (focus).
The slide-level positives, +-10 % scale and an overlapping neighbouring crop,
are read from the slide (archive_tiles).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from smily.evaluation.robustness import jpeg, stain_jitter

# Recorded in the adapted model's provenance.
POSITIVES = (
    "dihedral (8)",
    "HED stain jitter",
    "JPEG q50-95",
    "Gaussian blur r0.3-1.2",
    "scale 0.9-1.1 (read from the slide)",
    "overlapping neighbour crop, shift 1/8-1/2 tile",
    "slide restyle: features moved by the difference of two slides' mean features (half the pairs)",
)
STAIN_SIGMA = 0.08
JPEG_QUALITY = (50, 95)
BLUR_RADIUS = (0.3, 1.2)


def dihedral(rgb: np.ndarray, k: int) -> np.ndarray:
    """The k-th (0..7) element of the dihedral group: k % 4 quarter turns, then a flip when k >= 4."""
    out = np.rot90(rgb, k % 4)
    if k >= 4:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def blur(rgb: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius)))


def view(rgb: np.ndarray, rng) -> np.ndarray:
    """A random positive: a non-identity dihedral transform, then each
    photometric change with probability 1/2 (stain jitter 3/4)."""
    out = dihedral(rgb, int(rng.integers(1, 8)))
    if rng.random() < 0.75:
        out = stain_jitter(out, rng, STAIN_SIGMA)
    if rng.random() < 0.5:
        out = blur(out, rng.uniform(*BLUR_RADIUS))
    if rng.random() < 0.5:
        out = jpeg(out, rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    return out
