"""Tissue detection on a low-resolution thumbnail.

Glass is the brightest large grey mode of the slide itself, so a slide with a
colour cast or a dim scan is judged against its own background, not against
white. Every pixel is measured in optical density (OD) relative to that glass
colour. Stained tissue absorbs: either clearly (OD above a floor, whatever
its hue: pale IHC stroma with a weak haematoxylin counterstain is nearly grey
on a thumbnail) or faintly but with the hue of a stain (OD spread between the
channels: the eosin of fat's thin membranes, pale mucin).

Not tissue:
- pen ink: green and blue inks have hues H&E never has and are more
  saturated than a haematoxylin counterstain; black ink and scanner borders
  are darker than any stained tissue;
- dust, coverslip edges and bubble rims are grey and small or thin: grey
  absorbers count only in blobs at least 3 px across (an opening removes thin
  lines and rims), and components smaller than a speck are dropped;
Holes (fat cells, gland lumens) are then filled; ink drawn over tissue stays out.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

# Hue band (degrees) of green and blue pen ink; haematoxylin sits near 220-300.
PEN_HUE = (70.0, 235.0)
# A haematoxylin counterstain stays below 0.31 even in single pixels of an IHC image.
PEN_MIN_SATURATION = 0.35
# Black ink and scanner borders: no stained tissue is this dark on a thumbnail.
MIN_BRIGHTNESS = 0.2
# Pixels around black ink and borders that their blur darkens.
INK_HALO_PX = 2
# Glass: grey (low saturation) and bright; its mode must hold this share of the pixels.
GLASS_MAX_SATURATION = 0.12
GLASS_MIN_BRIGHTNESS = 0.55
GLASS_MIN_SHARE = 0.02
# Without a glass mode (tissue wall to wall), glass is assumed this bright grey.
DEFAULT_GLASS = 0.94
# Mean OD over the channels above which a single pixel absorbs (9% darker than glass)...
MIN_OD = 0.04
# ...and is grey, not stained, when its OD spreads less than this between channels.
MIN_STAIN_SPREAD = 0.025
# Pixels (a side) OD is averaged over before the tissue thresholds.
SMOOTH_PX = 3
# Tissue: averaged OD above this (4.5% darker than glass, twice the glass's
# uneven illumination), or a faint OD with a stain's hue (spread between channels).
MIN_SMOOTH_OD = 0.02
FAINT_SMOOTH_PX = 5
MIN_FAINT_SPREAD = 0.004
MIN_FAINT_OD = 0.004
# Second pass, against the local glass: 2.5% darker than the glass around.
MIN_LOCAL_OD = 0.011
# Glass-like: every channel within this of the slide's glass colour.
GLASS_TOLERANCE = 0.06
# Pixels (longer side) the glass field is computed on.
FIELD_SIDE = 256
# Weight of the slide's glass colour in the local average (a few pixels' worth).
FIELD_PRIOR = 0.02
# Thin absorbers this long (pixels) are lines: edges, rims, fibres.
LINE_PX = 10
# Components at most this thick (pixels, on average) and LINE_PX long are lines.
MAX_LINE_WIDTH = 4.0
# Components smaller than this share of the thumbnail (and 4 px) are specks.
MIN_COMPONENT_SHARE = 2e-4
MIN_COMPONENT_PX = 4 * SMOOTH_PX**2


# Per-pixel reductions over the 3 channels: numpy's axis=2 reductions are
# several times slower on an HxWx3 array.
def _cmax(a: np.ndarray) -> np.ndarray:
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


def _cmin(a: np.ndarray) -> np.ndarray:
    return np.minimum(np.minimum(a[..., 0], a[..., 1]), a[..., 2])


def _cmean(a: np.ndarray) -> np.ndarray:
    return (a[..., 0] + a[..., 1] + a[..., 2]) / 3


def hue_degrees(f: np.ndarray, mx: np.ndarray, mn: np.ndarray) -> np.ndarray:
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return h * 60.0


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of green, blue or black pen ink (and black scanner borders)."""
    f = rgb.astype(np.float32) / 255.0
    mx, mn = _cmax(f), _cmin(f)
    saturation = (mx - mn) / np.maximum(mx, 1e-6)
    hue = hue_degrees(f, mx, mn)
    coloured = (saturation > PEN_MIN_SATURATION) & (hue >= PEN_HUE[0]) & (hue <= PEN_HUE[1])
    return coloured | (mx < MIN_BRIGHTNESS)


def glass_colour(rgb: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """RGB in [0, 1] of the slide's glass: the brightest grey brightness mode
    holding at least GLASS_MIN_SHARE of the pixels (pale tissue can form a
    larger grey mode, but glass is brighter)."""
    f = rgb.astype(np.float32) / 255.0
    mx, mn = _cmax(f), _cmin(f)
    grey = ((mx - mn) / np.maximum(mx, 1e-6) < GLASS_MAX_SATURATION) & (mx > GLASS_MIN_BRIGHTNESS)
    if exclude is not None:
        grey &= ~exclude
    brightness = _cmean(f)
    hist, edges = np.histogram(brightness[grey], bins=90, range=(GLASS_MIN_BRIGHTNESS, 1.0))
    # A peak spread over neighbouring bins by noise counts whole.
    mass = np.convolve(hist, np.ones(3), mode="same")
    peaks = [
        i
        for i in range(len(mass))
        if mass[i] >= GLASS_MIN_SHARE * brightness.size
        and mass[i] >= mass[max(i - 1, 0)]
        and mass[i] >= mass[min(i + 1, len(mass) - 1)]
    ]
    if not peaks:
        return np.full(3, DEFAULT_GLASS, np.float32)
    top = max(peaks)
    near = grey & (brightness >= edges[max(top - 1, 0)]) & (brightness < edges[min(top + 2, len(edges) - 1)])
    return np.median(f[near], axis=0)


def optical_density(rgb: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """HxWx3 OD relative to the glass colour; brighter than glass reads 0."""
    f = np.maximum(rgb.astype(np.float32) / 255.0, 1 / 255.0)
    return np.maximum(-np.log10(f / np.maximum(glass, 1 / 255.0)), 0.0)


def glass_field(rgb: np.ndarray, away: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """HxWx3 glass colour that follows uneven illumination: the glass-like
    pixels outside `away` (tissue found so far, ink), averaged over a wide
    neighbourhood; where few are near, the slide's glass colour."""
    f = rgb.astype(np.float32) / 255.0
    near = (~away & (_cmax(np.abs(f - glass)) < GLASS_TOLERANCE)).astype(np.float32)
    # The field is smooth: computed on every step-th pixel, then interpolated.
    step = max(1, max(rgb.shape[:2]) // FIELD_SIDE)
    f, near = f[::step, ::step], near[::step, ::step]
    sigma = max(near.shape) / 10
    weight = ndi.gaussian_filter(near, sigma)
    total = ndi.gaussian_filter(f * near[..., None], (sigma, sigma, 0))
    field = (total + FIELD_PRIOR * glass) / (weight + FIELD_PRIOR)[..., None]
    if step == 1:
        return field
    zoom = (rgb.shape[0] / field.shape[0], rgb.shape[1] / field.shape[1], 1)
    big = ndi.zoom(field, zoom, order=1, mode="nearest", grid_mode=True)
    return np.pad(
        big, ((0, max(0, rgb.shape[0] - big.shape[0])), (0, max(0, rgb.shape[1] - big.shape[1])), (0, 0)), mode="edge"
    )[: rgb.shape[0], : rgb.shape[1]]


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of tissue pixels of an HxWx3 uint8 thumbnail."""
    pen = pen_mask(rgb)
    glass = glass_colour(rgb, exclude=pen)
    first = _detect(rgb, pen, glass, MIN_SMOOTH_OD)
    # Judged again against the glass around each pixel, which lets paler tissue in.
    away = ndi.binary_dilation(first, iterations=2) | pen
    mask = _detect(rgb, pen, glass_field(rgb, away, glass), MIN_LOCAL_OD)
    # Black borders and ink blur into the glass around them on a thumbnail.
    black = _cmax(rgb) < MIN_BRIGHTNESS * 255
    mask = _drop_specks(mask & ~ndi.binary_dilation(black, iterations=INK_HALO_PX))
    # Holes are filled, but ink drawn over tissue stays out: its pixels are not tissue.
    return ndi.binary_fill_holes(mask) & ~pen


def _detect(rgb: np.ndarray, pen: np.ndarray, glass: np.ndarray, min_level: float) -> np.ndarray:
    od = optical_density(rgb, glass)
    absorbs = _cmean(od) > MIN_OD
    grey = absorbs & (_cmax(od) - _cmin(od) < MIN_STAIN_SPREAD)
    # Grey specks (dust) and lines of any colour (coverslip and slide edges,
    # whose refraction fringes are coloured, bubble rims, fibres) are thinner
    # than 3 px: they are left out before anything is averaged.
    thin = absorbs & ~ndi.binary_opening(absorbs, structure=np.ones((3, 3)))
    valid = (~pen & ~(thin & grey) & ~_lines(thin)).astype(np.float32)
    # OD averaged over a pixel's valid neighbours: thumbnail noise averages out,
    # and fat's thin membranes count over the empty cells between them.
    level, _ = _averaged(od, valid, SMOOTH_PX)
    # Faint stain over a wider neighbourhood, where noise is lower still.
    faint_level, faint_spread = _averaged(od, valid, FAINT_SMOOTH_PX)
    faint = (faint_spread > MIN_FAINT_SPREAD) & (faint_level > MIN_FAINT_OD) & (level > MIN_FAINT_OD)
    return ((level > min_level) | faint) & (valid > 0)


def _averaged(od: np.ndarray, valid: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean OD over a pixel's valid size x size neighbours, and its spread between channels."""
    weight = ndi.uniform_filter(valid, size)
    smooth = ndi.uniform_filter(od * valid[..., None], (size, size, 1)) / np.maximum(weight, 1e-6)[..., None]
    return _cmean(smooth), _cmax(smooth) - _cmin(smooth)


def _lines(thin: np.ndarray) -> np.ndarray:
    """Components of thin pixels at least LINE_PX long: lines, not nuclei."""
    labels, n = ndi.label(thin, structure=np.ones((3, 3)))
    long = np.zeros(n + 1, bool)
    for i, box in enumerate(ndi.find_objects(labels), start=1):
        long[i] = max(box[0].stop - box[0].start, box[1].stop - box[1].start) >= LINE_PX
    return long[labels]


def _drop_specks(mask: np.ndarray) -> np.ndarray:
    """Drop components too small to be tissue, and long thin ones (a slide's
    or coverslip's edge at most MAX_LINE_WIDTH px thick, with its fringes)."""
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= max(MIN_COMPONENT_PX, MIN_COMPONENT_SHARE * mask.size)
    for i, box in enumerate(ndi.find_objects(labels), start=1):
        length = max(box[0].stop - box[0].start, box[1].stop - box[1].start)
        keep[i] &= not (length >= LINE_PX and sizes[i] / length <= MAX_LINE_WIDTH)
    keep[0] = False
    return keep[labels]
