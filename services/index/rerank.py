"""Exact-enough vectors in RAM, by tile id, to re-score an ANN search's candidates.

An IVF-PQ index finds candidates from 64-byte codes; their order is then
settled by scores from these vectors instead of float32 rows read from
storage (~25 ms for 1,000 rows from SQLite, docs/benchmarks.md). The vectors
are a FAISS scalar quantizer's codes (float16, or 8 bits a dimension) in an
IndexIDMap2, which finds a code by tile id; it is added to, removed from,
compacted and snapshotted with the IVF index it refines. An exact (Flat)
index needs none: it already scores every vector exactly.

FAISS's IndexRefine cannot serve here: it finds refine vectors by position,
so it supports neither the store's tile ids nor removing them.
"""

from __future__ import annotations

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


def vectors(refine: faiss.Index, ids) -> np.ndarray:
    """The decoded vectors of these tile ids (each must be held), float32 [len(ids), dim]."""
    ids = np.ascontiguousarray(ids, np.int64)
    return refine.reconstruct_batch(ids) if len(ids) else np.empty((0, refine.d), np.float32)


def scores(refine: faiss.Index, ids, query: np.ndarray) -> np.ndarray:
    """Inner products of `query` with these tiles' vectors."""
    return vectors(refine, ids) @ np.ascontiguousarray(query, np.float32).reshape(-1)


def form_of(refine: faiss.Index) -> str:
    qtype = faiss.downcast_index(refine.index).sq.qtype
    return next(name for name, t in FORMS.items() if t == qtype)
