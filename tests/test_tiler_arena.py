"""The shared arena that carries tiles from reader processes to the tiler server."""

from __future__ import annotations

import numpy as np
import pytest

from smily.common import memory
from smily.common.errors import FailedPrecondition
from smily.tiler.arena import Arena, Slot

pytestmark = pytest.mark.unit


def test_tiles_round_trip_and_overflow_goes_by_pipe():
    arena = Arena.create(1000)
    try:
        pixels = np.arange(3 * 10 * 10, dtype=np.uint8).reshape(10, 10, 3)
        first, second = arena.put(pixels), arena.put(b"png bytes")
        assert isinstance(first, Slot) and isinstance(second, Slot)
        assert arena.take(first) == pixels.tobytes() and arena.take(second) == b"png bytes"
        too_big = np.ones(800, np.uint8)
        spilled = arena.put(too_big)
        assert spilled == too_big.tobytes()  # no room left: returned whole, to go through the pipe
        assert arena.take(spilled) == spilled
        arena.reset()
        assert arena.put(too_big) == Slot(0, 800)
    finally:
        arena.close()


def test_a_malformed_slot_is_refused():
    arena = Arena.create(1000)
    try:
        for bad in (Slot(-1, 10), Slot(990, 20), Slot(0, -5)):
            with pytest.raises(FailedPrecondition):
                arena.take(bad)
    finally:
        arena.close()


def test_a_second_mapping_sees_the_same_memory():
    # What the reader process does with the descriptor it is sent.
    arena = Arena.create(1000)
    try:
        other = Arena(arena.fd, arena.size)
        slot = other.put(b"from the reader")
        assert arena.take(slot) == b"from the reader"
    finally:
        arena.close()


def test_malloc_settings_apply_on_glibc():
    assert memory.keep_large_buffers()
