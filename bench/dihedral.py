"""Rotation- and flip-robust queries: the robustness report and deployed precision with
the query embedded as it is, and under the 8 dihedral transforms merged by best score
per tile or by the mean embedding (issue 16; docs/evaluation.md).

One stack and index (the synthetic benchmark ingested once); one extra gateway per
configuration over the same backends, each with its own in-process cache, so no
configuration is served another's cached embeddings.

    .venv/bin/python -m bench.dihedral [--full] [--per-slide 10] [--max-queries 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from smily import stack  # noqa: E402
from smily.client import Client  # noqa: E402
from smily.common import logs  # noqa: E402
from smily.evaluation import evaluate_manifest, metrics, synthetic_benchmark  # noqa: E402
from smily.localstack import local_stack  # noqa: E402

CONFIGS = (
    ("identity (before)", (), "max"),
    ("8 transforms, best score", ("all",), "max"),
    ("8 transforms, mean embedding", ("all",), "mean"),
)
SHOWN = ("identity", "shift 1/4 tile", "rotate 90", "flip", "scale +10%", "scale -10%", "stain jitter")


def _ci(v) -> str:
    return f"{v[0]:.3f} [{v[1]:.2f},{v[2]:.2f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the full synthetic benchmark (12 slides)")
    ap.add_argument("--per-slide", type=int, default=10, help="robustness tiles per slide")
    ap.add_argument("--max-queries", type=int, default=30, help="precision queries per slide")
    ap.add_argument("--out", default=os.path.join(ROOT, "var", "dihedral-bench"))
    args = ap.parse_args()
    logs.setup("WARNING")
    rows = []
    with tempfile.TemporaryDirectory(prefix="smily-d4-") as tmp:
        specs = synthetic_benchmark.FULL if args.full else synthetic_benchmark.SMALL
        manifest = synthetic_benchmark.write(tmp, specs)
        with local_stack((tmp,), model_repository=os.path.join(ROOT, "models")) as settings:
            for name, transforms, merge in CONFIGS:
                running, s = stack.start(
                    ["gateway"],
                    settings.replace(gateway_port=0, redis_url="", query_transforms=transforms, query_merge=merge),
                )
                client = Client(f"127.0.0.1:{s.gateway.gateway_port}", timeout=600)
                try:
                    result = evaluate_manifest(
                        client,
                        s,
                        manifest,
                        os.path.join(args.out, name.split(" ")[0]),
                        max_queries=args.max_queries,
                        robustness_per_slide=args.per_slide,
                        quiet=True,
                    )
                finally:
                    client.close()
                    stack.stop(running, 0)
                r = result["robustness"]
                groups = np.array(r["slides"])
                rates = {t: metrics.bootstrap_ci(np.array(r["found"][t], float), groups) for t in SHOWN}
                p5 = result["columns"]["tissue"]["methods"]["deployed"]["P@5"]
                rows.append((name, p5, rates, r["latency_ms"], r["queries"], result["columns"]["tissue"]["queries"]))
                print(f"done: {name}", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dihedral.json"), "w") as fh:
        json.dump(
            [
                {
                    "config": n,
                    "p_at_5": p,
                    "rates": r,
                    "latency_ms": lat,
                    "robustness_queries": q,
                    "precision_queries": pq,
                }
                for n, p, r, lat, q, pq in rows
            ],
            fh,
            indent=1,
        )
    print(
        f"robustness: source tile in the deployed top 5 ({rows[0][4]} tile queries); deployed P@5 on "
        f"'tissue' ({rows[0][5]} region queries); mean [95% slide-bootstrap interval]"
    )
    print("| query | P@5 (tissue) | " + " | ".join(SHOWN) + " | image search ms (median / p90) |")
    print("|---" * (len(SHOWN) + 3) + "|")
    for name, p5, rates, lat, _, _ in rows:
        print(
            f"| {name} | {_ci(p5)} | "
            + " | ".join(_ci(rates[t]) for t in SHOWN)
            + f" | {lat['median']:.0f} / {lat['p90']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
