"""Deterministic synthetic whole-slide images for the demo and the tests.

Each slide is a pyramid of JPEG tiles whose tissue is a patchwork of
tissue-like textures (stroma, lymphocytes, glands, fat, tumour), drawn in
physical units so that a 20x and a 40x scan of the same layout look alike.
Two container flavours: a generic tiled TIFF, and an Aperio SVS with
thumbnail, label and macro pages (the label carries fake PHI so tests can
prove it never leaves the tiler).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

TEXTURES = ("stroma", "lymphocytes", "glands", "fat", "tumour")
FAKE_PHI = "DOE^JANE MRN 0042-7731 ACC S26-12345"


@dataclass(frozen=True)
class SlideSpec:
    name: str
    flavour: str  # "tiff" or "svs"
    width: int
    height: int
    mpp: float
    seed: int


DEFAULT_SLIDES = (
    SlideSpec("sample-a.tiff", "tiff", 4096, 3072, 0.5, 1),
    SlideSpec("sample-b.svs", "svs", 4096, 3072, 0.5, 2),
    SlideSpec("sample-c-40x.svs", "svs", 6144, 4608, 0.25, 3),
)


def _smooth_noise(rng, shape, sigma):
    return ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)


def _dots(rng, shape, density_per_px, radius_px, jitter=0.3):
    """A soft mask of round blobs (nuclei, cells) of about radius_px."""
    n = int(shape[0] * shape[1] * density_per_px)
    img = np.zeros(shape, np.float32)
    ys = rng.integers(0, shape[0], n)
    xs = rng.integers(0, shape[1], n)
    img[ys, xs] = 1.0 + jitter * rng.standard_normal(n).astype(np.float32)
    img = ndi.gaussian_filter(img, radius_px / 1.5)
    peak = 1.0 / (2 * np.pi * (radius_px / 1.5) ** 2)
    return np.clip(img / peak, 0, 1.5)


def _texture(kind: str, rng, shape, mpp: float) -> np.ndarray:
    """Return HxWx3 float RGB in [0, 255] for one texture class."""
    um = 1.0 / mpp  # pixels per micrometre
    pink = np.array([236, 170, 200], np.float32)
    purple = np.array([90, 50, 140], np.float32)
    white = np.array([245, 240, 245], np.float32)
    h, w = shape
    if kind == "stroma":
        fibres = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (1.0 * um, 12 * um))
        fibres = (fibres - fibres.mean()) / (fibres.std() + 1e-6)
        base = pink[None, None] + 18 * fibres[..., None]
        nuclei = _dots(rng, shape, 0.0004 / um**2, 2.5 * um)
    elif kind == "lymphocytes":
        base = np.broadcast_to(pink * 0.95, (h, w, 3)).copy()
        nuclei = _dots(rng, shape, 0.012 / um**2, 3.0 * um)
    elif kind == "tumour":
        base = np.broadcast_to(pink * 0.9, (h, w, 3)).copy()
        nuclei = _dots(rng, shape, 0.003 / um**2, 6.0 * um, jitter=0.6)
    elif kind == "glands":
        seeds = np.zeros(shape, bool)
        n = max(1, int(h * w / (90 * um) ** 2))
        seeds[rng.integers(0, h, n), rng.integers(0, w, n)] = True
        dist = ndi.distance_transform_edt(~seeds) / um
        lumen = dist < 22
        ring = (dist >= 22) & (dist < 32)
        base = np.where(lumen[..., None], white, pink)
        nuclei = ndi.gaussian_filter(ring.astype(np.float32), 1.5 * um) * 1.2
    elif kind == "fat":
        seeds = np.zeros(shape, bool)
        n = max(1, int(h * w / (60 * um) ** 2))
        seeds[rng.integers(0, h, n), rng.integers(0, w, n)] = True
        _, (iy, ix) = ndi.distance_transform_edt(~seeds, return_indices=True)
        label = iy * w + ix
        edge = (np.diff(label, axis=0, prepend=label[:1]) != 0) | (np.diff(label, axis=1, prepend=label[:, :1]) != 0)
        edge = ndi.binary_dilation(edge, iterations=max(1, int(1.0 * um)))
        base = np.where(edge[..., None], pink * 0.95, white)
        nuclei = np.zeros(shape, np.float32)
    else:
        raise ValueError(kind)
    nuclei = np.clip(nuclei, 0, 1)[..., None]
    return base * (1 - nuclei) + purple[None, None] * nuclei


def render(spec: SlideSpec, with_classes: bool = False):
    """Render level 0 of a slide as HxWx3 uint8; with_classes also returns
    the HxW int8 map of TEXTURES indices (-1 on glass), the ground truth of
    the evaluation benchmark."""
    rng = np.random.default_rng(spec.seed)
    h, w = spec.height, spec.width
    # Layout on a coarse grid in physical units, so resolution does not change it.
    coarse = (max(8, int(h * spec.mpp / 32)), max(8, int(w * spec.mpp / 32)))
    blob = _smooth_noise(rng, coarse, 6)
    blob = (blob - blob.mean()) / (blob.std() + 1e-6)
    yy, xx = np.mgrid[0 : coarse[0], 0 : coarse[1]]
    border = np.minimum.reduce([yy, xx, coarse[0] - 1 - yy, coarse[1] - 1 - xx]) / min(coarse)
    tissue_c = (blob + 4 * border) > 0.4
    n_regions = 7
    seeds = np.zeros(coarse, np.int32)
    seeds[rng.integers(0, coarse[0], n_regions), rng.integers(0, coarse[1], n_regions)] = np.arange(1, n_regions + 1)
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    region_c = seeds[iy, ix] - 1
    classes = rng.permutation(np.arange(n_regions) % len(TEXTURES))

    zoom = (h / coarse[0], w / coarse[1])
    region = ndi.zoom(region_c, zoom, order=0)[:h, :w]
    tissue = ndi.zoom(tissue_c.astype(np.uint8), zoom, order=0)[:h, :w].astype(bool)
    region = np.pad(region, ((0, h - region.shape[0]), (0, w - region.shape[1])), mode="edge")
    tissue = np.pad(tissue, ((0, h - tissue.shape[0]), (0, w - tissue.shape[1])), mode="edge")

    # Slow colour drift makes every place on the slide a little different.
    drift_c = _smooth_noise(rng, coarse, 3)
    drift = ndi.zoom(drift_c / (np.abs(drift_c).max() + 1e-6), zoom, order=1)
    drift = np.pad(drift, ((0, max(0, h - drift.shape[0])), (0, max(0, w - drift.shape[1]))), mode="edge")[:h, :w]

    img = np.empty((h, w, 3), np.float32)
    img[:] = (246, 244, 246)
    for r in range(n_regions):
        sel = (region == r) & tissue
        if not sel.any():
            continue
        ys, xs = np.nonzero(sel)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        tex = _texture(TEXTURES[classes[r]], rng, (y1 - y0, x1 - x0), spec.mpp)
        tex *= 1 + 0.08 * drift[y0:y1, x0:x1, None]
        box = sel[y0:y1, x0:x1]
        img[y0:y1, x0:x1][box] = tex[box]
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if not with_classes:
        return img
    class_map = np.where(tissue, classes[region], -1).astype(np.int8)
    return img, class_map


def _pyramid(level0: np.ndarray, min_side: int = 512) -> list[np.ndarray]:
    levels = [level0]
    while min(levels[-1].shape[:2]) // 4 >= min_side // 2 and len(levels) < 4:
        prev = Image.fromarray(levels[-1])
        levels.append(np.asarray(prev.reduce(4)))
    return levels


def _label_image() -> np.ndarray:
    img = Image.new("RGB", (400, 400), "white")
    draw = ImageDraw.Draw(img)
    for i, part in enumerate(FAKE_PHI.split(" ")):
        draw.text((20, 20 + 40 * i), part, fill="black")
    return np.asarray(img)


def write_slide(spec: SlideSpec, path: str, level0: np.ndarray | None = None) -> None:
    """Write the slide; level0 is render(spec) when the caller already has it."""
    import tifffile

    levels = _pyramid(render(spec) if level0 is None else level0)
    h, w = levels[0].shape[:2]
    res = (1e4 / spec.mpp, 1e4 / spec.mpp)  # pixels per centimetre
    tiled = dict(tile=(256, 256), compression="jpeg", compressionargs={"level": 90}, photometric="rgb", metadata=None)
    with tifffile.TiffWriter(path) as tif:
        if spec.flavour == "tiff":
            for i, lvl in enumerate(levels):
                tif.write(lvl, subfiletype=1 if i else 0, resolution=res, resolutionunit="CENTIMETER", **tiled)
            return
        head = f"Aperio Image Library vSMILY-synthetic\r\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90"
        # Vendor properties carry PHI in real files; these fake ones prove we drop them.
        tail = f"|AppMag = {round(10 / spec.mpp)}|MPP = {spec.mpp}|Filename = {FAKE_PHI}"
        tif.write(levels[0], description=head + tail, **tiled)
        thumb = np.asarray(Image.fromarray(levels[-1]).resize((w * 256 // max(w, h), h * 256 // max(w, h))))
        tif.write(
            thumb, description=head + f" -> {thumb.shape[1]}x{thumb.shape[0]}" + tail, photometric="rgb", metadata=None
        )
        for lvl in levels[1:]:
            tif.write(lvl, description=head + f" -> {lvl.shape[1]}x{lvl.shape[0]}" + tail, **tiled)
        label = _label_image()
        tif.write(
            label,
            subfiletype=1,
            description=f"Aperio Image Library vSMILY-synthetic\r\nlabel {label.shape[1]}x{label.shape[0]}",
            photometric="rgb",
            compression="lzw",
            metadata=None,
        )
        macro = np.concatenate([label, np.asarray(Image.fromarray(levels[-1]).resize((800, 400)))], axis=1)
        tif.write(
            macro,
            subfiletype=9,
            description=f"Aperio Image Library vSMILY-synthetic\r\nmacro {macro.shape[1]}x{macro.shape[0]}",
            photometric="rgb",
            compression="jpeg",
            metadata=None,
        )


# A slide that takes a while to ingest (for trying out cancel): one rendered block
# repeated BIG_REPEAT x BIG_REPEAT times, so writing it stays cheap.
BIG_SLIDE, BIG_REPEAT = SlideSpec("big.svs", "svs", 2048, 2048, 1.0, 7), 4


def write_big(output_dir: str) -> str:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, BIG_SLIDE.name)
    level0 = np.tile(render(BIG_SLIDE), (BIG_REPEAT, BIG_REPEAT, 1))
    spec = SlideSpec(BIG_SLIDE.name, BIG_SLIDE.flavour, level0.shape[1], level0.shape[0], BIG_SLIDE.mpp, BIG_SLIDE.seed)
    write_slide(spec, path + ".tmp", level0)
    os.replace(path + ".tmp", path)
    return path


def write_samples(output_dir: str, specs=DEFAULT_SLIDES) -> list[str]:
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for spec in specs:
        path = os.path.join(output_dir, spec.name)
        tmp = path + ".tmp"
        write_slide(spec, tmp)
        os.replace(tmp, path)
        paths.append(path)
    return paths
