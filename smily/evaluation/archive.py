"""Client-side copy of the archive: the same tiles as the index, read the same way.

Pixels come from OpenSlide directly on the slide files under the configured
slide roots, cut by the tiler's own code (smily.tiler.tiling) with the
index's tiling record, so every tile here is one the index holds.
Each tile gets its embedding (from the embedder service) for exact search
and its colour-texture features for the classical baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smily.common import images
from smily.common.tensors import from_tensor
from smily.common.tiling import Tiling
from smily.embedder.v1 import embedder_pb2
from smily.tiler import slides as slide_files
from smily.tiler import tiling
from smily.types.v1 import types_pb2

from . import baseline

BATCH = 32


class EvalError(RuntimeError):
    pass


@dataclass
class Archive:
    slide_ids: np.ndarray  # one per tile
    rects: np.ndarray  # (n, 4) level-0 x, y, width, height
    tissue: np.ndarray  # tissue fraction per tile
    embeddings: np.ndarray
    features: np.ndarray
    model_id: str

    def key(self, i: int) -> tuple[str, int, int]:
        return self.slide_ids[i], int(self.rects[i, 0]), int(self.rects[i, 1])


def open_slides(settings, sources: dict[str, str]) -> dict:
    """slide_id -> an open OpenSlide handle, resolved under the slide roots."""
    roots, cache, out = slide_files.SlideRoots(settings.tiler.slide_roots), slide_files.SlideCache(), {}
    for slide_id, source in sources.items():
        try:
            out[slide_id] = cache.get(roots.resolve(source))
        except Exception as exc:  # NotFound, FailedPrecondition...: name the slide id, never the path
            raise EvalError(f"slide {slide_id}: {exc}") from None
    return out


def embed(embedder, rgbs: list[np.ndarray]) -> tuple[np.ndarray, str]:
    resp = embedder.Embed(
        embedder_pb2.EmbedRequest(
            images=[
                types_pb2.Image(
                    data=images.encode(rgb, images.RAW_RGB),
                    encoding=images.RAW_RGB,
                    width=rgb.shape[1],
                    height=rgb.shape[0],
                )
                for rgb in rgbs
            ]
        ),
        timeout=300,
    )
    return from_tensor(resp.embeddings), resp.model_id


def build(tiling_: Tiling, mpp: float, opened: dict, embedder, progress=None) -> Archive:
    """The index's tiles at resolution `mpp` (one of the record's), embedded and described."""
    ids, rects, tissue, embs, feats, model_ids = [], [], [], [], [], set()
    size = tiling_.tile_size
    for slide_id, slide in opened.items():
        slide_mpp = slide_files.mpp(slide)
        if slide_mpp <= 0:
            raise EvalError(f"slide {slide_id} does not record its resolution (microns per pixel)")
        plan = tiling.plan(slide, slide_mpp, [mpp], size, tiling_.min_tissue, tiling_.stride)[0]
        for start in range(0, len(plan), BATCH):
            chunk = plan[start : start + BATCH]
            rgbs = [tiling.read(slide, t.x, t.y, t.size, t.size, size, size) for t in chunk]
            vecs, model_id = embed(embedder, rgbs)
            model_ids.add(model_id)
            embs.append(vecs)
            feats.append(np.stack([baseline.features(rgb) for rgb in rgbs]))
            ids += [slide_id] * len(chunk)
            rects += [(t.x, t.y, t.size, t.size) for t in chunk]
            tissue += [t.tissue_fraction for t in chunk]
        if progress:
            progress(f"archive: {slide_id}: {len(plan)} tiles")
    if not ids:
        raise EvalError("the manifest's slides have no tissue tiles at the configured tiling")
    if len(model_ids) != 1:
        raise EvalError(f"the embedder changed model during the evaluation: {sorted(model_ids)}")
    return Archive(
        np.array(ids, object),
        np.array(rects, np.int64),
        np.array(tissue, np.float32),
        np.concatenate(embs),
        np.concatenate(feats),
        model_ids.pop(),
    )
