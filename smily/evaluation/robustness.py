"""Robustness: is an indexed tile still found when the query is perturbed?

For tiles of each slide, query the deployed gateway with an image of the
tile changed one way (the same read path as the tiler, then a transform)
and count how often the source tile is among the top k hits.
"""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from smily.common import images
from smily.tiler import tiling

from .archive import Archive

K = 5
# Ruifrok & Johnston's haematoxylin, eosin, DAB optical densities (rows).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
# Stain jitter strength, as in Tellez et al. 2018 ("HED-light").
STAIN_SIGMA = 0.05

# "scale +10%" reads a 10 % wider field into the same pixels: the content at 0.9x.
TRANSFORMS = (
    "identity",
    "shift 1/4 tile",
    "rotate 90",
    "rotate 180",
    "rotate 270",
    "flip",
    "scale +10%",
    "scale -10%",
    "stain jitter",
    "JPEG q60",
)


def stain_jitter(rgb: np.ndarray, rng, sigma: float = STAIN_SIGMA) -> np.ndarray:
    """Scale and shift each stain's concentration in HED space by up to sigma."""
    od = -np.log(np.maximum(rgb.astype(np.float64), 1.0) / 255.0)
    hed = od.reshape(-1, 3) @ _HED_FROM_RGB
    hed = hed * rng.uniform(1 - sigma, 1 + sigma, 3) + rng.uniform(-sigma, sigma, 3)
    out = 255.0 * np.exp(-(hed @ _RGB_FROM_HED))
    return np.clip(out, 0, 255).reshape(rgb.shape).astype(np.uint8)


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """rgb after a JPEG round trip at this quality."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _read(slide, x: int, y: int, size: int, out: int) -> np.ndarray:
    width, height = slide.dimensions
    x, y = min(max(0, x), width - size), min(max(0, y), height - size)
    return tiling.read(slide, x, y, size, size, out, out)


def perturbed(name: str, slide, rect, tile_size: int, rng) -> np.ndarray:
    x, y, size, _ = (int(v) for v in rect)
    if name == "shift 1/4 tile":
        return _read(slide, x + size // 4, y + size // 4, size, tile_size)
    if name.startswith("scale"):
        # Read a 10% larger (smaller) field into the same pixels: content shrinks (grows).
        grown = round(size * (1.1 if "+" in name else 0.9))
        return _read(slide, x - (grown - size) // 2, y - (grown - size) // 2, grown, tile_size)
    rgb = _read(slide, x, y, size, tile_size)
    if name.startswith("rotate "):
        return np.ascontiguousarray(np.rot90(rgb, int(name.split()[1]) // 90))
    if name == "flip":
        return np.ascontiguousarray(rgb[:, ::-1])
    if name == "stain jitter":
        return stain_jitter(rgb, rng)
    if name == "JPEG q60":
        return jpeg(rgb, 60)
    if name == "identity":
        return rgb
    raise ValueError(name)


def _rate(values: list[bool]) -> float:
    return float(np.mean(values)) if values else float("nan")


def run(
    client, archive: Archive, opened: dict, tile_size: int, per_slide: int = 10, seed: int = 0, mpp: float = 0.0
) -> dict:
    """{"k", "queries", "per_slide": {slide: {transform: rate}}, "all": {transform: rate},
    "found": {transform: [0/1 per query]}, "slides": [slide per query], "latency_ms": {"median", "p90"}}.
    Tiles are read at `mpp` µm/px (the archive's), and the image queries say so."""
    rng = np.random.default_rng(seed)
    found: dict[str, dict[str, list[bool]]] = {}
    seconds: list[float] = []
    slides = list(dict.fromkeys(archive.slide_ids.tolist()))  # the manifest's slides only
    for slide_id, slide in opened.items():
        idx = np.flatnonzero(archive.slide_ids == slide_id)
        # Mostly-tissue tiles: a query of glass says nothing about robustness.
        idx = idx[np.argsort(-archive.tissue[idx], kind="stable")][: max(per_slide * 2, 1)]
        idx = rng.choice(idx, min(per_slide, len(idx)), replace=False) if len(idx) else idx
        found[slide_id] = {t: [] for t in TRANSFORMS}
        for i in idx:
            source = archive.key(int(i))
            for t in TRANSFORMS:
                rgb = perturbed(t, slide, archive.rects[i], tile_size, rng)
                started = time.perf_counter()
                hits = client.search(image=images.encode(rgb, images.PNG), k=K, slide_ids=slides, image_mpp=mpp).hits
                seconds.append(time.perf_counter() - started)
                found[slide_id][t].append(any((h.slide_id, h.x, h.y) == source for h in hits))
    return {
        "k": K,
        "queries": sum(len(v["identity"]) for v in found.values()),
        "per_slide": {s: {t: _rate(v) for t, v in d.items()} for s, d in found.items()},
        "all": {t: _rate([b for d in found.values() for b in d[t]]) for t in TRANSFORMS},
        "found": {t: [int(b) for d in found.values() for b in d[t]] for t in TRANSFORMS},
        "slides": [s for s, d in found.items() for _ in d["identity"]],
        # Wall time of one search by image, PNG encoding excluded (cache misses: every query differs).
        "latency_ms": {
            "median": 1000 * float(np.median(seconds)) if seconds else float("nan"),
            "p90": 1000 * float(np.percentile(seconds, 90)) if seconds else float("nan"),
        },
    }
