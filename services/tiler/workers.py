"""A pool of reader processes that can die.

Slide files are untrusted: a crafted one can make a C decoder abort, hang or
run out of memory. All parsing happens in these processes (started with
'spawn', so they share no gRPC threads or locks with the server). A call
gives one idle process one request; if it dies, or does not answer within
the timeout, it is killed and replaced in the background and the caller gets
a clear error while the service keeps serving. Several processes also read
in parallel on every core, with no GIL between them.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
from multiprocessing import reduction

from smily.common.errors import FailedPrecondition, Unavailable

from . import reader
from .arena import Arena

log = logging.getLogger("smily.tiler.workers")

READY_TIMEOUT_S = 60.0


class _Worker:
    def __init__(self, ctx, log_level: str):
        self.arena = Arena.create()
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=reader.serve, args=(child, self.arena.size, log_level), daemon=True,
                                   name="slide-reader")
        self.process.start()
        child.close()
        reduction.send_handle(self.conn, self.arena.fd, self.process.pid)
        # Ready once it has imported OpenSlide: the server only serves after that.
        if not self.conn.poll(READY_TIMEOUT_S) or self.conn.recv() != "ready":
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

    def _add(self) -> None:
        worker = _Worker(self._ctx, self._log_level)
        with self._lock:
            self._all.add(worker)
        self._idle.put(worker)

    def _replace(self, worker: _Worker, why: str, path: str) -> None:
        log.error("slide reader replaced", extra={"reason": why, "slide_id": reader.slide_id(path),
                                                  "exitcode": worker.process.exitcode})
        worker.kill()
        with self._lock:
            self._all.discard(worker)
            self.replaced += 1
        # Starting a process takes a moment: the caller gets its answer now.
        threading.Thread(target=self._refill, daemon=True).start()

    def _refill(self) -> None:
        while True:
            try:
                return self._add()
            except RuntimeError:
                log.error("slide reader failed to start; retrying")
                time.sleep(1)

    def call(self, op: str, path: str, *args):
        """Run reader.OPS[op](path, *args) in a reader process and return its result."""
        worker = self._idle.get()
        try:
            worker.conn.send((op, path, args))
            if not worker.conn.poll(self._timeout):
                self._replace(worker, "timeout", path)
                raise Unavailable(
                    f"reading the slide took longer than {self._timeout:g} s and was stopped; "
                    "the file may be damaged, or the tiler overloaded: try again later")
            reply = worker.conn.recv()
        except (EOFError, OSError):
            self._replace(worker, "died", path)
            raise FailedPrecondition(
                "the slide file crashed the slide reader; it is damaged or not a format OpenSlide "
                "reads safely. The service is still running; check or re-scan the file") from None
        if reply[0] != "ok":
            self._idle.put(worker)
            reader.reraise(reply[1], reply[2])
        try:
            # Tiles are copied out of the arena before the reader may overwrite it.
            return [worker.arena.take(item) for item in reply[1]] if op == "tiles" else reply[1]
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        with self._lock:
            workers, self._all = list(self._all), set()
        for w in workers:
            w.kill()
