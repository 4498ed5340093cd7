"""Issue 13's small parts on their own: caller keys, admission counting, the
reader reply format's checks, and which methods are retried."""

from __future__ import annotations

import struct

import pytest

from smily.common.caller import caller_of
from smily.common.channels import IDEMPOTENT
from smily.common.errors import Busy, NotFound
from smily.common.server import Admission
from smily.tiler import protocol
from smily.tiler.arena import Arena, Slot

pytestmark = pytest.mark.unit


class Peer:
    def __init__(self, peer: str):
        self._peer = peer

    def peer(self) -> str:
        return self._peer


def test_caller_is_the_peer_host():
    assert caller_of(Peer("ipv4:10.0.0.7:51234")) == "10.0.0.7"
    assert caller_of(Peer("ipv6:%5B::1%5D:5000")) == "::1"
    assert caller_of(Peer("unix:/tmp/s")) == "unix:/tmp/s"


def test_admission_limits_in_all_and_per_caller():
    a = Admission(limit=3, per_caller=2)
    x1, x2 = a.enter("gateway", Peer("ipv4:10.0.0.1:1")), a.enter("gateway", Peer("ipv4:10.0.0.1:2"))
    with pytest.raises(Busy, match="this caller"):
        a.enter("gateway", Peer("ipv4:10.0.0.1:3"))
    y = a.enter("gateway", Peer("ipv4:10.0.0.2:1"))
    with pytest.raises(Busy, match="limit of 3"):
        a.enter("gateway", Peer("ipv4:10.0.0.3:1"))
    for caller in (x1, x2, y):
        a.leave(caller)
    a.enter("gateway", Peer("ipv4:10.0.0.1:4"))  # all slots free again


def test_reader_replies_are_checked_before_use():
    arena = Arena.create(1024)
    try:
        good = protocol.ok_tiles([Slot(0, 10), b"inline"])
        assert protocol.parse("tiles", good, arena, expected=2)[1] == b"inline"
        bad = [
            b"",
            bytes([protocol.OK]) + struct.pack("<I", 1) + struct.pack("<BQQ", 0, 1000, 100),  # past the arena
            bytes([protocol.OK]) + struct.pack("<I", 1) + struct.pack("<BQQ", 1, 0, 5),  # past the reply
            bytes([protocol.OK]) + struct.pack("<I", 7),  # count does not match
            bytes([99]) + b"x",  # unknown error class
            protocol.error(NotFound, "ok") + b"\x1b[2J",  # not printable
        ]
        for reply in bad:
            with pytest.raises(protocol.Malformed):
                protocol.parse("tiles", reply, arena, expected=1)
        with pytest.raises(NotFound, match="gone"):
            protocol.parse("info", protocol.error(NotFound, "gone"), arena)
        with pytest.raises(protocol.Malformed):
            protocol.parse("plan", bytes([protocol.OK]) + struct.pack("<II", 1, 5), arena)
    finally:
        arena.close()


def test_only_idempotent_methods_are_retried():
    index = IDEMPOTENT["smily.index.v1.IndexService"]
    assert "DeleteSlide" not in index and "DeleteConcept" not in index
    assert "IngestSlide" not in IDEMPOTENT["smily.gateway.v1.GatewayService"]
