"""Client channels to the internal services.

Round-robin over every address a name resolves to (a headless Service in
Kubernetes resolves to all pods), and retries of UNAVAILABLE for idempotent
methods only: a retried call whose first reply was lost must not do its work
twice or answer differently (DeleteSlide would say NOT_FOUND).

A RotatingStub dials its target again when the client certificate is
renewed (tls.ClientCredentials), so a service keeps presenting a valid
certificate without a restart.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import grpc

from . import rpcmeta, tracing
from .server import MAX_MESSAGE_BYTES
from .tls import ClientCredentials

log = logging.getLogger("smily.channels")

# A replaced channel is left alone this long (a caller may hold a method fetched just
# before the swap), then closed once its calls in flight have ended.
RETIRE_GRACE_S = 5.0

# Methods that may run twice with the same effect and answer: `idempotency_level` in the protos.
IDEMPOTENT = rpcmeta.IDEMPOTENT

_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": service, "method": m} for service, methods in IDEMPOTENT.items() for m in methods],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel to target: TLS with credentials, else plaintext."""
    options = [
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Fail fast when a backend is gone instead of waiting minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # After a rolling restart every address a headless Service gave is gone: look the
        # name up again within a second, not gRPC's default 30 s (found by tests/cluster).
        ("grpc.dns_min_time_between_resolutions_ms", 1000),
    ]
    if credentials is None:
        return tracing.intercept(grpc.insecure_channel(target, options=options))
    return tracing.intercept(grpc.secure_channel(target, credentials, options=options))


class _InFlight(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Counts a channel's calls in flight, so a replaced channel is closed only once they are done:
    closing a channel cancels its calls (an ingest's tile stream may run for an hour)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._calls = 0
        self._on_idle: Any = None

    def _track(self, continuation, details, request):
        with self._lock:
            self._calls += 1
        try:
            call = continuation(details, request)
        except BaseException:
            self._done(None)
            raise
        call.add_done_callback(self._done)  # runs at once if the call already ended
        return call

    intercept_unary_unary = intercept_unary_stream = _track
    intercept_stream_unary = intercept_stream_stream = _track

    def _done(self, _call) -> None:
        with self._lock:
            self._calls -= 1
            idle, on_idle = self._calls == 0, self._on_idle
        if idle and on_idle is not None:
            on_idle()

    def when_idle(self, fn) -> None:
        """Run fn once no call is in flight: now, or when the last one ends."""
        with self._lock:
            run_now = self._calls == 0
            self._on_idle = None if run_now else _once(fn)
        if run_now:
            fn()


def _once(fn):
    lock, done = threading.Lock(), [False]

    def run() -> None:
        with lock:
            if done[0]:
                return
            done[0] = True
        fn()

    return run


def _close_soon(ch: grpc.Channel) -> None:
    """Close on a thread of its own: the last call's done callback runs on the
    channel's own thread, which close() waits for."""
    threading.Thread(target=ch.close, name="channel-close", daemon=True).start()


class RotatingStub:
    """A stub to one target whose channel follows the client certificate: when
    the credentials are renewed the next call dials a new channel and gets a
    new stub, swapped in at once; the old channel is closed when its calls in
    flight have ended. Attribute access is the current stub's (stub.Method(...),
    stub.Method.future(...)), so it stands in for a generated stub anywhere.
    With credentials None (plaintext) it is a plain stub on one channel."""

    def __init__(self, target: str, credentials: ClientCredentials | None, stub_class):
        self.target, self._credentials, self._stub_class = target, credentials, stub_class
        self._lock = threading.Lock()
        generation, creds = credentials.current() if credentials else (0, None)
        self._current = (generation, *self._dial(creds))

    def _dial(self, creds: grpc.ChannelCredentials | None) -> tuple[grpc.Channel, _InFlight | None, Any]:
        raw = channel(self.target, creds)
        if self._credentials is None:
            return raw, None, self._stub_class(raw)
        calls = _InFlight()
        counted = grpc.intercept_channel(raw, calls)
        return counted, calls, self._stub_class(counted)

    def _now(self) -> tuple:
        current = self._current
        if self._credentials is None:
            return current
        generation, creds = self._credentials.current()
        if generation == current[0]:
            return current
        with self._lock:
            old = self._current
            if old[0] == generation:
                return old
            self._current = (generation, *self._dial(creds))
            current = self._current
        log.info("channel dialled again with the renewed client certificate", extra={"target": self.target})
        old_channel, old_calls = old[1], old[2]
        assert old_calls is not None  # only TLS channels are replaced, and they count their calls
        retire = threading.Timer(RETIRE_GRACE_S, old_calls.when_idle, args=(lambda: _close_soon(old_channel),))
        retire.daemon = True
        retire.start()
        return current

    @property
    def channel(self) -> grpc.Channel:
        """The current channel (for health checks)."""
        return self._now()[1]

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return getattr(self._now()[3], method)

    def close(self) -> None:
        self._current[1].close()
