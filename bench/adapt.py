"""`smily model adapt` before and after (docs/evaluation.md, "Adapting the model").

Generates two disjoint sets of synthetic slides, each slide stained its own
way (the batch effect of slides from different labs): the archive the model
adapts to, and the labelled evaluation slides it never sees. Adapts the
default model with --method pca and --method ssl (each in its own process:
its time and peak memory are its own), then measures the source and both
adapted models in-process on the evaluation slides (smily.evaluation.adaptation),
and the deployed cost: the four services per model, the same slides ingested,
index bytes per tile on disk and gateway query p50, the stacks taking turns.

  ADAPT_SECONDS   --seconds of each adaptation (default 900)
  ADAPT_QUICK=1   a few slides and 60 s: a smoke run
Writes var/adapt-bench/result.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from smily.client import Client
from smily.common import images, logs
from smily.evaluation import adaptation, synthetic_benchmark
from smily.localstack import local_stack
from smily.synthetic import SlideSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "var", "adapt-bench")
QUICK = os.environ.get("ADAPT_QUICK") == "1"
SECONDS = float(os.environ.get("ADAPT_SECONDS") or (60 if QUICK else 900))
STAIN = 0.15  # per-slide HED shift: the batch effect
N_TRAIN, N_EVAL = (4, 3) if QUICK else (8, 5)
SIDE = (2048, 1536) if QUICK else (3072, 2304)
# Seeds never shared between the archive and the evaluation slides.
TRAIN = tuple(SlideSpec(f"archive-{i}.tiff", "tiff", *SIDE, 0.5, 400 + i) for i in range(N_TRAIN))
EVAL = tuple(
    SlideSpec(f"eval-{i}.{'svs' if i % 2 else 'tiff'}", "svs" if i % 2 else "tiff", *SIDE, 0.5, 500 + i)
    for i in range(N_EVAL)
)


def adapt(repo: str, slides: str, method: str) -> dict:
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "smily"), "model", "adapt", "--from", "efficientnet-lite0/1", "--name", f"archive-{method}",
        "--slide-roots", slides, "--method", method, "--seconds", str(SECONDS), "--dim", "256", "--output-dir", repo,
    ]  # fmt: skip
    started = time.monotonic()
    subprocess.run(cmd, check=True)
    with open(os.path.join(repo, f"archive-{method}", "1", "config.json")) as fh:
        provenance = json.load(fh)["provenance"]
    provenance["wall_s"] = time.monotonic() - started
    return provenance


def deployed_cost(repo: str, slides: str, model_ids: dict[str, str], queries: list[np.ndarray]) -> dict:
    """Index bytes per tile on disk and gateway query p50 per model, one stack each, queries taking turns."""
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="smily-adapt-cost-") as tmp:
        stacks, clients = {}, {}
        try:
            for label, model_id in model_ids.items():
                ctx = local_stack((slides,), model_repository=repo, model=model_id, index_dir=os.path.join(tmp, label))
                stacks[label] = (ctx, ctx.__enter__())
                clients[label] = Client(f"127.0.0.1:{stacks[label][1].gateway_port}", timeout=600)
                for spec in EVAL:
                    op = clients[label].wait(clients[label].ingest(spec.name, os.path.splitext(spec.name)[0], {}))
                    assert op.progress.tiles_indexed > 0, op.error_message
            seconds: dict[str, list[float]] = {label: [] for label in model_ids}
            for rgb in queries:
                data = images.encode(rgb, images.PNG)
                for label, client in clients.items():
                    started = time.perf_counter()
                    client.search(image=data, k=5)
                    seconds[label].append(time.perf_counter() - started)
            for label, client in clients.items():
                tiles = client.index_info().tile_count
                folder = os.path.join(tmp, label)
                size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
                out[label] = {
                    "tiles": tiles,
                    "index_bytes_per_tile_on_disk": size / max(1, tiles),
                    "gateway_query_p50_ms": 1000 * float(np.median(seconds[label])),
                }
        finally:
            for client in clients.values():
                client.close()
            for ctx, _ in stacks.values():
                ctx.__exit__(None, None, None)
    return out


def main() -> int:
    logs.setup("WARNING")
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smily-adapt-bench-") as tmp:
        archive, evaluation, repo = (os.path.join(tmp, d) for d in ("archive", "eval", "models"))
        os.makedirs(repo)
        os.symlink(os.path.join(ROOT, "models", "efficientnet-lite0"), os.path.join(repo, "efficientnet-lite0"))
        synthetic_benchmark.write(archive, TRAIN, stain_shift=STAIN)
        os.remove(os.path.join(archive, "manifest.csv"))  # the archive has no labels
        manifest = synthetic_benchmark.write(evaluation, EVAL, stain_shift=STAIN)
        result: dict = {"seconds": SECONDS, "quick": QUICK, "adapt": {}}
        for method in ("pca", "ssl"):
            print(f"== adapt --method {method} --seconds {SECONDS:g}", flush=True)
            result["adapt"][method] = adapt(repo, archive, method)
        model_ids = {"source": "efficientnet-lite0/1", "pca": "archive-pca/1", "ssl": "archive-ssl/1"}
        ev = adaptation.load(manifest)
        result["compare"] = adaptation.compare(repo, model_ids, ev, per_slide=6 if QUICK else 15)
        rng = np.random.default_rng(0)
        picks = rng.choice(len(ev.images), min(40, len(ev.images)), replace=False)
        result["deployed"] = deployed_cost(repo, evaluation, model_ids, [ev.images[i] for i in picks])
    print(adaptation.describe(result["compare"]))
    for label, cost in result["deployed"].items():
        print(
            f"{label}: {cost['tiles']} tiles, index {cost['index_bytes_per_tile_on_disk']:.0f} B/tile on disk, "
            f"gateway query p50 {cost['gateway_query_p50_ms']:.1f} ms"
        )
    for method, p in result["adapt"].items():
        print(f"adapt {method}: {p['wall_s']:.0f} s wall, peak RSS {p['peak_rss_mib']:.0f} MiB, timing {p['timing_s']}")
    with open(os.path.join(OUT, "result.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=float)
    print(f"wrote {os.path.join(OUT, 'result.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
