"""Tissue detection on the labelled thumbnails of tests/data/tissue: tissue
recall and precision per image, and how many artefact pixels are dropped.

    .venv/bin/python -m bench.tissue [--overlays DIR] [--detector new|otsu]

--overlays writes NAME.png side by side: the thumbnail, and the detector's
errors (red: tissue missed, blue: background kept, green: tissue kept).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from smily.tiler.tissue import tissue_mask
from tests.helpers import tissue_set


def otsu_saturation(rgb: np.ndarray) -> np.ndarray:
    """The detector before issue 16 (Otsu on HSV saturation), for comparison."""
    from scipy import ndimage as ndi

    from smily.tiler.tissue import pen_mask

    f = rgb.astype(np.float32) / 255.0
    mx, mn = f.max(axis=2), f.min(axis=2)
    saturation = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0)
    pen = pen_mask(rgb)
    hist, edges = np.histogram(saturation[~pen], bins=256, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    between = w0 * w1 * (m0 / np.maximum(w0, 1) - (m0[-1] - m0) / np.maximum(w1, 1)) ** 2
    threshold = max(float(centres[int(np.argmax(between))]), 0.07)
    mask = ndi.binary_opening((saturation > threshold) & ~pen, iterations=1)
    return ndi.binary_fill_holes(mask) & ~pen


def overlay(rgb: np.ndarray, pred: np.ndarray, labels: np.ndarray) -> Image.Image:
    err = rgb.copy()
    tissue = labels == tissue_set.TISSUE
    background = (labels != tissue_set.TISSUE) & (labels != tissue_set.IGNORED)
    err[tissue & pred] = (0.5 * err[tissue & pred] + (0, 120, 0)).astype(np.uint8)
    err[tissue & ~pred] = (255, 0, 0)
    err[background & pred] = (0, 0, 255)
    return Image.fromarray(np.concatenate([rgb, err], axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--overlays")
    ap.add_argument("--detector", choices=("new", "otsu"), default="new")
    args = ap.parse_args()
    detect = tissue_mask if args.detector == "new" else otsu_saturation
    rows = []
    print("| image | tissue px | tissue recall | precision | artefact px dropped |")
    print("|---|---|---|---|---|")
    for name, rgb, labels in tissue_set.load():
        pred = detect(rgb)
        s = tissue_set.score(pred, labels)
        dropped = "-" if np.isnan(s.artefacts_dropped) else f"{s.artefacts_dropped:.3f}"
        print(f"| {name} | {s.tissue_px} | {s.recall:.3f} | {s.precision:.3f} | {dropped} |")
        rows.append((s.recall, s.precision))
        if args.overlays:
            os.makedirs(args.overlays, exist_ok=True)
            overlay(rgb, pred, labels).save(os.path.join(args.overlays, name + ".png"))
    # Mean over images, with a 95% percentile interval from resampling images.
    values = np.array(rows)
    draws = np.random.default_rng(0).integers(0, len(values), (1000, len(values)))
    means = values[draws].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5], axis=0)
    mean = values.mean(axis=0)
    print(
        f"| mean [95% image bootstrap] | | {mean[0]:.3f} [{lo[0]:.3f},{hi[0]:.3f}] | "
        f"{mean[1]:.3f} [{lo[1]:.3f},{hi[1]:.3f}] | |"
    )


if __name__ == "__main__":
    main()
