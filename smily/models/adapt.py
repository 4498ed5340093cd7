"""`smily model adapt`: fit an embedder to the archive it serves, without labels.

1. Sample tissue tiles from the slides the way ingest cuts them
   (archive_tiles), an equal share per slide; hold a fifth of the slides out
   for the gate.
2. Embed each tile, then positives of it (augment, neighbouring crops,
   +-10 % scale), through the frozen backbone once (ONNX Runtime), until the
   embedding share of the time budget is spent.
3. Fit the head on the cached features: PCA-whitening (`--method pca`), or
   PCA-whitening then VICReg (`--method ssl`, see docs/adr/0008).
4. Score the label-free gate on the held-out slides, source and adapted.
5. Append the head and L2 normalisation to the backbone's ONNX graph and
   install it as <name>/<version>, its provenance in config.json.

The ADR gives the reasons; docs/models.md the use; docs/evaluation.md the figures.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import tempfile
import time

import numpy as np

from smily.common.errors import FailedPrecondition
from smily.common.tiling import DEFAULT_MPPS, Tiling
from smily.embedder import model_repo
from smily.embedder.runtime import Model
from smily.evaluation import gate

from . import archive_tiles, augment, heads

BATCH = 32
HOLDOUT_SHARE = 0.2
GATE_QUERIES = 32
# Shares of --seconds: embedding positives ends at EMBED_SHARE, training at TRAIN_SHARE.
EMBED_SHARE, TRAIN_SHARE = 0.55, 0.9
VIEW_KINDS = ("pixels", "neighbour", "scale")


class Embedder:
    """The source model's raw features (no L2 normalisation: the head comes
    first), run in-process by the embedder's own runtime."""

    def __init__(self, config: model_repo.ModelConfig, path: str):
        self.config = config
        self.model = Model(dataclasses.replace(config, l2_normalize=False), path, min(2, os.cpu_count() or 1), BATCH)
        self.images = 0

    def __call__(self, rgbs: list[np.ndarray]) -> np.ndarray:
        out = [self.model.embed_tensor(self.model.preprocess(rgbs[i : i + BATCH])) for i in range(0, len(rgbs), BATCH)]
        self.images += len(rgbs)
        return np.concatenate(out) if out else np.zeros((0, self.config.embedding_dim), np.float32)


@dataclasses.dataclass
class Options:
    source: str
    name: str
    version: str = "1"
    repo: str = "models"
    slide_roots: tuple[str, ...] = ()
    from_index: bool = False
    index_targets: tuple[str, ...] = ()
    max_tiles: int = 2000
    dim: int = 256
    method: str = "ssl"
    seconds: float = 900.0
    device: str = "cpu"
    unfreeze_blocks: int = 0
    seed: int = 0


def _check(opts: Options) -> None:
    if opts.method not in ("ssl", "pca"):
        raise FailedPrecondition(f"--method is ssl or pca, got {opts.method!r}")
    if opts.max_tiles < 8:
        raise FailedPrecondition("--max-tiles must be at least 8")
    if opts.dim < 2:
        raise FailedPrecondition("--dim must be at least 2")
    if opts.seconds <= 0:
        raise FailedPrecondition("--seconds must be positive")
    if opts.unfreeze_blocks:
        # Fine-tuning backbone blocks needs the backbone in torch and far more
        # than the CPU budget; this version trains the head only.
        raise FailedPrecondition("--unfreeze-blocks is not supported yet: the backbone stays frozen")
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise FailedPrecondition("--device cuda: torch sees no CUDA device (install torch's CUDA build)")


def _slides(opts: Options, progress) -> tuple[list[archive_tiles.Slide], Tiling, str]:
    """The slides to learn from, the tiling record to cut them with, and where they came from."""
    from smily.common.config import Settings

    settings = Settings.from_env()
    if opts.from_index:
        targets = opts.index_targets or settings.index.index_targets or (settings.index.index_target,)
        sources, record = [], None
        for target in targets:
            got, rec = archive_tiles.index_sources(target)
            sources += got
            record = record or rec
        if not sources:
            raise FailedPrecondition("the index holds no slide with a source under the slide roots")
        if record is None:
            raise FailedPrecondition("the index records no tiling yet")
        roots = archive_tiles.slide_files.SlideRoots(settings.tiler.slide_roots)
        paths, missing = [], 0
        for source in dict.fromkeys(sources):
            try:
                paths.append(roots.resolve(source))
            except Exception:  # NotFound, InvalidArgument (a DICOMweb source): counted, never named
                missing += 1
        if missing:
            progress(f"{missing} indexed slides are not files under SMILY_SLIDE_ROOTS: left out")
        origin = "index"
    else:
        record = Tiling.from_settings(settings.gateway)
        paths = archive_tiles.walk_roots(list(opts.slide_roots))
        origin = "slide-roots"
    mpp = record.nearest_mpp(DEFAULT_MPPS[0])
    slides = archive_tiles.open_slides(paths, record, mpp)
    if not slides:
        raise FailedPrecondition("no slide with tissue tiles and a recorded resolution was found")
    return slides, record, origin


def _split(slides: list, seed: int) -> tuple[list, list]:
    """(training, held out for the gate); with fewer than 3 slides, no gate."""
    if len(slides) < 3:
        return slides, []
    order = np.random.default_rng(seed).permutation(len(slides))
    n_out = max(1, round(HOLDOUT_SHARE * len(slides)))
    return [slides[i] for i in sorted(order[n_out:])], [slides[i] for i in sorted(order[:n_out])]


def _positives(tiles, slides, embed: Embedder, size: int, deadline: float, rng, progress):
    """Features of positives, round by round (one view per tile per round,
    the kinds in turn) until the deadline; every tile gets at least one."""
    n = len(tiles.images)
    rows: list[list[np.ndarray]] = [[] for _ in range(n)]
    kinds = {k: 0 for k in VIEW_KINDS}
    r = 0
    while r == 0 or time.monotonic() < deadline:
        kind = VIEW_KINDS[r % len(VIEW_KINDS)]
        for start in range(0, n, BATCH):
            if r and time.monotonic() >= deadline:
                break
            idx = range(start, min(n, start + BATCH))
            imgs = []
            for i in idx:
                slide = slides[tiles.slide[i]]
                if kind == "pixels":
                    img = augment.view(tiles.images[i], rng)
                elif kind == "neighbour":
                    img = augment.dihedral(
                        archive_tiles.neighbour(slide, tiles.rects[i], size, rng), int(rng.integers(8))
                    )
                else:
                    factor = rng.uniform(0.9, 1.1)
                    img = augment.dihedral(
                        archive_tiles.rescaled(slide, tiles.rects[i], size, factor), int(rng.integers(8))
                    )
                imgs.append(img)
            for i, f in zip(idx, embed(imgs)):
                rows[i].append(f)
            kinds[kind] += len(imgs)
        r += 1
        progress(f"positives: round {r} ({kind}), {sum(kinds.values())} views")
    most = max(len(v) for v in rows)
    d = embed.config.embedding_dim
    views = np.zeros((n, most, d), np.float32)
    have = np.zeros((n, most), bool)
    for i, v in enumerate(rows):
        views[i, : len(v)] = v
        have[i, : len(v)] = True
    return views, have, kinds


def _gate(
    embed: Embedder, held: list, record: Tiling, size: int, max_tiles: int, seed: int
) -> tuple[dict, archive_tiles.Tiles]:
    """Backbone features of the held-out slides' tiles and of perturbed queries."""
    rng = np.random.default_rng(seed + 1)
    db = archive_tiles.sample(held, max(64, max_tiles // 4), size, rng)
    handles = {i: s.handle for i, s in enumerate(held)}
    per_slide = max(1, GATE_QUERIES // len(held))
    sources, images = gate.queries(handles, db.slide, db.rects, size, per_slide, seed)
    feats = {
        "db": embed(db.images),
        "slide": db.slide,
        "sources": sources,
        "queries": {name: embed(imgs) for name, imgs in images.items()},
    }
    return feats, db


def gate_figures(feats: dict, project) -> dict:
    """Recall and slide dependence of embeddings `project(features)`."""
    db = project(feats["db"])
    queries = {name: project(q) for name, q in feats["queries"].items()}
    return {
        "recall": gate.recall(db, queries, feats["sources"]),
        "slide_dependence": gate.slide_dependence(db, feats["slide"]),
    }


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def adapt(opts: Options, on_progress=lambda msg: None) -> model_repo.ModelConfig:
    """Write <repo>/<name>/<version> and return its config."""
    _check(opts)
    started = time.monotonic()

    def progress(msg: str) -> None:
        on_progress(f"[{time.monotonic() - started:5.0f} s] {msg}")

    end = started + opts.seconds
    config, src_path = model_repo.load(opts.repo, opts.source)
    target = dataclasses.replace(config, name=opts.name, version=opts.version)
    model_repo.version_dir(opts.repo, target.model_id)  # a valid id before any work
    if target.model_id == config.model_id:
        raise FailedPrecondition("--name/--version must name a new version, not the source model")
    if opts.dim > config.embedding_dim:
        raise FailedPrecondition(f"--dim {opts.dim} is larger than {opts.source}'s {config.embedding_dim} features")
    embed = Embedder(config, src_path)
    rng = np.random.default_rng(opts.seed)

    slides, record, origin = _slides(opts, progress)
    train, held = _split(slides, opts.seed)
    size = record.tile_size
    tiles = archive_tiles.sample(train, opts.max_tiles, size, rng)
    progress(f"sampled {len(tiles.images)} tiles from {len(train)} slides ({len(held)} held out for the gate)")
    timing = {"sample_s": time.monotonic() - started}

    t = time.monotonic()
    gate_feats, gate_db = _gate(embed, held, record, size, opts.max_tiles, opts.seed) if held else ({}, None)
    timing["gate_embed_s"] = time.monotonic() - t
    t = time.monotonic()
    views, have, kinds = embed(tiles.images)[:, None], np.ones((len(tiles.images), 1), bool), {}
    if opts.method == "ssl":
        pos, pos_have, kinds = _positives(
            tiles, train, embed, size, started + EMBED_SHARE * opts.seconds, rng, progress
        )
        views, have = np.concatenate([views, pos], axis=1), np.concatenate([have, pos_have], axis=1)
    timing["embed_s"] = time.monotonic() - t
    tiles.images = []  # features only from here

    t = time.monotonic()
    fitted = heads.pca(views[have], opts.dim)
    progress("PCA-whitening fitted")
    if opts.method == "ssl":
        progress("training the head (VICReg)")
        fitted = heads.train_ssl(
            views, have, tiles.slide, fitted, started + TRAIN_SHARE * opts.seconds, opts.seed, device=opts.device
        )
    timing["train_s"] = time.monotonic() - t
    progress(f"head fitted ({len(fitted.losses) * 10} steps)" if fitted.losses else "head fitted")

    figures = None
    if gate_db is not None:
        figures = {
            "slides": len(held),
            "tiles": int(len(gate_db.slide)),
            "queries": int(len(gate_feats["sources"])),
            "slide_fingerprints": gate_db.fingerprints,
            "source": gate_figures(gate_feats, lambda x: x),
            "adapted": gate_figures(gate_feats, fitted),
        }
    timing["total_s"] = time.monotonic() - started
    provenance = {
        "tool": "smily model adapt",
        "method": opts.method,
        "source_model": config.model_id,
        "source_dim": config.embedding_dim,
        "sampled_from": origin,
        "tiling": {
            "mpp": record.nearest_mpp(DEFAULT_MPPS[0]),
            "tile_size": size,
            "stride": record.stride,
            "min_tissue": record.min_tissue,
        },
        "training": {
            "slides": len(train),
            "tiles": int(len(tiles.slide)),
            "views": {k: int(v) for k, v in kinds.items()},
            "slide_fingerprints": tiles.fingerprints,
        },
        "settings": {
            "dim": opts.dim,
            "max_tiles": opts.max_tiles,
            "seconds": opts.seconds,
            "device": opts.device,
            "unfreeze_blocks": opts.unfreeze_blocks,
            "seed": opts.seed,
            "head": "PCA-whitening"
            if opts.method == "pca"
            else f"PCA-whitening + MLP({heads.HIDDEN}) residual, VICReg",
            "vicreg_weights": [heads.SIM, heads.STD, heads.COV] if opts.method == "ssl" else None,
            "whitening_shrink": heads.SHRINK,
            "positives": list(augment.POSITIVES) if opts.method == "ssl" else [],
        },
        "loss_curve": fitted.losses,
        "gate": figures,
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "cpu_count": os.cpu_count(),
    }
    target = dataclasses.replace(
        target,
        embedding_dim=opts.dim,
        l2_normalize=True,
        description=f"{config.model_id} adapted to {len(train)} slides without labels ({opts.method}, dim {opts.dim})",
        provenance=provenance,
    )
    with tempfile.TemporaryDirectory(prefix="smily-adapt-") as tmp:
        out = os.path.join(tmp, model_repo.MODEL_FILE)
        heads.append_to(src_path, config.output_name, fitted, config.output_name, out)
        model_repo.install(out, target, opts.repo)
    if time.monotonic() > end + 60:
        progress(f"note: took {time.monotonic() - started:.0f} s against --seconds {opts.seconds:g}")
    return target
