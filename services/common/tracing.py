"""OpenTelemetry tracing across the services: W3C trace context in gRPC
metadata, a span per RPC on both ends, and `span()` for the steps inside.

Off by default. `configure()` installs an SDK tracer provider with an OTLP
exporter only when the standard variables ask for one: OTEL_TRACES_EXPORTER
(otlp, console or none) or OTEL_EXPORTER_OTLP_ENDPOINT; the exporter reads
the rest (endpoint, headers, OTEL_SERVICE_NAME, ...) itself. Without a
provider every span is OpenTelemetry's no-op, so the interceptors stay in
place and cost microseconds; a test may install its own provider.
"""

from __future__ import annotations

import logging
import os
import threading

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .config import ConfigError

log = logging.getLogger("smily.tracing")

tracer = trace.get_tracer("smily")
_configured = threading.Lock()
_done = False


def configure(service: str) -> bool:
    """Install the exporter the OTEL_* variables ask for, once per process;
    returns whether one was installed."""
    global _done
    with _configured:
        if _done:
            return False
        _done = True
        exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporter == "none":
            return False
        if not exporter:
            if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
                return False
            exporter = "otlp"
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        span_exporter: SpanExporter
        if exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter()
        elif exporter == "console":
            span_exporter = ConsoleSpanExporter()
        else:
            raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter!r}: smily supports otlp, console or none")
        # OTEL_SERVICE_NAME, when set, wins over this default (Resource.create merges it in).
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: f"smily-{service}"}))
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
        trace.set_tracer_provider(provider)
        log.info("tracing on", extra={"exporter": exporter})
        return True


def _on() -> bool:
    """Whether an SDK provider is installed (by configure() or a test): else every span is a no-op."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def span(name: str, **attributes):
    """A span for one step inside a request (decode, inference, ...), as a context manager."""
    return tracer.start_as_current_span(name, attributes=attributes or None)


# Probes (kubelet, the gateway's readiness poller) every few seconds: a trace each would bury the requests.
UNTRACED = {"grpc.health.v1.Health"}


def _method(full: str) -> tuple[str, str]:
    service, _, method = full.lstrip("/").rpartition("/")
    return service, method


def _fail(s, exc: BaseException) -> None:
    code = exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None
    if code is not None:
        s.set_attribute("rpc.grpc.status_code", code.value[0])
    s.set_status(Status(StatusCode.ERROR, type(exc).__name__))


class ServerInterceptor(grpc.ServerInterceptor):
    """Continues the caller's trace (traceparent in the metadata) with a SERVER span per RPC."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not (handler.unary_unary or handler.unary_stream) or not _on():
            return handler
        service, method = _method(handler_call_details.method)
        if service in UNTRACED:
            return handler
        name = f"{service}/{method}"
        attrs = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

        def start(context):
            carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            return tracer.start_span(name, context=propagate.extract(carrier), kind=SpanKind.SERVER, attributes=attrs)

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                s = start(context)
                try:
                    with trace.use_span(s, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                        return inner(request, context)
                except BaseException as exc:
                    _fail(s, exc)
                    raise
                finally:
                    s.end()

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)

        inner_stream = handler.unary_stream

        def stream(request, context):
            s = start(context)
            try:
                responses = iter(inner_stream(request, context))
                while True:
                    # Current only while the handler runs, not while gRPC sends.
                    token = otel_context.attach(trace.set_span_in_context(s))
                    try:
                        response = next(responses)
                    except StopIteration:
                        return
                    finally:
                        otel_context.detach(token)
                    yield response
            except BaseException as exc:
                if not isinstance(exc, GeneratorExit):
                    _fail(s, exc)
                raise
            finally:
                s.end()

        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class ClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """A CLIENT span per call, its context sent on as W3C traceparent metadata."""

    def _call(self, continuation, details, request):
        service, method = _method(details.method)
        if service in UNTRACED or not _on():
            return continuation(details, request)
        s = tracer.start_span(
            f"{service}/{method}",
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(s))
        metadata = list(details.metadata or ()) + list(carrier.items())
        try:
            call = continuation(_ClientCallDetails(details, metadata), request)
        except BaseException as exc:
            _fail(s, exc)
            s.end()
            raise

        def done(c) -> None:
            code = c.code()
            if code is not None and code != grpc.StatusCode.OK:
                s.set_attribute("rpc.grpc.status_code", code.value[0])
                s.set_status(Status(StatusCode.ERROR, code.name))
            s.end()

        call.add_done_callback(done)
        return call

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._call(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._call(continuation, client_call_details, request)


def intercept(channel: grpc.Channel) -> grpc.Channel:
    return grpc.intercept_channel(channel, ClientInterceptor())
