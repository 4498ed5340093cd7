"""`smily slides`, `delete`, `info`, `concept`, `tenants` and `move-slide`: what the index holds."""

from __future__ import annotations

from .common import EXAMPLE, api, client, example


def slides(args) -> int:
    listed = client(args).slides(args.find, args.find_key)
    if args.json:
        from smily.output import message_dict, print_json

        print_json({"slides": [message_dict(s) for s in listed]})
        return 0
    for s in listed:
        meta = ", ".join(f"{k}={v}" for k, v in sorted(s.metadata.items()))
        print(f"{s.tenant:<12} {s.slide_id:<24} {s.tile_count:>7} tiles  {s.model_id}  {meta}")
    print(f"{len(listed)} slides")
    return 0


def delete(args) -> int:
    n = client(args).delete(args.slide_id)
    if args.json:
        from smily.output import print_json

        print_json({"slide_id": args.slide_id, "deleted_tiles": n})
        return 0
    print(f"deleted {args.slide_id} ({n} tiles)")
    return 0


def info(args) -> int:
    from smily.gateway.v1 import gateway_pb2
    from smily.output import message_dict, print_json

    c = client(args)
    try:
        got = c.index_info()
    finally:
        c.close()
    t = got.tiling
    out = {
        "model_id": got.model_id,
        "slides": got.slide_count,
        "tiles": got.tile_count,
        "tiling": {
            "mpps": list(t.mpps),
            "tile_size": t.tile_size,
            "stride": t.stride,
            "min_tissue_fraction": t.min_tissue_fraction,
        },
        "tiling_recorded": got.tiling_recorded,
        "models": [{"model_id": m.model_id, "tiles": m.tile_count, "serving": m.serving} for m in got.models],
    }
    if got.HasField("migration"):
        out["migration"] = message_dict(got.migration)
    if args.json:
        print_json(out)
        return 0
    print(f"model {got.model_id or '(none yet)'}: {got.slide_count} slides, {got.tile_count} tiles")
    where = "recorded in the index" if got.tiling_recorded else "this gateway's settings; the first ingest records them"
    print(
        f"tiling ({where}): {t.tile_size} px tiles at {', '.join(f'{m:g}' for m in t.mpps)} µm/px, "
        f"stride {t.stride:g}, min tissue {t.min_tissue_fraction:g}"
    )
    for m in got.models:
        if not m.serving:
            print(f"also holds model {m.model_id}: {m.tile_count} tiles (cut over to it, or drop it)")
    if got.HasField("migration"):
        op = got.migration
        done = sum(1 for s in op.slides if s.state == gateway_pb2.OPERATION_STATE_SUCCEEDED)
        print(
            f"migration {op.operation_id} to {op.model_id} running: {done}/{len(op.slides)} slides, "
            f"{op.progress.tiles_indexed}/{op.progress.tiles_total} tiles"
        )
    return 0


def tenants(args) -> int:
    listed = client(args).tenants()
    if args.json:
        from smily.output import message_dict, print_json

        print_json({"tenants": [message_dict(t) for t in listed]})
        return 0
    for t in listed:
        print(f"{t.tenant:<24} {t.slide_count:>7} slides {t.tile_count:>9} tiles")
    print(f"{len(listed)} tenants")
    return 0


def move_slide(args) -> int:
    moved = client(args).move_slide(args.slide_id, args.from_tenant, args.to_tenant)
    if args.json:
        from smily.output import message_dict, print_json

        print_json(message_dict(moved))
        return 0
    print(f"moved {args.slide_id} from {args.from_tenant} to {moved.slide.tenant} ({moved.moved_tiles} tiles)")
    return 0


def concept(args) -> int:
    from smily.output import message_dict, print_json

    c = client(args)
    if args.concept_command == "create":
        if not args.with_ or not args.without:
            raise SystemExit("a concept needs --with and --without examples")
        made = c.create_concept(args.name, [example(e) for e in args.with_], [example(e) for e in args.without])
        if args.json:
            print_json(made)
        else:
            print(
                f"concept {made.name} ({made.model_id}): {made.with_examples} with, {made.without_examples} without, "
                f"training accuracy {made.train_accuracy:.2f}"
            )
    elif args.concept_command == "list":
        concepts = c.concepts()
        if args.json:
            print_json({"concepts": [message_dict(x) for x in concepts]})
            return 0
        for x in concepts:
            print(f"{x.name:<24} {x.with_examples:>4} with {x.without_examples:>4} without  {x.model_id}")
    else:
        c.delete_concept(args.name)
        if args.json:
            print_json({"deleted_concept": args.name})
            return 0
        print(f"deleted concept {args.name}")
    return 0


def register(sub) -> None:
    s = api(sub.add_parser("slides", help="list indexed slides, or find them by metadata"))
    s.add_argument(
        "--find",
        default="",
        metavar="TEXT",
        help="only slides with a searchable metadata value (case, barcode, organ...) starting with TEXT",
    )
    s.add_argument("--find-key", default="", metavar="KEY", help="match --find under this searchable key only")
    s.set_defaults(func=slides)

    s = api(sub.add_parser("delete", help="remove a slide from the index"))
    s.add_argument("slide_id", help="an indexed slide")
    s.set_defaults(func=delete)

    api(sub.add_parser("info", help="the index's model and tiling settings")).set_defaults(func=info)

    operator = "; needs the smily.operator role (a tenant's admin is not enough)"
    api(sub.add_parser("tenants", help="list the tenants in the index with their counts" + operator)).set_defaults(
        func=tenants
    )
    s = api(
        sub.add_parser(
            "move-slide",
            help="move a slide, with every tile, from one tenant to another" + operator,
            description="Moves the slide's tiles and embeddings (nothing is re-embedded) to the tenant TO; "
            "refused if FROM has no such slide or TO already has one. Audited with both tenants.",
        )
    )
    s.add_argument("slide_id", help="the slide's id in FROM")
    s.add_argument("--from", dest="from_tenant", required=True, metavar="FROM", help="the tenant holding it now")
    s.add_argument("--to", dest="to_tenant", required=True, metavar="TO", help="the tenant to hold it")
    s.set_defaults(func=move_slide)

    c = sub.add_parser("concept", help="concepts for steering searches").add_subparsers(
        dest="concept_command", required=True
    )
    s = api(c.add_parser("create", help="learn a concept from examples with and without it"))
    s.add_argument("name", help="the concept's name")
    s.add_argument("--with", dest="with_", action="append", metavar="EXAMPLE", help=f"shows it: {EXAMPLE}")
    s.add_argument("--without", action="append", metavar="EXAMPLE", help=f"does not show it: {EXAMPLE}")
    s.set_defaults(func=concept)
    api(c.add_parser("list", help="concepts of the current model")).set_defaults(func=concept)
    s = api(c.add_parser("delete", help="delete a concept"))
    s.add_argument("name", help="the concept's name")
    s.set_defaults(func=concept)
