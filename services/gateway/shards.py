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

A shard's target may also be one `dns:///name:port` that resolves to all
its replicas (a per-shard headless Service in Kubernetes): gRPC's round_robin
then spreads calls over them and its retries pass over a dead one; the
gateway cannot tell those replicas apart, so a hedge goes through the same
channel (round_robin sends it to the next replica) and the wait after a
commit sees only the replica that answers.

A search fans out to one replica per shard in parallel and merges the top-k;
listings merge in slide id order. A replica slower than the shard's recent
p95 search latency gets a hedge: the same search sent to another replica,
first answer wins; at most one per search and about one search in ten
(HEDGE_RATIO), and the slow replica is passed over for a while. Hits are
de-duplicated by tile identity, so a slide held by two shards while
`smily index reshard` moves it counts once. A shard with no live replica
fails the call (UNAVAILABLE naming the shard) unless the search allows a
partial answer, which then names the missing shards.
"""

from __future__ import annotations

import base64
import collections
import contextvars
import itertools
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import prometheus_client as prom

from smily.common import tenancy
from smily.common.channels import RotatingStub
from smily.common.errors import INDEX_DATABASE_UNREACHABLE, Unavailable
from smily.common.placement import shard_of, shard_of_slide
from smily.index.v1 import index_pb2, index_pb2_grpc

__all__ = ["ShardedIndex", "connect", "shard_of"]

REPLICA_SEPARATOR = "|"
# A replica that answered UNAVAILABLE, or lost to a hedge, is tried last for this long;
# each further loss in a row doubles it (up to SLOW_MAX_S), so a frozen replica does
# not spend the hedge budget every DOWN_S.
DOWN_S = 2.0
SLOW_MAX_S = 60.0
# Longest wait after a commit for the shard's other replicas to serve it.
REPLICA_WAIT_S = 5.0
# Hedging: searches remembered per shard for its p95, and how many before it is trusted.
LATENCY_WINDOW, LATENCY_MIN_SAMPLES = 200, 20
# Never hedge sooner than this, however fast the shard usually answers.
HEDGE_MIN_S = 0.005
# Hedges earned per search, and the most saved up: at most ~1 search in 10 hedged, 10 in a burst.
HEDGE_RATIO, HEDGE_BURST = 0.1, 10.0
# Threads per shard that send its searches (created as needed, reused). A gRPC `.future()` call
# starts a channel thread whenever the channel has no call in flight: +1.9 ms per search measured
# alone (docs/benchmarks.md), more than the hand-off to a waiting thread here.
SEARCH_THREADS = 64
# Targets whose name resolves to several addresses (gRPC name resolvers): one channel, several replicas.
BALANCED_SCHEMES = ("dns:", "ipv4:", "ipv6:")

HEDGES = prom.Counter("smily_index_hedges_total", "Searches sent to a second replica of a shard", ["shard", "won"])


class NoReplica(Unavailable, grpc.RpcError):
    """No replica of a shard served the call; an RpcError too, as gateway code expects of a backend.
    `database`: a replica answered that the shard's database is unreachable (so replicas are up)."""

    def __init__(self, shard: int, database: bool = False):
        # No backend's message: a transport error's names internal addresses.
        if database:
            message = f"{INDEX_DATABASE_UNREACHABLE} (index shard {shard}; its replicas are up): retry later"
        else:
            message = f"index shard {shard} has no live replica"
        super().__init__(message)
        self.shard = shard

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return str(self)


class Shard:
    """The replicas of one shard. `balanced[i]`: stub i's channel spreads calls
    over several replicas itself (a dns:/// target)."""

    def __init__(self, number: int, stubs: list, balanced: list[bool] | None = None):
        self.number, self.stubs = number, stubs
        self.balanced = balanced or [False] * len(stubs)
        self._down_until = [0.0] * len(stubs)
        self._losses = [0] * len(stubs)  # hedges lost in a row
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self._tokens = HEDGE_BURST
        self.hedges = 0
        self._senders = ThreadPoolExecutor(max_workers=SEARCH_THREADS, thread_name_prefix=f"shard{number}-search")

    def _order(self) -> list[int]:
        """Replica indexes to try: round robin over those up, then those recently down or slow."""
        with self._lock:
            start = next(self._turn) % len(self.stubs)
        order = [(start + i) % len(self.stubs) for i in range(len(self.stubs))]
        now = time.monotonic()
        return sorted(order, key=lambda i: self._down_until[i] > now)

    def call(self, method: str, request, timeout=None):
        database = False
        for i in self._order():
            try:
                return getattr(self.stubs[i], method)(request, timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                if _database_down(exc):  # the replica is up: another one meets the same database
                    database = True
                    continue
                self._down_until[i] = time.monotonic() + DOWN_S
        raise NoReplica(self.number, database)

    # -- hedged search ------------------------------------------------------------
    def hedge_delay(self) -> float | None:
        """The shard's recent p95 search latency (at least HEDGE_MIN_S); None until enough searches were seen."""
        with self._lock:
            if len(self._latencies) < LATENCY_MIN_SAMPLES:
                return None
            ordered = sorted(self._latencies)
        return max(HEDGE_MIN_S, ordered[int(0.95 * (len(ordered) - 1))])

    def _spend_token(self) -> bool:
        with self._lock:
            if self._tokens < 1:
                return False
            self._tokens -= 1
            self.hedges += 1
            return True

    def search(self, request, timeout=None):
        """Search on one replica, hedged to a second one when the first is slower than the shard's p95;
        failover as call() does."""
        with self._lock:
            self._tokens = min(HEDGE_BURST, self._tokens + HEDGE_RATIO)
        order = self._order()
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = self.hedge_delay()
        done: queue.SimpleQueue = queue.SimpleQueue()
        pending: dict = {}  # future -> (replica, started, is a hedge)
        untried = list(order)

        def launch(i: int, hedge: bool) -> None:
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            # In a copy of this context, so the trace goes on in the sender's thread.
            future = self._senders.submit(contextvars.copy_context().run, self.stubs[i].Search, request, timeout=left)
            pending[future] = (i, time.monotonic(), hedge)
            future.add_done_callback(done.put)

        launch(untried.pop(0), False)
        started = time.monotonic()
        hedged = delay is None  # no p95 yet: no hedge
        try:
            while pending:
                wait = None if hedged or delay is None else max(0.0, started + delay - time.monotonic())
                try:
                    future = done.get(timeout=wait)
                except queue.Empty:
                    hedged = True
                    primary = next(iter(pending.values()))[0]
                    target = untried.pop(0) if untried else (primary if self.balanced[primary] else None)
                    if target is not None and self._spend_token():
                        launch(target, True)
                    continue
                i, t0, hedge = pending.pop(future)
                try:
                    reply = future.result()
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    self._down_until[i] = time.monotonic() + DOWN_S
                    if not pending and untried:
                        launch(untried.pop(0), False)
                    continue
                with self._lock:
                    self._latencies.append(time.monotonic() - t0)
                    self._losses[i] = 0
                if hedge:
                    HEDGES.labels(str(self.number), "true").inc()
                    for j, _, _ in pending.values():  # the replica the hedge beat: passed over for a while
                        with self._lock:
                            self._losses[j] += 1
                            pause = min(SLOW_MAX_S, DOWN_S * 2 ** (self._losses[j] - 1))
                        self._down_until[j] = time.monotonic() + pause
                elif any(h for _, _, h in pending.values()):
                    HEDGES.labels(str(self.number), "false").inc()
                return reply
        finally:
            for future in pending:
                future.cancel()  # one not sent yet; a loser already sent runs out on its replica
        raise NoReplica(self.number)

    def close(self) -> None:
        self._senders.shutdown(wait=False)

    def wait_served(self, seq: int, timeout=None) -> None:
        """Bounded wait for every replica to serve journal sequence `seq`; one that does not answer is skipped."""
        deadline = time.monotonic() + min(REPLICA_WAIT_S, timeout or REPLICA_WAIT_S)
        for stub in self.stubs:
            while time.monotonic() < deadline:
                try:
                    info = stub.GetIndexInfo(
                        index_pb2.GetIndexInfoRequest(), timeout=max(0.05, deadline - time.monotonic())
                    )
                except grpc.RpcError:
                    break
                if info.journal_seq >= seq:
                    break
                time.sleep(0.02)


def _database_down(exc: grpc.RpcError) -> bool:
    return (exc.details() or "").startswith(INDEX_DATABASE_UNREACHABLE)


def _tile_key(hit) -> tuple:
    t = hit.tile
    return hit.tenant, hit.slide_id, t.x, t.y, t.width, t.height, t.mpp


class ShardedIndex:
    """Same call shapes as an IndexServiceStub, so callers need not know about shards.
    `shards`: per shard, its replicas' stubs (a bare stub is a shard of one replica)."""

    def __init__(self, shards: list, balanced: list[list[bool]] | None = None, default_tenant: str = tenancy.DEFAULT):
        # A request naming no tenant means the index's default tenant (SMILY_DEFAULT_TENANT): placed as its.
        self._default_tenant = default_tenant
        if not shards:
            raise ValueError("at least one index shard is required")
        groups = [list(s) if isinstance(s, (list, tuple)) else [s] for s in shards]
        self.shards = [Shard(n, g, balanced[n] if balanced else None) for n, g in enumerate(groups)]
        self._pool = ThreadPoolExecutor(max_workers=4 * len(self.shards), thread_name_prefix="shards")

    def _for(self, tenant: str, slide_id: str) -> Shard:
        return self.shards[shard_of_slide(tenant or self._default_tenant, slide_id, len(self.shards))]

    def _all(self, method: str, request, timeout, shards=None, partial=False):
        """(replies, missing shard numbers) of one call per shard, in parallel."""
        shards = self.shards if shards is None else shards

        def one(s: Shard):
            return s.search(request, timeout) if method == "Search" else s.call(method, request, timeout)

        futures: list[tuple[Shard, _Done | Future]]
        if len(shards) == 1:  # in this thread: no hand-off to the pool and back
            futures = [(shards[0], _Done(one, shards[0]))]
        else:  # each in a copy of this context, so the trace goes on in the pool's threads
            futures = [(s, self._pool.submit(contextvars.copy_context().run, one, s)) for s in shards]
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
        return self._for(request.tenant, request.slide_id).call("AddTiles", request, timeout)

    def CommitSlide(self, request, timeout=None):
        shard = self._for(request.slide.tenant, request.slide.slide_id)
        reply = shard.call("CommitSlide", request, timeout)
        if len(shard.stubs) > 1:
            shard.wait_served(reply.journal_seq, timeout)
        return reply

    def GetSlide(self, request, timeout=None):
        return self._placed_first("GetSlide", request, timeout)

    def ReadSlideTiles(self, request, timeout=None):
        return self._placed_first("ReadSlideTiles", request, timeout)

    def _placed_first(self, method: str, request, timeout):
        """A read of one slide: from the shard placement names, else from any shard holding it."""
        placed = self._for(request.tenant, request.slide_id)
        try:
            return placed.call(method, request, timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or len(self.shards) == 1:
                raise
            # Not where the current shard count puts it: maybe not moved there yet (resharding).
            others = [s for s in self.shards if s is not placed]
            for f in [
                self._pool.submit(contextvars.copy_context().run, s.call, method, request, timeout) for s in others
            ]:
                try:
                    return f.result()
                except grpc.RpcError:
                    pass
            raise

    def DeleteSlide(self, request, timeout=None):
        return self._for(request.tenant, request.slide_id).call("DeleteSlide", request, timeout)

    def Search(self, request, timeout=None):
        shards = None
        if request.slide_ids:  # only the shards holding the named slides
            placed = [self._for(t, i) for i in request.slide_ids for t in request.tenants or [""]]
            shards = list({s.number: s for s in placed}.values())
        replies, missing = self._all("Search", request, timeout, shards, request.allow_partial)
        hits: list = []
        seen: set = set()
        for h in sorted((h for r in replies for h in r.hits), key=lambda h: -h.score):
            if _tile_key(h) not in seen and len(hits) < request.k:
                seen.add(_tile_key(h))
                hits.append(h)
        return index_pb2.SearchResponse(
            hits=hits, model_id=next((r.model_id for r in replies if r.model_id), ""), missing_shards=missing
        )

    def ListSlides(self, request, timeout=None):
        size = min(request.page_size or 100, 1000)  # as each shard pages
        replies, _ = self._all("ListSlides", request, timeout)
        # A slide that a reshard is moving (or left behind, interrupted) is on two shards:
        # listed once, as the shard its placement names holds it. Each shard pages after the
        # same index key, so a page's slides do not depend on which shard holds them.
        chosen: dict = {}
        for shard, reply in zip(self.shards, replies):
            for s in reply.slides:
                key = tenancy.key(s.tenant, s.slide_id)
                if key not in chosen or self._for(s.tenant, s.slide_id) is shard:
                    chosen[key] = s
        # In index key order, as each shard pages (tenancy.key).
        slides = [chosen[key] for key in sorted(chosen)]
        more = len(slides) > size or any(r.next_page_token for r in replies)
        slides = slides[:size]
        last = tenancy.key(slides[-1].tenant, slides[-1].slide_id) if slides else ""
        token = base64.urlsafe_b64encode(last.encode()).decode() if more and slides else ""
        return index_pb2.ListSlidesResponse(slides=slides, next_page_token=token)

    # Concepts are small and keyed by name: each lives on the shard its name hashes to.
    def _for_concept(self, tenant: str, name: str) -> Shard:
        return self._for(tenant, "concept:" + name)

    def PutConcept(self, request, timeout=None):
        return self._for_concept(request.concept.tenant, request.concept.name).call("PutConcept", request, timeout)

    def GetConcept(self, request, timeout=None):
        return self._for_concept(request.tenant, request.name).call("GetConcept", request, timeout)

    def DeleteConcept(self, request, timeout=None):
        return self._for_concept(request.tenant, request.name).call("DeleteConcept", request, timeout)

    def ListConcepts(self, request, timeout=None):
        replies, _ = self._all("ListConcepts", request, timeout)
        concepts = sorted((c for r in replies for c in r.concepts), key=lambda c: c.name)
        return index_pb2.ListConceptsResponse(concepts=concepts)

    def GetIndexInfo(self, request, timeout=None):
        # Searches read the tiling record here: one shard down must not stop them all
        # (counts then leave that shard out).
        replies, missing = self._all("GetIndexInfo", request, timeout, partial=True)
        if not replies:
            raise NoReplica(missing[0])
        out = index_pb2.GetIndexInfoResponse(
            model_id=next((r.model_id for r in replies if r.model_id), ""),
            dim=max(r.dim for r in replies),
            tile_count=sum(r.tile_count for r in replies),
            slide_count=sum(r.slide_count for r in replies),
        )
        # Every shard records what the gateway sends, so the first one recorded speaks for all.
        recorded = next((r.tiling for r in replies if r.tiling.mpps), None)
        if recorded is not None:
            out.tiling.CopyFrom(recorded)
        return out

    def ListTenants(self, request, timeout=None):
        replies, _ = self._all("ListTenants", request, timeout)
        counts: dict[str, list[int]] = {}
        for t in (t for r in replies for t in r.tenants):
            c = counts.setdefault(t.tenant, [0, 0])
            c[0], c[1] = c[0] + t.slide_count, c[1] + t.tile_count
        return index_pb2.ListTenantsResponse(
            tenants=[
                index_pb2.TenantCount(tenant=t, slide_count=n, tile_count=k) for t, (n, k) in sorted(counts.items())
            ]
        )

    # -- models: every shard holds each, and switches by its own journal entry --------
    def ListModels(self, request, timeout=None):
        # Every shard holds the serving model: asking which one serves needs only the shards that
        # answer (a partial search goes on without one); counting what a model lacks needs all.
        replies, _ = self._all("ListModels", request, timeout, partial=not request.missing_model_id)
        tiles: dict[str, int] = collections.Counter()
        dims: dict[str, int] = {}
        for reply in replies:
            for m in reply.models:
                tiles[m.model_id] += m.tile_count
                dims[m.model_id] = m.dim
        # Mid-switch the shards may differ: the first shard's word until every one has switched.
        serving = next((r.serving_model_id for r in replies if r.serving_model_id), "")
        return index_pb2.ListModelsResponse(
            models=[
                index_pb2.HeldModel(model_id=m, dim=dims[m], tile_count=tiles[m], serving=m == serving)
                for m in sorted(dims)
            ],
            serving_model_id=serving,
            missing_slides=[s for r in replies for s in r.missing_slides][:100],
            missing_count=sum(r.missing_count for r in replies),
        )

    def SetServingModel(self, request, timeout=None):
        """Every shard switches, each at its own journal sequence number; a search in between is still
        one model's, as every shard holds both."""
        for shard in self.shards:
            reply = shard.call("SetServingModel", request, timeout)
            if len(shard.stubs) > 1:
                shard.wait_served(reply.journal_seq, timeout)
        return index_pb2.SetServingModelResponse()

    def LeaseMigration(self, request, timeout=None):
        # One record for the index: the first shard holds it.
        return self.shards[0].call("LeaseMigration", request, timeout)

    # Gateway operation records: the first shard holds them all, as the migration's lease.
    def PutOperationRecord(self, request, timeout=None):
        return self.shards[0].call("PutOperationRecord", request, timeout)

    def GetOperationRecord(self, request, timeout=None):
        return self.shards[0].call("GetOperationRecord", request, timeout)

    def AddModel(self, request, timeout=None):
        self._all("AddModel", request, timeout)
        return index_pb2.AddModelResponse()

    def DropModel(self, request, timeout=None):
        replies, _ = self._all("DropModel", request, timeout)
        # Every replica has forgotten it when this returns: one that still named it would have the next
        # ingest write the model again (refused: it is no longer held).
        for shard, reply in zip(self.shards, replies, strict=True):
            if len(shard.stubs) > 1:
                shard.wait_served(reply.journal_seq, timeout)
        return index_pb2.DropModelResponse(dropped_tiles=sum(r.dropped_tiles for r in replies))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for shard in self.shards:
            shard.close()


def connect(
    targets, credentials=None, default_tenant: str = tenancy.DEFAULT
) -> tuple[ShardedIndex, list[list[RotatingStub]]]:
    """A ShardedIndex over SMILY_INDEX_TARGETS-style targets ("a1|a2" per shard)
    and its replicas' stubs, one list per shard. credentials: tls.ClientCredentials
    (each replica's channel is dialled again when they are renewed), None for plaintext."""
    names = [[t.strip() for t in target.split(REPLICA_SEPARATOR) if t.strip()] for target in targets]
    stubs = [[RotatingStub(t, credentials, index_pb2_grpc.IndexServiceStub) for t in replicas] for replicas in names]
    balanced = [[t.startswith(BALANCED_SCHEMES) for t in replicas] for replicas in names]
    return ShardedIndex(stubs, balanced, default_tenant), stubs


class _Done:
    """A call already made, shaped like a future: an error surfaces at result()."""

    def __init__(self, fn, *args):
        try:
            self._value, self._error = fn(*args), None
        except BaseException as exc:
            self._value, self._error = None, exc

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value
