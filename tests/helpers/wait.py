"""Bounded waits: a test that waits on something that never happens fails with a named reason,
well before pytest-timeout's limit (pyproject.toml) stops the whole test."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from smily.client import Client
from smily.gateway.v1 import gateway_pb2

T = TypeVar("T")

# An ingest on 2 busy shared cores takes tens of seconds; pytest-timeout's limit is larger.
DEADLINE_S = 300.0


def wait_done(
    client: Client, op: gateway_pb2.Operation, deadline_s: float = DEADLINE_S, poll_s: float = 0.2
) -> gateway_pb2.Operation:
    """op once it is done (succeeded, failed or cancelled); smily.client.OperationTimeout after deadline_s."""
    return client.wait(op, poll_s=poll_s, deadline_s=deadline_s)


class WaitTimeout(AssertionError):
    """A condition polled by wait_until did not hold by its deadline."""


def wait_until(what: str, probe: Callable[[], T | None], deadline_s: float = DEADLINE_S, poll_s: float = 0.05) -> T:
    """The first truthy value of probe(); WaitTimeout naming `what` after deadline_s."""
    end = time.monotonic() + deadline_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= end:
            raise WaitTimeout(f"{what}: not within {deadline_s:g} s")
        time.sleep(poll_s)


def pages(fetch: Callable[[str], tuple[list[T], str]], max_pages: int = 1000) -> list[list[T]]:
    """Every page of a paginated listing, in order: fetch(page_token) -> (items, next_page_token).
    A listing that still returns a next token after max_pages fails instead of looping."""
    out: list[list[T]] = []
    token = ""
    for _ in range(max_pages):
        page, token = fetch(token)
        out.append(page)
        if not token:
            return out
    raise AssertionError(f"pagination did not end within {max_pages} pages")
