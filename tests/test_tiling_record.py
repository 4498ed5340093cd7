"""Issue 16: the index's tiling record, read by the gateway, the CLI and `smily eval`
instead of their own environment."""

from __future__ import annotations

import json

import pytest

from smily import stack
from smily.client import Client

from .helpers.wait import wait_done
from .test_cli import smily


def test_index_info_reports_the_recorded_tiling(client, ingested):
    info = client.index_info()
    assert info.tiling_recorded and info.model_id == "efficientnet-lite0/1"
    t = info.tiling
    assert (list(t.mpps), t.tile_size, t.stride, t.min_tissue_fraction) == ([1.0], 224, 1.0, 0.5)


def test_cli_info_prints_the_record(settings, ingested):
    out = smily(settings, "info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["tiling_recorded"] and info["tiling"]["mpps"] == [1.0] and info["tiling"]["tile_size"] == 224


@pytest.fixture
def misconfigured_gateway(settings, ingested):
    """A second gateway on the same index whose environment asks for another tiling."""
    running, s = stack.start(
        ["gateway"], settings.replace(gateway_port=0, tile_mpp=0.5, tile_stride=0.5, tile_size=256)
    )
    c = Client(f"127.0.0.1:{s.gateway.gateway_port}", timeout=300)
    yield c
    c.close()
    stack.stop(running, 0)


def test_gateway_uses_the_index_record_not_its_environment(misconfigured_gateway):
    info = misconfigured_gateway.index_info()
    assert info.tiling_recorded and list(info.tiling.mpps) == [1.0] and info.tiling.tile_size == 224
    # Searches run at the recorded tiling (no FAILED_PRECONDITION) and find tiles at 1.0 µm/px.
    hits = misconfigured_gateway.search(region=dict(slide_id="synth-a", x=448, y=448, width=448, height=448), k=3).hits
    assert len(hits) == 3 and all(abs(h.mpp - 1.0) < 0.01 for h in hits)
    # An ingest through it cuts tiles as the index records them: the same tile count as before.
    before = {s.slide_id: s.tile_count for s in misconfigured_gateway.slides()}
    op = wait_done(
        misconfigured_gateway,
        misconfigured_gateway.ingest("synth-a.tiff", "synth-a", {"file": "synth-a.tiff", "organ": "test"}),
    )
    assert op.error_code == "" and op.progress.tiles_indexed == before["synth-a"]
