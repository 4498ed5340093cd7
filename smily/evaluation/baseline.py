"""The classical colour-texture baseline: histograms plus LBP, brute-force cosine.

Features of one RGB tile: a joint RGB histogram (4 bins per channel) and
rotation-invariant uniform LBP histograms (8 neighbours) at radii 1 and 3
of the grey image. Each block is L1-normalised and square-rooted (Hellinger),
so a dot product of the L2-normalised concatenation compares histograms.
"""

from __future__ import annotations

import numpy as np

COLOUR_BINS = 4
LBP_RADII = (1, 3)
# 8 neighbours on the circle, rounded to the pixel grid.
_ANGLES = np.arange(8) * (2 * np.pi / 8)


def _lbp_riu2(grey: np.ndarray, radius: int) -> np.ndarray:
    """Histogram of rotation-invariant uniform LBP codes 0..9 (9 = non-uniform)."""
    h, w = grey.shape
    centre = grey[radius : h - radius, radius : w - radius]
    planes = []
    for a in _ANGLES:
        dy, dx = int(round(-radius * np.sin(a))), int(round(radius * np.cos(a)))
        planes.append(grey[radius + dy : h - radius + dy, radius + dx : w - radius + dx] >= centre)
    bits = np.stack(planes).astype(np.int8)
    transitions = np.abs(np.diff(np.concatenate([bits, bits[:1]]), axis=0)).sum(0)
    codes = np.where(transitions <= 2, bits.sum(0), 9)
    return np.bincount(codes.ravel(), minlength=10).astype(np.float64)


def features(rgb: np.ndarray) -> np.ndarray:
    """Descriptor of an HxWx3 uint8 tile, float32, L2-normalised."""
    q = (rgb.astype(np.int32) * COLOUR_BINS) // 256
    joint = (q[..., 0] * COLOUR_BINS + q[..., 1]) * COLOUR_BINS + q[..., 2]
    blocks = [np.bincount(joint.ravel(), minlength=COLOUR_BINS**3).astype(np.float64)]
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    blocks += [_lbp_riu2(grey, r) for r in LBP_RADII]
    vec = np.concatenate([np.sqrt(b / max(b.sum(), 1.0)) for b in blocks])
    return (vec / np.linalg.norm(vec)).astype(np.float32)


def nearest(queries: np.ndarray, database: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most cosine-similar database rows per query, best first.

    allowed is a (n_queries, n_database) bool mask (False: leave out, e.g. the
    query's own slide); fewer than k allowed rows give -1 padding.
    """
    scores = queries @ database.T
    scores = np.where(allowed, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(allowed, order, 1), order, -1)
