"""The `smily` command. Each command group is a module that adds its subcommands
(register) and holds their handlers; this dispatcher only assembles them."""

from __future__ import annotations

import argparse
import logging

import grpc

from . import catalog, common, data, index, local, models, operations, search

GROUPS = (local, operations, search, catalog, models, data, index)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smily", description="Reverse image search for whole-slide images.")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        logging.basicConfig(level=logging.WARNING)
    try:
        return args.func(args)
    except (grpc.RpcError, OSError) as exc:  # a call that failed, a file named on the command line
        return common.report(exc, args)
