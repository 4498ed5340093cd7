"""What every command group of the CLI shares: the gateway flags, the client,
waiting for an operation, the small argument parsers, and error messages that
say what to do."""

from __future__ import annotations

import argparse
import os
import re
import sys

import grpc

# SMILY_GATEWAY, else the port a `make up` with the same environment listens on.
DEFAULT_GATEWAY = os.environ.get("SMILY_GATEWAY") or f"127.0.0.1:{os.environ.get('SMILY_GATEWAY_PORT') or 50050}"
EXAMPLE = "an image FILE or SLIDE_ID:X,Y,W,H"


def with_gateway(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of a command that calls the gateway."""
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


def api(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A command that calls the gateway and can print its whole answer as one JSON object."""
    sp.add_argument("--json", action="store_true", help="print the response as one JSON object (snake_case fields)")
    return with_gateway(sp)


def client(args):
    from smily.client import Client

    try:
        return Client(args.gateway, tls_ca=args.tls_ca, token=args.token)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


def wait(client, op):
    """Wait for an operation to finish, showing its progress on stderr."""
    from smily.output import Progress

    progress = Progress(f"  {op.slide_id or op.operation_id}")
    try:
        return client.wait(op, on_progress=lambda o: progress.update(o.progress.tiles_indexed, o.progress.tiles_total))
    finally:
        progress.close()


def key_values(items, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def parse_region(text: str) -> dict:
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--region takes X,Y,W,H in level-0 pixels, got {text!r}") from None
    return {"x": x, "y": y, "width": w, "height": h}


def example(spec: str):
    """SLIDE_ID:X,Y,W,H is a region; anything else is an image file."""
    slide, sep, rect = spec.rpartition(":")
    if sep and rect.count(",") == 3:
        return dict(slide_id=slide, **parse_region(rect))
    with open(spec, "rb") as fh:
        return fh.read()


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


def flags(message: str) -> str:
    """A service's message with request fields named as the flags that set them."""
    return _FIELD.sub(
        lambda m: ("with " if m.group(1) and m.group(1).startswith("in ") else "") + FLAGS[m.group(2)], message
    )


# The services a backend port may serve, by the package of their RPC names.
_BACKENDS = {"smily.tiler.": "tiler", "smily.embedder.": "embedder", "smily.index.": "index"}


def _served_elsewhere(gateway: str) -> str:
    """Which smily backend answers at `gateway` ('' if none or unknown): its health
    service knows its own service name. Plaintext: where `make up` runs."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from smily.common.channels import channel

    with channel(gateway) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for prefix, name in _BACKENDS.items():
            service = f"{prefix}v1.{name.capitalize()}Service"
            try:
                stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                return name
            except grpc.RpcError:
                continue
    return ""


# What gRPC's own transport says when no server answered (the gateway's own messages say none of these).
_TRANSPORT_FAILURES = (
    "failed to connect",
    "connection refused",
    "socket closed",
    "dns resolution failed",
    "connection reset",
    "end of tcp stream",
    "connections to all backends failing",
)


def _no_answer(details: str) -> bool:
    """Whether an UNAVAILABLE came from the transport (the gateway did not answer), not from the gateway."""
    return not details or any(f in details.lower() for f in _TRANSPORT_FAILURES)


def explain(exc: grpc.RpcError, gateway: str) -> str:
    """What went wrong, and what to do about it."""
    code, details = exc.code(), flags(exc.details() or "")
    if code == grpc.StatusCode.UNAVAILABLE:
        if not _no_answer(details):  # the gateway answered: a backend behind it is down
            return f"UNAVAILABLE: {details}"
        what = "cannot connect" if "failed to connect" in details.lower() else details
        return (
            f"UNAVAILABLE: the gateway at {gateway}: {what}. Is the stack up? `make up` starts the local "
            f"one; --gateway HOST:PORT (or SMILY_GATEWAY) names another."
        )
    if code == grpc.StatusCode.UNIMPLEMENTED and "method not found" in details.lower():
        backend = _served_elsewhere(gateway)
        if backend:
            return (
                f"{gateway} serves the {backend} service, not the gateway: give the gateway's address "
                f"with --gateway HOST:PORT (or SMILY_GATEWAY; `make up` puts it on 50050)"
            )
    if code == grpc.StatusCode.NOT_FOUND:
        if "slide roots" in details:
            from smily.common.config import Settings

            roots = ":".join(Settings.from_env().tiler.slide_roots)
            details += f" (slide roots: {roots}, SMILY_SLIDE_ROOTS; give a path relative to one of them)"
        elif "not in the index" in details:
            details += "; `smily slides` lists the indexed slides"
        elif "no operation" in details:
            details += "; `smily ingest --no-wait` prints an operation's id"
        elif "no concept" in details:
            details += "; `smily concept list` lists the concepts"
    return f"{code.name}: {details}"


def report(exc: BaseException, args) -> int:
    """An error of a command, on stderr: 2."""
    if isinstance(exc, grpc.RpcError):
        print(f"error: {explain(exc, getattr(args, 'gateway', DEFAULT_GATEWAY))}", file=sys.stderr)
    elif isinstance(exc, OSError):  # a file named on the command line
        print(f"error: {exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}", file=sys.stderr)
    return 2
