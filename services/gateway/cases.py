"""IngestCase: every whole-slide series of a case (accession number) ingested as a slide.

The tiler finds the series (QIDO-RS in a configured DICOMweb archive; the
gateway never talks DICOMweb itself). Each series becomes an ordinary slide
ingest (ingest.py) with its own operation, so the slides share its queue,
de-duplication and atomic commit; the case's operation lists them with their
progress. A watcher refreshes each running case from its slides and
publishes it like any operation, so every replica answers GetOperation.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import grpc

from smily.common.errors import NotFound, ServiceError, status_of
from smily.gateway.v1 import gateway_pb2
from smily.tiler.v1 import tiler_pb2

from .backends import Backends
from .ingest import Ingestor, _copy
from .operations import FINISHED, HEARTBEAT_S

log = logging.getLogger("smily.cases")

State = gateway_pb2.OperationState
WATCH_S = 0.5
MAX_CASES_KEPT = 1000


class CaseIngestor:
    def __init__(self, backends: Backends, ingestor: Ingestor, shared):
        self._b = backends
        self._ingest = ingestor
        self._shared = shared
        self._lock = threading.Lock()
        self._cases: dict[str, gateway_pb2.Operation] = {}
        self._published: dict[str, float] = {}
        self._starters: dict[str, frozenset[str]] = {}  # operation id -> the caller who started it
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="case-watch", daemon=True).start()

    def start(
        self,
        accession: str,
        archive: str,
        slide_ids: dict[str, str],
        metadata: dict[str, str],
        tenant: str,
        starter: str = "",
    ) -> gateway_pb2.Operation:
        """The case's operation, at once: the archive is searched in the background, never
        while the caller waits. An archive may call this from its own event handler and
        answer no request until the call returns (Orthanc runs its Lua callbacks under a
        lock that every request to its REST API and DICOMweb takes)."""
        op = gateway_pb2.Operation(
            operation_id=uuid.uuid4().hex,
            tenant=tenant,  # its slides land in the caller's tenant
            state=State.OPERATION_STATE_RUNNING,
            progress=gateway_pb2.IngestProgress(),
        )
        with self._lock:
            self._cases[op.operation_id] = op
            self._starters[op.operation_id] = frozenset({starter})
            self._trim()
        threading.Thread(
            target=self._find,
            args=(op.operation_id, accession, archive, slide_ids, metadata, tenant),
            name="case-find",
            daemon=True,
        ).start()
        # The accession number is an identifier: logs carry the operation id only.
        log.info("case ingest started", extra={"operation_id": op.operation_id})
        return self._refresh(op.operation_id)

    def _find(
        self,
        operation_id: str,
        accession: str,
        archive: str,
        slide_ids: dict[str, str],
        metadata: dict[str, str],
        tenant: str,
    ) -> None:
        """QIDO-RS (through the tiler) for the case's series, then one slide ingest each;
        no series, or an archive error, fails the case with its code."""
        timeout = self._b.timeout()
        entries = []
        try:
            found = self._b.tiler.ListCaseSeries(
                tiler_pb2.ListCaseSeriesRequest(accession_number=accession, archive=archive), timeout=timeout
            ).series
            if not found:
                raise NotFound(
                    "the archive has no whole-slide series (modality SM, ImageType VOLUME) with that accession number"
                )
        except Exception as exc:
            with self._lock:
                op = self._cases[operation_id]
                op.state = State.OPERATION_STATE_FAILED
                code, op.error_message = status_of(exc)
                op.error_code = code.name
            self._refresh(operation_id, changed=True)
            return
        for series in found:
            entry = gateway_pb2.SlideOperation(
                slide_id=slide_ids.get(series.series_instance_uid) or series.series_instance_uid,
                study_instance_uid=series.study_instance_uid,
                series_instance_uid=series.series_instance_uid,
            )
            try:  # one unreadable series fails its own entry, not the case
                child = self._ingest.start(
                    series.source,
                    entry.slide_id,
                    metadata,
                    timeout,
                    starter=next(iter(self.starters(operation_id))),
                    tenant=tenant,
                )
                entry.operation_id, entry.state = child.operation_id, child.state
            except (ServiceError, grpc.RpcError) as exc:
                entry.state = State.OPERATION_STATE_FAILED
                code, entry.error_message = status_of(exc)
                entry.error_code = code.name
            entries.append(entry)
        with self._lock:
            op = self._cases[operation_id]
            op.slides.extend(entries)  # all at once: the case is not summarised from some of its slides
            cancelled = op.cancel_requested
        log.info("case series found", extra={"operation_id": operation_id, "slides": len(entries)})
        if cancelled:  # asked while the archive was searched
            self.cancel(operation_id)
        self._refresh(operation_id, changed=True)

    def starters(self, operation_id: str) -> frozenset[str]:
        """Who started a case this replica runs; empty when it runs no such case."""
        with self._lock:
            return self._starters.get(operation_id, frozenset())

    def get(self, operation_id: str) -> gateway_pb2.Operation | None:
        """A case this replica runs, or None."""
        with self._lock:
            op = self._cases.get(operation_id)
            return _copy(op) if op is not None else None

    def cancel(self, operation_id: str) -> gateway_pb2.Operation | None:
        with self._lock:
            op = self._cases.get(operation_id)
            if op is None:
                return None
            op.cancel_requested = op.state not in FINISHED
            children = [s.operation_id for s in op.slides if s.operation_id and s.state not in FINISHED]
        for child in children:
            self._ingest.cancel(child)
        log.info("case ingest cancel requested", extra={"operation_id": operation_id})
        return self._refresh(operation_id)

    def _refresh(self, operation_id: str, changed: bool = False) -> gateway_pb2.Operation:
        """Update a case from its slides' operations; publish it when it changed (here
        or, `changed`, before the call) or every heartbeat, and return a copy."""
        with self._lock:
            children = [
                s.operation_id for s in self._cases[operation_id].slides if s.operation_id and s.state not in FINISHED
            ]
        latest = {c: self._ingest.get(c) for c in children}
        with self._lock:
            op = self._cases[operation_id]
            before = op.SerializeToString()
            for entry in op.slides:
                child = latest.get(entry.operation_id)
                if child is not None:
                    entry.state = child.state
                    entry.progress.CopyFrom(child.progress)
                    entry.error_code, entry.error_message = child.error_code, child.error_message
            _summarise(op)
            changed = changed or op.SerializeToString() != before
            if changed or time.time() - self._published.get(operation_id, 0) >= HEARTBEAT_S:
                op.updated_at = time.time()
                self._published[operation_id] = op.updated_at
                snapshot = _copy(op)
                publish = True
            else:
                snapshot, publish = _copy(op), False
            starters = self._starters.get(operation_id, frozenset())
        if publish:
            self._shared.publish(snapshot, starters)
            if snapshot.state in FINISHED and changed:
                log.info(
                    "case ingest finished", extra={"operation_id": operation_id, "state": State.Name(snapshot.state)}
                )
        return snapshot

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_S):
            with self._lock:
                running = [k for k, o in self._cases.items() if o.state not in FINISHED]
            for operation_id in running:
                try:
                    if self._shared.cancel_requested(operation_id):  # asked on another replica
                        self.cancel(operation_id)
                    self._refresh(operation_id)
                except Exception:  # the watcher must outlive any one case
                    log.exception("case refresh failed", extra={"operation_id": operation_id})

    def _trim(self) -> None:
        done = [k for k, o in self._cases.items() if o.state in FINISHED]
        for key in done[: max(0, len(self._cases) - MAX_CASES_KEPT)]:
            del self._cases[key]
            self._published.pop(key, None)
            self._starters.pop(key, None)

    def close(self) -> None:
        self._stop.set()


def _summarise(op: gateway_pb2.Operation) -> None:
    """The case's progress and state from its slides' (none yet while the archive is searched)."""
    if not op.slides:
        return
    for field in ("tiles_total", "tiles_embedded", "tiles_indexed"):
        setattr(op.progress, field, sum(getattr(s.progress, field) for s in op.slides))
    if any(s.state not in FINISHED for s in op.slides):
        return
    failed = [s for s in op.slides if s.state == State.OPERATION_STATE_FAILED]
    if failed:
        op.state = State.OPERATION_STATE_FAILED
        op.error_code = failed[0].error_code
        op.error_message = f"{len(failed)} of {len(op.slides)} slides failed; see slides[] (re-running is safe)"
    elif any(s.state == State.OPERATION_STATE_CANCELLED for s in op.slides):
        op.state = State.OPERATION_STATE_CANCELLED
    else:
        op.state = State.OPERATION_STATE_SUCCEEDED
