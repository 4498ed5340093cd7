"""Tissue detection on the labelled thumbnails of tests/data/tissue (tests/helpers/tissue_set.py):
every stain kept, glass and artefacts dropped."""

import numpy as np
import pytest

from smily.tiler.tissue import glass_colour, tissue_mask
from tests.helpers import tissue_set

pytestmark = pytest.mark.unit

SET = tissue_set.load()


def test_the_set_has_real_ihc_and_fat_rich_images():
    names = {name for name, _, _ in SET}
    assert {"ihc-skimage", "cmu-macro", "cmu-region", "fat-synthetic", "ihc-synthetic"} <= names


@pytest.mark.parametrize("name,rgb,labels", SET, ids=[n for n, _, _ in SET])
def test_keeps_tissue_and_drops_background(name, rgb, labels):
    s = tissue_set.score(tissue_mask(rgb), labels)
    assert s.recall >= 0.97, f"{name}: tissue recall {s.recall:.3f}"
    assert s.precision >= 0.95, f"{name}: precision {s.precision:.3f}"
    if not np.isnan(s.artefacts_dropped):
        assert s.artefacts_dropped >= 0.95, f"{name}: artefacts dropped {s.artefacts_dropped:.3f}"


def test_blank_glass_with_a_colour_cast_has_no_tissue():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal((226, 232, 240), 2, (120, 160, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()


def test_glass_is_the_bright_grey_mode_not_pale_tissue():
    img = np.full((100, 100, 3), (214, 214, 224), np.uint8)  # pale tissue on most of the frame
    img[:, :20] = (240, 238, 236)  # glass
    assert np.allclose(glass_colour(img) * 255, (240, 238, 236), atol=1)
    mask = tissue_mask(img)
    assert mask[:, 30:].all() and not mask[:, :15].any()


def test_ink_over_tissue_stays_out():
    img = np.full((80, 80, 3), (240, 240, 240), np.uint8)
    img[10:70, 10:70] = (200, 130, 180)
    img[38:42, :] = (30, 140, 60)  # a green line across
    mask = tissue_mask(img)
    assert not mask[38:42].any() and mask[20:30, 20:60].all()
