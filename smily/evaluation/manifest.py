"""The labelled set: a CSV or JSON manifest of slides or regions.

Columns (JSON: a list of objects with the same keys):
  source                   slide path relative to the slide roots (required)
  slide_id                 id in the index (default: the file name without suffix)
  x, y, width, height      optional level-0 region; all four or none
  every other column       a label column (organ, feature, grade...)

A row without a region labels the whole slide; rows with regions label
those rectangles. An empty label cell means "not labelled in this column".
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

REGION = ("x", "y", "width", "height")
RESERVED = ("source", "slide_id", *REGION)


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class Row:
    source: str
    slide_id: str
    region: tuple[int, int, int, int] | None  # x, y, width, height
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    rows: tuple[Row, ...]
    label_columns: tuple[str, ...]

    def slides(self) -> dict[str, str]:
        """slide_id -> source, in manifest order."""
        return {r.slide_id: r.source for r in self.rows}


def load(path: str) -> Manifest:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            records = json.load(fh) if path.lower().endswith(".json") else list(csv.DictReader(fh))
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest {os.path.basename(path)} is not valid CSV/JSON: {exc}") from None
    return parse(records)


def parse(records) -> Manifest:
    if not isinstance(records, list) or not records:
        raise ManifestError("the manifest has no rows (JSON: a non-empty list of objects)")
    label_columns: list[str] = []
    rows = []
    sources: dict[str, str] = {}
    for n, rec in enumerate(records, 1):
        where = f"manifest row {n}"
        if not isinstance(rec, dict):
            raise ManifestError(f"{where} is not an object with named columns")
        if None in rec:  # csv.DictReader puts surplus cells under None
            raise ManifestError(f"{where} has more cells than the header has columns")
        rec = {str(k).strip(): ("" if v is None else str(v).strip()) for k, v in rec.items()}
        source = rec.get("source", "")
        if not source:
            raise ManifestError(f"{where}: 'source' (slide path under the slide roots) is required")
        slide_id = rec.get("slide_id") or os.path.splitext(os.path.basename(source))[0]
        if sources.setdefault(slide_id, source) != source:
            raise ManifestError(f"{where}: slide_id {slide_id!r} names two different sources")
        rows.append(
            Row(source, slide_id, _region(rec, where), {k: v for k, v in rec.items() if k not in RESERVED and v})
        )
        label_columns += [k for k in rec if k not in RESERVED and k not in label_columns]
    return Manifest(tuple(rows), tuple(label_columns))


def _region(rec: dict, where: str):
    given = [rec.get(k, "") for k in REGION]
    if not any(given):
        return None
    if not all(given):
        raise ManifestError(f"{where}: a region needs all of x, y, width, height")
    try:
        x, y, w, h = (int(float(v)) for v in given)
    except ValueError:
        raise ManifestError(f"{where}: x, y, width, height must be integers, got {given}") from None
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise ManifestError(f"{where}: region must have x, y >= 0 and positive width and height")
    return x, y, w, h


# A tile takes a labelled region's labels when at least this share of it lies inside.
MIN_OVERLAP = 0.5


class Labeller:
    """Labels of any tile of a manifest slide, by the rule in docs/evaluation.md."""

    def __init__(self, manifest: Manifest):
        self._regions: dict[str, list[Row]] = {}
        self._whole: dict[str, Row] = {}
        for row in manifest.rows:
            if row.region is None:
                self._whole[row.slide_id] = row
            else:
                self._regions.setdefault(row.slide_id, []).append(row)

    def slide_labels(self, slide_id: str) -> dict[str, str]:
        """Labels of a whole-slide row (stored as the slide's metadata at ingest)."""
        row = self._whole.get(slide_id)
        return row.labels if row else {}

    def __call__(self, slide_id: str, x: int, y: int, width: int, height: int) -> dict[str, str]:
        row = self.row(slide_id, x, y, width, height)
        return row.labels if row else {}

    def row(self, slide_id: str, x: int, y: int, width: int, height: int) -> Row | None:
        """The manifest row that labels this tile, if any."""
        best, best_area = None, 0
        for row in self._regions.get(slide_id, ()):
            assert row.region is not None  # rows without one are in _whole
            rx, ry, rw, rh = row.region
            area = max(0, min(x + width, rx + rw) - max(x, rx)) * max(0, min(y + height, ry + rh) - max(y, ry))
            if area > best_area:
                best, best_area = row, area
        if best is not None and best_area >= MIN_OVERLAP * width * height:
            return best
        return self._whole.get(slide_id)
