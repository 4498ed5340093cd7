"""The tiling in force for this gateway: the index's record once it has one.

Before the first ingest the index has no record: this gateway's settings
(SMILY_TILE_*) are what its first ingest will record. After, the record wins
over the environment, so a gateway redeployed with other settings cannot mix
scales in one index (a differing environment is logged once).
"""

from __future__ import annotations

import logging
import threading

from smily.common.tiling import Tiling
from smily.index.v1 import index_pb2
from smily.tiler.v1 import tiler_pb2

log = logging.getLogger("smily.gateway")


class IndexTiling:
    def __init__(self, index, proposed: Tiling):
        self._index = index
        self.proposed = proposed
        self._recorded: Tiling | None = None
        self._lock = threading.Lock()

    def current(self, timeout: float) -> tuple[Tiling, bool]:
        """(tiling in force, whether the index recorded it). A record never changes, so it is kept."""
        if self._recorded is not None:
            return self._recorded, True
        info = self._index.GetIndexInfo(index_pb2.GetIndexInfoRequest(), timeout=timeout)
        recorded = Tiling.from_pb(info.tiling)
        if recorded is None:
            return self.proposed, False
        with self._lock:
            if self._recorded is None and recorded != self.proposed:
                log.warning(
                    "the index's tiling record differs from this gateway's settings; the record is used",
                    extra={"index": recorded.describe(), "settings": self.proposed.describe()},
                )
            self._recorded = recorded
        return recorded, True


def params(tiling: Tiling, mpps=None, stride: float | None = None) -> tiler_pb2.TilingParams:
    """The tiler's request for `tiling` (or some of its resolutions, another stride)."""
    return tiler_pb2.TilingParams(
        mpps=list(mpps or tiling.mpps),
        tile_size=tiling.tile_size,
        min_tissue_fraction=tiling.min_tissue,
        stride=tiling.stride if stride is None else stride,
    )
