"""`smily serve`, `up`, `down`, `demo`, and the handler of `index reshard`: running the services."""

from __future__ import annotations

SERVICES = ("all", "tiler", "embedder", "index", "gateway", "http")


def serve(args) -> int:
    """The same start and stop path as `python -m smily.<service>` (smily.common.server.run)."""
    from smily.common import server

    if args.service == "http":
        from smily.http.server import serve

        serve()
        return 0
    from smily import stack

    names = stack.ORDER if args.service == "all" else (args.service,)
    server.run(lambda settings: list(stack.start(names, settings)[0].values()))
    return 0


def demo(args) -> int:
    from smily.demo import run

    return run(args.slides)


def up(args) -> int:
    from smily.localstack import up, up_cluster

    if args.shards or args.replicas:
        return up_cluster(args.shards or 1, args.replicas or 1)
    return up()


def down(args) -> int:
    from smily.localstack import down

    return down()


def reshard(args) -> int:
    from smily.common.config import Settings
    from smily.index.reshard import reshard

    url = Settings.from_env().index.index_database_url
    if not url:
        raise SystemExit("set SMILY_INDEX_DATABASE_URL to the index cluster's PostgreSQL")
    moved = reshard(url, args.from_shards, args.shards)
    print(
        f"moved {moved} slides from {args.from_shards} to {args.shards} shards; "
        f"now set SMILY_INDEX_TARGETS to {args.shards} shards"
    )
    return 0


def register(sub) -> None:
    s = sub.add_parser("serve", help="run services (config from SMILY_* variables)")
    s.add_argument(
        "service",
        choices=SERVICES,
        help="one service, `all` (the four gRPC services in one process) or `http` (the HTTP API and viewer)",
    )
    s.set_defaults(func=serve)

    s = sub.add_parser("demo", help="start the stack, ingest the samples, search, stop")
    s.add_argument("--slides", default="data/samples", help="folder of slides to ingest (default %(default)s)")
    s.set_defaults(func=demo)

    s = sub.add_parser("up", help="start the local stack in the background")
    s.add_argument("--shards", type=int, default=0, help="index shards on a local PostgreSQL (cluster mode)")
    s.add_argument("--replicas", type=int, default=0, help="index replicas per shard (cluster mode)")
    s.set_defaults(func=up)
    sub.add_parser("down", help="stop the local stack").set_defaults(func=down)
