"""The label-free gate: does a model find a tile again when its scan changes?

On slides a model was not trained on, each query is a perturbed copy of an
indexed tile, read the way the tiler reads it and then changed one way, and
the score is the source tile's recall@1 and recall@5 among all the tiles.
Slide dependence is the batch effect: the share of a tile's top-5 hits
(itself left out) that come from its own slide, for tiles whose content also
occurs on other slides (known from labels where there are any; without
labels, every tile). Lower is better.

The scoring is exact cosine search over given vectors, so the same figures
come from any embedding: an ONNX model run in-process, cached features
through a head, or the embedder service.
"""

from __future__ import annotations

import numpy as np

from .robustness import TRANSFORMS, perturbed

K = 5
# Every perturbation of the deployed robustness check but the identity.
PERTURBATIONS = tuple(t for t in TRANSFORMS if t != "identity")


def _normed(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def recall(db: np.ndarray, queries: dict[str, np.ndarray], sources: np.ndarray, k: int = K) -> dict:
    """{perturbation: {"recall@1", "recall@5"}, "mean": {...}}: sources[j] is the
    db row query j was made from (the same for every perturbation)."""
    db = _normed(db)
    out: dict[str, dict[str, float]] = {}
    for name, q in queries.items():
        sims = _normed(q) @ db.T
        rank = (sims > sims[np.arange(len(sources)), sources][:, None]).sum(axis=1)  # hits scored above the source
        out[name] = {"recall@1": float(np.mean(rank < 1)), f"recall@{k}": float(np.mean(rank < k))}
    out["mean"] = {m: float(np.mean([v[m] for v in out.values()])) for m in ("recall@1", f"recall@{k}")}
    return out


def slide_dependence(vecs: np.ndarray, slides: np.ndarray, labels=None, k: int = K) -> dict:
    """Mean share of own-slide tiles among each tile's top-k others, over the
    tiles whose label (when labels are given) occurs on another slide."""
    v = _normed(vecs)
    slides = np.asarray(slides)
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :k]
    keep = np.ones(len(v), bool)
    if labels is not None:
        labels = np.asarray(labels, object)
        keep = np.array([bool(((labels == labels[i]) & (slides != slides[i])).any()) for i in range(len(v))])
    share = (slides[top] == slides[:, None]).mean(axis=1)
    # What a model blind to slides would score: the own slide's share of the other tiles.
    chance = np.array([((slides == slides[i]).sum() - 1) / max(1, len(v) - 1) for i in range(len(v))])
    return {
        "queries": int(keep.sum()),
        "own_slide_share": float(share[keep].mean()) if keep.any() else float("nan"),
        "chance": float(chance[keep].mean()) if keep.any() else float("nan"),
    }


def queries(slides: dict, db_slide: np.ndarray, db_rects: np.ndarray, tile_size: int, per_slide: int, seed: int = 0):
    """(sources, {perturbation: [rgb]}): up to per_slide query tiles per slide,
    each under every perturbation. slides: slide key -> open slide handle."""
    rng = np.random.default_rng(seed)
    sources: list[int] = []
    for key in slides:
        idx = np.flatnonzero(db_slide == key)
        sources += sorted(rng.choice(idx, min(per_slide, len(idx)), replace=False).tolist())
    images = {
        name: [perturbed(name, slides[db_slide[i]], db_rects[i], tile_size, rng) for i in sources]
        for name in PERTURBATIONS
    }
    return np.array(sources, np.int64), images
