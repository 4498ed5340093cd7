"""Search latency while the index migrates to another model (issue 25), against before it.

The stack in this process (tiler, an embedder per model, a SQLite index, the gateway): the
default model and its INT8 version (`smily model quantize`, into a temporary repository), the
synthetic sample slides ingested. Side by side in one run: the p50 and p95 of region searches,
each of a region not searched before (so each embeds its query: the embedder is what a
migration competes for), before the migration and while it re-embeds every slide (throttle
--max-tiles-per-s, and the p95 guard).

    nice -n 10 .venv/bin/python bench/migration.py
    .venv/bin/python bench/migration.py --searches 40 --slides 2   # quick look
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time

from smily import stack
from smily.cli import main as smily_main
from smily.client import Client
from smily.common.config import Settings
from smily.gateway.v1 import gateway_pb2
from smily.synthetic import DEFAULT_SLIDES, write_samples

OLD, NEW = "efficientnet-lite0/1", "efficientnet-lite0/1-int8"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNING = (gateway_pb2.OPERATION_STATE_QUEUED, gateway_pb2.OPERATION_STATE_RUNNING)


def regions():
    """Regions of sample-a never searched before in this run: every search embeds its query."""
    for i in itertools.count():
        yield dict(slide_id="sample-a", x=256 + (i * 37) % 3072, y=256 + (i * 53) % 2304, width=224, height=224)


def timed(client: Client, where, n: int, while_=lambda: True) -> list[float]:
    out = []
    for _ in range(n):
        if not while_():
            break
        start = time.perf_counter()
        client.search(region=next(where), k=10)
        out.append((time.perf_counter() - start) * 1000)
    return out


def row(name: str, ms: list[float]) -> str:
    ordered = sorted(ms)
    return f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {ordered[int(0.95 * (len(ms) - 1))]:.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--searches", type=int, default=200, help="before, and at most during")
    ap.add_argument("--max-tiles-per-s", type=float, default=0.0, help="the migration's throttle (0: none)")
    ap.add_argument("--slides", type=int, default=3, help="sample slides ingested")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = os.path.join(tmp, "repo")
        os.makedirs(os.path.join(repo, "efficientnet-lite0"))
        os.symlink(
            os.path.join(ROOT, "models", "efficientnet-lite0", "1"), os.path.join(repo, "efficientnet-lite0", "1")
        )
        assert smily_main(["model", "quantize", "--model", OLD, "--calibration-tiles", "16", "--output-dir", repo]) == 0
        slides = os.path.join(tmp, "slides")
        specs = DEFAULT_SLIDES[: args.slides]
        write_samples(slides, specs)
        settings = Settings().replace(
            bind_host="127.0.0.1",
            plaintext=True,
            auth="none",
            gateway_port=0,
            tiler_port=0,
            embedder_port=0,
            index_port=0,
            metrics_port=0,
            slide_roots=(slides,),
            model_repository=repo,
            model=OLD,
            index_dir=os.path.join(tmp, "index"),
        )
        backends, settings = stack.start(["tiler", "embedder", "index"], settings)
        int8, int8_settings = stack.start(["embedder"], settings.replace(model=NEW, embedder_port=0))
        settings = settings.replace(model_embedder_targets=(int8_settings.embedder.embedder_target,))
        gateway, settings = stack.start(["gateway"], settings)
        client = Client(f"127.0.0.1:{settings.gateway.gateway_port}", timeout=600)
        try:
            for spec in specs:
                op = client.wait(client.ingest(spec.name, os.path.splitext(spec.name)[0]), deadline_s=1800)
                assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, op.error_message
            where = regions()
            timed(client, where, 10)  # warm up
            before = timed(client, where, args.searches)
            op = client.migrate_index(NEW, args.max_tiles_per_s)
            during = timed(client, where, args.searches, lambda: client.operation(op.operation_id).state in RUNNING)
            done = client.wait(op, deadline_s=3600)
            print(f"migration: {gateway_pb2.OperationState.Name(done.state)}, {done.progress.tiles_indexed} tiles")
            print("| searches | n | p50 ms | p95 ms |\n| --- | --- | --- | --- |")
            print(row("before the migration", before))
            print(row("during the migration", during))
            p95 = [sorted(x)[int(0.95 * (len(x) - 1))] for x in (before, during)]
            print(f"p95 during / before: {p95[1] / p95[0]:.2f}x")
        finally:
            client.close()
            for running in (gateway, int8, backends):
                stack.stop(running, 0)


if __name__ == "__main__":
    main()
