"""The labelled slide thumbnails of tissue detection (tests/data/tissue/).

Each image NAME.png has a mask NAME.mask.png of hand-checked labels:
255 tissue, 128 ignored (a one-pixel band where a thumbnail pixel is part
tissue, part glass), anything else background: 0 glass, and the artefacts
the detector must drop, by kind (ARTEFACTS).

`python -m tests.helpers.tissue_set --ihc PATH/skimage/data/ihc.png` regenerates the
synthetic images and the IHC composite deterministically; the CMU images are
cut from tests/data/cmu_small_region.svs and their masks were drawn by hand
(cmu_masks below) and checked on overlays.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

from smily import synthetic

DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tissue")
TISSUE, IGNORED = 255, 128
ARTEFACTS = {"pen": 10, "dust": 20, "bubble": 30, "coverslip edge": 40, "border": 50}


@dataclass(frozen=True)
class Scores:
    recall: float  # tissue pixels kept
    precision: float  # kept pixels that are tissue
    artefacts_dropped: float  # artefact pixels dropped (nan when none)
    tissue_px: int


def score(pred: np.ndarray, labels: np.ndarray) -> Scores:
    tissue = labels == TISSUE
    background = (labels != TISSUE) & (labels != IGNORED)
    artefact = background & (labels != 0)
    kept = pred & (tissue | background)
    return Scores(
        recall=float((pred & tissue).sum() / max(tissue.sum(), 1)),
        precision=float((pred & tissue).sum() / max(kept.sum(), 1)),
        artefacts_dropped=float((~pred & artefact).sum() / artefact.sum()) if artefact.any() else float("nan"),
        tissue_px=int(tissue.sum()),
    )


def load() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, RGB thumbnail, labels) of every image of the set, sorted by name."""
    out = []
    for f in sorted(os.listdir(DIR)):
        if f.endswith(".png") and not f.endswith(".mask.png"):
            name = f[:-4]
            rgb = np.asarray(Image.open(os.path.join(DIR, f)).convert("RGB"))
            labels = np.asarray(Image.open(os.path.join(DIR, name + ".mask.png")))
            out.append((name, rgb, labels))
    return out


# -- generation ---------------------------------------------------------------

# Thumbnails are rendered at RENDER_MPP and shrunk by SHRINK: 16 µm per pixel,
# between the tiler's thumbnails for 0.5 and 1.0 µm/px tiles.
RENDER_MPP, SHRINK = 2.0, 8
SIZE = (240, 320)  # thumbnail rows, columns
WHITE = np.array((246, 244, 246), np.float32)  # synthetic.render's glass


def _blob(rng, shape, coverage: float) -> np.ndarray:
    """A smooth random tissue outline covering about `coverage` of the frame."""
    noise = ndi.gaussian_filter(rng.standard_normal(shape), min(shape) / 8)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    edge = np.minimum.reduce([yy, xx, shape[0] - 1 - yy, shape[1] - 1 - xx]) / min(shape)
    field = noise / noise.std() + 6 * np.minimum(edge, 0.2)
    return field > np.quantile(field, 1 - coverage)


def _mucin(rng, shape, mpp: float) -> np.ndarray:
    """Pale blue-grey strands of mucin with a few floating cells."""
    um = 1 / mpp
    streaks = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (3 * um, 20 * um))
    streaks = np.clip(streaks / (streaks.std() + 1e-6), -2, 2)
    base = np.array([214, 214, 232], np.float32)[None, None] + 8 * streaks[..., None]
    cells = synthetic._dots(rng, shape, 0.00005 / um**2, 4 * um)[..., None]
    return base * (1 - np.clip(cells, 0, 1)) + np.array([150, 110, 170], np.float32) * np.clip(cells, 0, 1)


def _texture(kind: str, rng, shape) -> np.ndarray:
    if kind == "mucin":
        return _mucin(rng, shape, RENDER_MPP)
    return synthetic._texture(kind, rng, shape, RENDER_MPP)


def _to_ihc(rgb: np.ndarray, rng) -> np.ndarray:
    """H&E texture re-stained as IHC: a pale blue haematoxylin counterstain
    (its OD a third of H&E's) and brown DAB in smooth patches."""
    od = -np.log(np.clip(rgb / WHITE, 1e-3, 1))
    haem = od.mean(axis=2) * 0.35
    dab = np.clip(ndi.gaussian_filter(rng.standard_normal(rgb.shape[:2]), 40), 0, None)
    dab = 0.9 * dab / (dab.max() + 1e-6)
    h_vec, d_vec = np.array([0.65, 0.55, 0.25]), np.array([0.27, 0.57, 0.78])
    total = haem[..., None] * h_vec / h_vec.mean() + dab[..., None] * d_vec / d_vec.mean()
    return WHITE * np.exp(-total)


def _render_tissue(rng, kinds: list[str], coverage: float, stain: str) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution tissue (float RGB) and its boolean outline."""
    h, w = SIZE[0] * SHRINK, SIZE[1] * SHRINK
    outline = ndi.zoom(_blob(rng, (h // 16, w // 16), coverage).astype(np.uint8), 16, order=0).astype(bool)
    seeds = np.zeros((h // 16, w // 16), np.int32)
    seeds[rng.integers(0, h // 16, len(kinds)), rng.integers(0, w // 16, len(kinds))] = np.arange(1, len(kinds) + 1)
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    region = ndi.zoom(seeds[iy, ix] - 1, 16, order=0)
    img = np.zeros((h, w, 3), np.float32)
    for r, kind in enumerate(kinds):
        sel = region == r
        if sel.any():
            img[sel] = _texture(kind, rng, (h, w))[sel]
    if stain == "pale":  # a third of the stain: weakly stained H&E
        img = WHITE * (np.maximum(img, 1) / WHITE) ** 0.35
    elif stain == "ihc":
        img = _to_ihc(img, rng)
    return img, outline


def _glass(rng, shape, colour) -> np.ndarray:
    """Glass with a colour cast, uneven illumination and scanner noise."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    vignette = 1 - 0.01 * (((yy / shape[0] - 0.5) ** 2 + (xx / shape[1] - 0.5) ** 2) * 4)
    img = np.array(colour, np.float32)[None, None] * vignette[..., None]
    return img + rng.normal(0, 1.2, img.shape)


def _shrink(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // SHRINK, img.shape[1] // SHRINK
    return img[: h * SHRINK, : w * SHRINK].reshape(h, SHRINK, w, SHRINK, -1).mean(axis=(1, 3))


def _labels_from_coverage(coverage: np.ndarray) -> np.ndarray:
    labels = np.zeros(coverage.shape, np.uint8)
    labels[coverage > 0.02] = IGNORED
    labels[coverage >= 0.98] = TISSUE
    return labels


def _add_artefacts(rng, img: np.ndarray, labels: np.ndarray, which: tuple[str, ...]) -> None:
    """Draw artefacts on glass (not over tissue) in place, labelled by kind."""
    h, w = labels.shape
    near_tissue = ndi.binary_dilation(labels > 0, iterations=2)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    colours = {}
    if "pen" in which:
        for i, colour in enumerate(((30, 140, 60), (40, 60, 170), (25, 25, 30))):
            x0, y0 = int(rng.integers(5, w - 60)), int(rng.integers(5, h - 30))
            pts = [(x0 + 12 * k, y0 + int(6 * np.sin(k + i))) for k in range(5)]
            draw.line(pts, fill=1 + i, width=3)
            colours[1 + i] = (colour, ARTEFACTS["pen"])
    if "dust" in which:
        for _ in range(25):
            x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), float(rng.uniform(0.5, 1.5))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=4)
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        draw.line([(x0, y0), (x0 + 15, y0 + 9), (x0 + 30, y0 + 6)], fill=5, width=1)  # a fibre
        colours[4] = ((150, 140, 130), ARTEFACTS["dust"])
        colours[5] = ((170, 170, 168), ARTEFACTS["dust"])
    if "bubble" in which:
        for _ in range(3):
            x, y, r = int(rng.integers(20, w - 20)), int(rng.integers(20, h - 20)), int(rng.integers(6, 15))
            draw.ellipse((x - r, y - r, x + r, y + r), outline=6, width=1)
        colours[6] = ((175, 176, 178), ARTEFACTS["bubble"])
    if "coverslip edge" in which:
        x = int(w * 0.93)
        draw.line([(x, 0), (x + 3, h)], fill=7, width=1)
        colours[7] = ((160, 162, 160), ARTEFACTS["coverslip edge"])
    if "border" in which:
        draw.rectangle((0, h - 5, w, h), fill=8)
        colours[8] = ((12, 12, 14), ARTEFACTS["border"])
    marks = np.asarray(canvas)
    for value, (colour, kind) in colours.items():
        sel = (marks == value) & ~near_tissue
        img[sel] = colour
        labels[sel] = kind
        labels[(marks == value) & near_tissue & (labels != TISSUE)] = IGNORED


def synthetic_image(
    seed: int, kinds: list[str], coverage: float, stain: str, glass=(238, 236, 232)
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tissue, outline = _render_tissue(rng, kinds, coverage, stain)
    # Tissue transmits the light the glass does: its white (empty fat cells,
    # lumens) is the glass colour.
    tissue *= np.array(glass, np.float32) / WHITE
    full = np.where(outline[..., None], tissue, np.array(glass, np.float32))
    img = _shrink(full)
    img = np.where(_shrink(outline[..., None].astype(np.float32)) > 0, img, _glass(rng, img.shape[:2], glass))
    labels = _labels_from_coverage(_shrink(outline[..., None].astype(np.float32))[..., 0])
    _add_artefacts(rng, img, labels, tuple(ARTEFACTS))
    return np.clip(img, 0, 255).astype(np.uint8), labels


def ihc_composite(ihc: np.ndarray, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's IHC field (512 px), shrunk to 200 px, as a tissue piece on glass."""
    rng = np.random.default_rng(seed)
    h, w = SIZE
    side = 200
    piece = np.asarray(Image.fromarray(ihc).resize((side, side), Image.Resampling.BOX), np.float32)
    # The piece's outline leaves out the image's left edge, which is glass (a lumen open to the edge).
    yy, xx = np.mgrid[0:side, 0:side]
    wobble = ndi.gaussian_filter(rng.standard_normal((side, side)), 10)
    wobble *= 0.12 / (np.abs(wobble).max() + 1e-9)
    outline = np.hypot((yy - side / 2) / side, (xx - side * 0.58) / side) < 0.4 + wobble
    img = _glass(rng, SIZE, (236, 236, 234))
    y0, x0 = (h - side) // 2, (w - side) // 2 - 20
    img[y0 : y0 + side, x0 : x0 + side][outline] = piece[outline]
    full = np.zeros(SIZE, bool)
    full[y0 : y0 + side, x0 : x0 + side] = outline
    labels = np.zeros(SIZE, np.uint8)
    labels[full] = IGNORED
    labels[ndi.binary_erosion(full)] = TISSUE
    _add_artefacts(rng, img, labels, tuple(ARTEFACTS))
    return np.clip(img, 0, 255).astype(np.uint8), labels


SYNTHETIC = {
    "he-synthetic": {
        "seed": 11,
        "kinds": ["stroma", "lymphocytes", "glands", "tumour", "fat"],
        "coverage": 0.45,
        "stain": "he",
    },
    "he-pale-synthetic": {
        "seed": 12,
        "kinds": ["stroma", "glands", "fat", "stroma", "lymphocytes"],
        "coverage": 0.5,
        "stain": "pale",
        "glass": (244, 244, 246),
    },
    "fat-synthetic": {
        "seed": 13,
        "kinds": ["fat", "fat", "fat", "stroma", "fat"],
        "coverage": 0.55,
        "stain": "he",
        "glass": (235, 238, 240),
    },
    "mucin-synthetic": {"seed": 14, "kinds": ["mucin", "mucin", "glands", "stroma"], "coverage": 0.45, "stain": "he"},
    "ihc-synthetic": {
        "seed": 15,
        "kinds": ["stroma", "glands", "tumour", "stroma", "fat"],
        "coverage": 0.5,
        "stain": "ihc",
        "glass": (240, 238, 236),
    },
}


def _save(name: str, img: np.ndarray, labels: np.ndarray) -> None:
    Image.fromarray(img).save(os.path.join(DIR, name + ".png"), optimize=True)
    Image.fromarray(labels).save(os.path.join(DIR, name + ".mask.png"), optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ihc", help="scikit-image's skimage/data/ihc.png")
    args = ap.parse_args()
    os.makedirs(DIR, exist_ok=True)
    for name, kw in SYNTHETIC.items():
        _save(name, *synthetic_image(**kw))
    if args.ihc:
        _save("ihc-skimage", *ihc_composite(np.asarray(Image.open(args.ihc).convert("RGB"))))


if __name__ == "__main__":
    main()
