"""Shared memory that carries tile pixels from a reader process to the server.

Pickling a block of tiles (up to ~10 MB of RGB) through a pipe copies it four
times and blocks the reader until the server has drained the pipe. Instead
each reader writes its tiles into an arena it shares with the server and
replies with (offset, length) slots; the server copies each tile out once,
into the bytes it sends. The arena is a memfd, so it needs no /dev/shm space
(small in containers) and vanishes with the last process that holds it.
"""

from __future__ import annotations

import mmap
import os
from typing import NamedTuple

import numpy as np

from smily.common.errors import FailedPrecondition

DEFAULT_BYTES = 16 * 1024 * 1024  # one block of the largest tiles (8 x 224 px ... 1 x 2048 px) fits


class Slot(NamedTuple):
    offset: int
    length: int


class Arena:
    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size)
        self._used = 0

    @classmethod
    def create(cls, size: int = DEFAULT_BYTES) -> Arena:
        fd = os.memfd_create("smily-tiles", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)  # memory is taken now, not by a SIGBUS in a reader later
        return cls(fd, size)

    # -- reader side ------------------------------------------------------
    def reset(self) -> None:
        self._used = 0

    def put(self, data) -> Slot | bytes:
        """Copy a uint8 array or bytes in; what no longer fits is returned to go by pipe."""
        view = (
            np.asarray(data, dtype=np.uint8).reshape(-1)
            if isinstance(data, np.ndarray)
            else np.frombuffer(data, np.uint8)
        )
        if self._used + view.size > self.size:
            return view.tobytes()
        np.frombuffer(self._map, np.uint8, view.size, self._used)[:] = view
        slot = Slot(self._used, view.size)
        self._used += view.size
        return slot

    # -- server side ------------------------------------------------------
    def take(self, item: Slot | bytes) -> bytes:
        if not isinstance(item, Slot):
            return item
        offset, length = item
        # The reader parses untrusted files: its slots are checked, not trusted.
        if not (offset >= 0 and length >= 0 and offset + length <= self.size):
            raise FailedPrecondition("the slide reader sent a malformed reply; the file may be hostile")
        return self._map[offset : offset + length]

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)
