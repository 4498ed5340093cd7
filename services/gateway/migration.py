"""MigrateIndex: every slide of the index re-embedded with another model, in the background.

Searches go on with the serving model throughout: the new model's vectors go
into their own FAISS index beside it (the index holds vectors per model), and
only a cutover (CutoverIndex: a journal entry per shard) makes them serve.
Each slide is re-embedded from the source the index recorded for it, with
the index's tiling record, as one commit of the new model; a slide whose
source is gone is FAILED_PRECONDITION in the operation's list and the others
go on. Ingests meanwhile write both models and deletes remove from both
(ingest.py, the index), so a slide added or deleted during the migration is
neither missing nor resurrected at cutover. The operation is published like
an ingest's (operations.py), so any replica answers GetOperation and takes
a cancel. Two brakes leave the embedders and the index to queries: a rate
(max_tiles_per_s), and a p95 guard that pauses the re-embedding while this
gateway's search p95 is above GUARD_RATIO times what it was when the
migration started.

A migration survives its gateway: what it is lives in the system of record,
under a lease (the index's LeaseMigration) that the running gateway renews.
Every gateway watches the lease; when it expires (the runner died), one
takes it and resumes the operation under the same id. What is left is what
the index lacks (slides without the target model's tiles), so a slide
committed before the runner died is not embedded again. Before it completes,
it lists what the index lacks once more: a slide an ingest committed without
the new model (it began before the migration held it) is re-embedded then,
not left missing.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable

from smily.common import tenancy
from smily.common.errors import FailedPrecondition, NotFound, status_of
from smily.gateway.v1 import gateway_pb2
from smily.index.v1 import index_pb2
from smily.tiler.v1 import tiler_pb2

from .backends import BackendError, Backends
from .indexing import SlideSource, generation_for, index_slide
from .ingest import Cancelled, _copy
from .models import Models
from .operations import FINISHED, SharedOperations
from .tilings import IndexTiling

log = logging.getLogger("smily.migration")

State = gateway_pb2.OperationState
# Slides listed per index call.
PAGE = 200
# The runner's lease on the migration, renewed every third of it; how often each gateway looks for an
# expired one to resume.
LEASE_S = 10.0
WATCH_S = 2.0


class Lost(Exception):
    """Another gateway took the migration's lease (this one stalled past it): stop without a word."""


# Search p95 above this multiple of the one before the migration pauses it, GUARD_PAUSE_S at a time.
GUARD_RATIO = 1.5
GUARD_PAUSE_S = 0.5
# The p95 is taken over the searches of the last LATENCY_WINDOW_S (at most LATENCY_MAX of them), and
# trusted from LATENCY_MIN_SAMPLES on: with no recent searches there is nothing to protect.
LATENCY_WINDOW_S, LATENCY_MAX, LATENCY_MIN_SAMPLES = 30.0, 200, 20


class Latencies:
    """The gateway's recent search latencies, for the p95 guard."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: collections.deque[tuple[float, float]] = collections.deque(maxlen=LATENCY_MAX)

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seen.append((time.monotonic(), seconds))

    def p95(self) -> float | None:
        """None with fewer than LATENCY_MIN_SAMPLES searches in the window."""
        since = time.monotonic() - LATENCY_WINDOW_S
        with self._lock:
            recent = sorted(s for at, s in self._seen if at >= since)
        if len(recent) < LATENCY_MIN_SAMPLES:
            return None
        return recent[int(0.95 * (len(recent) - 1))]


class Throttle:
    """At most `per_s` tiles a second on average (0: no limit), and no work while search p95 is above
    GUARD_RATIO times `latencies`' p95 at the start (none then: no guard)."""

    def __init__(self, per_s: float, latencies: Latencies, stop: Callable[[], None] = lambda: None):
        self._per_s, self._start, self._spent = per_s, time.monotonic(), 0
        self._latencies, self._stop = latencies, stop
        self._baseline = latencies.p95()

    def spend(self, tiles: int) -> float:
        """After a batch of `tiles`: sleeps as the brakes say; returns how long the p95 guard paused.
        `stop` is called between pauses (a cancellation point)."""
        self._spent += tiles
        if self._per_s > 0:
            ahead = self._spent / self._per_s - (time.monotonic() - self._start)
            if ahead > 0:
                time.sleep(ahead)
        paused = 0.0
        while self._over():
            self._stop()
            time.sleep(GUARD_PAUSE_S)
            paused += GUARD_PAUSE_S
        if paused:
            self._start += paused  # the pause is no debt the rate should make up
        return paused

    def _over(self) -> bool:
        now = self._latencies.p95()
        return self._baseline is not None and now is not None and now > GUARD_RATIO * self._baseline


class Migrator:
    def __init__(
        self,
        backends: Backends,
        tilings: IndexTiling,
        models: Models,
        shared: SharedOperations,
        batch: int,
        default_tenant: str,
        latencies: Latencies,
        refit: Callable[[str, str], list[str]],
    ):
        self._refit = refit  # (from model, to model) -> concepts not refitted (refit.py)
        self._b, self._tilings, self._models, self._shared = backends, tilings, models, shared
        self._latencies = latencies
        self._batch, self._default_tenant = batch, default_tenant
        self._lock = threading.Lock()
        self._ops: dict[str, gateway_pb2.Operation] = {}
        self._starters: dict[str, frozenset[str]] = {}
        self._owner = uuid.uuid4().hex  # this gateway process, as the lease knows it
        self._lost: set[str] = set()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="migration-watch", daemon=True).start()

    # -- the operation -------------------------------------------------------
    def start(
        self, model_id: str, max_tiles_per_s: float, cutover: bool, tenant: str, starter: str
    ) -> gateway_pb2.Operation:
        timeout = self._b.timeout()
        serving, _ = self._models.current(timeout)
        if model_id == serving:
            raise FailedPrecondition(f"model {model_id} already serves the index")
        _, info = self._b.embedder_for(model_id, timeout)  # none serves it: fail the call, not the operation
        record = dict(
            operation_id=uuid.uuid4().hex,
            model_id=model_id,
            max_tiles_per_s=max_tiles_per_s,
            cutover=cutover,
            tenant=tenant,
            starters=[starter],
        )
        with self._lock:
            held = self._lease(json.dumps(record))
            if held is not None:
                raise FailedPrecondition(f"migration {held['operation_id']} is running: cancel it or wait")
            # Held from now on: every ingest writes it too, so the slides listed below are all it misses.
            self._b.index.AddModel(
                index_pb2.AddModelRequest(model_id=model_id, dim=info.embedding_dim), timeout=timeout
            )
            self._models.changed()
        log.info("migration started", extra={"operation_id": record["operation_id"], "model_id": model_id})
        return self._launch(record)

    def _launch(self, record: dict) -> gateway_pb2.Operation:
        """Run (or resume) the migration the record describes, under its operation id."""
        op = gateway_pb2.Operation(
            operation_id=record["operation_id"],
            tenant=record["tenant"],
            model_id=record["model_id"],
            state=State.OPERATION_STATE_RUNNING,
            progress=gateway_pb2.IngestProgress(),
            updated_at=time.time(),
        )
        with self._lock:
            self._ops[op.operation_id] = op
            self._starters[op.operation_id] = frozenset(record["starters"])
        threading.Thread(target=self._run, args=(record,), name="migrate", daemon=True).start()
        return self._publish(op.operation_id)

    def _lease(self, record: str) -> dict | None:
        """Take or renew the lease with this record (empty: end it); None, or the record of the one holding it."""
        reply = self._b.index.LeaseMigration(
            index_pb2.LeaseMigrationRequest(owner=self._owner, lease_s=LEASE_S if record else 0.0, record=record),
            timeout=self._b.timeout(),
        )
        return None if reply.granted else json.loads(reply.record or "{}")

    def _watch(self) -> None:
        """Resume a migration whose runner stopped renewing its lease."""
        while not self._stop.wait(WATCH_S):
            try:
                if self.current() is not None:
                    continue
                reply = self._b.index.LeaseMigration(index_pb2.LeaseMigrationRequest(), timeout=self._b.timeout())
                if not (reply.record and reply.expired):
                    continue
                with self._lock:
                    if self._lease(reply.record) is not None:
                        continue  # another gateway was quicker
                record = json.loads(reply.record)
                log.warning(
                    "resuming a migration whose gateway stopped", extra={"operation_id": record["operation_id"]}
                )
                self._launch(record)
            except Exception:
                log.exception("looking for a migration to resume failed; retrying")

    def close(self) -> None:
        self._stop.set()

    def running(self) -> gateway_pb2.Operation | None:
        """The migration this gateway runs (caller holds the lock, or reads a snapshot)."""
        return next((_copy(o) for o in self._ops.values() if o.state not in FINISHED), None)

    def current(self) -> gateway_pb2.Operation | None:
        with self._lock:
            return self.running()

    def anywhere(self) -> gateway_pb2.Operation | None:
        """The running migration, whichever gateway runs it (its record in the index names it)."""
        mine = self.current()
        if mine is not None:
            return mine
        reply = self._b.index.LeaseMigration(index_pb2.LeaseMigrationRequest(), timeout=self._b.timeout())
        if not reply.record:
            return None
        found = self._shared.fetch(json.loads(reply.record)["operation_id"])
        return found[0] if found is not None and found[0].state not in FINISHED else None

    def get(self, operation_id: str) -> gateway_pb2.Operation | None:
        """A migration this gateway runs or ran; None otherwise (another replica's is in `shared`)."""
        with self._lock:
            op = self._ops.get(operation_id)
            return _copy(op) if op is not None else None

    def starters(self, operation_id: str) -> frozenset[str]:
        with self._lock:
            return self._starters.get(operation_id, frozenset())

    def cancel(self, operation_id: str) -> gateway_pb2.Operation | None:
        with self._lock:
            op = self._ops.get(operation_id)
            if op is None:
                return None
            if op.state not in FINISHED:
                op.cancel_requested = True
        log.info("migration cancel requested", extra={"operation_id": operation_id})
        return self._publish(operation_id)

    def _publish(self, operation_id: str) -> gateway_pb2.Operation:
        with self._lock:
            op = self._ops[operation_id]
            op.updated_at = time.time()
            snapshot, starters = _copy(op), self._starters[operation_id]
        self._shared.publish(snapshot, starters)
        return snapshot

    def _check_cancel(self, operation_id: str) -> None:
        with self._lock:
            if operation_id in self._lost:
                raise Lost()
            requested = self._ops[operation_id].cancel_requested
        if requested or self._shared.cancel_requested(operation_id):
            raise Cancelled()

    # -- the work -------------------------------------------------------------
    def _run(self, record: dict) -> None:
        operation_id, model_id = record["operation_id"], record["model_id"]
        throttle = Throttle(record["max_tiles_per_s"], self._latencies, lambda: self._check_cancel(operation_id))
        done = threading.Event()
        threading.Thread(target=self._renew, args=(record, done), name="migration-lease", daemon=True).start()
        try:
            tried: set[tuple[str, str]] = set()
            # The first listing is what the index lacked at the start; each later one catches a slide
            # committed meanwhile without the model (an ingest that began before the model was held, so
            # did not write it), until a listing finds none this run has not tried.
            while slides := [s for s in self._slides(model_id) if (s.tenant, s.slide_id) not in tried]:
                tried.update((s.tenant, s.slide_id) for s in slides)
                with self._lock:
                    op = self._ops[operation_id]
                    first = len(op.slides)
                    op.progress.tiles_total += sum(s.tile_count for s in slides)
                    for s in slides:
                        op.slides.add(slide_id=self._name(s), state=State.OPERATION_STATE_QUEUED)
                self._publish(operation_id)
                for i, s in enumerate(slides, first):
                    self._check_cancel(operation_id)
                    self._one(operation_id, i, s, model_id, throttle)
            if record["cutover"]:
                switched = self.cutover(model_id, allow_missing=False)
                with self._lock:  # shown by GetOperation (`smily status`), not only logged
                    self._ops[operation_id].unrefitted_concepts.extend(switched.unrefitted_concepts)
            self._finish(operation_id, State.OPERATION_STATE_SUCCEEDED)
        except Lost:
            log.warning("migration taken over by another gateway", extra={"operation_id": operation_id})
            with self._lock:  # its state is the new runner's to tell (through `shared`)
                self._ops.pop(operation_id, None)
            return
        except Cancelled:
            self._finish(operation_id, State.OPERATION_STATE_CANCELLED)
        except Exception as exc:
            code, message = status_of(exc)
            self._finish(operation_id, State.OPERATION_STATE_FAILED, code.name, message)
        finally:
            done.set()
        try:
            self._lease("")  # finished: nothing to resume
        except Exception:
            log.exception("ending the migration's lease failed; it expires by itself")

    def _renew(self, record: dict, done: threading.Event) -> None:
        """Renew the lease while the migration runs; losing it stops the run (another gateway has it)."""
        text = json.dumps(record)
        while not done.wait(LEASE_S / 3):
            try:
                if self._lease(text) is not None:
                    with self._lock:
                        self._lost.add(record["operation_id"])
                    return
            except Exception:
                log.warning("renewing the migration's lease failed; retrying", extra={"op": record["operation_id"]})

    def _finish(self, operation_id: str, state: int, code: str = "", message: str = "") -> None:
        with self._lock:
            op = self._ops[operation_id]
            op.state, op.error_code, op.error_message = state, code, message  # type: ignore[assignment]
            for entry in op.slides:
                if entry.state == State.OPERATION_STATE_QUEUED and state == State.OPERATION_STATE_CANCELLED:
                    entry.state = State.OPERATION_STATE_CANCELLED
        self._publish(operation_id)
        log.info("migration finished", extra={"operation_id": operation_id, "state": State.Name(state)})

    def _slides(self, model_id: str) -> list[index_pb2.Slide]:
        """Every slide of the index (of every tenant, in key order) that lacks the model: a migration run
        again re-embeds only what the last one left (cancelled, or failed)."""
        out, token = [], ""
        while True:
            page = self._b.index.ListSlides(
                index_pb2.ListSlidesRequest(
                    page_size=PAGE, page_token=token, all_tenants=True, lacking_model_id=model_id
                ),
                timeout=self._b.timeout(),
            )
            out += page.slides
            token = page.next_page_token
            if not token:
                return out

    def _name(self, s: index_pb2.Slide) -> str:
        """A slide as the operation names it: its id, after its tenant's name when not the default's."""
        tenant = s.tenant or self._default_tenant
        return s.slide_id if tenant == self._default_tenant else tenancy.key(tenant, s.slide_id)

    def _one(self, operation_id: str, i: int, s: index_pb2.Slide, model_id: str, throttle: Throttle) -> None:
        """Re-embed one slide; its outcome goes into its entry, never out of the migration."""
        timeout = self._b.timeout()
        self._entry(operation_id, i, state=State.OPERATION_STATE_RUNNING)
        done = [0]

        def batch(n: int) -> None:
            with self._lock:
                op = self._ops[operation_id]
                op.slides[i].progress.tiles_indexed = n
                op.progress.tiles_indexed += n - done[0]
                op.progress.tiles_embedded = op.progress.tiles_indexed
            throttle.spend(n - done[0])
            done[0] = n
            self._publish(operation_id)

        try:
            try:
                self._b.tiler.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=s.source), timeout=timeout)
            except BackendError as exc:
                raise FailedPrecondition("the slide's recorded source can no longer be read") from exc
            embedder, _ = self._b.embedder_for(model_id, timeout)
            tiling, _ = self._tilings.current(timeout)
            index_slide(
                self._b,
                SlideSource(s.tenant, s.slide_id, s.source, dict(s.metadata), s.slide_mpp),
                model_id,
                embedder,
                tiling,
                generation_for(operation_id + "-" + str(i), model_id, serving=False),
                self._batch,
                timeout,
                register=True,
                before_batch=lambda: self._check_cancel(operation_id),
                on_batch=batch,
            )
        except Cancelled:
            raise
        except Exception as exc:
            code, message = status_of(exc)
            if code.name == "NOT_FOUND":  # deleted while re-embedded: the delete removed it from both models
                self._entry(operation_id, i, state=State.OPERATION_STATE_CANCELLED, error_message="deleted meanwhile")
                return
            self._entry(
                operation_id, i, state=State.OPERATION_STATE_FAILED, error_code=code.name, error_message=message
            )
            log.warning(
                "slide not migrated", extra={"operation_id": operation_id, "slide_id": s.slide_id, "code": code.name}
            )
            return
        self._entry(operation_id, i, state=State.OPERATION_STATE_SUCCEEDED)

    def _entry(self, operation_id: str, i: int, **fields) -> None:
        with self._lock:
            entry = self._ops[operation_id].slides[i]
            for name, value in fields.items():
                setattr(entry, name, value)
        self._publish(operation_id)

    # -- cutover and drop -----------------------------------------------------------
    def cutover(self, model_id: str, allow_missing: bool) -> gateway_pb2.CutoverIndexResponse:
        """Serve another held model (empty: the one other held model); refused while slides are missing in it."""
        timeout = self._b.timeout()
        serving, held = self._models.current(timeout)
        others = [m for m in held if m != serving]
        if not model_id:
            if not others:
                raise NotFound("the index holds no model besides the serving one: migrate to one first")
            if len(others) > 1:
                raise FailedPrecondition(
                    f"the index holds {len(others)} models besides the serving one: name the one to serve"
                )
            model_id = others[0]
        if model_id not in held:
            raise NotFound(f"the index holds no vectors of model {model_id}: migrate to it first")
        reply = self._b.index.ListModels(index_pb2.ListModelsRequest(missing_model_id=model_id), timeout=timeout)
        missing = [self._name(s) for s in reply.missing_slides]
        if reply.missing_count and not allow_missing:
            raise FailedPrecondition(
                f"{reply.missing_count} slides are missing in model {model_id} ({', '.join(missing)}"
                f"{', ...' if reply.missing_count > len(missing) else ''}): finish the migration, or allow missing"
            )
        # Before the switch, so that no search meets a concept not yet fitted for the new model.
        unrefitted = self._refit(serving, model_id) if model_id != serving else []
        self._b.index.SetServingModel(index_pb2.SetServingModelRequest(model_id=model_id), timeout=timeout)
        self._models.changed()
        log.info(
            "index cut over",
            extra={
                "model_id": model_id,
                "previous": serving,
                "missing": reply.missing_count,
                "unrefitted_concepts": len(unrefitted),
            },
        )
        return gateway_pb2.CutoverIndexResponse(
            model_id=model_id,
            previous_model_id=serving,
            missing_slide_ids=missing,
            missing_count=reply.missing_count,
            unrefitted_concepts=unrefitted,
        )

    def drop(self, model_id: str) -> int:
        timeout = self._b.timeout()
        running = self.current()
        if running is not None and running.model_id == model_id:
            raise FailedPrecondition(f"migration {running.operation_id} is filling model {model_id}: cancel it first")
        reply = self._b.index.DropModel(index_pb2.DropModelRequest(model_id=model_id), timeout=timeout)
        self._models.changed()
        return reply.dropped_tiles
