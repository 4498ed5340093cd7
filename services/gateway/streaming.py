"""One slide's tissue tiles embedded in batches: the loop behind both ingest
and whole-slide (mosaic) queries.

The embedder reads the tiles from the tiler itself (EmbedSlide), so pixels
never pass through the gateway; it hands back tile rectangles and embeddings.
"""
from __future__ import annotations

from typing import Callable, Iterator

from smily.embedder.v1 import embedder_pb2
from smily.tiler.v1 import tiler_pb2
from smily.types.v1 import types_pb2

from .backends import Backends


def embed_slide(b: Backends, source: str, tiling: tiler_pb2.TilingParams, slide_mpp: float, batch: int,
                stream_timeout: float,
                on_stream: Callable[[object], None] = lambda stream: None,
                on_total: Callable[[int], None] = lambda total: None,
                before_batch: Callable[[], None] = lambda: None,
                ) -> Iterator[tuple[list[tiler_pb2.Tile], types_pb2.Tensor, str]]:
    """Yields (tiles without pixels, embeddings tensor, model id) per batch of at most `batch` tiles.

    on_stream gets the EmbedSlide call (cancelling it cancels the embedder's
    tile stream too), on_total the planned tile count whenever it changes,
    and before_batch runs before each batch is handed on (a cancellation point)."""
    stream = b.embedder.EmbedSlide(
        embedder_pb2.EmbedSlideRequest(
            tiles=tiler_pb2.StreamTilesRequest(slide=source, params=tiling, slide_mpp=slide_mpp), batch=batch),
        timeout=stream_timeout)
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
