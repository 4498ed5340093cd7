"""One slide's tissue tiles embedded in batches: the loop behind both ingest
and whole-slide (mosaic) queries.

The embedder reads the tiles from the tiler itself (EmbedSlide), so pixels
never pass through the gateway; it hands back tile rectangles and embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from smily.common import limits
from smily.common.errors import FailedPrecondition
from smily.embedder.v1 import embedder_pb2
from smily.tiler.v1 import tiler_pb2
from smily.types.v1 import types_pb2

from .backends import Backend, Backends


def check_tiling(info: tiler_pb2.SlideInfo, slide_mpp: float, tiling: tiler_pb2.TilingParams, max_tiles: int) -> None:
    """Refuse, before any tile is planned or streamed, a slide whose resolution is
    implausible or whose tile grid is over the cap (a wrong slide_mpp can turn
    17 tiles into a million)."""
    mpp = slide_mpp or info.mpp_x
    if mpp <= 0:
        raise FailedPrecondition(
            "the slide does not record its resolution (microns per pixel); state it in the request's "
            "slide_mpp (e.g. 0.25 for a 40x scan, 0.5 for 20x)"
        )
    if not limits.plausible_mpp(mpp):
        raise FailedPrecondition(
            f"the slide records an implausible resolution ({mpp:g} microns per pixel); state the right one in slide_mpp"
        )
    grid = limits.tile_grid(
        info.width, info.height, mpp, list(tiling.mpps) or [tiling.mpp], tiling.tile_size, tiling.stride
    )
    limits.tiles_per_slide(grid, max_tiles, mpp)


def embed_slide(
    b: Backends,
    source: str,
    tiling: tiler_pb2.TilingParams,
    slide_mpp: float,
    batch: int,
    stream_timeout: float,
    on_stream: Callable[[object], None] = lambda stream: None,
    on_total: Callable[[int], None] = lambda total: None,
    before_batch: Callable[[], None] = lambda: None,
    embedder: Backend | None = None,
) -> Iterator[tuple[list[tiler_pb2.Tile], types_pb2.Tensor, str]]:
    """Yields (tiles without pixels, embeddings tensor, model id) per batch of at most `batch` tiles.

    on_stream gets the EmbedSlide call (cancelling it cancels the embedder's
    tile stream too), on_total the planned tile count whenever it changes,
    and before_batch runs before each batch is handed on (a cancellation point). `embedder`: the one
    serving the model to embed with (default: the gateway's embedder)."""
    stream = (embedder or b.embedder).EmbedSlide(
        embedder_pb2.EmbedSlideRequest(
            tiles=tiler_pb2.StreamTilesRequest(slide=source, params=tiling, slide_mpp=slide_mpp), batch=batch
        ),
        timeout=stream_timeout,
    )
    try:
        on_stream(stream)
        total = 0
        for msg in stream:
            if total != msg.tiles_total:
                total = msg.tiles_total
                on_total(total)
            if msg.tiles:
                before_batch()
                yield list(msg.tiles), msg.embeddings, msg.model_id
    finally:  # a caller that stops early (cancel, error) ends the embedder's work too
        stream.cancel()
