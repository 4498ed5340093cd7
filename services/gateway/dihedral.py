"""Rotation- and flip-robust queries: tissue has no orientation.

A query image is embedded under a subset of the 8 symmetries of the square
(the dihedral group D4) in one embedder call; the results of searching with
each are merged by the best score per tile (or the embeddings are averaged
into one query, SMILY_QUERY_MERGE=mean).
"""

from __future__ import annotations

from typing import Any

import numpy as np

TRANSFORMS = {
    "identity": lambda a: a,
    "rot90": lambda a: np.rot90(a, 1),
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3),
    "flip": lambda a: a[:, ::-1],
    "flip_rot90": lambda a: np.rot90(a[:, ::-1], 1),
    "flip_rot180": lambda a: np.rot90(a[:, ::-1], 2),
    "flip_rot270": lambda a: np.rot90(a[:, ::-1], 3),
}
ALL = tuple(TRANSFORMS)
MERGES = ("max", "mean")


def parse(names) -> tuple[str, ...]:
    """The configured transforms, identity first (concepts and plain queries use it), no repeats."""
    if any(n == "all" for n in names):
        return ALL
    unknown = sorted(set(names) - set(TRANSFORMS))
    if unknown:
        raise ValueError(f"SMILY_QUERY_TRANSFORMS: unknown transforms {unknown}; known: {', '.join(ALL)} or all")
    return ("identity", *dict.fromkeys(n for n in names if n != "identity"))


def apply(rgb: np.ndarray, names) -> list[np.ndarray]:
    return [np.ascontiguousarray(TRANSFORMS[n](rgb)) for n in names]


def check_merge(merge: str) -> str:
    if merge not in MERGES:
        raise ValueError(f"SMILY_QUERY_MERGE must be one of {', '.join(MERGES)}, got {merge!r}")
    return merge


def merge_hits(per_query: list[list], n: int) -> list:
    """The best n tiles over several hit lists, each tile once with its best score."""
    best: dict[tuple, Any] = {}
    for hits in per_query:
        for h in hits:
            key = (h.slide_id, h.tile.x, h.tile.y, h.tile.width, h.tile.height)
            if key not in best or h.score > best[key].score:
                best[key] = h
    return sorted(best.values(), key=lambda h: -h.score)[:n]
