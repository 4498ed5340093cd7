"""One slide embedded with one model and written to the index: what an ingest does for each model
the index holds, and what a migration does for its target model.

The tiles are staged under a generation of this model alone and published by one CommitSlide,
so a slide changes atomically per model. A model the index does not hold yet is registered by
the first batch when `register` is set (a migration's first slide).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from smily.common.errors import Aborted, FailedPrecondition
from smily.common.tiling import Tiling
from smily.index.v1 import index_pb2

from .backends import Backend, Backends
from .streaming import embed_slide
from .tilings import params


@dataclass(frozen=True)
class SlideSource:
    """A slide as the index records it: where its pixels are and what it says about itself."""

    tenant: str
    slide_id: str
    source: str
    metadata: dict[str, str] = field(default_factory=dict)
    slide_mpp: float = 0.0


def generation_for(base: str, model_id: str, serving: bool) -> str:
    """A model's own generation of one ingest (the index keeps each model's tiles apart by it)."""
    return base if serving else f"{base}-{hashlib.sha256(model_id.encode()).hexdigest()[:12]}"


def index_slide(
    b: Backends,
    slide: SlideSource,
    model_id: str,
    embedder: Backend,
    tiling: Tiling,
    generation: str,
    batch: int,
    timeout: float,
    register: bool = False,
    on_stream: Callable[[object], None] = lambda stream: None,
    on_total: Callable[[int], None] = lambda total: None,
    before_batch: Callable[[], None] = lambda: None,
    on_batch: Callable[[int], None] = lambda tiles: None,
    before_commit: Callable[[], None] = lambda: None,
) -> int:
    """Embed the slide with `embedder` (which serves `model_id`), stage and commit it; returns its tiles.
    on_batch gets the tiles staged so far; before_commit is the last moment to cancel."""
    embedded = 0
    for tiles, embeddings, got in embed_slide(
        b,
        slide.source,
        params(tiling),
        slide.slide_mpp,
        batch,
        max(timeout, 3600.0),
        on_stream=on_stream,
        on_total=on_total,
        before_batch=before_batch,
        embedder=embedder,
    ):
        if got != model_id:  # redeployed with another model: write nothing of it
            b.forget_models()
            raise Aborted(f"the embedder for model {model_id} now serves {got}; try again")
        embedded += len(tiles)
        rects = [
            index_pb2.TileRect(
                x=t.x, y=t.y, width=t.width, height=t.height, mpp=t.mpp, tissue_fraction=t.tissue_fraction
            )
            for t in tiles
        ]
        # Passed on as bytes; the index validates them, and checks (or records) the tiling.
        add = index_pb2.AddTilesRequest(
            model_id=model_id,
            tenant=slide.tenant,
            slide_id=slide.slide_id,
            generation=generation,
            embeddings=embeddings,
            tiles=rects,
            register_model=register,
        )
        tiling.to_pb(add.tiling)
        b.index.AddTiles(add, timeout=timeout)
        on_batch(embedded)
    before_commit()
    if embedded == 0:
        raise FailedPrecondition("no tissue tiles found on the slide at the configured tiling parameters")
    b.index.CommitSlide(
        index_pb2.CommitSlideRequest(
            model_id=model_id,
            generation=generation,
            expected_tiles=embedded,
            slide=index_pb2.Slide(
                tenant=slide.tenant,
                slide_id=slide.slide_id,
                source=slide.source,
                metadata=slide.metadata,
                slide_mpp=slide.slide_mpp,
            ),
        ),
        timeout=timeout,
    )
    return embedded
