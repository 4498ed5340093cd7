"""`smily index`: the index's model lifecycle (migrate, cutover, rollback, drop-model) and reshard."""

from __future__ import annotations

import sys

from .common import api, client, flags, wait
from .local import reshard


def migrate(args) -> int:
    from smily.gateway.v1 import gateway_pb2
    from smily.output import print_json

    c = client(args)
    op = c.migrate_index(args.to, args.max_tiles_per_s, args.cutover)
    if args.no_wait and not args.json:
        print(op.operation_id)
        return 0
    if not args.no_wait:
        op = wait(c, op)
    if args.json:
        print_json(op)
    else:
        failed = [s for s in op.slides if s.state == gateway_pb2.OPERATION_STATE_FAILED]
        for s in failed:
            print(f"  {s.slide_id}: {s.error_code}: {flags(s.error_message)}", file=sys.stderr)
        print(
            f"migration {op.operation_id} to {op.model_id}: {gateway_pb2.OperationState.Name(op.state)}, "
            f"{op.progress.tiles_indexed}/{op.progress.tiles_total} tiles, {len(failed)} slides failed"
            + (f" ({op.error_code}: {flags(op.error_message)})" if op.error_code else "")
        )
    return 1 if op.state == gateway_pb2.OPERATION_STATE_FAILED else 0


def _switched(got, as_json: bool) -> int:
    from smily.output import print_json

    if as_json:
        print_json(got)
        return 0
    print(f"serving {got.model_id} (was {got.previous_model_id})")
    if got.missing_count:
        print(f"{got.missing_count} slides missing in it: {', '.join(got.missing_slide_ids)}", file=sys.stderr)
    if got.unrefitted_concepts:
        print(f"concepts not refitted (create them again): {', '.join(got.unrefitted_concepts)}", file=sys.stderr)
    return 0


def cutover(args) -> int:
    return _switched(client(args).cutover_index(args.to or "", args.allow_missing), args.json)


def rollback(args) -> int:
    # The model a cutover left is the one other model held: a cutover back to it.
    return _switched(client(args).cutover_index("", False), args.json)


def drop_model(args) -> int:
    print(f"dropped {client(args).drop_index_model(args.model)} tiles of {args.model}")
    return 0


def register(sub) -> None:
    ix = sub.add_parser("index", help="the index's model lifecycle, and cluster tools").add_subparsers(
        dest="index_command", required=True
    )
    s = api(ix.add_parser("migrate", help="re-embed every slide with another model while searches go on"))
    s.add_argument("--to", required=True, metavar="NAME/VERSION", help="the model to migrate to")
    s.add_argument("--max-tiles-per-s", type=float, default=0.0, help="re-embed at most this many tiles a second")
    s.add_argument("--cutover", action="store_true", help="serve the new model as soon as the migration completes")
    s.add_argument("--no-wait", action="store_true", help="print the operation id and return (`smily status OP`)")
    s.set_defaults(func=migrate)
    s = api(ix.add_parser("cutover", help="serve the migrated model, on every shard and replica at once"))
    s.add_argument("--to", metavar="NAME/VERSION", help="the model to serve (default: the one other model held)")
    s.add_argument("--allow-missing", action="store_true", help="switch even while slides are missing (named)")
    s.set_defaults(func=cutover)
    api(ix.add_parser("rollback", help="serve the model the last cutover left (its vectors are kept)")).set_defaults(
        func=rollback
    )
    s = api(ix.add_parser("drop-model", help="free a model's vectors (never the serving model's)"))
    s.add_argument("model", metavar="NAME/VERSION", help="the model whose vectors to free")
    s.set_defaults(func=drop_model)
    s = ix.add_parser(
        "reshard", help="move slides to their shards for a new shard count (PostgreSQL at SMILY_INDEX_DATABASE_URL)"
    )
    s.add_argument("--shards", type=int, required=True, help="the new shard count")
    s.add_argument("--from", dest="from_shards", type=int, required=True, help="the current shard count")
    s.set_defaults(func=reshard)
