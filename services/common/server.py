"""The one server bootstrap every service uses.

It gives each gRPC server the same things: the standard health service
(NOT_SERVING until the servicers are built, and again while draining; also
on a plaintext health-only port for kubelet), TLS/mTLS, reflection when asked
for, canonical error mapping, Prometheus metrics, connection ageing
for Kubernetes load balancing, and a graceful stop on SIGTERM.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import prometheus_client as prom
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import logs, memory, tls, tracing
from .caller import caller_of
from .config import ConfigError, Settings
from .errors import Busy, status_of

log = logging.getLogger("smily.server")

# OpenMP's threads (FAISS's) spin after each parallel region by default, taking the cores from the
# gRPC threads and numpy work that run next: on 2 cores a 1,000-candidate re-rank ran 3-4x slower
# (docs/benchmarks.md). Read when OpenMP loads, so set before any service imports FAISS.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

REQUESTS = prom.Counter("smily_grpc_requests_total", "RPCs handled", ["service", "method", "code"])
LATENCY = prom.Histogram(
    "smily_grpc_request_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
IN_FLIGHT = prom.Gauge("smily_grpc_in_flight", "RPCs being handled", ["service"])
REFUSED = prom.Counter("smily_grpc_refused_total", "RPCs refused by the concurrency limits", ["service", "limit"])

# Never counted nor refused: probes must answer while the server is saturated.
EXEMPT_SERVICES = (health.SERVICE_NAME,)
# Threads beyond the RPC limit, so health checks and refusals always find one.
SPARE_THREADS = 8

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Close connections now and then so clients re-resolve DNS and new
    # replicas behind a headless Service get traffic.
    ("grpc.max_connection_age_ms", 5 * 60 * 1000),
    ("grpc.max_connection_age_grace_ms", 60 * 1000),
    ("grpc.keepalive_time_ms", 60 * 1000),
    # Clients keep idle connections warm with a ping a minute (channels.KEEPALIVE_MS): allowed,
    # where gRPC's default (one per 5 minutes) would end them with "too many pings".
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 30 * 1000),
]


class Admission:
    """Counts in-flight RPCs, in all and per caller, and refuses those over the limits."""

    def __init__(self, limit: int, per_caller: int = 0, who: str = "caller"):
        # `who`: what enter's key counts ("caller": caller_of; "tenant": the key it is given).
        self._limit, self._per_caller, self._who = limit, per_caller, who
        self._lock = threading.Lock()
        self._total = 0
        self._by_caller: dict[str, int] = {}

    def enter(self, service: str, context, key: str = "") -> str:
        caller = (key or caller_of(context)) if self._per_caller else ""
        with self._lock:
            if self._total >= self._limit:
                REFUSED.labels(service, "server").inc()
                raise Busy(f"the {service} is at its limit of {self._limit} concurrent requests")
            if self._per_caller and self._by_caller.get(caller, 0) >= self._per_caller:
                REFUSED.labels(service, self._who).inc()
                raise Busy(
                    f"this {self._who} has {self._per_caller} requests in flight, the most one {self._who} may have"
                )
            self._total += 1
            if self._per_caller:
                self._by_caller[caller] = self._by_caller.get(caller, 0) + 1
        return caller

    def leave(self, caller: str) -> None:
        with self._lock:
            self._total -= 1
            if self._per_caller:
                left = self._by_caller.pop(caller) - 1
                if left:
                    self._by_caller[caller] = left


class _Interceptor(grpc.ServerInterceptor):
    """Maps exceptions to statuses, records metrics and applies the concurrency
    limits for every RPC but health checks."""

    def __init__(self, service: str, admission: Admission):
        self._service = service
        self._admission = admission

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        rpc_service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if rpc_service in EXEMPT_SERVICES:
            return handler
        service = self._service
        admission = self._admission

        def record(start: float, code: grpc.StatusCode) -> None:
            REQUESTS.labels(service, method, code.name).inc()
            LATENCY.labels(service, method).observe(time.perf_counter() - start)

        def fail(exc: Exception, context, start: float):
            if context.code() not in (None, grpc.StatusCode.OK):
                raise exc  # the handler already set its status
            code, message = status_of(exc)
            record(start, code)
            if isinstance(exc, Busy):
                context.set_trailing_metadata((("retry-after-s", f"{exc.retry_after_s:g}"),))
            context.abort(code, message)

        @contextlib.contextmanager
        def admitted(context):
            # One admission, metrics and status path for unary and streaming handlers.
            start = time.perf_counter()
            try:
                caller = admission.enter(service, context)
            except Busy as exc:
                fail(exc, context, start)
            IN_FLIGHT.labels(service).inc()
            try:
                yield
                record(start, grpc.StatusCode.OK)
            except Exception as exc:
                fail(exc, context, start)
            finally:
                IN_FLIGHT.labels(service).dec()
                admission.leave(caller)

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                with admitted(context):
                    return inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request, context):
                with admitted(context):
                    yield from inner_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


class Servicer(Protocol):
    """What the bootstrap asks of a servicer beyond its RPCs: the lifecycle of
    initialize (its constructor, before the server starts), serve, finalize.
    Servicers subclass it and override what they need; the defaults do nothing."""

    def watch_readiness(self, set_ready: Callable[[bool], None]) -> None:
        """Call set_ready(False/True) as what the service depends on goes and
        comes back; readiness (the service's name) follows it, liveness ("")
        stays the process's own. Default: ready while serving."""
        return None

    def close(self) -> None:
        """Release what the servicer holds, once the server has stopped."""
        return None


@dataclass
class Registration:
    """What a service hands the bootstrap: its name, servicer and how to add it."""

    name: str  # full proto service name, e.g. smily.tiler.v1.TilerService
    servicer: Servicer
    add_to_server: Callable[[object, grpc.Server], None]
    # The service's own interceptors (the gateway's auth, quota and audit), inside the shared one.
    interceptors: tuple = ()


class Stoppable(Protocol):
    """A started server of a process (gRPC here, HTTP in smily.http.server)."""

    def stop(self, grace: float) -> None: ...


class RunningServer:
    def __init__(
        self,
        server: grpc.Server,
        health_servicer,
        port: int,
        servicers: list[Servicer],
        names: list[str],
        health_server: grpc.Server | None = None,
        health_port: int = 0,
    ):
        self.server = server
        self.health = health_servicer
        self.port = port
        self.servicers = servicers
        self.names = names
        self.health_server = health_server
        self.health_port = health_port

    def stop(self, grace: float) -> None:
        # Health says NOT_SERVING first, so load balancers stop sending work,
        # then in-flight RPCs get `grace` seconds to finish; the servicers close last.
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        for servicer in self.servicers:
            servicer.close()

    @property
    def servicer(self) -> Servicer:
        return self.servicers[0]


def _set_ready(health_servicer, name: str, ready: bool) -> None:
    health_servicer.set(
        name, health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
    )


def start(
    registrations: Iterable[Registration],
    host: str,
    port: int,
    *,
    max_concurrent_rpcs: int = 64,
    worker_threads: int = 16,
    credentials: grpc.ServerCredentials | None = None,
    allowed_clients: frozenset[str] | None = None,
    health_port: int | None = None,
    reflection_on: bool = False,
) -> RunningServer:
    """Start a gRPC server with the given servicers; port 0 picks a free one.

    At most max_concurrent_rpcs RPCs run at once (more get RESOURCE_EXHAUSTED),
    counted by the interceptor rather than by grpc.server, so health checks
    are outside the limit; the pool has threads to spare for them.
    credentials: TLS (tls.server_credentials), None for plaintext. allowed_clients:
    under mTLS, the client certificate identities accepted. health_port: also serve
    the health service alone, in plaintext, on this port (0 picks one) for kubelet."""
    memory.keep_large_buffers()
    regs = list(registrations)
    label = regs[0].name.split(".")[1] if regs else "server"
    tracing.configure(label)  # once per process; off unless OTEL_* ask for an exporter
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=max(worker_threads, max_concurrent_rpcs) + SPARE_THREADS, thread_name_prefix=label
        ),
        interceptors=[tracing.ServerInterceptor(), _Interceptor(label, Admission(max_concurrent_rpcs))]
        + ([tls.PeerCheck(allowed_clients)] if allowed_clients is not None else [])
        + [i for r in regs for i in r.interceptors],
        options=SERVER_OPTIONS,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [r.name for r in regs]
    for r in regs:
        r.add_to_server(r.servicer, server)
        health_servicer.set(r.name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if reflection_on:
        reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if credentials is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    health_server, health_bound = None, 0
    if health_port is not None:
        health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{label}-health"))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_bound = health_server.add_insecure_port(f"{host}:{health_port}")
        if health_bound == 0:
            raise OSError(f"cannot bind {host}:{health_port}")
        health_server.start()
    server.start()
    # Servicers are fully built (model loaded, index opened) before start().
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    for r in regs:
        # Readiness (the service's name) may follow what the servicer depends on;
        # liveness ("") stays the process's own.
        r.servicer.watch_readiness(functools.partial(_set_ready, health_servicer, r.name))
    log.info(
        "serving", extra={"services": names, "port": bound, "tls": credentials is not None, "health_port": health_bound}
    )
    return RunningServer(server, health_servicer, bound, [r.servicer for r in regs], names, health_server, health_bound)


def security(settings: Settings, service: str) -> dict:
    """start()'s TLS, client allow-list, health port and reflection from settings."""
    return dict(
        credentials=tls.server_credentials(settings),
        allowed_clients=tls.allowed_clients(settings, service),
        health_port=settings.server.health_port or None,
        reflection_on=settings.server.reflection,
    )


def warn_if_plaintext(settings: Settings) -> None:
    """The one line a plaintext run prints at start."""
    if not settings.tls.tls_cert_file and settings.tls.plaintext:
        log.warning(tls.PLAINTEXT_WARNING)


def start_metrics(port: int, host: str = "127.0.0.1") -> None:
    if port:
        prom.start_http_server(port, addr=host)
        log.info("metrics endpoint", extra={"port": port, "host": host})


def wait_for_signal(servers: list[Stoppable], grace: float) -> None:
    """Block until SIGTERM or SIGINT, then drain and stop every server."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down", extra={"grace_s": grace})
    threads = [threading.Thread(target=s.stop, args=(grace,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def start_services(
    services: list[tuple[str, Callable[[Settings], Registration]]], settings: Settings
) -> tuple[dict[str, RunningServer], Settings]:
    """Start each (name, registration) in order, backends first, each on its port
    (SMILY_<NAME>_PORT; 0 picks a free one) with the settings' TLS and limits. A
    service started later dials those started before it. Returns the servers and
    the settings with the real ports filled in; a failed start stops the others."""
    if settings.server.health_port and len(services) > 1:
        raise ConfigError("SMILY_HEALTH_PORT serves one service per process; unset it for `serve all`")
    tls.check(settings)  # before a servicer loads a model or opens an index
    warn_if_plaintext(settings)
    running: dict[str, RunningServer] = {}
    try:
        for name, registration in services:
            reg = registration(settings)
            try:
                srv = start(
                    [reg],
                    settings.server.bind_host,
                    settings.port_of(name),
                    max_concurrent_rpcs=settings.limits.max_concurrent_rpcs,
                    worker_threads=settings.server.worker_threads,
                    **security(settings, name),
                )
            except BaseException:
                reg.servicer.close()
                raise
            running[name] = srv
            updates: dict[str, Any] = {f"{name}_port": srv.port}
            if name != "gateway":
                updates[f"{name}_target"] = f"{dial_host(settings.server.bind_host)}:{srv.port}"
            settings = settings.replace(**updates)
    except BaseException:
        for srv in reversed(running.values()):
            srv.stop(0)
        raise
    return running, settings


def dial_host(bind_host: str) -> str:
    """Where a client on this machine reaches a server bound to bind_host."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "[::]", "") else bind_host


def run(start_servers: Callable[[Settings], list[Stoppable]], metrics: bool = True) -> None:
    """The one way a process runs (`python -m smily.X`, `smily serve X`): settings
    from SMILY_* variables, logging, metrics, the servers start_servers starts, and
    a graceful stop on SIGTERM. A configuration error is one line and exit status 2."""
    try:
        settings = Settings.from_env()
        logs.setup(settings.server.log_level)
        if metrics:
            start_metrics(settings.server.metrics_port, settings.server.bind_host)
        servers = start_servers(settings)
    except (ConfigError, OSError) as exc:  # a setting to give or a port taken: what to change, not a traceback
        print(f"smily: cannot start: {exc}", file=sys.stderr)
        sys.exit(2)
    wait_for_signal(servers, settings.server.shutdown_grace_s)


def serve(name: str, registration: Callable[[Settings], Registration]) -> None:
    """`python -m smily.<name>`: that service alone."""
    run(lambda settings: list(start_services([(name, registration)], settings)[0].values()))
