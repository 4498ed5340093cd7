"""The `smily` command: run services, ingest, search, manage models and data."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import warnings
from typing import Any

import grpc

# SMILY_GATEWAY, else the port a `make up` with the same environment listens on.
DEFAULT_GATEWAY = os.environ.get("SMILY_GATEWAY") or f"127.0.0.1:{os.environ.get('SMILY_GATEWAY_PORT') or 50050}"


def _serve(args) -> int:
    from smily import stack
    from smily.common import logs, server
    from smily.common.config import Settings

    settings = Settings.from_env()
    if args.service == "http":
        from smily.http.server import serve

        serve(settings)
        return 0
    logs.setup(settings.log_level)
    names = stack.ORDER if args.service == "all" else (args.service,)
    server.start_metrics(settings.metrics_port, settings.bind_host)
    running, _ = stack.start(names, settings)
    server.wait_for_signal(list(running.values()), settings.shutdown_grace_s)
    stack.stop(running, 0)
    return 0


def _client(args):
    from smily.client import Client

    try:
        return Client(args.gateway, tls_ca=args.tls_ca, token=args.token)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


def _wait(client, op):
    """Wait for an operation to finish, showing its progress on stderr."""
    from smily.output import Progress

    progress = Progress(f"  {op.slide_id or op.operation_id}")
    try:
        return client.wait(op, on_progress=lambda o: progress.update(o.progress.tiles_indexed, o.progress.tiles_total))
    finally:
        progress.close()


def _print_operation(op, as_json: bool) -> int:
    """An ingest operation, as JSON or one line; non-zero when it failed."""
    from smily.gateway.v1 import gateway_pb2
    from smily.output import print_json

    failed = op.state == gateway_pb2.OPERATION_STATE_FAILED
    if as_json:
        print_json(op)
    elif failed:
        print(f"ingest of {op.slide_id} failed: {op.error_code}: {_flags(op.error_message)}", file=sys.stderr)
    elif op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED:
        print(f"ingested {op.slide_id}: {op.progress.tiles_indexed} tiles (model {op.model_id})")
    else:
        print(
            f"{op.operation_id}: {gateway_pb2.OperationState.Name(op.state)} {op.slide_id}, "
            f"{op.progress.tiles_indexed}/{op.progress.tiles_total} tiles indexed"
            f"{' (cancel requested)' if op.cancel_requested else ''}"
        )
    return 1 if failed else 0


def _key_values(items, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _ingest(args) -> int:
    metadata = _key_values(args.meta, "--meta")
    client = _client(args)
    op = client.ingest(args.slide, args.slide_id or "", metadata, args.slide_mpp)
    if args.no_wait and not args.json:
        print(op.operation_id)
        return 0
    return _print_operation(op if args.no_wait else _wait(client, op), args.json)


def _status(args) -> int:
    client = _client(args)
    op = client.operation(args.operation_id)
    return _print_operation(_wait(client, op) if args.wait else op, args.json)


def _ingest_case(args) -> int:
    from smily.gateway.v1 import gateway_pb2
    from smily.output import print_json

    client = _client(args)
    op = client.ingest_case(
        args.accession, args.archive or "", _key_values(args.slide_id, "--slide-id"), _key_values(args.meta, "--meta")
    )
    if args.no_wait and not args.json:
        print(op.operation_id)
        return 0
    if not args.no_wait:
        op = _wait(client, op)
    failed = op.state == gateway_pb2.OPERATION_STATE_FAILED
    if args.json:
        print_json(op)
        return 1 if failed else 0
    for s in op.slides:
        state = gateway_pb2.OperationState.Name(s.state).removeprefix("OPERATION_STATE_").lower()
        error = f" {s.error_code}: {_flags(s.error_message)}" if s.error_code else ""
        print(f"{s.slide_id}\t{state}\t{s.progress.tiles_indexed} tiles\tstudy {s.study_instance_uid}{error}")
    if failed:
        print(f"case ingest failed: {op.error_code}: {_flags(op.error_message)}", file=sys.stderr)
    return 1 if failed else 0


def _parse_region(text: str) -> dict:
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--region takes X,Y,W,H in level-0 pixels, got {text!r}") from None
    return {"x": x, "y": y, "width": w, "height": h}


def _example(spec: str):
    """SLIDE_ID:X,Y,W,H is a region; anything else is an image file."""
    slide, sep, rect = spec.rpartition(":")
    if sep and rect.count(",") == 3:
        return dict(slide_id=slide, **_parse_region(rect))
    with open(spec, "rb") as fh:
        return fh.read()


def _concept_weights(items) -> dict[str, float]:
    out = {}
    for item in items or []:
        name, sep, weight = item.partition("=")
        try:
            out[name] = float(weight)
        except ValueError:
            raise SystemExit(f"--concept takes NAME=WEIGHT, got {item!r}") from None
        if not sep or not name:
            raise SystemExit(f"--concept takes NAME=WEIGHT, got {item!r}")
    return out


def _search(args) -> int:
    client = _client(args)
    if args.image and args.slide:
        raise SystemExit("give either --image FILE or --slide ID --region X,Y,W,H")
    if not (args.image or args.slide or args.positive):
        raise SystemExit("give --image FILE, --slide ID --region X,Y,W,H or --positive examples")
    query: dict[str, bytes | dict] = {}
    if args.image:
        with open(args.image, "rb") as fh:
            query["image"] = fh.read()
    elif args.slide:
        if not args.region:
            raise SystemExit("--slide needs --region X,Y,W,H")
        query["region"] = dict(slide_id=args.slide, **_parse_region(args.region))
    resp = client.search(
        **query,
        k=args.k,
        exclude_query_slide=args.exclude_query_slide,
        positives=[_example(e) for e in args.positive or []],
        negatives=[_example(e) for e in args.negative or []],
        negative_weight=args.negative_weight,
        concepts=_concept_weights(args.concept),
        max_hits_per_slide=args.max_per_slide,
        page_size=args.page_size,
        page_token=args.page_token,
        slide_ids=args.slide_id or [],
        filters=_key_values(args.filter, "--filter"),
        exclude_slide_ids=args.exclude_slide or [],
        exclude_query_case=args.exclude_query_case,
        nprobe=args.nprobe,
        image_mpp=args.image_mpp,
    )
    from smily.output import print_hits, print_json

    if args.json:
        print_json(resp)
        return 0
    print_hits(resp)
    if resp.next_page_token:
        print(f"next page: --page-token {resp.next_page_token}", file=sys.stderr)
    return 0


def _search_slides(args) -> int:
    from smily.client import hit_dict

    if bool(args.slide_id) == bool(args.source):
        raise SystemExit("give either --slide-id ID or --source PATH")
    resp = _client(args).search_slides(
        slide_id=args.slide_id or "",
        source=args.source or "",
        k=args.k,
        mosaic_size=args.mosaic_size,
        exclude_query_slide=args.exclude_query_slide,
        slide_mpp=args.slide_mpp,
    )
    if args.json:
        from smily.output import print_json

        print_json(resp)
        return 0
    slides = [
        {
            "slide_id": s.slide_id,
            "score": round(float(s.score), 4),
            "matched_mosaic_tiles": s.matched_mosaic_tiles,
            "metadata": dict(s.metadata),
            "regions": [hit_dict(h) for h in s.regions],
        }
        for s in resp.slides
    ]
    print(f"{len(slides)} slides (mosaic of {resp.mosaic_size} tiles, model {resp.model_id})")
    for i, s in enumerate(slides, 1):
        best = s["regions"][0] if s["regions"] else None
        where = f"best region {best['x']},{best['y']},{best['width']},{best['height']}" if best else ""
        print(f"{i:>4}  {s['score']:>6.3f}  {s['slide_id']:<24} {s['matched_mosaic_tiles']:>3} tiles matched  {where}")
    return 0


def _read_region(args) -> int:
    region = dict(slide_id=args.slide_id, **_parse_region(args.region))
    resp = _client(args).read_region(
        region, mpp=args.mpp, max_side=args.max_side, jpeg=args.output.lower().endswith((".jpg", ".jpeg"))
    )
    with open(args.output, "wb") as fh:
        fh.write(resp.image)
    if args.json:
        from smily.output import message_dict, print_json

        fields = {k: v for k, v in message_dict(resp).items() if k != "image"}  # the image is in the file
        print_json({"output": args.output, **fields})
        return 0
    print(f"wrote {args.output}: {resp.width}x{resp.height} at {resp.mpp:.3f} um/px")
    return 0


def _concept(args) -> int:
    from smily.output import message_dict, print_json

    client = _client(args)
    if args.concept_command == "create":
        if not args.with_ or not args.without:
            raise SystemExit("a concept needs --with and --without examples")
        c = client.create_concept(args.name, [_example(e) for e in args.with_], [_example(e) for e in args.without])
        if args.json:
            print_json(c)
        else:
            print(
                f"concept {c.name} ({c.model_id}): {c.with_examples} with, {c.without_examples} without, "
                f"training accuracy {c.train_accuracy:.2f}"
            )
    elif args.concept_command == "list":
        concepts = client.concepts()
        if args.json:
            print_json({"concepts": [message_dict(c) for c in concepts]})
            return 0
        for c in concepts:
            print(f"{c.name:<24} {c.with_examples:>4} with {c.without_examples:>4} without  {c.model_id}")
    else:
        client.delete_concept(args.name)
        if args.json:
            print_json({"deleted_concept": args.name})
            return 0
        print(f"deleted concept {args.name}")
    return 0


def _cancel(args) -> int:
    _print_operation(_client(args).cancel(args.operation_id), args.json)
    return 0


def _slides(args) -> int:
    slides = _client(args).slides()
    if args.json:
        from smily.output import message_dict, print_json

        print_json({"slides": [message_dict(s) for s in slides]})
        return 0
    for s in slides:
        meta = ", ".join(f"{k}={v}" for k, v in sorted(s.metadata.items()))
        print(f"{s.slide_id:<24} {s.tile_count:>7} tiles  {s.model_id}  {meta}")
    print(f"{len(slides)} slides")
    return 0


def _delete(args) -> int:
    n = _client(args).delete(args.slide_id)
    if args.json:
        from smily.output import print_json

        print_json({"slide_id": args.slide_id, "deleted_tiles": n})
        return 0
    print(f"deleted {args.slide_id} ({n} tiles)")
    return 0


def _model_export(args) -> int:
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


def _model_import(args) -> int:
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


def _model_quantize(args) -> int:
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


def _sample_data(args) -> int:
    from smily.synthetic import write_big, write_samples

    for path in [write_big(args.output_dir)] if args.big else write_samples(args.output_dir):
        print(f"wrote {path}")
    return 0


def _info(args) -> int:
    from smily.output import print_json

    client = _client(args)
    try:
        info = client.index_info()
    finally:
        client.close()
    t = info.tiling
    out = {
        "model_id": info.model_id,
        "slides": info.slide_count,
        "tiles": info.tile_count,
        "tiling": {
            "mpps": list(t.mpps),
            "tile_size": t.tile_size,
            "stride": t.stride,
            "min_tissue_fraction": t.min_tissue_fraction,
        },
        "tiling_recorded": info.tiling_recorded,
    }
    if args.json:
        print_json(out)
        return 0
    print(f"model {info.model_id or '(none yet)'}: {info.slide_count} slides, {info.tile_count} tiles")
    where = (
        "recorded in the index" if info.tiling_recorded else "this gateway's settings; the first ingest records them"
    )
    print(
        f"tiling ({where}): {t.tile_size} px tiles at {', '.join(f'{m:g}' for m in t.mpps)} µm/px, "
        f"stride {t.stride:g}, min tissue {t.min_tissue_fraction:g}"
    )
    return 0


def _eval(args) -> int:
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
    client = _client(args)
    try:
        evaluate_manifest(
            client,
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
        client.close()
    return 0


def _eval_data(args) -> int:
    from smily.common.config import Settings
    from smily.evaluation import synthetic_benchmark as bench

    settings = Settings.from_env()
    path = bench.write(args.output_dir, bench.FULL if args.full else bench.SMALL, settings.tile_mpp, settings.tile_size)
    print(f"wrote {path}")
    # The manifest's sources are relative to this directory: the tiler must be allowed to read it.
    root = os.path.abspath(args.output_dir)
    print(f"slide root: {root}")
    print(f"start the stack with SMILY_SLIDE_ROOTS={root} (and pass --slide-root {root} to smily eval)")
    return 0


def _demo(args) -> int:
    from smily.demo import run

    return run(args.slides)


def _up(args) -> int:
    from smily.localstack import up, up_cluster

    if args.shards or args.replicas:
        return up_cluster(args.shards or 1, args.replicas or 1)
    return up()


def _reshard(args) -> int:
    from smily.common.config import Settings
    from smily.index.reshard import reshard

    url = Settings.from_env().index_database_url
    if not url:
        raise SystemExit("set SMILY_INDEX_DATABASE_URL to the index cluster's PostgreSQL")
    moved = reshard(url, args.from_shards, args.shards)
    print(
        f"moved {moved} slides from {args.from_shards} to {args.shards} shards; "
        f"now set SMILY_INDEX_TARGETS to {args.shards} shards"
    )
    return 0


def _down(args) -> int:
    from smily.localstack import down

    return down()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smily", description="Reverse image search for whole-slide images.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_gateway(sp):
        sp.add_argument("--gateway", default=DEFAULT_GATEWAY, help="gateway HOST:PORT (default %(default)s)")
        sp.add_argument(
            "--tls-ca",
            default=None,
            metavar="FILE",
            help="CA certificate (PEM) to verify the gateway with: TLS (default $SMILY_TLS_CA_FILE)",
        )
        sp.add_argument(
            "--token", default=None, help="OIDC bearer token sent with every call (default $SMILY_TOKEN; needs TLS)"
        )
        return sp

    def api(sp):
        """A command that calls the gateway and can print its whole answer as one JSON object."""
        sp.add_argument("--json", action="store_true", help="print the response as one JSON object")
        return with_gateway(sp)

    s = sub.add_parser("serve", help="run services (config from SMILY_* variables)")
    # "http" (the HTTP/JSON API and viewer) is its own process; "all" is the four gRPC services.
    s.add_argument("service", choices=["all", "tiler", "embedder", "index", "gateway", "http"])
    s.set_defaults(func=_serve)

    s = api(sub.add_parser("ingest", help="index a slide (path relative to the slide roots)"))
    s.add_argument("slide")
    s.add_argument("--slide-id", help="your opaque id for the slide (default: from its content)")
    s.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata returned with hits")
    s.add_argument(
        "--slide-mpp",
        type=float,
        default=0.0,
        help="microns per level-0 pixel, for a file that records none (e.g. 0.25 at 40x)",
    )
    s.add_argument("--no-wait", action="store_true", help="print the operation id and return")
    s.set_defaults(func=_ingest)

    s = api(sub.add_parser("ingest-case", help="index every slide of a case from the DICOMweb archive"))
    s.add_argument("accession", help="the case's accession number (0008,0050)")
    s.add_argument("--archive", help="a configured archive's name (default: the first)")
    s.add_argument(
        "--slide-id",
        action="append",
        metavar="SERIES_UID=ID",
        help="your id for a series' slide (default: its SeriesInstanceUID)",
    )
    s.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata added to every slide")
    s.add_argument("--no-wait", action="store_true", help="print the operation id and return")
    s.set_defaults(func=_ingest_case)

    s = api(sub.add_parser("search", help="find similar regions"))
    s.add_argument("--image", help="PNG or JPEG patch")
    s.add_argument("--slide", help="indexed slide id, with --region")
    s.add_argument("--region", help="X,Y,W,H in level-0 pixels")
    s.add_argument(
        "--image-mpp",
        type=float,
        default=0.0,
        help="microns per pixel of --image (default 1.0): searched at the nearest indexed resolution",
    )
    s.add_argument("--k", type=int, default=None, help="number of hits (default 10)")
    s.add_argument("--exclude-query-slide", action="store_true", help="leave the region examples' slides out")
    s.add_argument(
        "--exclude-query-case",
        action="store_true",
        help="leave every slide of the query slide's case out (metadata SMILY_CASE_KEY, default case_id)",
    )
    s.add_argument(
        "--filter", action="append", metavar="KEY=VALUE", help="only slides with this metadata (all must hold)"
    )
    s.add_argument("--slide-id", action="append", metavar="ID", help="only tiles of these slides")
    s.add_argument("--exclude-slide", action="append", metavar="ID", help="leave this slide out")
    s.add_argument("--nprobe", type=int, default=0, help="IVF lists probed (default: the index's)")
    example = "an image FILE or SLIDE_ID:X,Y,W,H"
    s.add_argument("--positive", action="append", metavar="EXAMPLE", help=f"more like this: {example}")
    s.add_argument("--negative", action="append", metavar="EXAMPLE", help=f"less like this: {example}")
    s.add_argument("--negative-weight", type=float, default=None, help="Rocchio weight of negatives (default 0.5)")
    s.add_argument("--concept", action="append", metavar="NAME=WEIGHT", help="steer by a concept (weight < 0: less)")
    s.add_argument("--max-per-slide", type=int, default=0, help="at most this many hits per slide")
    s.add_argument("--page-size", type=int, default=0)
    s.add_argument("--page-token", default="")
    s.set_defaults(func=_search)

    s = api(sub.add_parser("search-slides", help="find similar whole slides (Yottixel)"))
    s.add_argument("--slide-id", help="an indexed slide")
    s.add_argument("--source", help="a slide path under the slide roots")
    s.add_argument("--k", type=int, default=None, help="number of slides (default 10)")
    s.add_argument("--mosaic-size", type=int, default=None, help="tiles in the query's mosaic (default 16)")
    s.add_argument("--exclude-query-slide", action="store_true")
    s.add_argument("--slide-mpp", type=float, default=0.0, help="with --source: as for ingest")
    s.set_defaults(func=_search_slides)

    s = api(sub.add_parser("read-region", help="save the image of a slide region (a hit)"))
    s.add_argument("slide_id")
    s.add_argument("region", help="X,Y,W,H in level-0 pixels")
    s.add_argument("--output", required=True, help=".png or .jpg file")
    s.add_argument("--mpp", type=float, default=0.0, help="output um/px (default: the tiling resolution)")
    s.add_argument("--max-side", type=int, default=0, help="longest side in pixels (default 1024)")
    s.set_defaults(func=_read_region)

    c = sub.add_parser("concept", help="concepts for steering searches").add_subparsers(
        dest="concept_command", required=True
    )
    s = api(c.add_parser("create", help="learn a concept from examples with and without it"))
    s.add_argument("name")
    s.add_argument("--with", dest="with_", action="append", metavar="EXAMPLE", help=example)
    s.add_argument("--without", action="append", metavar="EXAMPLE", help=example)
    s.set_defaults(func=_concept)
    s = api(c.add_parser("list", help="concepts of the current model"))
    s.set_defaults(func=_concept)
    s = api(c.add_parser("delete", help="delete a concept"))
    s.add_argument("name")
    s.set_defaults(func=_concept)

    s = api(sub.add_parser("cancel", help="cancel an ingest operation"))
    s.add_argument("operation_id")
    s.set_defaults(func=_cancel)

    s = api(sub.add_parser("info", help="the index's model and tiling settings"))
    s.set_defaults(func=_info)

    s = api(sub.add_parser("status", help="state and progress of an ingest operation"))
    s.add_argument("operation_id")
    s.add_argument("--wait", action="store_true", help="wait until it finishes, showing progress")
    s.set_defaults(func=_status)

    s = api(sub.add_parser("slides", help="list indexed slides"))
    s.set_defaults(func=_slides)

    s = api(sub.add_parser("delete", help="remove a slide from the index"))
    s.add_argument("slide_id")
    s.set_defaults(func=_delete)

    m = sub.add_parser("model", help="model repository tools").add_subparsers(dest="model_command", required=True)
    s = m.add_parser("export", help="export EfficientNet-Lite0 (default) or any PyTorch backbone to ONNX")
    s.add_argument("--output-dir", default="models", help="model repository (default %(default)s)")
    s.add_argument(
        "--factory",
        metavar="PACKAGE.MODULE:FUNCTION",
        help="function returning an nn.Module: images [N,3,H,W] -> [N,D] or [N,D,h,w] (pooled)",
    )
    s.add_argument("--weights", metavar="FILE", help="local state dict for the factory's module")
    s.add_argument("--name", help="model name (required with --factory)")
    s.add_argument("--version", help="model version (default 1)")
    s.add_argument("--input-size", type=int, default=224)
    s.add_argument("--mean", type=float, nargs=3, help="per-channel mean of [0,1] pixels (default ImageNet)")
    s.add_argument("--std", type=float, nargs=3, help="per-channel std of [0,1] pixels (default ImageNet)")
    s.add_argument("--color-order", choices=["RGB", "BGR"], default="RGB")
    s.add_argument("--no-l2-normalize", action="store_true", help="serve raw features")
    s.add_argument("--description")
    s.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="largest max abs difference to PyTorch accepted (default %(default)s)",
    )
    s.set_defaults(func=_model_export)

    s = m.add_parser("import", help="register a ready ONNX model with its config.json (validated)")
    s.add_argument("--onnx", required=True)
    s.add_argument("--config", required=True, help="config.json naming the model, see docs/models.md")
    s.add_argument("--output-dir", default="models")
    s.set_defaults(func=_model_import)

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
    s.add_argument("--output-dir", default="models")
    s.set_defaults(func=_model_quantize)
    from smily.models import adapt_cli

    adapt_cli.add_parser(m)

    s = sub.add_parser("sample-data", help="write synthetic sample slides")
    s.add_argument("--output-dir", default="data/samples")
    s.add_argument("--big", action="store_true", help="write big.svs only: a slide that takes a while to ingest")
    s.set_defaults(func=_sample_data)

    s = with_gateway(sub.add_parser("eval", help="measure retrieval quality on a labelled manifest"))
    s.add_argument("--manifest", help="CSV or JSON: source, slide_id, [x,y,width,height], labels...")
    s.add_argument(
        "--pathmnist", metavar="FILE.npz", help="instead: MedMNIST PathMNIST, train split indexed, test queried"
    )
    s.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="precision@k cut-offs (default 1 5 10)")
    s.add_argument("--out", default="var/eval", help="folder for evaluation.json and the plot")
    s.add_argument("--slide-root", action="append", help="slide root (default SMILY_SLIDE_ROOTS)")
    s.add_argument("--embedder", help="embedder HOST:PORT for exact search (default SMILY_EMBEDDER_TARGET)")
    s.add_argument("--max-queries-per-slide", type=int, default=50)
    s.add_argument(
        "--robustness", type=int, default=0, metavar="N", help="also test N perturbed tiles per slide (0: skip)"
    )
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws for the 95%% intervals")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_eval)

    s = sub.add_parser("eval-data", help="write the synthetic labelled benchmark and its manifest")
    s.add_argument("--output-dir", default="data/eval")
    s.add_argument("--full", action="store_true", help="the full-size benchmark (default: the small one)")
    s.set_defaults(func=_eval_data)

    s = sub.add_parser("demo", help="start the stack, ingest the samples, search, stop")
    s.add_argument("--slides", default="data/samples")
    s.set_defaults(func=_demo)

    s = sub.add_parser("up", help="start the local stack in the background")
    s.add_argument("--shards", type=int, default=0, help="index shards on a local PostgreSQL (cluster mode)")
    s.add_argument("--replicas", type=int, default=0, help="index replicas per shard (cluster mode)")
    s.set_defaults(func=_up)
    ix = sub.add_parser("index", help="index cluster tools").add_subparsers(dest="index_command", required=True)
    s = ix.add_parser(
        "reshard", help="move slides to their shards for a new shard count (PostgreSQL at SMILY_INDEX_DATABASE_URL)"
    )
    s.add_argument("--shards", type=int, required=True, help="the new shard count")
    s.add_argument("--from", dest="from_shards", type=int, required=True, help="the current shard count")
    s.set_defaults(func=_reshard)
    sub.add_parser("down", help="stop the local stack").set_defaults(func=_down)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        logging.basicConfig(level=logging.WARNING)
    try:
        return args.func(args)
    except grpc.RpcError as exc:
        print(f"error: {_explain(exc, getattr(args, 'gateway', DEFAULT_GATEWAY))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file named on the command line
        print(f"error: {exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2


# Request fields the services name in errors -> the flags that set them.
FLAGS = {
    "slide_mpp": "--slide-mpp",
    "page_token": "--page-token",
    "page_size": "--page-size",
    "max_hits_per_slide": "--max-per-slide",
    "negative_weight": "--negative-weight",
    "mosaic_size": "--mosaic-size",
    "max_side": "--max-side",
    "nprobe": "--nprobe",
    "slide_ids": "--slide-id",
    "exclude_slide_ids": "--exclude-slide",
    "filters": "--filter",
}
_FIELD = re.compile(r"(in the request's |the request's )?\b(" + "|".join(FLAGS) + r")\b")


def _flags(message: str) -> str:
    """A service's message with request fields named as the flags that set them."""
    return _FIELD.sub(
        lambda m: ("with " if m.group(1) and m.group(1).startswith("in ") else "") + FLAGS[m.group(2)], message
    )


def _explain(exc: grpc.RpcError, gateway: str) -> str:
    """What went wrong, and what to do about it."""
    code, details = exc.code(), _flags(exc.details() or "")
    if code == grpc.StatusCode.UNAVAILABLE:
        what = "cannot connect" if "failed to connect" in details.lower() else details
        return (
            f"UNAVAILABLE: the gateway at {gateway}: {what}. Is the stack up? `make up` starts the local "
            f"one; --gateway HOST:PORT (or SMILY_GATEWAY) names another."
        )
    if code == grpc.StatusCode.NOT_FOUND:
        if "slide roots" in details:
            from smily.common.config import Settings

            roots = ":".join(Settings.from_env().slide_roots)
            details += f" (slide roots: {roots}, SMILY_SLIDE_ROOTS; give a path relative to one of them)"
        elif "not in the index" in details:
            details += "; `smily slides` lists the indexed slides"
        elif "no operation" in details:
            details += "; `smily ingest --no-wait` prints an operation's id"
        elif "no concept" in details:
            details += "; `smily concept list` lists the concepts"
    return f"{code.name}: {details}"


if __name__ == "__main__":
    sys.exit(main())
