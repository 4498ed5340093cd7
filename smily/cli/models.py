"""`smily model export`, `import`, `quantize` and `adapt`: the model repository."""

from __future__ import annotations

import dataclasses
import sys
import warnings

REPOSITORY_HELP = "model repository (default %(default)s)"


def export(args) -> int:
    warnings.filterwarnings("ignore")
    from smily.models import export

    if args.factory:
        if not args.name:
            raise SystemExit("--factory needs --name")
        module, config = export.from_factory(
            args.factory,
            args.weights,
            name=args.name,
            version=args.version or "1",
            input_size=args.input_size,
            mean=tuple(args.mean or export.IMAGENET_MEAN),
            std=tuple(args.std or export.IMAGENET_STD),
            color_order=args.color_order,
            l2_normalize=not args.no_l2_normalize,
            description=args.description or "",
        )
    else:
        if args.weights or args.name:
            raise SystemExit("--weights and --name go with --factory")
        module, config = export.efficientnet_lite0()
        if args.version:
            config = dataclasses.replace(config, version=args.version)
    try:
        diff = export.export(module, config, args.output_dir, args.tolerance)
    except ValueError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(
        f"exported {config.model_id} to {args.output_dir}/{config.model_id} "
        f"(embedding dim {config.embedding_dim}, max abs difference to PyTorch {diff:.2e})"
    )
    return 0


def import_(args) -> int:
    from smily.common.errors import FailedPrecondition
    from smily.embedder import model_repo

    try:
        config = model_repo.read_config(args.config)
        target = model_repo.install(args.onnx, config, args.output_dir)
    except FailedPrecondition as exc:
        print(f"import failed: {exc}", file=sys.stderr)
        return 1
    print(f"imported {config.model_id} to {target} (embedding dim {config.embedding_dim})")
    return 0


def quantize(args) -> int:
    from smily.common.errors import FailedPrecondition
    from smily.models import quantize

    try:
        config = quantize.quantize(
            args.output_dir, args.model, args.version, args.calibration_dir, args.calibration_tiles, args.fp32_convs
        )
    except FailedPrecondition as exc:
        print(f"quantize failed: {exc}", file=sys.stderr)
        return 1
    print(f"quantized {args.model} to {config.model_id} in {args.output_dir} ({config.description})")
    return 0


def register(sub) -> None:
    m = sub.add_parser("model", help="model repository tools").add_subparsers(dest="model_command", required=True)
    s = m.add_parser("export", help="export EfficientNet-Lite0 (default) or any PyTorch backbone to ONNX")
    s.add_argument("--output-dir", default="models", help=REPOSITORY_HELP)
    s.add_argument(
        "--factory",
        metavar="PACKAGE.MODULE:FUNCTION",
        help="function returning an nn.Module: images [N,3,H,W] -> [N,D] or [N,D,h,w] (pooled)",
    )
    s.add_argument("--weights", metavar="FILE", help="local state dict for the factory's module")
    s.add_argument("--name", help="model name (required with --factory)")
    s.add_argument("--version", help="model version (default 1)")
    s.add_argument("--input-size", type=int, default=224, help="input side in pixels (default %(default)s)")
    s.add_argument("--mean", type=float, nargs=3, help="per-channel mean of [0,1] pixels (default ImageNet)")
    s.add_argument("--std", type=float, nargs=3, help="per-channel std of [0,1] pixels (default ImageNet)")
    s.add_argument(
        "--color-order", choices=["RGB", "BGR"], default="RGB", help="channel order the model expects (default RGB)"
    )
    s.add_argument("--no-l2-normalize", action="store_true", help="serve raw features")
    s.add_argument("--description", help="one line about the model, kept in its config.json")
    s.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="largest max abs difference to PyTorch accepted (default %(default)s)",
    )
    s.set_defaults(func=export)

    s = m.add_parser("import", help="register a ready ONNX model with its config.json (validated)")
    s.add_argument("--onnx", required=True, help="the model's .onnx file")
    s.add_argument("--config", required=True, help="config.json naming the model, see docs/models.md")
    s.add_argument("--output-dir", default="models", help=REPOSITORY_HELP)
    s.set_defaults(func=import_)

    s = m.add_parser("quantize", help="write a static INT8 version of a model, calibrated on tissue tiles")
    s.add_argument("--model", default="efficientnet-lite0/1", help="source <name>/<version>")
    s.add_argument("--version", help="version to write (default <source version>-int8)")
    s.add_argument("--calibration-dir", help="PNG/JPEG tiles to calibrate on (default: synthetic tissue)")
    s.add_argument("--calibration-tiles", type=int, default=128, help="tiles used (default %(default)s)")
    s.add_argument(
        "--fp32-convs",
        type=int,
        default=3,
        help="leading convolutions kept in FP32: more is closer to FP32, slower (default %(default)s)",
    )
    s.add_argument("--output-dir", default="models", help=REPOSITORY_HELP)
    s.set_defaults(func=quantize)

    from smily.models import adapt_cli

    adapt_cli.add_parser(m)
