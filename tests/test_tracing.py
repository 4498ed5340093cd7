"""OpenTelemetry: one search is one connected trace across the services.

The SDK's in-memory exporter collects the spans of the real gateway,
tiler, embedder and index (one process here, the same interceptors and W3C
traceparent metadata as between pods)."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image

from smily.common.channels import channel
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc
from smily.types.v1 import types_pb2

from .conftest import CMU


@pytest.fixture(scope="module")
def spans():
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def _png(settings, seed: int) -> bytes:
    tiler = tiler_pb2_grpc.TilerServiceStub(channel(settings.tiler.tiler_target))
    img = tiler.ReadRegion(
        tiler_pb2.ReadRegionRequest(
            slide=CMU, x=600, y=600, width=448, height=448, mpp=1.0, encoding=types_pb2.IMAGE_ENCODING_RAW_RGB
        )
    ).image
    rgb = np.frombuffer(img.data, np.uint8).reshape(img.height, img.width, 3).copy()
    rgb[0, 0] = (seed % 256, 1, 2)  # never seen before: an uncached query
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# The gateway's background poll of the migration lease (every WATCH_S, a trace of its own each
# time) may fall inside a search's window: not the search's.
BACKGROUND = ("/LeaseMigration",)


def _trace_of(exporter, run) -> list:
    """The spans `run` produced (background polls left out), once the gateway's server span has ended."""
    exporter.clear()
    run()
    deadline = time.monotonic() + 30  # a bound on the wait, not a speed check
    while time.monotonic() < deadline:
        spans = exporter.get_finished_spans()
        if any(s.name == "smily.gateway.v1.GatewayService/Search" and s.kind == trace.SpanKind.SERVER for s in spans):
            return [s for s in spans if not s.name.endswith(BACKGROUND)]
        time.sleep(0.02)
    raise AssertionError("the gateway's Search span never ended")


def _assert_one_connected_trace(spans) -> set[str]:
    assert len({s.context.trace_id for s in spans}) == 1, "more than one trace"
    ids = {s.context.span_id for s in spans}
    roots = [s for s in spans if s.parent is None or s.parent.span_id not in ids]
    assert [r.name for r in roots] == ["smily.gateway.v1.GatewayService/Search"], [r.name for r in roots]
    return {s.name for s in spans}


def test_image_search_is_one_trace_over_gateway_embedder_and_index(spans, client, settings, ingested):
    png = _png(settings, 7)
    names = _assert_one_connected_trace(_trace_of(spans, lambda: client.search(image=png, k=5)))
    for name in (
        "smily.gateway.v1.GatewayService/Search",
        "cache.get",
        "cache.put",
        "smily.embedder.v1.EmbedderService/Embed",
        "decode",
        "preprocess",
        "inference",
        "smily.index.v1.IndexService/Search",
        "index.search",
        "index.records",
    ):
        assert name in names, (name, sorted(names))
    # Both ends of each backend call: the client span is the server span's parent.
    by_id = {s.context.span_id: s for s in spans.get_finished_spans()}
    embed = [s for s in by_id.values() if s.name.endswith("/Embed") and s.kind == trace.SpanKind.SERVER][0]
    assert by_id[embed.parent.span_id].kind == trace.SpanKind.CLIENT

    # Served from the cache: no embedder in the trace.
    names = _assert_one_connected_trace(_trace_of(spans, lambda: client.search(image=png, k=5)))
    assert "cache.get" in names and not any("Embed" in n for n in names)


def test_region_search_traces_the_tiler_read(spans, client, settings, ingested):
    region = dict(slide_id="cmu_small_region", x=333, y=444, width=448, height=448)
    names = _assert_one_connected_trace(_trace_of(spans, lambda: client.search(region=region, k=5)))
    assert {
        "smily.tiler.v1.TilerService/ReadRegion",
        "tiler.read",
        "smily.embedder.v1.EmbedderService/Embed",
        "smily.index.v1.IndexService/Search",
    } <= names


def test_no_exporter_unless_otel_variables_ask():
    code = (
        "import os; from smily.common import tracing; from opentelemetry import trace; "
        "from opentelemetry.sdk.trace import TracerProvider; "
        "assert not tracing.configure('x'); assert not isinstance(trace.get_tracer_provider(), TracerProvider); "
        "os.environ['OTEL_TRACES_EXPORTER'] = 'console'; tracing._done = False; "
        "assert tracing.configure('x') and isinstance(trace.get_tracer_provider(), TracerProvider)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
