"""Ingest as an operation: the embedder embeds the tiler's tiles (batches) -> index, in the background.

IngestSlide returns an operation at once; a bounded pool runs the work and
the rest wait in its queue. Tiles are staged under a fresh generation and
published by one CommitSlide, so re-ingesting replaces a slide atomically.
Operations are published for the other gateway replicas (operations.py).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import prometheus_client as prom

from smily.common import tenancy
from smily.common.config import GatewaySettings, LimitsSettings
from smily.common.errors import Busy, NotFound, status_of
from smily.gateway.v1 import gateway_pb2
from smily.tiler.v1 import tiler_pb2

from . import dicom
from .backends import Backends
from .indexing import SlideSource, generation_for, index_slide
from .models import Models
from .operations import FINISHED, HEARTBEAT_S, SharedOperations, failed_unavailable
from .streaming import check_tiling
from .tilings import IndexTiling, params

log = logging.getLogger("smily.ingest")

INGESTS = prom.Counter("smily_ingests_total", "Finished slide ingests", ["result"])
TILES = prom.Counter("smily_ingested_tiles_total", "Tiles embedded and indexed")

State = gateway_pb2.OperationState
MAX_OPERATIONS_KEPT = 10000


class Cancelled(Exception):
    pass


class Ingestor:
    def __init__(
        self,
        backends: Backends,
        tilings: IndexTiling,
        shared: SharedOperations,
        gateway: GatewaySettings,
        bounds: LimitsSettings,
        models: Models,
    ):
        self._b = backends
        self._models = models
        self._case_key = gateway.case_key
        self._tilings = tilings
        self._batch = gateway.embed_batch
        self._max_queued = bounds.max_queued_ingests
        self._max_queued_per_tenant = bounds.max_queued_ingests_per_tenant
        self._max_tiles = bounds.max_tiles_per_slide
        self._sources: dict[str, str] = {}  # operation id -> source, to tell ingests of one id apart
        self._starters: dict[str, frozenset[str]] = {}  # operation id -> the callers who asked for it
        self._pool = ThreadPoolExecutor(max_workers=gateway.max_concurrent_ingests, thread_name_prefix="ingest")
        self._lock = threading.Lock()
        self._ops: dict[str, gateway_pb2.Operation] = {}  # the operations this replica runs
        # The tile stream of each running ingest, so a cancel stops it at once.
        self._streams: dict[str, grpc.Future] = {}
        self._shared = shared
        # Snapshots reach the index in the order they were taken: a late heartbeat
        # never overwrites a finished state.
        self._publish_lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, name="ingest-heartbeat", daemon=True).start()

    def start(
        self,
        source: str,
        slide_id: str,
        metadata: dict[str, str],
        timeout: float,
        slide_mpp: float = 0.0,
        starter: str = "",
        tenant: str = tenancy.DEFAULT,
    ) -> gateway_pb2.Operation:
        """Queue an ingest of `source` into `tenant` (the caller's). starter: the caller's identity
        (Caller.key); it may follow the operation with the ingest role alone."""
        # Validates the name and reads the fingerprint now, so bad input fails the call itself.
        info = self._b.tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=source), timeout=timeout).info
        tiling, _ = self._tilings.current(timeout)
        check_tiling(info, slide_mpp, params(tiling), self._max_tiles)  # before anything is queued
        slide_id = slide_id or info.dicom.series_instance_uid or default_slide_id(info.fingerprint, source)
        # A DICOMweb series brings its identifiers; the caller's metadata wins.
        metadata = {**dicom.slide_metadata(info.dicom, self._case_key), **metadata}
        with self._lock:
            queued = mine = 0
            for op in self._ops.values():
                if op.state not in FINISHED and not op.cancel_requested:
                    same = op.tenant == tenant and op.slide_id == slide_id
                    if same and self._sources.get(op.operation_id) == source:
                        # The same slide from the same file is already on its way: this caller may follow it too.
                        self._starters[op.operation_id] |= {starter}
                        return _copy(op)
                    waiting = op.state == State.OPERATION_STATE_QUEUED
                    queued, mine = queued + waiting, mine + (waiting and op.tenant == tenant)
            if queued >= self._max_queued:
                raise Busy(f"{queued} ingests are waiting on this gateway, the most it queues", retry_after_s=60)
            if self._max_queued_per_tenant and mine >= self._max_queued_per_tenant:
                # One tenant's bulk ingest leaves the other tenants their slots.
                raise Busy(f"{mine} ingests of this tenant are waiting, the most one tenant queues", retry_after_s=60)
            op = gateway_pb2.Operation(
                operation_id=uuid.uuid4().hex,
                tenant=tenant,
                slide_id=slide_id,
                state=State.OPERATION_STATE_QUEUED,
                progress=gateway_pb2.IngestProgress(),
            )
            self._ops[op.operation_id] = op
            self._sources[op.operation_id] = source
            self._starters[op.operation_id] = frozenset({starter})
            self._trim()
        log.info("ingest queued", extra={"operation_id": op.operation_id, "slide_id": slide_id})
        snapshot = self._publish(op.operation_id)
        self._pool.submit(self._run, op.operation_id, source, slide_id, dict(metadata), slide_mpp)
        return snapshot

    def get(self, operation_id: str) -> gateway_pb2.Operation:
        with self._lock:
            op = self._ops.get(operation_id)
            if op is not None:
                return _copy(op)
        return self._elsewhere(operation_id)

    def _elsewhere(self, operation_id: str) -> gateway_pb2.Operation:
        """An operation another replica runs (or ran)."""
        found = self._shared.fetch(operation_id)
        if found is None:
            raise NotFound(f"no operation {operation_id!r}")
        return found[0]

    def starters(self, operation_id: str) -> frozenset[str]:
        """Who started an operation (here or on another replica); empty when unknown."""
        with self._lock:
            if operation_id in self._starters:
                return self._starters[operation_id]
        found = self._shared.fetch(operation_id)
        return found[1] if found is not None else frozenset()

    def cancel(self, operation_id: str) -> gateway_pb2.Operation:
        stream = None
        with self._lock:
            op = self._ops.get(operation_id)
            if op is not None and op.state not in FINISHED:
                op.cancel_requested = True
                if op.state == State.OPERATION_STATE_QUEUED:
                    op.state = State.OPERATION_STATE_CANCELLED  # its worker will see it and not start
                stream = self._streams.get(operation_id)
        if op is None:  # run by another replica: it stops the ingest between two batches
            op = self._elsewhere(operation_id)
            if op.state not in FINISHED:
                self._shared.request_cancel(operation_id)
                op.cancel_requested = True
            log.info("ingest cancel requested", extra={"operation_id": operation_id})
            return op
        log.info("ingest cancel requested", extra={"operation_id": operation_id})
        if stream is not None:
            stream.cancel()
        return self._publish(operation_id)

    def _check_cancel(self, operation_id: str) -> None:
        with self._lock:
            requested = self._ops[operation_id].cancel_requested
        if not requested and self._shared.cancel_requested(operation_id):  # asked on another replica
            self.cancel(operation_id)
            requested = True
        if requested:
            raise Cancelled()

    def _update(self, operation_id: str, **fields) -> None:
        with self._lock:
            op = self._ops[operation_id]
            for name, value in fields.items():
                if name in ("tiles_total", "tiles_embedded", "tiles_indexed"):
                    setattr(op.progress, name, value)
                else:
                    setattr(op, name, value)
        self._publish(operation_id)

    def _publish(self, operation_id: str) -> gateway_pb2.Operation:
        """Stamp the operation and show it to the other replicas; returns a copy."""
        with self._publish_lock:
            with self._lock:
                op = self._ops[operation_id]
                op.updated_at = time.time()
                snapshot = _copy(op)
                starters = self._starters.get(operation_id, frozenset())
            self._shared.publish(snapshot, starters)
        return snapshot

    def _heartbeat(self) -> None:
        """Refresh every unfinished operation (a queued one may wait long), and
        pick up cancels asked on other replicas between batches."""
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                unfinished = [k for k, o in self._ops.items() if o.state not in FINISHED]
            for operation_id in unfinished:
                if self._shared.cancel_requested(operation_id):
                    self.cancel(operation_id)
                else:
                    self._publish(operation_id)

    def _trim(self) -> None:
        done = [k for k, o in self._ops.items() if o.state in FINISHED]
        for key in done[: max(0, len(self._ops) - MAX_OPERATIONS_KEPT)]:
            del self._ops[key]
            self._sources.pop(key, None)
            self._starters.pop(key, None)

    def _run(self, op_id: str, source: str, slide_id: str, metadata: dict[str, str], slide_mpp: float) -> None:
        if self._shared.cancel_requested(op_id):  # cancelled on another replica while queued
            self.cancel(op_id)
        with self._lock:
            op = self._ops.get(op_id)
            if op is None or op.cancel_requested:
                INGESTS.labels("cancelled").inc()
                return
            op.state = State.OPERATION_STATE_RUNNING
        self._publish(op_id)
        try:
            model_id = self._ingest(op_id, source, slide_id, metadata, slide_mpp)
        except Exception as exc:
            with self._lock:
                self._streams.pop(op_id, None)
                cancelled = self._ops[op_id].cancel_requested
                if self._ops[op_id].state in FINISHED:  # failed by close(): the gateway is stopping
                    return
            if cancelled:  # staged tiles stay uncommitted; the index drops stale ones
                self._update(op_id, state=State.OPERATION_STATE_CANCELLED)
                INGESTS.labels("cancelled").inc()
                log.info("ingest cancelled", extra={"operation_id": op_id, "slide_id": slide_id})
                return
            status, message = status_of(exc)
            code = status.name
            self._update(op_id, state=State.OPERATION_STATE_FAILED, error_code=code, error_message=message)
            INGESTS.labels("failed").inc()
            log.warning("ingest failed", extra={"operation_id": op_id, "slide_id": slide_id, "code": code})
            return
        self._update(op_id, state=State.OPERATION_STATE_SUCCEEDED, model_id=model_id)
        INGESTS.labels("succeeded").inc()
        log.info("ingest done", extra={"operation_id": op_id, "slide_id": slide_id})

    def _ingest(self, op_id: str, source: str, slide_id: str, metadata: dict[str, str], slide_mpp: float) -> str:
        """Write the slide for the serving model, then for each other model the index holds (a migration's
        target, or the model kept for rollback), so no model misses it; returns the serving model."""
        b, timeout = self._b, self._b.default_timeout
        with self._lock:
            tenant = self._ops[op_id].tenant
        slide = SlideSource(tenant, slide_id, source, metadata, slide_mpp)
        # The index's record, or this gateway's settings for the first ingest (which records them).
        tiling, _ = self._tilings.current(timeout)
        serving, held = self._models.current(timeout)

        def registered(stream) -> None:
            with self._lock:
                self._streams[op_id] = stream
            self._check_cancel(op_id)  # a cancel that came before the stream was registered

        def indexed(n: int) -> None:
            with self._lock:
                TILES.inc(n - self._ops[op_id].progress.tiles_indexed)
            self._update(op_id, tiles_embedded=n, tiles_indexed=n)

        models = list(held)  # grows by a model held meanwhile (below)
        for model_id in models:
            try:
                embedder, _ = b.embedder_for(model_id, timeout)
            except NotFound:
                if model_id == serving:
                    raise
                # A cutover to it names the slide as missing; the migration that added the model re-embeds it.
                log.warning("no embedder for a held model; slide not written for it", extra={"model_id": model_id})
                continue
            if model_id == serving:  # the operation's progress, and its cancellation points
                index_slide(
                    b,
                    slide,
                    model_id,
                    embedder,
                    tiling,
                    generation_for(op_id, model_id, serving=True),
                    self._batch,
                    timeout,
                    on_stream=registered,
                    on_total=lambda n: self._update(op_id, tiles_total=n),
                    before_batch=lambda: self._check_cancel(op_id),
                    on_batch=indexed,
                    before_commit=lambda: self._check_cancel(op_id),  # after CommitSlide the slide is in
                )
            else:  # the slide is in: the other models follow it, whatever a cancel asks now
                index_slide(
                    b, slide, model_id, embedder, tiling, generation_for(op_id, model_id, False), self._batch, timeout
                )
            with self._lock:
                self._streams.pop(op_id, None)
            if model_id == serving:
                # A model the index came to hold while the slide was written (a migration started since,
                # which may have listed the slides before this one was in): written too, not missed.
                models += [m for m in self._models.current(timeout, fresh=True)[1] if m not in models]
        return serving

    def close(self) -> None:
        """The gateway is stopping: what it has not finished fails now, visibly to
        every replica, instead of looking alive until it goes stale."""
        self._stop.set()
        with self._lock:
            unfinished = [k for k, o in self._ops.items() if o.state not in FINISHED]
            streams = [self._streams.get(k) for k in unfinished]
            for k in unfinished:
                self._ops[k].cancel_requested = True  # its worker stops at the next batch
                failed_unavailable(self._ops[k], "the gateway running this ingest was stopped")
        for stream in streams:
            if stream is not None:
                stream.cancel()
        for operation_id in unfinished:
            self._publish(operation_id)
        self._pool.shutdown(wait=False, cancel_futures=True)


def default_slide_id(fingerprint: str, source: str) -> str:
    """An opaque id from the slide's content (file names can hold accession numbers)."""
    digest = fingerprint or hashlib.sha256(source.encode()).hexdigest()
    return "s-" + digest[:16]


def _copy(op: gateway_pb2.Operation) -> gateway_pb2.Operation:
    out = gateway_pb2.Operation()
    out.CopyFrom(op)
    return out
