"""Issue 16 step 4: queries embedded under the dihedral transforms, merged by best score."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest

from smily import stack
from smily.client import Client
from smily.common import images
from smily.gateway import dihedral

from .test_search_e2e import _tissue_tile


def test_the_eight_transforms_are_the_symmetries_of_the_square():
    a = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)  # no symmetry of its own
    out = dihedral.apply(a, dihedral.ALL)
    assert len({o.tobytes() for o in out}) == 8
    assert all(o.flags.c_contiguous for o in out)
    # Closed under composition: rotating any of them by 90 degrees gives another.
    assert {np.rot90(o).tobytes() for o in out} == {o.tobytes() for o in out}


def test_parse_puts_identity_first_and_refuses_unknown_names():
    assert dihedral.parse(()) == ("identity",)
    assert dihedral.parse(("rot90", "flip", "rot90")) == ("identity", "rot90", "flip")
    assert dihedral.parse(("all",)) == dihedral.ALL
    with pytest.raises(ValueError, match="rot45"):
        dihedral.parse(("rot45",))


def test_merge_keeps_each_tile_once_with_its_best_score():
    def hit(x, score):
        return NS(slide_id="a", score=score, tile=NS(x=x, y=0, width=10, height=10))

    merged = dihedral.merge_hits([[hit(0, 0.9), hit(10, 0.5)], [hit(10, 0.95), hit(20, 0.4)]], 2)
    assert [(h.tile.x, h.score) for h in merged] == [(10, 0.95), (0, 0.9)]


@pytest.fixture(scope="module", params=["max", "mean"])
def robust_gateway(request, settings, ingested):
    """A gateway on the session's backends and index whose queries go under all 8 transforms."""
    running, s = stack.start(
        ["gateway"],
        settings.replace(gateway_port=0, redis_url="", query_transforms=("all",), query_merge=request.param),
    )
    c = Client(f"127.0.0.1:{s.gateway.gateway_port}", timeout=300)
    yield c, request.param
    c.close()
    stack.stop(running, 0)


def test_rotated_and_flipped_queries_find_their_source_first(settings, robust_gateway):
    gateway, merge = robust_gateway
    tile, _ = _tissue_tile(settings, "synth-b.svs")
    rgb = images.decode(tile.image.data, tile.image.encoding, tile.image.width, tile.image.height)
    for name in ("identity", "rot90", "rot270", "flip_rot90"):
        image = images.encode(dihedral.TRANSFORMS[name](rgb).copy(), images.PNG)
        top = gateway.search(image=image, k=5, slide_ids=["synth-b"]).hits[0]
        assert (top.x, top.y) == (tile.x, tile.y), name
        if merge == "max":
            assert top.score > 0.98, name  # one transform of the query is the tile itself
    again = gateway.search(image=image, k=5, slide_ids=["synth-b"])
    assert again.cached  # the 8 embeddings are cached together
