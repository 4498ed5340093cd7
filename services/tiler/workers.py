"""A pool of reader processes that can die.

Slide files are untrusted: a crafted one can make a C decoder abort, hang or
run out of memory. All parsing happens in these processes (started with
'spawn', so they share no gRPC threads or locks with the server). A call
gives one idle process one request; if it dies, does not answer within the
timeout or sends a reply that breaks protocol.py, it is killed and replaced
in the background and the caller gets a clear error while the service keeps
serving. A process found dead while idle (the OOM killer, a signal) is
replaced before the request that finds it, which then succeeds. Several
processes also read in parallel on every core, with no GIL between them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
from multiprocessing import reduction

from smily.common.errors import FailedPrecondition, ServiceError, Unavailable

from . import protocol, reader
from .arena import Arena

log = logging.getLogger("smily.tiler.workers")

READY_TIMEOUT_S = 60.0


class _Worker:
    def __init__(self, ctx, log_level: str):
        self.arena = Arena.create()
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=reader.serve, args=(child, self.arena.size, log_level), daemon=True, name="slide-reader"
        )
        self.process.start()
        child.close()
        reduction.send_handle(self.conn, self.arena.fd, self.process.pid)
        # Ready once it has imported OpenSlide: the server only serves after that.
        try:
            ready = self.conn.poll(READY_TIMEOUT_S) and self.conn.recv_bytes(len(reader.READY)) == reader.READY
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError("a slide reader process did not start")

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()
        self.arena.close()


class WorkerPool:
    def __init__(self, size: int, timeout_s: float, log_level: str = "INFO"):
        if size < 1:
            raise ValueError("the tiler needs at least one reader process")
        self._ctx = mp.get_context("spawn")
        self._timeout = timeout_s
        self._log_level = log_level
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self.size = size
        self.replaced = 0  # readers killed and replaced, for tests and logs
        for _ in range(size):
            self._add()

    def _new(self) -> _Worker:
        worker = _Worker(self._ctx, self._log_level)
        with self._lock:
            self._all.add(worker)
        return worker

    def _add(self) -> None:
        self._idle.put(self._new())

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)
            self.replaced += 1

    def _replace(self, worker: _Worker, why: str, path: str) -> None:
        log.error(
            "slide reader replaced",
            extra={"reason": why, "slide_id": reader.slide_id(path), "exitcode": worker.process.exitcode},
        )
        self._discard(worker)
        # Starting a process takes a moment: the caller gets its answer now.
        threading.Thread(target=self._refill, daemon=True).start()

    def _take(self) -> _Worker:
        """An idle reader that is alive: one that died while idle is replaced first."""
        worker = self._idle.get()
        if worker.process.is_alive():
            return worker
        log.error("slide reader died while idle; replaced", extra={"exitcode": worker.process.exitcode})
        self._discard(worker)
        try:
            return self._new()
        except RuntimeError:
            threading.Thread(target=self._refill, daemon=True).start()
            raise Unavailable("no slide reader could be started; try again later") from None

    def _refill(self) -> None:
        while True:
            try:
                return self._add()
            except RuntimeError:
                log.error("slide reader failed to start; retrying")
                time.sleep(1)

    def call(self, op: str, path: str, *args):
        """Run reader.OPS[op](path, *args) in a reader process and return its
        checked result (protocol.parse)."""
        worker = self._take()
        try:
            worker.conn.send_bytes(protocol.request(op, path, args))
            if not worker.conn.poll(self._timeout):
                self._replace(worker, "timeout", path)
                raise Unavailable(
                    f"reading the slide took longer than {self._timeout:g} s and was stopped; "
                    "the file may be damaged, or the tiler overloaded: try again later"
                )
            reply = worker.conn.recv_bytes(protocol.MAX_REPLY_BYTES)
        except (EOFError, OSError):
            self._replace(worker, "died", path)
            raise FailedPrecondition(
                "the slide file crashed the slide reader; it is damaged or not a format OpenSlide "
                "reads safely. The service is still running; check or re-scan the file"
            ) from None
        try:
            # Tiles are copied out of the arena before the reader may overwrite it.
            result = protocol.parse(op, reply, worker.arena, len(args[0]) if op == "tiles" else 0)
        except protocol.Malformed as exc:
            self._replace(worker, f"malformed reply: {exc}", path)
            raise FailedPrecondition("the slide reader sent a malformed reply; the file may be hostile") from None
        except ServiceError:
            self._idle.put(worker)
            raise
        self._idle.put(worker)
        return result

    def close(self) -> None:
        with self._lock:
            workers, self._all = list(self._all), set()
        for w in workers:
            w.kill()
