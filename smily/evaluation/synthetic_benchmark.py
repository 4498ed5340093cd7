"""A labelled benchmark the project generates itself.

Synthetic slides (smily.synthetic) at 0.5 and 0.25 µm/px, each a
patchwork of the five textures, so every class appears on several slides
and at both scan resolutions. The ground-truth texture map labels each
grid tile of the archive's tiling that is at least half tissue and whose
tissue is at least PURE one texture; the manifest lists those tiles as regions with two label columns:
`tissue` (the texture) and `cellularity` (a coarser grouping).
"""

from __future__ import annotations

import csv
import os

import numpy as np

from smily.synthetic import TEXTURES, SlideSpec, render, write_slide

from .robustness import stain_jitter

PURE = 0.8
CELLULARITY = {"stroma": "low", "fat": "low", "glands": "low", "lymphocytes": "high", "tumour": "high"}

# Seeds of the small set chosen so that every texture has labelled tiles.
SMALL = (
    SlideSpec("eval-s1.tiff", "tiff", 2688, 2016, 0.5, 101),
    SlideSpec("eval-s2.svs", "svs", 2688, 2016, 0.5, 102),
    SlideSpec("eval-s3.tiff", "tiff", 2688, 2016, 0.5, 104),
    SlideSpec("eval-s4-40x.svs", "svs", 3584, 2688, 0.25, 100),
    SlideSpec("eval-s5-40x.tiff", "tiff", 3584, 2688, 0.25, 103),
)
FULL = tuple(
    SlideSpec(f"eval-f{i}.{'svs' if i % 2 else 'tiff'}", "svs" if i % 2 else "tiff", 4096, 3072, 0.5, 200 + i)
    for i in range(8)
) + tuple(SlideSpec(f"eval-f{i}-40x.svs", "svs", 6144, 4608, 0.25, 200 + i) for i in range(8, 12))


def labelled_tiles(class_map: np.ndarray, tile_level0: int) -> list[tuple[int, int, str]]:
    """(x, y, texture) of every grid tile at least half tissue and PURE one texture."""
    rows, cols = class_map.shape[0] // tile_level0, class_map.shape[1] // tile_level0
    out = []
    for r in range(rows):
        for c in range(cols):
            cell = class_map[r * tile_level0 : (r + 1) * tile_level0, c * tile_level0 : (c + 1) * tile_level0]
            counts = np.bincount(cell[cell >= 0].ravel(), minlength=len(TEXTURES))
            best, tissue = int(counts.argmax()), counts.sum()
            if tissue >= 0.5 * cell.size and counts[best] >= PURE * tissue:
                out.append((c * tile_level0, r * tile_level0, TEXTURES[best]))
    return out


def write(output_dir: str, specs=SMALL, tile_mpp: float = 1.0, tile_size: int = 224, stain_shift: float = 0.0) -> str:
    """Write the slides and manifest.csv (sources relative to output_dir); returns the manifest path.
    stain_shift > 0 stains each slide its own way (HED jitter of that strength,
    seeded by the slide): the batch effect of slides from different labs."""
    os.makedirs(output_dir, exist_ok=True)
    records = []
    for spec in specs:
        level0, class_map = render(spec, with_classes=True)
        if stain_shift:
            level0 = stain_jitter(level0, np.random.default_rng(spec.seed), stain_shift)
        path = os.path.join(output_dir, spec.name)
        write_slide(spec, path + ".tmp", level0)
        os.replace(path + ".tmp", path)
        # The same level-0 tile edge as smily.tiler.tiling.plan.
        size = max(1, round(tile_size * tile_mpp / spec.mpp))
        slide_id = os.path.splitext(spec.name)[0]
        for x, y, texture in labelled_tiles(class_map, size):
            records.append(
                {
                    "source": spec.name,
                    "slide_id": slide_id,
                    "x": x,
                    "y": y,
                    "width": size,
                    "height": size,
                    "tissue": texture,
                    "cellularity": CELLULARITY[texture],
                }
            )
    manifest = os.path.join(output_dir, "manifest.csv")
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return manifest
