"""The query path as OpenTelemetry sees it: span breakdown of cached and uncached image queries.

The stack of bench/overhead.py (redis-server and the four services, each in its
own process, as deployed) exports its spans over OTLP to a collector in this
process (the standard OTEL_* variables, as an operator would set them); this
process traces the client call too. Each query is one trace; for every span
name the bench prints the median start (from the client's call) and duration
over the queries, so a serial hop shows as a span that starts only after
another ends.

    nice -n 10 .venv/bin/python bench/trace.py [--tiles 20000] [--queries 20] [--keep DIR] [--keep-index DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import overhead  # noqa: E402  (bench/overhead.py: the stack, the slide, the index filler)

from smily.client import Client  # noqa: E402
from smily.localstack import free_port  # noqa: E402


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps (service, name, trace, span, parent, start ns, end ns)."""

    def __init__(self):
        self.spans: list[tuple] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "?")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(
                            (
                                service,
                                s.name,
                                s.trace_id,
                                s.span_id,
                                s.parent_span_id,
                                s.start_time_unix_nano,
                                s.end_time_unix_nano,
                            )
                        )
        return trace_service_pb2.ExportTraceServiceResponse()


def breakdown(spans: list[tuple], roots: list[bytes]) -> list[tuple[str, float, float, int]]:
    """(service: span, median start ms from the root's start, median duration ms, traces) per span."""
    by_trace: dict[bytes, list[tuple]] = {}
    for s in spans:
        by_trace.setdefault(s[2], []).append(s)
    rows: dict[str, tuple[list[float], list[float]]] = {}
    order: dict[str, float] = {}
    for t in roots:
        got = by_trace.get(t, [])
        root = next((s for s in got if s[1] == "query"), None)
        if root is None:
            continue
        for s in got:
            name = f"{s[0]}: {s[1]}"
            starts, durs = rows.setdefault(name, ([], []))
            starts.append((s[5] - root[5]) / 1e6)
            durs.append((s[6] - s[5]) / 1e6)
    for name, (starts, _) in rows.items():
        order[name] = statistics.median(starts)
    return sorted(
        ((n, statistics.median(st), statistics.median(d), len(d)) for n, (st, d) in rows.items()),
        key=lambda r: (order[r[0]], -r[2]),
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=20_000, help="synthetic vectors in the index (+ the slide)")
    ap.add_argument("--ivf-threshold", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--keep", help="folder to keep the slide in between runs (bench/overhead.py's --keep)")
    ap.add_argument("--keep-index", help="index folder kept between runs (bench/overhead.py's --keep-index)")
    args = ap.parse_args()

    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    os.environ.update(
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    from opentelemetry import trace

    from smily.common import tracing

    tracing.configure("bench")
    tracer = trace.get_tracer("bench")

    slides = args.keep or tempfile.mkdtemp(prefix="smily-trace-")
    os.makedirs(slides, exist_ok=True)
    slide_path = os.path.join(slides, overhead.SLIDE)
    if not os.path.exists(slide_path):
        overhead.write_slide(slide_path)
    index_dir = args.keep_index or tempfile.mkdtemp(prefix="smily-trace-index-")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores)")
    stack = overhead.Stack(slides, index_dir, args.ivf_threshold)
    try:
        overhead.fill_index(stack, args.tiles, args.ivf_threshold)
        client = Client(stack.targets["gateway"], timeout=600)
        png = overhead.png_patch(stack)
        fixed = png(10**6)
        client.search(image=fixed, k=10)  # warm: channels, model id, the cache entry
        traces: dict[str, list[bytes]] = {"uncached": [], "cached": []}
        for i in range(args.queries):
            for case, image in (("uncached", png(i)), ("cached", fixed)):
                with tracer.start_as_current_span("query") as root:
                    client.search(image=image, k=10)
                traces[case].append(root.get_span_context().trace_id.to_bytes(16, "big"))
        client.close()
        trace.get_tracer_provider().force_flush()
        time.sleep(2)  # the services' batch processors export every 200 ms
    finally:
        stack.stop()  # their providers flush at exit
        if not args.keep_index:
            shutil.rmtree(index_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(slides, ignore_errors=True)
    time.sleep(1)
    server.stop(2)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for case, roots in traces.items():
        print(f"\n{case} image query, k = 10, median over {len(roots)} traces (ms from the client's call)")
        print("| service: span | starts at | lasts |")
        print("| --- | ---: | ---: |")
        for name, start, dur, n in breakdown(collector.spans, roots):
            print(f"| {name} | {start:.2f} | {dur:.2f} |" + ("" if n == len(roots) else f" (in {n} traces)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
