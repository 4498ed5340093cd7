"""`smily ingest`, `ingest-case`, `status` and `cancel`: ingest operations."""

from __future__ import annotations

import sys

from .common import api, client, flags, key_values, wait


def print_operation(op, as_json: bool) -> int:
    """An operation, as JSON or one line (after a line per slide of a case or migration); non-zero when it
    failed."""
    from smily.gateway.v1 import gateway_pb2
    from smily.output import print_json

    failed = op.state == gateway_pb2.OPERATION_STATE_FAILED
    if as_json:
        print_json(op)
        return 1 if failed else 0
    for s in op.slides:  # a case's or a migration's slides, each with its own state
        state = gateway_pb2.OperationState.Name(s.state).removeprefix("OPERATION_STATE_").lower()
        why = f" {s.error_code}: {flags(s.error_message)}" if s.error_code else ""
        print(f"  {s.slide_id}: {state}, {s.progress.tiles_indexed} tiles{why}")
    if op.unrefitted_concepts:  # a migration that cut over
        print(f"concepts not refitted (create them again): {', '.join(op.unrefitted_concepts)}", file=sys.stderr)
    what = f"ingest of {op.slide_id}" if op.slide_id else f"operation {op.operation_id}"
    if failed:
        print(f"{what} failed: {op.error_code}: {flags(op.error_message)}", file=sys.stderr)
    elif op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED:
        done = f"ingested {op.slide_id}" if op.slide_id else f"{op.operation_id} done"
        print(f"{done}: {op.progress.tiles_indexed} tiles (model {op.model_id})")
    else:
        print(
            f"{op.operation_id}: {gateway_pb2.OperationState.Name(op.state)} {op.slide_id}, "
            f"{op.progress.tiles_indexed}/{op.progress.tiles_total} tiles indexed"
            f"{' (cancel requested)' if op.cancel_requested else ''}"
        )
    return 1 if failed else 0


def ingest(args) -> int:
    metadata = key_values(args.meta, "--meta")
    c = client(args)
    op = c.ingest(args.slide, args.slide_id or "", metadata, args.slide_mpp)
    if args.no_wait and not args.json:
        print(op.operation_id)
        return 0
    return print_operation(op if args.no_wait else wait(c, op), args.json)


def status(args) -> int:
    c = client(args)
    op = c.operation(args.operation_id)
    return print_operation(wait(c, op) if args.wait else op, args.json)


def cancel(args) -> int:
    print_operation(client(args).cancel(args.operation_id), args.json)
    return 0


def ingest_case(args) -> int:
    from smily.gateway.v1 import gateway_pb2
    from smily.output import print_json

    c = client(args)
    op = c.ingest_case(
        args.accession, args.archive or "", key_values(args.slide_id, "--slide-id"), key_values(args.meta, "--meta")
    )
    if args.no_wait and not args.json:
        print(op.operation_id)
        return 0
    if not args.no_wait:
        op = wait(c, op)
    failed = op.state == gateway_pb2.OPERATION_STATE_FAILED
    if args.json:
        print_json(op)
        return 1 if failed else 0
    for s in op.slides:
        state = gateway_pb2.OperationState.Name(s.state).removeprefix("OPERATION_STATE_").lower()
        error = f" {s.error_code}: {flags(s.error_message)}" if s.error_code else ""
        print(f"{s.slide_id}\t{state}\t{s.progress.tiles_indexed} tiles\tstudy {s.study_instance_uid}{error}")
    if failed:
        print(f"case ingest failed: {op.error_code}: {flags(op.error_message)}", file=sys.stderr)
    return 1 if failed else 0


def register(sub) -> None:
    s = api(sub.add_parser("ingest", help="index a slide (path relative to the slide roots)"))
    s.add_argument("slide", help="the slide's path, relative to one of the slide roots (SMILY_SLIDE_ROOTS)")
    s.add_argument("--slide-id", help="your opaque id for the slide (default: from its content)")
    s.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata returned with hits")
    s.add_argument(
        "--slide-mpp",
        type=float,
        default=0.0,
        help="microns per level-0 pixel, for a file that records none (e.g. 0.25 at 40x)",
    )
    s.add_argument("--no-wait", action="store_true", help="print the operation id and return")
    s.set_defaults(func=ingest)

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
    s.set_defaults(func=ingest_case)

    s = api(sub.add_parser("status", help="state and progress of an ingest operation"))
    s.add_argument("operation_id", help="the id `smily ingest --no-wait` printed")
    s.add_argument("--wait", action="store_true", help="wait until it finishes, showing progress")
    s.set_defaults(func=status)

    s = api(sub.add_parser("cancel", help="cancel an ingest operation"))
    s.add_argument("operation_id", help="the id `smily ingest --no-wait` printed")
    s.set_defaults(func=cancel)
