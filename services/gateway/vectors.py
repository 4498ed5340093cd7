"""Query arithmetic on L2-normalised embeddings, in numpy: Rocchio
combination, concept activation vectors, slide mosaics and Yottixel's
slide ranking. Pure functions, so they are tested without servers."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from smily.common.errors import InvalidArgument


def unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm < 1e-6:
        raise InvalidArgument("the examples and concepts cancel out: the query vector is zero")
    return (v / norm).astype(np.float32)


def combine(positives, negatives=(), negative_weight: float = 0.5, concepts=()) -> np.ndarray:
    """Rocchio: mean(pos) - b * mean(neg) + sum(w_i * c_i), renormalised.

    concepts are (weight, unit direction) pairs."""
    q = np.mean(np.asarray(positives, np.float32), axis=0)
    if len(negatives):
        q = q - negative_weight * np.mean(np.asarray(negatives, np.float32), axis=0)
    for weight, direction in concepts:
        q = q + weight * np.asarray(direction, np.float32)
    return unit(q)


def concept_vector(
    with_: np.ndarray, without: np.ndarray, steps: int = 300, lr: float = 0.5, l2: float = 1e-3
) -> tuple[np.ndarray, float]:
    """A concept activation vector: the unit normal of a logistic regression
    separating `with_` from `without` embeddings (classes weighted equally),
    and its training accuracy."""
    x = np.concatenate([with_, without]).astype(np.float64)
    y = np.concatenate([np.ones(len(with_)), np.zeros(len(without))])
    # Centre and scale by one global factor: embeddings share a large common
    # component that would make gradient descent crawl. Per-dimension
    # scaling would favour near-constant dimensions, a direction searches
    # barely feel, so the geometry of the embedding space is kept.
    z = x - x.mean(0)
    z /= z.std() + 1e-12
    sample_w = np.where(y == 1, 0.5 / len(with_), 0.5 / len(without))
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(z @ w + b)))
        g = (p - y) * sample_w
        w -= lr * (z.T @ g + l2 * w)
        b -= lr * g.sum()
    accuracy = float((((z @ w + b) > 0) == (y == 1)).mean())
    return unit(w), accuracy


def mosaic(vectors: np.ndarray, size: int, iterations: int = 20, seed: int = 0) -> np.ndarray:
    """Indices of up to `size` representative rows: k-means (k-means++ start),
    then the row nearest each centre, so a mosaic is made of real tiles."""
    n = len(vectors)
    if n <= size:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    x = vectors.astype(np.float32)
    centres = [x[rng.integers(n)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, size):
        centres.append(x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(n)])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    c = np.stack(centres)
    for _ in range(iterations):
        assign = _sq_dist(x, c).argmin(1)
        new = np.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(size)])
        if np.allclose(new, c):
            break
        c = new
    return np.unique(_sq_dist(x, c).argmin(0))


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[n, k] squared distances without an [n, k, dim] temporary (slides have 10^4+ tiles)."""
    return (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]


def rank_slides(per_tile_hits: list[list]) -> list[tuple[tuple[str, str], float, int, list]]:
    """Yottixel's rule on the hits of each mosaic tile (objects with
    slide_id and score, best first): a slide's score is the median over
    mosaic tiles of its best score. A tile whose top list misses the slide
    counts its last (lowest) score: the slide's true best there is at most
    that. Returns ((tenant, slide_id), score, tiles that found it, its hits best first),
    best slide first."""
    best: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    hits_of: dict[tuple[str, str], list] = defaultdict(list)
    floors = []
    for i, hits in enumerate(per_tile_hits):
        floors.append(hits[-1].score if hits else -1.0)
        for h in hits:
            slide = (getattr(h, "tenant", ""), h.slide_id)  # the same id in two tenants: two slides
            if h.score > best[slide].get(i, -2.0):
                best[slide][i] = h.score
            hits_of[slide].append(h)
    ranked = []
    for slide_id, scores in best.items():
        per_tile = [scores.get(i, floors[i]) for i in range(len(per_tile_hits))]
        hits = sorted(hits_of[slide_id], key=lambda h: -h.score)
        ranked.append((slide_id, float(np.median(per_tile)), len(scores), hits))
    ranked.sort(key=lambda r: (-r[1], -r[2], r[0]))
    return ranked
