"""`smily eval`: retrieval quality of the deployed system on a labelled manifest.

Queries are the archive's labelled tissue tiles (at most max_queries per
slide), each searched with its own slide left out, as SMILY did. Methods:
  deployed        the gateway's Search by region: the index as configured
  exact           brute-force cosine over the same tiles' embeddings
  colour-texture  brute-force cosine over colour histograms + LBP
  random          k tiles drawn uniformly from the other slides (negative control)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc
import numpy as np

from smily.gateway.v1 import gateway_pb2

from . import baseline, metrics
from .archive import Archive, EvalError
from .manifest import Labeller, Manifest

METHODS = ("deployed", "exact", "colour-texture", "random")
VOTE_K = 5


def ensure_ingested(client, manifest: Manifest, labeller: Labeller, progress=None) -> dict[str, int]:
    """Ingest the manifest's slides the index lacks; returns slide_id -> indexed tile count."""
    indexed = {s.slide_id: s.tile_count for s in client.slides()}
    ops = []
    for slide_id, source in manifest.slides().items():
        if slide_id not in indexed:
            try:
                ops.append(client.ingest(source, slide_id, labeller.slide_labels(slide_id)))
            except grpc.RpcError as exc:
                raise EvalError(f"cannot ingest {slide_id}: {exc.code().name}: {exc.details()}") from None
    for op in ops:
        op = client.wait(op)
        if op.state != gateway_pb2.OPERATION_STATE_SUCCEEDED:
            raise EvalError(f"ingest of {op.slide_id} failed: {op.error_code}: {op.error_message}")
        indexed[op.slide_id] = op.progress.tiles_indexed
        if progress:
            progress(f"ingested {op.slide_id}: {op.progress.tiles_indexed} tiles")
    return indexed


def choose_queries(archive: Archive, labels: list[dict], max_per_slide: int, rng) -> np.ndarray:
    """Labelled tiles, at most max_per_slide per slide, drawn at random."""
    chosen = []
    for slide_id in dict.fromkeys(archive.slide_ids):
        idx = [i for i in np.flatnonzero(archive.slide_ids == slide_id) if labels[i]]
        if len(idx) > max_per_slide:
            idx = sorted(rng.choice(idx, max_per_slide, replace=False))
        chosen += idx
    return np.array(chosen, np.int64)


def rankings(client, archive: Archive, queries: np.ndarray, k: int, rng) -> dict[str, list[list[tuple]]]:
    """Top-k hits per query and method, each hit a (slide_id, x, y, width, height)."""
    other = archive.slide_ids[None, :] != archive.slide_ids[queries][:, None]

    def rect(i):
        return (archive.slide_ids[i], *map(int, archive.rects[i]))

    out: dict[str, list] = {"deployed": []}
    # The deployed search sees the manifest's slides only, like the other methods:
    # a slide left in the index by someone else must not compete for the top k.
    slides = list(dict.fromkeys(archive.slide_ids.tolist()))
    for q in queries:
        slide_id, x, y, w, h = rect(q)
        resp = client.search(
            region=dict(slide_id=slide_id, x=x, y=y, width=w, height=h), k=k, exclude_query_slide=True, slide_ids=slides
        )
        if resp.model_id != archive.model_id:
            raise EvalError(f"the index serves {resp.model_id} but the embedder gave {archive.model_id}")
        out["deployed"].append([(h_.slide_id, h_.x, h_.y, h_.width, h_.height) for h_ in resp.hits])
    for name, vecs in (("exact", archive.embeddings), ("colour-texture", archive.features)):
        top = baseline.nearest(vecs[queries], vecs, other, k)
        out[name] = [[rect(i) for i in row if i >= 0] for row in top]
    out["random"] = [
        [rect(i) for i in rng.choice(np.flatnonzero(row), min(k, row.sum()), replace=False)] for row in other
    ]
    return out


def run(
    client,
    archive: Archive,
    manifest: Manifest,
    indexed: dict[str, int],
    ks=(1, 5, 10),
    max_queries: int = 50,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    rng = np.random.default_rng(seed)
    labeller = Labeller(manifest)
    kmax = max(max(ks), VOTE_K)
    rows = [labeller.row(archive.slide_ids[i], *map(int, archive.rects[i])) for i in range(len(archive.slide_ids))]
    labels = [row.labels if row else {} for row in rows]
    reached = {id(row) for row in rows}
    result: dict[str, Any] = {
        "model_id": archive.model_id,
        "k": list(ks),
        "bootstrap": n_boot,
        "methods": list(METHODS),
        "archive": {
            "slides": len(set(archive.slide_ids)),
            "tiles": len(archive.slide_ids),
            "index_slides": len(indexed),
        },
        "warnings": consistency(archive, indexed),
        "columns": {},
        # Labelled regions no tissue tile covers at least half of (small regions, or glass to the tiler).
        "regions_without_tiles": sum(1 for r in manifest.rows if r.region and id(r) not in reached),
    }
    if not manifest.label_columns:
        result["warnings"].append("the manifest has no label columns: no retrieval metrics")
        return result
    queries = choose_queries(archive, labels, max_queries, rng)
    if not len(queries):
        raise EvalError("no archive tile falls in a labelled region (at least half of it inside)")
    ranked = rankings(client, archive, queries, kmax, rng)
    groups = archive.slide_ids[queries]
    ann = np.array(
        [
            len({h[:3] for h in d} & {h[:3] for h in e}) / max(1, len(e))
            for d, e in zip(ranked["deployed"], ranked["exact"])
        ]
    )
    for col in manifest.label_columns:
        keep = np.array([col in labels[q] for q in queries])
        if not keep.any():
            continue
        q_labels = [labels[q][col] for q in queries[keep]]
        entry: dict[str, Any] = {
            "queries": int(keep.sum()),
            "slides": len(set(groups[keep])),
            "classes": dict(sorted(Counter(q_labels).items())),
            "methods": {},
            "curve": {},
        }
        for method in METHODS:
            hit_labels = [[labeller(*h).get(col) for h in hits] for hits, kept in zip(ranked[method], keep) if kept]
            per_q = metrics.per_query(q_labels, hit_labels, tuple(ks), VOTE_K)
            entry["methods"][method] = {
                name: metrics.bootstrap_ci(v, groups[keep], n_boot, seed=seed) for name, v in per_q.items()
            }
            entry["curve"][method] = [
                float(np.mean([metrics.precision_at_k(q, h, k) for q, h in zip(q_labels, hit_labels)]))
                for k in range(1, kmax + 1)
            ]
        result["columns"][col] = entry
    result["ann_recall"] = {"k": kmax, "value": metrics.bootstrap_ci(ann, groups, n_boot, seed=seed)}
    return result


def consistency(archive: Archive, indexed: dict[str, int]) -> list[str]:
    """Warnings when the client-side tiles differ from the index's (other tiling settings)."""
    warnings = []
    for slide_id in dict.fromkeys(archive.slide_ids):
        mine = int((archive.slide_ids == slide_id).sum())
        if indexed.get(slide_id, mine) != mine:
            warnings.append(
                f"{slide_id}: the index holds {indexed[slide_id]} tiles, the evaluation cut {mine}; "
                "was the slide ingested before the index recorded its tiling?"
            )
    extra = len(set(indexed) - set(archive.slide_ids))
    if extra:
        warnings.append(
            f"the index holds {extra} slides outside the manifest: the deployed search was "
            "restricted to the manifest's slides"
        )
    return warnings
