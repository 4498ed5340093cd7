"""The `smily` command against the running gateway."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys

import pytest

from smily.cli import build_parser
from smily.cli.common import flags
from smily.output import Progress

from .conftest import ROOT


def smily(settings, *args):
    cmd = [sys.executable, "-m", "smily.cli", *args, "--gateway", f"127.0.0.1:{settings.gateway.gateway_port}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_search_json(settings, ingested):
    out = smily(settings, "search", "--slide", "synth-b", "--region", "1100,800,448,448", "--k", "4", "--json")
    assert out.returncode == 0, out.stderr
    resp = json.loads(out.stdout)  # one object: everything the response holds
    assert {"hits", "next_page_token", "model_id", "cached"} <= set(resp) and resp["model_id"]
    hits = resp["hits"]
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
    listed = json.loads(smily(settings, "slides", "--json").stdout)["slides"]
    assert {"synth-a", "synth-b", "cmu_small_region"} <= {s["slide_id"] for s in listed}
    # Find slides by metadata (the test stack searches the `file` key too).
    found = json.loads(smily(settings, "slides", "--find", "SYNTH-B", "--json").stdout)["slides"]
    assert [s["slide_id"] for s in found] == ["synth-b"]
    by_organ = smily(settings, "slides", "--find", "synth", "--find-key", "organ", "--json")
    assert json.loads(by_organ.stdout)["slides"] == []
    bad = smily(settings, "slides", "--find", "synth", "--find-key", "stain")
    assert bad.returncode != 0 and "searchable keys" in bad.stderr


def test_errors_are_reported_not_raised(settings, ingested, tmp_path):
    out = smily(settings, "search", "--slide", "missing", "--region", "0,0,10,10")
    assert out.returncode == 2 and "NOT_FOUND" in out.stderr and "Traceback" not in out.stderr
    assert "`smily slides` lists" in out.stderr
    out = smily(settings, "ingest", "../outside.svs")
    assert out.returncode == 2 and "INVALID_ARGUMENT" in out.stderr
    out = smily(settings, "ingest", "no-such-slide.svs")
    assert out.returncode == 2 and "NOT_FOUND" in out.stderr and "slide roots:" in out.stderr
    out = smily(settings, "search", "--image", str(tmp_path / "nope.png"))
    assert out.returncode == 2 and "nope.png: No such file or directory" in out.stderr
    assert "Traceback" not in out.stderr
    out = smily(settings, "search", "--slide", "synth-a", "--region", "1,2,three")
    assert out.returncode != 0 and "--region takes X,Y,W,H" in out.stderr and "Traceback" not in out.stderr
    out = smily(settings, "status", "no-such-operation")
    assert out.returncode == 2 and "smily ingest --no-wait" in out.stderr


def test_unreachable_gateway_says_what_to_do():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-m", "smily.cli", "slides", "--gateway", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"UNAVAILABLE: the gateway at 127.0.0.1:{port}" in out.stderr
    assert "`make up`" in out.stderr and "--gateway" in out.stderr


def test_a_backend_address_is_named_as_not_the_gateway(settings):
    """--gateway at a backend's port: which service answers there, not "Method not found!"."""
    for name in ("index", "tiler"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "smily.cli",
                "slides",
                "--gateway",
                f"127.0.0.1:{settings.port_of(name)}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert f"serves the {name} service, not the gateway" in out.stderr, out.stderr
        assert "Method not found" not in out.stderr


def _parsers(parser):
    """The parser and every subcommand's, depth first."""
    yield parser
    for action in parser._actions:
        if action.choices and hasattr(action, "_name_parser_map"):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def test_every_flag_and_argument_has_help():
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 20  # every command and subcommand was walked
    missing = [
        f"{p.prog} {'/'.join(a.option_strings) or a.dest}"
        for p in parsers
        for a in p._actions
        if not a.help and not hasattr(a, "_name_parser_map")
    ]
    assert missing == []


@pytest.mark.unit
def test_service_messages_name_theflags():
    message = "the slide does not record its resolution; state it in the request's slide_mpp (e.g. 0.25)"
    assert flags(message) == "the slide does not record its resolution; state it with --slide-mpp (e.g. 0.25)"
    assert flags("max_hits_per_slide must not be negative") == "--max-per-slide must not be negative"


def test_json_on_every_gateway_command(settings, ingested, tmp_path):
    op = json.loads(smily(settings, "ingest", "synth-a.tiff", "--slide-id", "cli-json", "--json").stdout)
    # The proto3 JSON mapping: enum names, 64-bit integers as strings.
    assert op["state"] == "OPERATION_STATE_SUCCEEDED" and int(op["progress"]["tiles_indexed"]) > 0
    status = json.loads(smily(settings, "status", op["operation_id"], "--json").stdout)
    assert status["operation_id"] == op["operation_id"] and status["model_id"] == op["model_id"]
    region = json.loads(
        smily(
            settings, "read-region", "cli-json", "900,900,448,448", "--output", str(tmp_path / "r.png"), "--json"
        ).stdout
    )
    assert region["output"].endswith("r.png") and region["width"] == 224 and "image" not in region
    created = json.loads(
        smily(
            settings,
            "concept",
            "create",
            "cli-json",
            "--with",
            "cli-json:900,900,448,448",
            "--without",
            "cmu_small_region:449,2245,449,449",
            "--json",
        ).stdout
    )
    assert created["name"] == "cli-json" and created["with_examples"] == 1
    listed = json.loads(smily(settings, "concept", "list", "--json").stdout)["concepts"]
    assert "cli-json" in {c["name"] for c in listed}
    assert json.loads(smily(settings, "concept", "delete", "cli-json", "--json").stdout) == {
        "deleted_concept": "cli-json"
    }
    # The operator's commands (SMILY_AUTH=none: the anonymous caller is the operator too).
    tenants = {t["tenant"]: t for t in json.loads(smily(settings, "tenants", "--json").stdout)["tenants"]}
    assert int(tenants["default"]["slide_count"]) >= 1
    moved = json.loads(smily(settings, "move-slide", "cli-json", "--from", "default", "--to", "cli-t", "--json").stdout)
    assert moved["slide"]["tenant"] == "cli-t" and moved["moved_tiles"] == op["progress"]["tiles_indexed"]
    back = smily(settings, "move-slide", "cli-json", "--from", "cli-t", "--to", "default")
    assert back.returncode == 0 and "moved cli-json from cli-t to default" in back.stdout, back.stderr
    again = smily(settings, "move-slide", "cli-json", "--from", "cli-t", "--to", "default")
    assert again.returncode == 2 and "NOT_FOUND" in again.stderr and "Traceback" not in again.stderr
    deleted = json.loads(smily(settings, "delete", "cli-json", "--json").stdout)
    assert deleted["slide_id"] == "cli-json" and deleted["deleted_tiles"] == int(op["progress"]["tiles_indexed"])


def test_steered_search_concepts_and_slides(settings, ingested, tmp_path):
    out = smily(
        settings,
        "concept",
        "create",
        "cli-concept",
        "--with",
        "synth-a:900,900,448,448",
        "--without",
        "cmu_small_region:449,2245,449,449",
    )
    assert out.returncode == 0 and "1 with, 1 without" in out.stdout, out.stderr
    out = smily(
        settings,
        "search",
        "--slide",
        "synth-b",
        "--region",
        "1100,800,448,448",
        "--negative",
        "cmu_small_region:449,2245,449,449",
        "--concept",
        "cli-concept=0.2",
        "--max-per-slide",
        "1",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)["hits"]
    assert len({h["slide_id"] for h in hits}) == len(hits) > 1
    assert smily(settings, "concept", "delete", "cli-concept").returncode == 0
    out = smily(settings, "search-slides", "--source", "synth-b.svs", "--mosaic-size", "4", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["slides"][0]["slide_id"] == "synth-b"
    png = tmp_path / "hit.png"
    out = smily(settings, "read-region", "synth-a", "900,900,448,448", "--output", str(png))
    assert out.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG", out.stderr


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.unit
def test_progress_is_a_bar_on_a_terminal_and_plain_lines_with_an_eta_elsewhere():
    log = _Stream(tty=False)
    progress = Progress("slide-x", log, every_s=0)
    progress.update(10, 100)
    progress.update(50, 100)
    progress.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue()
    assert lines[1].startswith("slide-x: 50/100 tiles indexed (50%)") and "ETA" in lines[1]
    terminal = _Stream(tty=True)
    progress = Progress("slide-x", terminal)
    progress.update(10, 100)
    progress.update(100, 100)
    progress.close()
    assert "slide-x" in terminal.getvalue() and "100/100" in terminal.getvalue()


def test_search_then_export_geojson(settings, ingested, tmp_path):
    out = smily(settings, "search", "--slide", "synth-b", "--region", "1100,800,448,448", "--k", "6")
    assert out.returncode == 0, out.stderr
    assert "a retrieval statistic, not a diagnosis" in out.stderr
    search_id = out.stderr.split("smily export ")[1].split()[0]
    path = tmp_path / "hits.geojson"
    got = smily(settings, "export", search_id, "--slide-id", "synth-b", "--output", str(path))
    assert got.returncode == 0, got.stderr
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and doc["features"]
    assert {f["properties"]["slide_id"] for f in doc["features"]} == {"synth-b"}
    assert all(f["properties"]["query_id"] == search_id for f in doc["features"])
    missing = smily(settings, "export", "0" * 32)
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr
    # DICOM annotations come from the gateway, of one slide from a DICOMweb archive (these are files).
    no_slide = smily(settings, "export", search_id, "--format", "dicom-ann")
    assert no_slide.returncode != 0 and "--slide-id" in no_slide.stderr
    no_archive = smily(settings, "export", search_id, "--format", "dicom-ann", "--slide-id", "synth-b", "--stow")
    assert no_archive.returncode != 0 and "--dicomweb" in no_archive.stderr
    from_file = smily(settings, "export", search_id, "--format", "dicom-ann", "--slide-id", "synth-b")
    assert from_file.returncode == 2 and "FAILED_PRECONDITION" in from_file.stderr, from_file.stderr
