"""The operator's calls (issue 24): the tenants in the index, and moving a slide between them.

A move re-embeds nothing: it copies the slide's tiles and embeddings, page by
page, to the shard that placement names for (new tenant, slide id) as a new
generation, commits them there (the index refuses the commit unless every tile
arrived), and only then deletes the slide from the old tenant. So no tile is
lost: until the commit the slide is the old tenant's alone, after it briefly
both tenants' (each sees it once), then the new tenant's. A move interrupted
between the two leaves it in both; the operator deletes the one not wanted.

No cache names the old tenant afterwards: the gateway caches query embeddings,
not hits, and a region query's key holds the slide's tenant and commit time
(query.py), so the old tenant's region queries are NOT_FOUND by the index first,
and the new tenant's are computed afresh.
"""

from __future__ import annotations

import logging
import uuid

import grpc

from smily.common.errors import Aborted, AlreadyExists, ServiceError
from smily.gateway.v1 import gateway_pb2
from smily.index.v1 import index_pb2

from .tilings import IndexTiling

log = logging.getLogger("smily.moves")

# Tiles copied per index call (each page's embeddings travel in one message).
PAGE = 1024


def list_tenants(index, timeout: float) -> gateway_pb2.ListTenantsResponse:
    reply = index.ListTenants(index_pb2.ListTenantsRequest(), timeout=timeout)
    return gateway_pb2.ListTenantsResponse(
        tenants=[
            gateway_pb2.TenantSummary(tenant=t.tenant, slide_count=t.slide_count, tile_count=t.tile_count)
            for t in reply.tenants
        ]
    )


def _absent(index, slide_id: str, tenant: str, timeout: float) -> None:
    try:
        index.GetSlide(index_pb2.GetSlideRequest(slide_id=slide_id, tenant=tenant), timeout=timeout)
    except ServiceError as exc:  # as backends.Backend translates an index error
        if exc.code == grpc.StatusCode.NOT_FOUND:
            return
        raise
    raise AlreadyExists(f"tenant {tenant!r} already has a slide {slide_id!r}; nothing was moved")


def move_slide(
    index, tilings: IndexTiling, slide_id: str, source: str, target: str, timeout: float
) -> tuple[index_pb2.Slide, int]:
    """Move a slide from tenant `source` to `target`: (the slide as the target holds it, tiles moved)."""
    slide = index.GetSlide(index_pb2.GetSlideRequest(slide_id=slide_id, tenant=source), timeout=timeout).slide
    _absent(index, slide_id, target, timeout)
    tiling, _ = tilings.current(timeout)
    generation = uuid.uuid4().hex
    after = copied = 0
    while True:
        page = index.ReadSlideTiles(
            index_pb2.ReadSlideTilesRequest(slide_id=slide_id, tenant=source, after=after, page_size=PAGE),
            timeout=timeout,
        )
        if page.tiles:
            add = index_pb2.AddTilesRequest(
                model_id=slide.model_id,
                tenant=target,
                slide_id=slide_id,
                generation=generation,
                embeddings=page.embeddings,
                tiles=page.tiles,
            )
            tiling.to_pb(add.tiling)
            index.AddTiles(add, timeout=timeout)
            copied += len(page.tiles)
        after = page.next_after
        if not after:
            break
    if copied != slide.tile_count:  # re-ingested or deleted meanwhile: the old tenant keeps it as it is
        raise Aborted(f"slide {slide_id!r} changed while it was copied; nothing was moved, try again")
    committed = index.CommitSlide(
        index_pb2.CommitSlideRequest(
            model_id=slide.model_id,
            generation=generation,
            expected_tiles=copied,
            slide=index_pb2.Slide(
                slide_id=slide_id,
                tenant=target,
                source=slide.source,
                metadata=slide.metadata,
                slide_mpp=slide.slide_mpp,
            ),
        ),
        timeout=timeout,
    ).slide
    index.DeleteSlide(index_pb2.DeleteSlideRequest(slide_id=slide_id, tenant=source), timeout=timeout)
    log.info("slide moved between tenants", extra={"slide_id": slide_id, "from": source, "to": target, "tiles": copied})
    return committed, copied
