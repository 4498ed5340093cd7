"""Retrieval metrics per query, and bootstrap confidence intervals.

A query has a label; its ranked hits have labels too (None when a hit falls
on nothing labelled: it never matches). Each metric is a number per query;
figures are means over queries.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def precision_at_k(query_label, hit_labels: list, k: int) -> float:
    """Share of the top k that match; missing hits (fewer than k) count as misses."""
    return sum(1 for lbl in hit_labels[:k] if lbl is not None and lbl == query_label) / k


def accuracy_at_k(query_label, hit_labels: list, k: int) -> float:
    """Acc@k: 1 when at least one of the top k matches."""
    return float(any(lbl is not None and lbl == query_label for lbl in hit_labels[:k]))


def majority_vote_at_k(query_label, hit_labels: list, k: int) -> float:
    """mMV@k: 1 when the majority label of the top k is the query's.

    Unlabelled hits vote for "nothing"; a tie goes to the label of the
    best-ranked hit among the tied ones.
    """
    top = hit_labels[:k]
    if not top:
        return 0.0
    counts = Counter(top)
    best = max(counts.values())
    winner = next(lbl for lbl in top if counts[lbl] == best)
    return float(winner is not None and winner == query_label)


def per_query(query_labels: list, ranked: list[list], ks: tuple[int, ...], vote_k: int = 5) -> dict[str, np.ndarray]:
    """Every metric for every query: {"P@1": array, ..., "Acc@5": ..., "mMV@5": ...}."""
    out = {f"P@{k}": np.array([precision_at_k(q, r, k) for q, r in zip(query_labels, ranked)]) for k in ks}
    out[f"Acc@{vote_k}"] = np.array([accuracy_at_k(q, r, vote_k) for q, r in zip(query_labels, ranked)])
    out[f"mMV@{vote_k}"] = np.array([majority_vote_at_k(q, r, vote_k) for q, r in zip(query_labels, ranked)])
    return out


def bootstrap_ci(
    values: np.ndarray, groups: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): a percentile interval from resampling whole groups.

    Queries from one slide are correlated, so the slides (groups) are
    resampled with replacement, not the queries one by one.
    """
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    uniq, idx = np.unique(groups, return_inverse=True)
    sums = np.bincount(idx, weights=values, minlength=len(uniq))
    counts = np.bincount(idx, minlength=len(uniq)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(uniq), (n_boot, len(uniq)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(values.mean()), float(lo), float(hi)
