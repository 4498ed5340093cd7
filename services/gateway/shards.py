"""The index seen through its shards: each slide lives on the shard its id hashes to.

Writes and per-slide reads go to that one shard; a search fans out to every
shard in parallel and merges the top-k; listings merge in slide id order.
A failing shard fails the call: results are never silently partial.
"""
from __future__ import annotations

import base64
import hashlib

from smily.index.v1 import index_pb2


def shard_of(slide_id: str, shards: int) -> int:
    """Stable across processes and releases (unlike hash())."""
    return int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], "big") % shards


class ShardedIndex:
    """Same call shapes as an IndexServiceStub, so callers need not know about shards."""

    def __init__(self, stubs: list):
        if not stubs:
            raise ValueError("at least one index shard is required")
        self.stubs = stubs

    def _for(self, slide_id: str):
        return self.stubs[shard_of(slide_id, len(self.stubs))]

    def AddTiles(self, request, timeout=None):
        return self._for(request.slide_id).AddTiles(request, timeout=timeout)

    def CommitSlide(self, request, timeout=None):
        return self._for(request.slide.slide_id).CommitSlide(request, timeout=timeout)

    def GetSlide(self, request, timeout=None):
        return self._for(request.slide_id).GetSlide(request, timeout=timeout)

    def DeleteSlide(self, request, timeout=None):
        return self._for(request.slide_id).DeleteSlide(request, timeout=timeout)

    def Search(self, request, timeout=None):
        if request.slide_ids:  # only the shards holding the named slides
            stubs = list({id(s): s for s in map(self._for, request.slide_ids)}.values())
        else:
            stubs = self.stubs
        if len(stubs) == 1:  # a blocking call waits in this thread: no hand-off, no merge, no copy
            return stubs[0].Search(request, timeout=timeout)
        replies = [f.result() for f in [s.Search.future(request, timeout=timeout) for s in stubs]]
        hits = sorted((h for r in replies for h in r.hits), key=lambda h: -h.score)[: request.k]
        return index_pb2.SearchResponse(hits=hits, model_id=next((r.model_id for r in replies if r.model_id), ""))

    def ListSlides(self, request, timeout=None):
        size = min(request.page_size or 100, 1000)  # as each shard pages
        replies = [f.result() for f in [s.ListSlides.future(request, timeout=timeout) for s in self.stubs]]
        slides = sorted((s for r in replies for s in r.slides), key=lambda s: s.slide_id)
        more = len(slides) > size or any(r.next_page_token for r in replies)
        slides = slides[:size]
        token = base64.urlsafe_b64encode(slides[-1].slide_id.encode()).decode() if more and slides else ""
        return index_pb2.ListSlidesResponse(slides=slides, next_page_token=token)

    # Concepts are small and keyed by name: each lives on the shard its name hashes to.
    def _for_concept(self, name: str):
        return self._for("concept:" + name)

    def PutConcept(self, request, timeout=None):
        return self._for_concept(request.concept.name).PutConcept(request, timeout=timeout)

    def GetConcept(self, request, timeout=None):
        return self._for_concept(request.name).GetConcept(request, timeout=timeout)

    def DeleteConcept(self, request, timeout=None):
        return self._for_concept(request.name).DeleteConcept(request, timeout=timeout)

    def ListConcepts(self, request, timeout=None):
        replies = [f.result() for f in [s.ListConcepts.future(request, timeout=timeout) for s in self.stubs]]
        concepts = sorted((c for r in replies for c in r.concepts), key=lambda c: c.name)
        return index_pb2.ListConceptsResponse(concepts=concepts)

    def GetIndexInfo(self, request, timeout=None):
        replies = [f.result() for f in [s.GetIndexInfo.future(request, timeout=timeout) for s in self.stubs]]
        return index_pb2.GetIndexInfoResponse(
            model_id=next((r.model_id for r in replies if r.model_id), ""), dim=max(r.dim for r in replies),
            tile_count=sum(r.tile_count for r in replies), slide_count=sum(r.slide_count for r in replies))
