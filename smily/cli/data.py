"""`smily sample-data`, `eval-data` and `eval`: synthetic slides and retrieval quality."""

from __future__ import annotations

import os
import sys
from typing import Any

from .common import client, with_gateway


def sample_data(args) -> int:
    from smily.synthetic import write_big, write_samples

    for path in [write_big(args.output_dir)] if args.big else write_samples(args.output_dir):
        print(f"wrote {path}")
    return 0


def eval_data(args) -> int:
    from smily.common.config import Settings
    from smily.evaluation import synthetic_benchmark as bench

    settings = Settings.from_env()
    path = bench.write(
        args.output_dir, bench.FULL if args.full else bench.SMALL, settings.gateway.tile_mpp, settings.gateway.tile_size
    )
    print(f"wrote {path}")
    # The manifest's sources are relative to this directory: the tiler must be allowed to read it.
    root = os.path.abspath(args.output_dir)
    print(f"slide root: {root}")
    print(f"start the stack with SMILY_SLIDE_ROOTS={root} (and pass --slide-root {root} to smily eval)")
    return 0


def evaluate(args) -> int:
    from smily.common.config import Settings
    from smily.evaluation import archive, evaluate_manifest, manifest

    if args.pathmnist:
        from smily.evaluation import pathmnist

        return pathmnist.run_cli(args)
    if not args.manifest:
        raise SystemExit("give --manifest FILE (or --pathmnist FILE.npz)")
    overrides: dict[str, Any] = {}
    if args.slide_root:
        overrides["slide_roots"] = tuple(args.slide_root)
    if args.embedder:
        overrides["embedder_target"] = args.embedder
    if any(k <= 0 for k in args.k):
        raise SystemExit("--k takes positive integers")
    c = client(args)
    try:
        evaluate_manifest(
            c,
            Settings.from_env(**overrides),
            args.manifest,
            args.out,
            tuple(sorted(set(args.k))),
            args.max_queries_per_slide,
            args.robustness,
            args.bootstrap,
            args.seed,
        )
    except (manifest.ManifestError, archive.EvalError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        c.close()
    return 0


def register(sub) -> None:
    s = sub.add_parser("sample-data", help="write synthetic sample slides")
    s.add_argument("--output-dir", default="data/samples", help="where to write them (default %(default)s)")
    s.add_argument("--big", action="store_true", help="write big.svs only: a slide that takes a while to ingest")
    s.set_defaults(func=sample_data)

    s = sub.add_parser("eval-data", help="write the synthetic labelled benchmark and its manifest")
    s.add_argument("--output-dir", default="data/eval", help="where to write them (default %(default)s)")
    s.add_argument("--full", action="store_true", help="the full-size benchmark (default: the small one)")
    s.set_defaults(func=eval_data)

    s = with_gateway(sub.add_parser("eval", help="measure retrieval quality on a labelled manifest"))
    s.add_argument("--manifest", help="CSV or JSON: source, slide_id, [x,y,width,height], labels...")
    s.add_argument(
        "--pathmnist", metavar="FILE.npz", help="instead: MedMNIST PathMNIST, train split indexed, test queried"
    )
    s.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="precision@k cut-offs (default 1 5 10)")
    s.add_argument("--out", default="var/eval", help="folder for evaluation.json and the plot")
    s.add_argument("--slide-root", action="append", help="slide root (default SMILY_SLIDE_ROOTS)")
    s.add_argument("--embedder", help="embedder HOST:PORT for exact search (default SMILY_EMBEDDER_TARGET)")
    s.add_argument(
        "--max-queries-per-slide", type=int, default=50, help="query tiles drawn per slide (default %(default)s)"
    )
    s.add_argument(
        "--robustness", type=int, default=0, metavar="N", help="also test N perturbed tiles per slide (0: skip)"
    )
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws for the 95%% intervals")
    s.add_argument("--seed", type=int, default=0, help="random seed of the draws (default %(default)s)")
    s.set_defaults(func=evaluate)
