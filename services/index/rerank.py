"""Exact-enough vectors in RAM, by tile id, to re-score an ANN search's candidates.

An IVF-PQ index finds candidates from 64-byte codes; their order is then
settled by scores from these vectors instead of float32 rows read from
storage (~25 ms for 1,000 rows from SQLite, docs/benchmarks.md). The vectors
are a FAISS scalar quantizer's codes (float16, or 8 bits a dimension) in an
IndexIDMap2, which finds a code by tile id; it is added to, removed from,
compacted and snapshotted with the IVF index it refines. An exact (Flat)
index needs none: it already scores every vector exactly.

FAISS's IndexRefine cannot serve here: it finds refine vectors by position,
so it supports neither the store's tile ids nor removing them. Candidates are
scored by the quantizer's own distance computer on their codes, found by
position (Positions): FAISS's reconstruct by id decodes one vector per call,
each in an OpenMP region, 4-13 ms for 1,000 candidates against ~1 ms here.
"""

from __future__ import annotations

import threading

import faiss
import numpy as np

# Refine forms: FAISS scalar quantizer types. fp16 is the form storage holds.
FORMS = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}
DEFAULT_FORM = "fp16"
# No vectors in RAM: candidates are re-scored from rows read from storage per search (the
# least RAM, for shards too large to hold 2 B a dimension a tile; ~25 ms per 1,000 candidates).
STORAGE = "storage"


def build(dim: int, form: str, train: np.ndarray | None) -> faiss.Index:
    """An empty refine store of this form; sq8 learns each dimension's range from `train`."""
    if form not in FORMS:
        raise ValueError(f"re-rank form must be one of {sorted(FORMS)}, got {form!r}")
    sq = faiss.IndexScalarQuantizer(dim, FORMS[form], faiss.METRIC_INNER_PRODUCT)
    if not sq.is_trained:
        if train is None or not len(train):
            raise ValueError(f"re-rank form {form!r} needs training vectors")
        sq.train(np.ascontiguousarray(train, np.float32))
    return faiss.IndexIDMap2(sq)


class Positions:
    """Tile id -> position in a refine store's codes, from a sorted copy of its id map.

    The copy is taken again only when a lookup misses (a write moved or added
    codes since); every lookup is checked against the live id map, so a stale
    copy is never trusted. Ids are added mostly in increasing order, so the
    copy is usually already sorted and needs no argsort.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys = np.empty(0, np.int64)  # sorted ids
        self._order: np.ndarray | None = None  # positions of _keys (None: _keys is the id map itself)

    def of(self, refine: faiss.Index, ids: np.ndarray) -> np.ndarray:
        """Positions of these ids; RuntimeError when the store does not hold one."""
        held = _id_map(refine)
        pos = self._find(held, ids)
        if pos is None:
            with self._lock:
                pos = self._find(held, ids)  # another search may have refreshed the copy meanwhile
                if pos is None:
                    keys = held.copy()
                    self._order = None if bool(np.all(keys[1:] > keys[:-1])) else np.argsort(keys, kind="stable")
                    self._keys = keys if self._order is None else keys[self._order]
                    pos = self._find(held, ids)
        if pos is None:
            raise RuntimeError("the re-rank vectors lack a candidate")
        return pos

    def _find(self, held: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
        keys, order = self._keys, self._order
        if not len(keys) or not len(held):
            return None
        at = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
        pos = at if order is None else order[at]
        if np.any(pos >= len(held)):
            return None
        return pos if np.array_equal(held[pos], ids) else None


def _id_map(refine: faiss.Index) -> np.ndarray:
    """The store's ids by position: a view of FAISS's array, valid while no write runs."""
    n = refine.id_map.size()
    return faiss.rev_swig_ptr(refine.id_map.data(), n) if n else np.empty(0, np.int64)


def scores(refine: faiss.Index, ids, query: np.ndarray, positions: Positions) -> np.ndarray:
    """Inner products of `query` with these tiles' vectors, computed on their codes by the
    quantizer's distance computer (no decode into float32 rows)."""
    ids = np.ascontiguousarray(ids, np.int64)
    if not len(ids):
        return np.empty(0, np.float32)
    pos = positions.of(refine, ids)
    q = np.ascontiguousarray(query, np.float32).reshape(-1)
    dc = faiss.downcast_index(refine.index).get_distance_computer()
    dc.set_query(faiss.swig_ptr(q))
    return np.fromiter((dc(p) for p in pos.tolist()), np.float32, len(pos))


def form_of(refine: faiss.Index) -> str:
    qtype = faiss.downcast_index(refine.index).sq.qtype
    return next(name for name, t in FORMS.items() if t == qtype)
