"""The rendered manifests: `kubectl kustomize`, and the few rules of Kubernetes objects the box needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml


def render(kustomization: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        raise RuntimeError("kubectl is required (apt-get install kubectl)")
    out = subprocess.run([kubectl, "kustomize", str(kustomization)], capture_output=True, text=True, check=True)
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def of_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    if not found:
        raise KeyError(f"{kind}/{name} is not in the rendered manifests")
    return found[0]


def selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels and matchExpressions); an empty one selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def replicas(objs: list[dict], workload: dict) -> int:
    """spec.replicas, else what its HorizontalPodAutoscaler starts it at (minReplicas), else 1."""
    if workload["spec"].get("replicas") is not None:
        return int(workload["spec"]["replicas"])
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["kind"] == workload["kind"] and ref["name"] == workload["metadata"]["name"]:
            return int(hpa["spec"].get("minReplicas", 1))
    return 1
