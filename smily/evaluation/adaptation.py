"""Before and after adaptation, side by side: the source model and the models
adapted from it, measured in-process on the same tiles of a labelled manifest
whose slides the adaptation never saw.

Per model: the label-free gate (recall@1/@5 of the source tile under each
perturbation, slide dependence among tiles whose label also occurs on other
slides), the labelled figures (P@5 and mMV@5 of the exact search with the
query's slide left out, 95 % intervals by slide bootstrap), and the cost
(vector bytes per tile, p50 of embedding one query tile and searching).
Every model sees the same perturbed queries.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from smily.common.tiling import DEFAULT_MPPS, Tiling
from smily.embedder import model_repo
from smily.embedder.runtime import Model
from smily.tiler import slides as slide_files
from smily.tiler import tiling

from . import baseline, gate, manifest, metrics

BATCH = 32
VOTE_K = 5


@dataclass
class EvalSet:
    handles: dict  # slide_id -> open slide
    images: list[np.ndarray]
    slide: np.ndarray  # slide_id per tile
    rects: np.ndarray  # (n, 4) level-0
    labels: list  # the label column's value per tile, None when unlabelled
    tile_size: int


def load(manifest_path: str, column: str = "tissue", record: Tiling | None = None) -> EvalSet:
    """Every tissue tile of the manifest's slides (sources relative to the
    manifest's folder), cut by the tiler's code with `record` (default tiling)."""
    m = manifest.load(manifest_path)
    labeller = manifest.Labeller(m)
    record = record or Tiling()
    mpp = record.nearest_mpp(DEFAULT_MPPS[0])
    base = os.path.dirname(os.path.abspath(manifest_path))
    cache = slide_files.SlideCache()
    handles, images, slide_ids, rects, labels = {}, [], [], [], []
    for slide_id, source in m.slides().items():
        handle = cache.get(os.path.join(base, source))
        handles[slide_id] = handle
        plan = tiling.plan(handle, slide_files.mpp(handle), [mpp], record.tile_size, record.min_tissue, record.stride)[
            0
        ]
        for t in plan:
            images.append(tiling.read(handle, t.x, t.y, t.size, t.size, record.tile_size, record.tile_size))
            slide_ids.append(slide_id)
            rects.append((t.x, t.y, t.size, t.size))
            labels.append(labeller(slide_id, t.x, t.y, t.size, t.size).get(column))
    return EvalSet(handles, images, np.array(slide_ids, object), np.array(rects, np.int64), labels, record.tile_size)


def open_model(repo: str, model_id: str) -> Model:
    config, path = model_repo.load(repo, model_id)
    return Model(config, path, min(2, os.cpu_count() or 1), BATCH)


def embed(model: Model, rgbs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(
        [model.embed_tensor(model.preprocess(rgbs[i : i + BATCH])) for i in range(0, len(rgbs), BATCH)]
    )


def labelled(db: np.ndarray, ev: EvalSet, n_boot: int, seed: int) -> dict:
    """P@5 and mMV@5 of exact cosine search, the query's slide left out."""
    q = np.array([i for i, label in enumerate(ev.labels) if label], np.int64)
    if not len(q):
        return {"queries": 0}
    allowed = ev.slide[None, :] != ev.slide[q][:, None]
    top = baseline.nearest(db[q], db, allowed, VOTE_K)
    hit_labels = [[ev.labels[j] for j in row if j >= 0] for row in top]
    per_q = metrics.per_query([ev.labels[i] for i in q], hit_labels, (VOTE_K,), VOTE_K)
    return {
        "queries": len(q),
        **{name: metrics.bootstrap_ci(per_q[name], ev.slide[q], n_boot, seed=seed) for name in ("P@5", "mMV@5")},
    }


def bytes_per_tile(db: np.ndarray) -> float:
    """Bytes of a flat FAISS index per vector (the index's in-memory and snapshot form)."""
    import faiss

    index = faiss.IndexFlatIP(db.shape[1])
    index.add(np.ascontiguousarray(db, np.float32))
    return len(faiss.serialize_index(index)) / len(db)


def query_latency(models: dict[str, Model], dbs: dict[str, np.ndarray], tiles: list[np.ndarray]) -> dict:
    """p50 ms of embedding one tile and searching the flat index, the models
    taking turns query by query so that a busy machine slows them alike."""
    import faiss

    indexes = {}
    for name, db in dbs.items():
        indexes[name] = faiss.IndexFlatIP(db.shape[1])
        indexes[name].add(np.ascontiguousarray(db, np.float32))
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for rgb in tiles:
        for name, model in models.items():
            started = time.perf_counter()
            vec = model.embed_tensor(model.preprocess([rgb]))
            indexes[name].search(vec, VOTE_K)
            seconds[name].append(time.perf_counter() - started)
    return {name: 1000 * float(np.median(s)) for name, s in seconds.items()}


def compare(
    repo: str,
    model_ids: dict[str, str],
    ev: EvalSet,
    per_slide: int = 10,
    latency_queries: int = 30,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """{label: figures} for each of model_ids ({label: "<name>/<version>"})."""
    sources, perturbed = gate.queries(ev.handles, ev.slide, ev.rects, ev.tile_size, per_slide, seed)
    models = {label: open_model(repo, model_id) for label, model_id in model_ids.items()}
    out, dbs = {}, {}
    for label, model in models.items():
        db = embed(model, ev.images)
        dbs[label] = db
        out[label] = {
            "model_id": model.config.model_id,
            "dim": int(db.shape[1]),
            "gate": gate.recall(db, {name: embed(model, imgs) for name, imgs in perturbed.items()}, sources),
            "slide_dependence": gate.slide_dependence(db, ev.slide, ev.labels),
            "labelled": labelled(db, ev, n_boot, seed),
            "bytes_per_tile": bytes_per_tile(db),
        }
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(ev.images), min(latency_queries, len(ev.images)), replace=False)
    for label, ms in query_latency(models, dbs, [ev.images[i] for i in picks]).items():
        out[label]["query_p50_ms"] = ms
    return {
        "slides": len(ev.handles),
        "tiles": len(ev.images),
        "gate_queries": len(sources),
        "models": out,
    }


def describe(result: dict) -> str:
    """A Markdown table of compare()'s figures, one column per model."""
    labels = list(result["models"])
    models = result["models"]

    def ci(v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    rows = [("model", [models[m]["model_id"] for m in labels]), ("dim", [str(models[m]["dim"]) for m in labels])]
    for name in gate.PERTURBATIONS + ("mean",):
        rows.append(
            (
                f"gate {name}: recall@1 / @5",
                [
                    f"{models[m]['gate'][name]['recall@1']:.3f} / {models[m]['gate'][name]['recall@5']:.3f}"
                    for m in labels
                ],
            )
        )
    rows += [
        (
            "slide dependence (own-slide share of top 5)",
            [f"{models[m]['slide_dependence']['own_slide_share']:.3f}" for m in labels],
        ),
        ("labelled P@5 [95 % CI]", [ci(models[m]["labelled"].get("P@5", (np.nan,) * 3)) for m in labels]),
        ("labelled mMV@5 [95 % CI]", [ci(models[m]["labelled"].get("mMV@5", (np.nan,) * 3)) for m in labels]),
        ("bytes per tile (flat index)", [f"{models[m]['bytes_per_tile']:.0f}" for m in labels]),
        ("query p50, ms (embed 1 tile + search)", [f"{models[m]['query_p50_ms']:.1f}" for m in labels]),
    ]
    chance = models[labels[0]]["slide_dependence"]["chance"]
    lines = [
        f"{result['slides']} slides, {result['tiles']} tiles, {result['gate_queries']} gate queries "
        f"(slide-blind own-slide share: {chance:.3f})",
        "",
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    lines += [f"| {name} | " + " | ".join(vals) + " |" for name, vals in rows]
    return "\n".join(lines)
