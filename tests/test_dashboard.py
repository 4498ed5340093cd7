"""The Grafana dashboard and docs/metrics.md name only metrics the services export."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _exported() -> set[str]:
    names = set()
    for path in (ROOT / "services").rglob("*.py"):
        names |= set(re.findall(r'prom\.\w+\(\s*"(smily_\w+)"', path.read_text()))
    return names


def test_dashboard_and_docs_cover_every_exported_metric():
    exported = _exported()
    assert {"smily_grpc_requests_total", "smily_embedder_batch_size", "smily_cache_lookups_total"} <= exported
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "smily-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\bsmily_\w+", e)}
    assert used == exported, used ^ exported
    documented = set(re.findall(r"`(smily_\w+)`", (ROOT / "docs" / "metrics.md").read_text()))
    assert documented == exported, documented ^ exported
