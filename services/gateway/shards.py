"""The index seen through its shards and their replicas.

Each slide lives on the shard that rendezvous hashing of its id picks
(smily.common.placement). A shard is served by one or more interchangeable
replicas (SMILY_INDEX_TARGETS="a1|a2,b1|b2": "," between shards, "|" between
replicas). Each call goes to one replica of the shard, round robin; a
replica that answers UNAVAILABLE is passed over for a while and the call
goes to the next, so a dead replica fails no call while another lives.
Writes are acknowledged by the shard's system of record, so any replica
takes them (a retried commit is idempotent); after a commit the gateway waits,
bounded, for the shard's other live replicas to serve it.

A search fans out to one replica per shard in parallel and merges the top-k;
listings merge in slide id order. A shard with no live replica fails the call
(UNAVAILABLE naming the shard) unless the search allows a partial answer, which
then names the missing shards.
"""
from __future__ import annotations

import base64
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from smily.common.channels import channel
from smily.common.errors import Unavailable
from smily.common.placement import shard_of
from smily.index.v1 import index_pb2, index_pb2_grpc

__all__ = ["ShardedIndex", "connect", "shard_of"]

REPLICA_SEPARATOR = "|"
# A replica that answered UNAVAILABLE is tried last for this long.
DOWN_S = 2.0
# Longest wait after a commit for the shard's other replicas to serve it.
REPLICA_WAIT_S = 5.0


class NoReplica(Unavailable, grpc.RpcError):
    """No replica of a shard served the call; an RpcError too, as gateway code expects of a backend."""

    def __init__(self, shard: int):
        # No backend's message: a transport error's names internal addresses.
        super().__init__(f"index shard {shard} has no live replica (replicas or the index database unreachable)")
        self.shard = shard

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return str(self)


class Shard:
    """The replicas of one shard."""

    def __init__(self, number: int, stubs: list):
        self.number, self.stubs = number, stubs
        self._down_until = [0.0] * len(stubs)
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def _order(self) -> list[int]:
        """Replica indexes to try: round robin over those up, then those recently down."""
        with self._lock:
            start = next(self._turn) % len(self.stubs)
        order = [(start + i) % len(self.stubs) for i in range(len(self.stubs))]
        now = time.monotonic()
        return sorted(order, key=lambda i: self._down_until[i] > now)

    def call(self, method: str, request, timeout=None):
        for i in self._order():
            try:
                return getattr(self.stubs[i], method)(request, timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                # Unreachable, or its database is: either way the next replica may serve.
                self._down_until[i] = time.monotonic() + DOWN_S
        raise NoReplica(self.number)

    def wait_served(self, seq: int, timeout=None) -> None:
        """Bounded wait for every replica to serve journal sequence `seq`; one that does not answer is skipped."""
        deadline = time.monotonic() + min(REPLICA_WAIT_S, timeout or REPLICA_WAIT_S)
        for stub in self.stubs:
            while time.monotonic() < deadline:
                try:
                    info = stub.GetIndexInfo(index_pb2.GetIndexInfoRequest(), timeout=max(0.05, deadline - time.monotonic()))
                except grpc.RpcError:
                    break
                if info.journal_seq >= seq:
                    break
                time.sleep(0.02)


class ShardedIndex:
    """Same call shapes as an IndexServiceStub, so callers need not know about shards.
    `shards`: per shard, its replicas' stubs (a bare stub is a shard of one replica)."""

    def __init__(self, shards: list):
        if not shards:
            raise ValueError("at least one index shard is required")
        self.shards = [Shard(n, list(s) if isinstance(s, (list, tuple)) else [s]) for n, s in enumerate(shards)]
        self._pool = ThreadPoolExecutor(max_workers=4 * len(self.shards), thread_name_prefix="shards")

    def _for(self, slide_id: str) -> Shard:
        return self.shards[shard_of(slide_id, len(self.shards))]

    def _all(self, method: str, request, timeout, shards=None, partial=False):
        """(replies, missing shard numbers) of one call per shard, in parallel."""
        shards = self.shards if shards is None else shards
        futures = [(s, self._pool.submit(s.call, method, request, timeout)) for s in shards]
        replies, missing = [], []
        for shard, f in futures:
            try:
                replies.append(f.result())
            except NoReplica:
                if not partial:
                    raise
                missing.append(shard.number)
        return replies, missing

    def AddTiles(self, request, timeout=None):
        return self._for(request.slide_id).call("AddTiles", request, timeout)

    def CommitSlide(self, request, timeout=None):
        shard = self._for(request.slide.slide_id)
        reply = shard.call("CommitSlide", request, timeout)
        if len(shard.stubs) > 1:
            shard.wait_served(reply.journal_seq, timeout)
        return reply

    def GetSlide(self, request, timeout=None):
        return self._for(request.slide_id).call("GetSlide", request, timeout)

    def DeleteSlide(self, request, timeout=None):
        return self._for(request.slide_id).call("DeleteSlide", request, timeout)

    def Search(self, request, timeout=None):
        shards = None
        if request.slide_ids:  # only the shards holding the named slides
            shards = list({s.number: s for s in map(self._for, request.slide_ids)}.values())
        replies, missing = self._all("Search", request, timeout, shards, request.allow_partial)
        hits = sorted((h for r in replies for h in r.hits), key=lambda h: -h.score)[: request.k]
        return index_pb2.SearchResponse(hits=hits, model_id=next((r.model_id for r in replies if r.model_id), ""),
                                        missing_shards=missing)

    def ListSlides(self, request, timeout=None):
        size = min(request.page_size or 100, 1000)  # as each shard pages
        replies, _ = self._all("ListSlides", request, timeout)
        slides = sorted((s for r in replies for s in r.slides), key=lambda s: s.slide_id)
        more = len(slides) > size or any(r.next_page_token for r in replies)
        slides = slides[:size]
        token = base64.urlsafe_b64encode(slides[-1].slide_id.encode()).decode() if more and slides else ""
        return index_pb2.ListSlidesResponse(slides=slides, next_page_token=token)

    # Concepts are small and keyed by name: each lives on the shard its name hashes to.
    def _for_concept(self, name: str) -> Shard:
        return self._for("concept:" + name)

    def PutConcept(self, request, timeout=None):
        return self._for_concept(request.concept.name).call("PutConcept", request, timeout)

    def GetConcept(self, request, timeout=None):
        return self._for_concept(request.name).call("GetConcept", request, timeout)

    def DeleteConcept(self, request, timeout=None):
        return self._for_concept(request.name).call("DeleteConcept", request, timeout)

    def ListConcepts(self, request, timeout=None):
        replies, _ = self._all("ListConcepts", request, timeout)
        concepts = sorted((c for r in replies for c in r.concepts), key=lambda c: c.name)
        return index_pb2.ListConceptsResponse(concepts=concepts)

    def GetIndexInfo(self, request, timeout=None):
        replies, _ = self._all("GetIndexInfo", request, timeout)
        out = index_pb2.GetIndexInfoResponse(
            model_id=next((r.model_id for r in replies if r.model_id), ""), dim=max(r.dim for r in replies),
            tile_count=sum(r.tile_count for r in replies), slide_count=sum(r.slide_count for r in replies))
        # Every shard records what the gateway sends, so the first one recorded speaks for all.
        recorded = next((r.tiling for r in replies if r.tiling.mpps), None)
        if recorded is not None:
            out.tiling.CopyFrom(recorded)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def connect(targets, credentials=None) -> tuple[ShardedIndex, list[list]]:
    """A ShardedIndex over SMILY_INDEX_TARGETS-style targets ("a1|a2" per shard)
    and its channels, one list of replicas per shard."""
    channels = [[channel(t.strip(), credentials) for t in target.split(REPLICA_SEPARATOR) if t.strip()] for target in targets]
    return ShardedIndex([[index_pb2_grpc.IndexServiceStub(c) for c in replicas] for replicas in channels]), channels
