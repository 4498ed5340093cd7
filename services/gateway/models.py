"""Which model serves searches, as the index says, and which others it holds.

The serving model is a journal entry of the index (every replica switches at
one sequence number); the gateway embeds each query with it, so a query and
the vectors it is searched against are always one model's. Asked of the index
at most every SERVING_TTL_S; a cutover or rollback through this gateway asks
again at once. An index with nothing in it yet serves the embedder's model.
Models held beside the serving one (a migration's target, or the model a
cutover left for rollback) get every ingest too (ingest.py), so none misses a
slide.
"""

from __future__ import annotations

import threading
import time

from smily.embedder.v1 import embedder_pb2
from smily.index.v1 import index_pb2

from .backends import Backends

SERVING_TTL_S = 1.0


class Models:
    def __init__(self, backends: Backends):
        self._b = backends
        self._lock = threading.Lock()
        self._known: tuple[str, tuple[str, ...]] = ("", ())
        self._until = 0.0

    def current(self, timeout: float, fresh: bool = False) -> tuple[str, tuple[str, ...]]:
        """(the serving model, every model held: the serving one first); `fresh`: asked of the index now."""
        with self._lock:
            if time.monotonic() < self._until and not fresh:
                return self._known
        reply = self._b.index.ListModels(index_pb2.ListModelsRequest(), timeout=timeout)
        serving = reply.serving_model_id
        if not serving:  # nothing indexed yet: the embedder's model will be bound by the first ingest
            serving = self._b.embedder.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=timeout).info.model_id
        held = (serving, *sorted(m.model_id for m in reply.models if m.model_id != serving))
        with self._lock:
            self._known, self._until = (serving, held), time.monotonic() + SERVING_TTL_S
        return serving, held

    def serving(self, timeout: float) -> str:
        return self.current(timeout)[0]

    def changed(self) -> None:
        """This gateway switched or dropped a model: ask the index again on the next call."""
        with self._lock:
            self._until = 0.0
