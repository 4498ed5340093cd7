"""The `smily` command against the running gateway."""
from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT


def smily(settings, *args):
    cmd = [sys.executable, "-m", "smily.cli", *args, "--gateway", f"127.0.0.1:{settings.gateway_port}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_search_json(settings, ingested):
    out = smily(settings, "search", "--slide", "synth-b", "--region", "1100,800,448,448", "--k", "4", "--json")
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)
    assert len(hits) == 4
    assert {"slide_id", "x", "y", "width", "height", "score"} <= set(hits[0])
    assert hits[0]["score"] >= hits[-1]["score"]


def test_search_image_and_slides(settings, ingested, tmp_path):
    import numpy as np
    from PIL import Image

    path = tmp_path / "patch.png"
    Image.fromarray(np.full((224, 224, 3), (200, 120, 170), np.uint8)).save(path)
    out = smily(settings, "search", "--image", str(path), "--k", "2")
    assert out.returncode == 0, out.stderr
    assert "2 hits" in out.stdout
    listed = json.loads(smily(settings, "slides", "--json").stdout)
    assert {"synth-a", "synth-b", "cmu_small_region"} <= {s["slide_id"] for s in listed}


def test_errors_are_reported_not_raised(settings, ingested):
    out = smily(settings, "search", "--slide", "missing", "--region", "0,0,10,10")
    assert out.returncode == 2 and "NOT_FOUND" in out.stderr and "Traceback" not in out.stderr
    out = smily(settings, "ingest", "../outside.svs")
    assert out.returncode == 2 and "INVALID_ARGUMENT" in out.stderr


def test_steered_search_concepts_and_slides(settings, ingested, tmp_path):
    out = smily(settings, "concept", "create", "cli-concept", "--with", "synth-a:900,900,448,448",
                "--without", "cmu_small_region:449,2245,449,449")
    assert out.returncode == 0 and "1 with, 1 without" in out.stdout, out.stderr
    out = smily(settings, "search", "--slide", "synth-b", "--region", "1100,800,448,448", "--negative",
                "cmu_small_region:449,2245,449,449", "--concept", "cli-concept=0.2", "--max-per-slide", "1", "--json")
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)
    assert len({h["slide_id"] for h in hits}) == len(hits) > 1
    assert smily(settings, "concept", "delete", "cli-concept").returncode == 0
    out = smily(settings, "search-slides", "--source", "synth-b.svs", "--mosaic-size", "4", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["slide_id"] == "synth-b"
    png = tmp_path / "hit.png"
    out = smily(settings, "read-region", "synth-a", "900,900,448,448", "--output", str(png))
    assert out.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG", out.stderr
