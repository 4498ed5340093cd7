"""The tiling settings of an index: one record, one set of defaults.

An index holds tiles cut one way (tile µm/px list, tile size, stride, minimum
tissue). The first ingest records the settings in the index next to the model
id; every later write and search is checked against that record, and the
gateway, the CLI and `smily eval` read it from the index rather than from
their own environment (issue 16). The defaults live here and nowhere else.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .errors import FailedPrecondition, InvalidArgument

DEFAULT_MPPS = (1.0,)
DEFAULT_TILE_SIZE = 224
# Step between neighbouring tiles as a fraction of the tile: 1.0 abuts, 0.5 overlaps by half.
DEFAULT_STRIDE = 1.0
DEFAULT_MIN_TISSUE = 0.5
MAX_TILE_SIZE = 2048
MAX_RESOLUTIONS = 8
MIN_STRIDE = 0.25


def _round(value: float) -> float:
    return round(float(value), 6)


@dataclass(frozen=True)
class Tiling:
    mpps: tuple[float, ...] = DEFAULT_MPPS
    tile_size: int = DEFAULT_TILE_SIZE
    stride: float = DEFAULT_STRIDE
    min_tissue: float = DEFAULT_MIN_TISSUE

    def __post_init__(self):
        object.__setattr__(self, "mpps", tuple(_round(m) for m in self.mpps))
        object.__setattr__(self, "stride", _round(self.stride))
        object.__setattr__(self, "min_tissue", _round(self.min_tissue))

    def validate(self) -> Tiling:
        if not 0 < len(self.mpps) <= MAX_RESOLUTIONS:
            raise InvalidArgument(f"1..{MAX_RESOLUTIONS} tile resolutions expected, got {len(self.mpps)}")
        if not all(math.isfinite(m) and m > 0 for m in self.mpps) or len(set(self.mpps)) != len(self.mpps):
            raise InvalidArgument("tile resolutions must be positive and distinct")
        if not 0 < self.tile_size <= MAX_TILE_SIZE:
            raise InvalidArgument(f"tile_size must be in 1..{MAX_TILE_SIZE}")
        if not MIN_STRIDE <= self.stride <= 1:
            raise InvalidArgument(f"tile stride must be in {MIN_STRIDE:g}..1 (a fraction of the tile)")
        if not 0 <= self.min_tissue <= 1:
            raise InvalidArgument("min_tissue_fraction must be in [0, 1]")
        return self

    def describe(self) -> str:
        return (
            f"tiles of {self.tile_size} px at {', '.join(f'{m:g}' for m in self.mpps)} µm/px, "
            f"stride {self.stride:g}, min tissue {self.min_tissue:g}"
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "mpps": list(self.mpps),
                "tile_size": self.tile_size,
                "stride": self.stride,
                "min_tissue": self.min_tissue,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Tiling | None:
        if not text:
            return None
        d = json.loads(text)
        return cls(tuple(d["mpps"]), int(d["tile_size"]), d["stride"], d["min_tissue"])

    def to_pb(self, message):
        """Fill a smily.types.v1.Tiling message."""
        message.mpps[:] = list(self.mpps)
        message.tile_size, message.stride, message.min_tissue_fraction = self.tile_size, self.stride, self.min_tissue
        return message

    @classmethod
    def from_pb(cls, message) -> Tiling | None:
        """None for an unset message (no mpps)."""
        if not message.mpps:
            return None
        return cls(
            tuple(message.mpps),
            message.tile_size or DEFAULT_TILE_SIZE,
            message.stride or DEFAULT_STRIDE,
            message.min_tissue_fraction,
        )

    @classmethod
    def from_settings(cls, gateway) -> Tiling:
        """The tiling a gateway proposes for an index that has no record yet, from its
        GatewaySettings (not imported: config imports this module's defaults)."""
        mpps = gateway.tile_mpps or (gateway.tile_mpp,)
        return cls(tuple(mpps), gateway.tile_size, gateway.tile_stride, gateway.min_tissue_fraction).validate()

    def nearest_mpp(self, mpp: float) -> float:
        """The indexed resolution closest to `mpp` on a log scale (a factor counts the same both ways)."""
        return min(self.mpps, key=lambda m: (abs(math.log(m / mpp)), m))


def mpp_range(record: Tiling, mpp: float) -> tuple[float, float]:
    """[lo, hi) of the tile resolutions that belong to indexed resolution `mpp`: tiles are cut at
    the slide's nearest whole number of pixels, so their µm/px is near the target, not equal;
    the bounds are the geometric midpoints to the neighbouring indexed resolutions."""
    ms = sorted(record.mpps)
    i = ms.index(_round(mpp))
    lo = math.sqrt(ms[i - 1] * ms[i]) if i > 0 else 0.0
    hi = math.sqrt(ms[i] * ms[i + 1]) if i + 1 < len(ms) else math.inf
    return lo, hi


def check(record: Tiling | None, got: Tiling, what: str = "this write") -> None:
    """FAILED_PRECONDITION naming both when `got` is not the index's record."""
    if record is not None and got != record:
        raise FailedPrecondition(
            f"the index holds {record.describe()}; {what} used {got.describe()}: "
            "one index holds one tiling (a new tiling needs a new index)"
        )


def check_mpp(record: Tiling | None, mpp: float) -> None:
    """FAILED_PRECONDITION when a search asks for a resolution the index does not hold."""
    if record is not None and mpp and _round(mpp) not in record.mpps:
        raise FailedPrecondition(
            f"the index holds tiles at {', '.join(f'{m:g}' for m in record.mpps)} µm/px, not at {mpp:g} µm/px"
        )
