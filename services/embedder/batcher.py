"""Dynamic batching: concurrent requests are coalesced into one model run.

Request threads preprocess their own images (in parallel with the model
running the previous batch) and queue the tensor. One worker thread takes
the oldest request and waits for more until the batch holds `preferred`
images or the oldest request has waited `max_delay_s`; then it runs them
together and hands each request its rows. The queue is bounded in images;
a request that does not fit gets RESOURCE_EXHAUSTED at once, so callers
back off instead of piling up latency.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import prometheus_client as prom

from smily.common.errors import ResourceExhausted, Unavailable

QUEUE_SECONDS = prom.Histogram(
    "smily_embedder_queue_seconds",
    "Time a request waited in the batching queue",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
BATCH_SIZE = prom.Histogram(
    "smily_embedder_batch_size",
    "Images per model run",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
QUEUED_IMAGES = prom.Gauge("smily_embedder_queued_images", "Images waiting in the batching queue")


class _Job:
    __slots__ = ("tensor", "queued_at", "done", "result", "error")

    def __init__(self, tensor: np.ndarray):
        self.tensor = tensor
        self.queued_at = time.perf_counter()
        self.done = threading.Event()
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None


class Batcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], preferred: int, max_delay_s: float, max_queue: int):
        self._run = run
        self._preferred = max(1, preferred)
        self._max_delay = max(0.0, max_delay_s)
        self._max_queue = max(1, max_queue)
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # images in self._jobs
        self._cv = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="embedder-batcher", daemon=True)
        self._worker.start()

    @property
    def queued(self) -> int:
        return self._queued

    def submit(self, tensor: np.ndarray) -> np.ndarray:
        """Queue one request's [n, ...] input and block until its [n, dim] output."""
        job = _Job(tensor)
        n = len(tensor)
        with self._cv:
            if self._closed:
                raise Unavailable("the embedder is shutting down")
            # An empty queue admits any request, so one larger than the bound still runs.
            if self._jobs and self._queued + n > self._max_queue:
                raise ResourceExhausted(
                    f"embedding queue is full ({self._queued} images waiting, limit {self._max_queue}); retry later"
                )
            self._jobs.append(job)
            self._queued += n
            QUEUED_IMAGES.set(self._queued)
            self._cv.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None  # a finished job holds a result or an error
        return job.result

    def _next_batch(self) -> list[_Job] | None:
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait()
            if not self._jobs:
                return None
            deadline = self._jobs[0].queued_at + self._max_delay
            while self._queued < self._preferred and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch: list[_Job] = []
            size = 0
            # Whole requests, oldest first, up to the preferred size (at least one).
            while self._jobs and (not batch or size + len(self._jobs[0].tensor) <= self._preferred):
                job = self._jobs.popleft()
                batch.append(job)
                size += len(job.tensor)
            self._queued -= size
            QUEUED_IMAGES.set(self._queued)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            now = time.perf_counter()
            for job in batch:
                QUEUE_SECONDS.observe(now - job.queued_at)
            tensors = [job.tensor for job in batch]
            BATCH_SIZE.observe(sum(len(t) for t in tensors))
            try:
                out = self._run(tensors[0] if len(tensors) == 1 else np.concatenate(tensors))
                start = 0
                for job in batch:
                    job.result = out[start : start + len(job.tensor)]
                    start += len(job.tensor)
            except BaseException as exc:  # every waiting request gets the error, the worker lives on
                for job in batch:
                    job.error = exc
            for job in batch:
                job.done.set()

    def close(self) -> None:
        """Finish what is queued, then stop the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join()
