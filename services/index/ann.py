"""FAISS index types: choice by factory string or size, training, filtered search.

Exact search ("Flat") for small collections; an IVF index (PQ-compressed by
default) once a collection is large. Only "Flat" and IVF-based factory
strings are accepted: they support add/remove by id and ID selectors, which
the store needs for replace, delete and in-search filters.
"""

from __future__ import annotations

import math
import time

import faiss
import numpy as np

FLAT = "Flat"
# Bytes of vectors or codes a search scans, above which it uses every OpenMP thread.
SINGLE_THREAD_BYTES = 64 << 20


def auto_factory(n: int, dim: int, threshold: int) -> str:
    """Flat below `threshold` vectors, else IVF with ~sqrt(n) lists and PQ codes.

    PQ uses the largest sub-quantizer count <= 64 that divides dim: 64 bytes
    a vector for the default 1280-d model (plus 8 bytes of id).
    """
    if n < threshold:
        return FLAT
    nlist = max(1, min(int(math.sqrt(n)), n // 39))
    m = max(d for d in range(1, min(64, dim) + 1) if dim % d == 0)
    return f"IVF{nlist},PQ{m}"


def validate(factory: str, dim: int) -> None:
    """Raise ValueError unless `factory` builds an index the store can use."""
    if factory == FLAT:
        return
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"SMILY_INDEX_FACTORY={factory!r} is not a FAISS factory string: {exc}") from None
    if _ivf(index) is None:
        raise ValueError(f"SMILY_INDEX_FACTORY={factory!r}: only Flat or an IVF-based index is supported")


def build(factory: str, dim: int, train: np.ndarray | None) -> tuple[faiss.Index, float]:
    """An empty index of this type, trained on `train` when it needs training.

    Returns (index, seconds spent training).
    """
    if factory == FLAT:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), 0.0
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return index, 0.0
    if train is None or len(train) == 0:
        raise ValueError(f"index {factory!r} needs training vectors")
    start = time.perf_counter()
    index.train(np.ascontiguousarray(train, np.float32))
    return index, time.perf_counter() - start


def is_exact(index: faiss.Index) -> bool:
    return _ivf(index) is None


def nlist(index: faiss.Index) -> int:
    ivf = _ivf(index)
    return ivf.nlist if ivf is not None else 0


def search(
    index: faiss.Index, queries: np.ndarray, k: int, nprobe: int, selector: faiss.IDSelector | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids); the selector filters inside the scan, not after it."""
    ivf = _ivf(index)
    if ivf is None:
        params = faiss.SearchParameters(sel=selector) if selector is not None else None
        scanned = index.ntotal * index.d * 4
    else:
        nprobe = max(1, min(nprobe, ivf.nlist))
        params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        if isinstance(index, faiss.IndexPreTransform):
            params = faiss.SearchParametersPreTransform(index_params=params)
        scanned = index.ntotal * nprobe // max(1, ivf.nlist) * ivf.code_size
    queries = np.ascontiguousarray(queries, np.float32)
    if len(queries) * scanned > SINGLE_THREAD_BYTES:
        return index.search(queries, k, params=params)
    # A small scan runs fastest on this thread alone: waking and joining OpenMP's
    # threads costs more than they save, most of all on busy cores (a 642-vector
    # exact search took 7.1 ms on 2 threads, 0.25 ms on one; docs/benchmarks.md).
    # The setting is per thread, so training elsewhere keeps every core.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k, params=params)
    finally:
        faiss.omp_set_num_threads(before)


def _ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
