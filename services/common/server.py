"""The one server bootstrap every service uses.

It gives each gRPC server the same things: the standard health service
(NOT_SERVING until the servicers are built, and again while draining),
reflection, canonical error mapping, Prometheus metrics, connection ageing
for Kubernetes load balancing, and a graceful stop on SIGTERM.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Iterable

import grpc
import prometheus_client as prom
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import logs, memory, tracing
from .config import Settings
from .errors import ServiceError

log = logging.getLogger("smily.server")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

REQUESTS = prom.Counter(
    "smily_grpc_requests_total", "RPCs handled", ["service", "method", "code"]
)
LATENCY = prom.Histogram(
    "smily_grpc_request_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
IN_FLIGHT = prom.Gauge("smily_grpc_in_flight", "RPCs being handled", ["service"])

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Close connections now and then so clients re-resolve DNS and new
    # replicas behind a headless Service get traffic.
    ("grpc.max_connection_age_ms", 5 * 60 * 1000),
    ("grpc.max_connection_age_grace_ms", 60 * 1000),
    ("grpc.keepalive_time_ms", 60 * 1000),
]


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        # A downstream call failed: pass its status on, it is already canonical.
        return exc.code(), exc.details() or exc.code().name
    error_id = uuid.uuid4().hex[:12]
    log.error("unhandled error", exc_info=exc, extra={"error_id": error_id})
    return grpc.StatusCode.INTERNAL, f"internal error (error id {error_id})"


class _Interceptor(grpc.ServerInterceptor):
    """Maps exceptions to statuses and records metrics for every RPC."""

    def __init__(self, service: str):
        self._service = service

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        service = self._service

        def record(start: float, code: grpc.StatusCode) -> None:
            REQUESTS.labels(service, method, code.name).inc()
            LATENCY.labels(service, method).observe(time.perf_counter() - start)

        def fail(exc: Exception, context, start: float):
            if context.code() not in (None, grpc.StatusCode.OK):
                raise exc  # the handler already set its status
            code, message = _status_of(exc)
            record(start, code)
            context.abort(code, message)

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                start = time.perf_counter()
                IN_FLIGHT.labels(service).inc()
                try:
                    response = inner(request, context)
                    record(start, grpc.StatusCode.OK)
                    return response
                except Exception as exc:
                    fail(exc, context, start)
                finally:
                    IN_FLIGHT.labels(service).dec()

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request, context):
                start = time.perf_counter()
                IN_FLIGHT.labels(service).inc()
                try:
                    yield from inner_stream(request, context)
                    record(start, grpc.StatusCode.OK)
                except Exception as exc:
                    fail(exc, context, start)
                finally:
                    IN_FLIGHT.labels(service).dec()

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


@dataclass
class Registration:
    """What a service hands the bootstrap: its name, servicer and how to add it."""

    name: str  # full proto service name, e.g. smily.tiler.v1.TilerService
    servicer: object
    add_to_server: Callable[[object, grpc.Server], None]


class RunningServer:
    def __init__(self, server: grpc.Server, health_servicer, port: int, names: list[str]):
        self.server = server
        self.health = health_servicer
        self.port = port
        self.names = names

    def stop(self, grace: float) -> None:
        # Health says NOT_SERVING first, so load balancers stop sending work,
        # then in-flight RPCs get `grace` seconds to finish.
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def start(
    registrations: Iterable[Registration],
    host: str,
    port: int,
    *,
    max_concurrent_rpcs: int = 64,
    worker_threads: int = 16,
) -> RunningServer:
    """Start a gRPC server with the given servicers; port 0 picks a free one."""
    memory.keep_large_buffers()
    regs = list(registrations)
    label = regs[0].name.split(".")[1] if regs else "server"
    tracing.configure(label)  # once per process; off unless OTEL_* ask for an exporter
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=worker_threads, thread_name_prefix=label),
        interceptors=[tracing.ServerInterceptor(), _Interceptor(label)],
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [r.name for r in regs]
    for r in regs:
        r.add_to_server(r.servicer, server)
        health_servicer.set(r.name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    # Servicers are fully built (model loaded, index opened) before start().
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", extra={"services": names, "port": bound})
    return RunningServer(server, health_servicer, bound, names)


def start_metrics(port: int) -> None:
    if port:
        prom.start_http_server(port)
        log.info("metrics endpoint", extra={"port": port})


def wait_for_signal(servers: list[RunningServer], grace: float) -> None:
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


def serve(name: str, registration: Callable[[Settings], Registration]) -> None:
    """A service's process: settings from SMILY_* variables, metrics, the gRPC
    server on the service's port, and a graceful stop on SIGTERM."""
    settings = Settings.from_env()
    logs.setup(settings.log_level)
    start_metrics(settings.metrics_port)
    reg = registration(settings)
    running = start([reg], settings.bind_host, getattr(settings, f"{name}_port"),
                    max_concurrent_rpcs=settings.max_concurrent_rpcs,
                    worker_threads=settings.worker_threads)
    wait_for_signal([running], settings.shutdown_grace_s)
    close = getattr(reg.servicer, "close", None)
    if close:
        close()
