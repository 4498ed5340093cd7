"""Stubs to the three backends, with deadlines derived from the caller's, and
one error vocabulary at the public boundary.

Every backend call goes through a Backend wrapper that turns its failures
into statuses that name the backend and never an address: UNAVAILABLE (down,
overloaded), DEADLINE_EXCEEDED (too slow), INTERNAL (anything the gateway's
own request caused). Only what the caller's input decided passes through as
it is (an unknown slide stays NOT_FOUND, a region off the slide stays
INVALID_ARGUMENT), per method below.
"""

from __future__ import annotations

import logging
import threading
import uuid

import grpc

from smily.common import rpcmeta
from smily.common.channels import RotatingStub
from smily.common.config import Settings
from smily.common.errors import DeadlineExceeded, NotFound, ServiceError, Unavailable
from smily.common.tls import client_credentials
from smily.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from smily.tiler.v1 import tiler_pb2_grpc

from .shards import NoReplica, connect

log = logging.getLogger("smily.gateway.backends")

C = grpc.StatusCode
# A backend's verdict on the caller's own input or on the state of the archive.
_ALWAYS = {C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED}
# Methods whose INVALID_ARGUMENT is about what the caller sent (a slide path,
# a region, a concept name, a page token), not about the gateway's request:
# (smily.options.v1.caller_input) in the backends' protos.
_CALLER_INPUT = rpcmeta.CALLER_INPUT


class BackendError(ServiceError):
    """A status the public boundary passes on as it is."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def translate(backend: str, method: str, exc: grpc.RpcError) -> ServiceError:
    if isinstance(exc, NoReplica):  # names the shard, never an address
        return Unavailable(str(exc))
    code = exc.code() if hasattr(exc, "code") else C.UNKNOWN
    if code in _ALWAYS or (code == C.INVALID_ARGUMENT and method in _CALLER_INPUT.get(backend, ())):
        return BackendError(code, exc.details() or code.name)
    if code == C.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"the {backend} did not answer in time")
    if code == C.UNAVAILABLE:
        return Unavailable(f"the {backend} is unavailable; retry later")
    if code == C.RESOURCE_EXHAUSTED:
        return Unavailable(f"the {backend} is overloaded; retry later")
    if code == C.CANCELLED:
        return BackendError(code, f"the call to the {backend} was cancelled")
    error_id = uuid.uuid4().hex[:12]
    # The backend's own text may say more; it stays in the gateway's log.
    log.error(
        "backend error",
        extra={"backend": backend, "method": method, "code": code.name, "details": exc.details(), "error_id": error_id},
    )
    return BackendError(C.INTERNAL, f"the {backend} failed (error id {error_id})")


class _Stream:
    """A server stream whose errors are translated; cancel() still stops it."""

    def __init__(self, call, backend: str, method: str):
        self._call, self._backend, self._method = call, backend, method

    def __iter__(self):
        try:
            yield from self._call
        except grpc.RpcError as exc:
            raise translate(self._backend, self._method, exc) from None

    def cancel(self) -> None:
        self._call.cancel()


class Backend:
    """A stub (or ShardedIndex) whose every method translates its failures."""

    def __init__(self, name: str, stub, streams: tuple[str, ...] = ()):
        self._name, self._stub, self._streams = name, stub, streams

    def __getattr__(self, method: str):
        fn = getattr(self._stub, method)
        name = self._name
        if method in self._streams:
            return lambda request, **kw: _Stream(fn(request, **kw), name, method)

        def call(request, **kw):
            try:
                return fn(request, **kw)
            except grpc.RpcError as exc:
                raise translate(name, method, exc) from None

        return call


class Backends:
    """Every stub dials again when the gateway's client certificate is renewed (RotatingStub)."""

    def __init__(self, settings: Settings):
        creds = client_credentials(settings)
        router, self._shards = connect(
            settings.index.index_targets or (settings.index.index_target,), creds, settings.auth.default_tenant
        )
        self._router = router
        self._tiler = RotatingStub(settings.tiler.tiler_target, creds, tiler_pb2_grpc.TilerServiceStub)
        self._embedder = RotatingStub(settings.embedder.embedder_target, creds, embedder_pb2_grpc.EmbedderServiceStub)
        self.tiler = Backend("tiler", self._tiler, streams=("StreamTiles",))
        self.embedder = Backend("embedder", self._embedder, streams=("EmbedSlide",))
        self._model_embedders = [
            RotatingStub(t, creds, embedder_pb2_grpc.EmbedderServiceStub)
            for t in settings.embedder.model_embedder_targets
        ]
        # model id -> (its embedder, its ModelInfo), learnt by asking each embedder.
        self._by_model: dict[str, tuple[Backend, embedder_pb2.ModelInfo]] = {}
        self._by_model_lock = threading.Lock()
        self.index = Backend("index", router)
        self.default_timeout = settings.gateway.backend_timeout_s

    def embedder_for(self, model_id: str, timeout: float) -> tuple[Backend, embedder_pb2.ModelInfo]:
        """The embedder serving a model and its ModelInfo; FAILED_PRECONDITION when none does."""
        with self._by_model_lock:
            found = self._by_model.get(model_id)
        if found is None:
            self._learn_models(timeout)
            with self._by_model_lock:
                found = self._by_model.get(model_id)
        if found is None:
            raise NotFound(
                f"no embedder serves model {model_id}: run one with SMILY_MODEL={model_id} and name it in "
                "the gateway's SMILY_MODEL_EMBEDDER_TARGETS"
            )
        return found

    def _learn_models(self, timeout: float) -> None:
        learnt: dict[str, tuple[Backend, embedder_pb2.ModelInfo]] = {}
        for stub in (self._embedder, *self._model_embedders):
            backend = Backend("embedder", stub, streams=("EmbedSlide",))
            try:
                info = backend.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=timeout).info
            except ServiceError:
                continue  # down now: asked again on the next miss
            learnt.setdefault(info.model_id, (backend, info))
        with self._by_model_lock:
            self._by_model = learnt

    def forget_models(self) -> None:
        """An embedder answered with another model than it was known for (redeployed): ask again."""
        with self._by_model_lock:
            self._by_model = {}

    @property
    def stubs(self) -> dict[str, list[list[RotatingStub]]]:
        """Each backend's groups of interchangeable stubs (the index: a group
        of replicas per shard), for readiness."""
        return {"tiler": [[self._tiler]], "embedder": [[self._embedder]], "index": self._shards}

    def timeout(self, context=None) -> float:
        """What is left of the caller's deadline, or the default when it set none."""
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            return self.default_timeout
        return max(0.001, min(remaining, self.default_timeout))

    def close(self) -> None:
        self._router.close()
        for stub in (
            self._tiler,
            self._embedder,
            *self._model_embedders,
            *(s for shard in self._shards for s in shard),
        ):
            stub.close()
