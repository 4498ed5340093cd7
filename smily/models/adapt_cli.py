"""The `smily model adapt` command line; the work is in smily.models.adapt
(imported only when the command runs, so `smily --help` stays quick)."""

from __future__ import annotations

import sys


def add_parser(model_commands) -> None:
    """`smily model adapt` under the `smily model` subcommands."""
    s = model_commands.add_parser("adapt", help="adapt a model to the archive's own slides, without labels")
    s.add_argument("--from", dest="source", required=True, metavar="NAME/VERSION", help="the model to adapt")
    s.add_argument("--name", required=True, help="name of the adapted model")
    s.add_argument("--version", default="1", help="its version (default %(default)s)")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--slide-roots", nargs="+", metavar="DIR", help="learn from every slide under these folders")
    where.add_argument(
        "--from-index",
        action="store_true",
        help="learn from the indexed slides (sources from the index service, files under SMILY_SLIDE_ROOTS)",
    )
    s.add_argument(
        "--index", metavar="HOST:PORT", action="append", help="with --from-index (default SMILY_INDEX_TARGET(S))"
    )
    s.add_argument("--max-tiles", type=int, default=2000, help="tiles sampled across slides (default %(default)s)")
    s.add_argument("--dim", type=int, default=256, help="embedding size (default %(default)s)")
    s.add_argument("--method", choices=["ssl", "pca"], default="ssl", help="ssl: VICReg head; pca: PCA-whitening")
    s.add_argument("--seconds", type=float, default=900, help="time budget (default %(default)s)")
    s.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the head trains (cuda needs torch's CUDA build)"
    )
    s.add_argument("--unfreeze-blocks", type=int, default=0, help="backbone blocks trained too (not supported yet)")
    s.add_argument("--seed", type=int, default=0, help="random seed of sampling, augmentation and training")
    s.add_argument("--output-dir", default="models", help="model repository (default %(default)s)")
    s.set_defaults(func=run)


def run(args) -> int:
    import warnings

    from smily.common.errors import FailedPrecondition

    from .adapt import Options, adapt
    from .archive_tiles import SampleError

    warnings.filterwarnings("ignore")
    opts = Options(
        source=args.source,
        name=args.name,
        version=args.version,
        repo=args.output_dir,
        slide_roots=tuple(args.slide_roots or ()),
        from_index=args.from_index,
        index_targets=tuple(args.index or ()),
        max_tiles=args.max_tiles,
        dim=args.dim,
        method=args.method,
        seconds=args.seconds,
        device=args.device,
        unfreeze_blocks=args.unfreeze_blocks,
        seed=args.seed,
    )
    try:
        config = adapt(opts, lambda msg: print(msg, file=sys.stderr))
    except (FailedPrecondition, SampleError) as exc:
        print(f"adapt failed: {exc}", file=sys.stderr)
        return 1
    g = config.provenance["gate"]
    print(f"adapted {opts.source} to {config.model_id} in {opts.repo} (dim {config.embedding_dim}, {opts.method})")
    if g:
        src, new = g["source"], g["adapted"]
        print(
            f"gate on {g['slides']} held-out slides, {g['queries']} queries: mean recall@5 "
            f"{src['recall']['mean']['recall@5']:.3f} -> {new['recall']['mean']['recall@5']:.3f}, "
            f"own-slide share of top-5 {src['slide_dependence']['own_slide_share']:.3f} -> "
            f"{new['slide_dependence']['own_slide_share']:.3f}"
        )
    return 0
