"""The Kubernetes deployment, run as rendered: the cpu overlay in the cluster in a box.

Every pod runs from its built image (`make images`) in its own network namespace, with
NetworkPolicies enforced, certificates issued from the tls component and kubelet's
probes (tests/cluster/). A LIS in its own namespace takes a token from a real IdP
(oidc-provider), ingests through smily-http and searches through the gateway Service
over gRPC with TLS.

Two markers, one boot of the box per run: `cluster_fast` (`make test-cluster-fast`: the
end-to-end path, the policies, one index replica killed during a short search loop, the
deploy guide's check, kubelet's probes) and `cluster_full` (the long resilience loop).
`make test-cluster` runs both; `make test` runs neither.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smily.synthetic import write_samples

from .cluster.box import Box
from .cluster.rootfs import DOCKER
from .conftest import TEST_SLIDES, need

SLIDE = TEST_SLIDES[0]


def require_box() -> None:
    if os.geteuid() != 0:
        need("root", "the box makes network namespaces, mounts and nftables rules")
    for tool, package in (("nft", "nftables"), ("ip", "iproute2"), ("kubectl", "kubectl"), ("node", "nodejs")):
        if not shutil.which(tool):
            need(tool, f"apt-get install -y {package}")
    if subprocess.run([DOCKER, "image", "inspect", "localhost/smily/gateway:0.1.0"], capture_output=True).returncode:
        need("the images", "`make images` (docker.io: dockerd --storage-driver vfs, then make images)")


def start_box(tmp_path_factory) -> Box:
    require_box()
    root = tmp_path_factory.mktemp("box")
    slides = root / "slides"
    write_samples(str(slides), [SLIDE])
    box = Box(root / "state", "cpu", slides)
    try:
        box.timings["ready"] = box.cluster.wait_settled(900)
    except BaseException:
        box.close()
        raise
    return box


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    b = start_box(tmp_path_factory)
    yield b
    b.close()


@pytest.fixture(scope="module")
def lis(box):
    agent = box.lis()
    assert agent.call("get_token") == {"ok": True}
    return agent


def ingest(lis, source: str) -> str:
    started = lis.call("http", method="POST", path="/v1/slides:ingest", body={"source": source})
    assert started["status"] == 200, started
    op = started["json"]["operation"]["operationId"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        got = lis.call("http", method="GET", path=f"/v1/operations/{op}")
        assert got["status"] == 200, got
        state = got["json"]["operation"]["state"]
        if state == "OPERATION_STATE_SUCCEEDED":
            return got["json"]["operation"]["slideId"]
        assert state in ("OPERATION_STATE_QUEUED", "OPERATION_STATE_RUNNING"), got
        time.sleep(1)
    raise AssertionError(f"ingest {op} did not finish")


@pytest.mark.cluster_fast
def test_every_workload_runs_from_its_image(box):
    digests = Path(__file__).resolve().parent.parent / "deploy/k8s/components/image-digests/kustomization.yaml"
    for w in box.cluster.workloads:
        for c in w.obj["spec"]["template"]["spec"]["containers"]:
            # The images `make images` built and pinned; the box's own stand-ins (box-stores) are not.
            pinned = digests.exists() and c["image"].split("@")[0].split(":")[0] in digests.read_text()
            if pinned and c["image"].startswith("localhost/smily/"):
                assert "@sha256:" in c["image"], f"{c['image']}: `make images` pinned it by digest"
        pods = box.cluster.pods_of(w)
        assert len(pods) == w.desired and all(p.ready for p in pods), box.cluster.describe()
        for pod in pods:
            for c in pod.containers:
                image = box.registry.resolve(c.spec["image"])
                pid = c.main_pid()
                assert pid, f"{pod.name}/{c.name} has no process"
                # The process's root is the overlay over the image's exported filesystem, not the checkout.
                root = os.readlink(f"/proc/{pid}/root")
                assert root == str(pod.dir / "rootfs" / c.name), root
                mounts = Path(f"/proc/{pid}/mountinfo").read_text()
                assert f"lowerdir={image.root}" in mounts
                status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
                uid = (pod.spec.get("securityContext") or {}).get("runAsUser")
                assert status["Uid"].split()[0] == str(uid)


@pytest.fixture(scope="module")
def slide_id(lis) -> str:
    """The slide ingested through smily-http, once per run."""
    return ingest(lis, SLIDE.name)


@pytest.mark.cluster_fast
def test_ingest_through_http_then_search_through_the_gateway_with_tls_and_a_token(lis, slide_id):
    found = lis.call("search", slide_id=slide_id, x=512, y=512, size=512)
    assert slide_id in found.get("hits", []), found
    listed = lis.call("http", method="GET", path="/v1/slides")
    assert slide_id in [s["slideId"] for s in listed["json"].get("slides", [])], listed
    tile = lis.call("http", method="GET", path=f"/iiif/3/{slide_id}/0,0,512,512/256,/0/default.jpg", raw=True)
    assert tile["status"] == 200 and tile["content_type"] == "image/jpeg" and tile["head"].startswith("ffd8"), tile


@pytest.mark.cluster_fast
def test_network_policies_admit_only_the_declared_edges(box, lis):
    index = next(p for p in box.cluster.pods if p.labels.get("app.kubernetes.io/name") == "smily-index")
    gateway = next(p for p in box.cluster.pods if p.labels.get("app.kubernetes.io/name") == "smily-gateway")
    assert lis.call("connect", host=gateway.ip, port=50050)["connected"] is True
    # The LIS may reach the gateway only: not an index replica, nor the gateway's metrics.
    assert lis.call("connect", host=index.ip, port=50053)["connected"] is False
    assert lis.call("connect", host=gateway.ip, port=9100)["connected"] is False


def _blip(lis, before: dict) -> dict:
    now = lis.call("loop_status")
    return {"ok": now["ok"] - before["ok"], "failed": now["failed"] - before["failed"]}


def _kill(cluster, name: str) -> None:
    """`kubectl delete pod` of one running pod of app.kubernetes.io/name=name."""
    pod = next(p for p in cluster.pods if p.labels.get("app.kubernetes.io/name") == name and not p.terminating)
    pod.delete()


@pytest.mark.cluster_fast
def test_an_index_replica_killed_during_a_search_loop_fails_no_search(box, lis, slide_id):
    cluster = box.cluster
    assert lis.call("loop_start", query={"slide_id": slide_id, "x": 512, "y": 512, "size": 512}) == {"ok": True}
    try:
        time.sleep(2)  # searches before the kill
        _kill(cluster, "smily-index")
        time.sleep(2)
        cluster.wait_settled(600)
        time.sleep(2)  # and after the replacement serves
    finally:
        result = lis.call("loop_stop")
    assert result["failed"] == [] and result["ok"] > 0, result["failed"][:5]


# -- make test-cluster: the resilience loop ----------------------------------------


@pytest.mark.cluster_full
def test_searches_survive_kills_rollouts_a_scale_up_and_certificate_reissue(box, lis, tmp_path):
    cluster = box.cluster
    slide_id = ingest(lis, SLIDE.name)
    acknowledged = {slide_id}
    figures: dict[str, float | int] = {"time_to_ready_s": round(box.timings["ready"], 1)}
    assert lis.call("loop_start", query={"slide_id": slide_id, "x": 512, "y": 512, "size": 512}) == {"ok": True}

    def step(name: str, action, settle: list[str] | None = None) -> None:
        before = lis.call("loop_status")
        action()
        time.sleep(2)
        figures[f"{name}_s"] = round(cluster.wait_settled(900, settle), 1)
        figures[f"{name}_failed"] = _blip(lis, before)["failed"]

    step("kill_index_replica", lambda: _kill(cluster, "smily-index"))
    step("kill_gateway_pod", lambda: _kill(cluster, "smily-gateway"))
    for w in [w for w in cluster.workloads if w.kind == "Deployment"]:
        step(f"rollout_{w.name}", w.restart, [w.name])
    shard = cluster.workload("smily-index-0")
    step("scale_index_shard", lambda: cluster.scale(shard.name, shard.desired + 1), [shard.name])

    def running() -> dict[str, list[int]]:
        with cluster.lock:
            return {p.name: [c.restarts for c in p.containers] for p in cluster.pods if not p.terminating}

    pods = running()
    before = lis.call("loop_status")
    cluster.reissue_certificates()
    time.sleep(30)  # the servers re-read the files they watch
    figures["reissue_failed"] = _blip(lis, before)["failed"]
    after = running()
    result = lis.call("loop_stop")
    figures["searches"], figures["slowest_search_s"] = result["ok"], round(result["slowest"], 2)
    (tmp_path / "figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))
    assert after == pods, "a pod restarted or was replaced for the new certificates"
    assert result["failed"] == [] and result["ok"] > 0, (result["failed"][:5], figures)
    listed = lis.call("http", method="GET", path="/v1/slides")
    assert acknowledged <= {s["slideId"] for s in listed["json"].get("slides", [])}, listed


@pytest.mark.cluster_fast
def test_the_deploy_guides_check_step_passes_on_the_box(box):
    out = box.deploy_script("check")
    assert "certificate" not in out.lower() or "error" not in out.lower(), out


# -- the box's kubelet and policies on a workload of their own (the Debian base image) --

PROBE_WORKLOAD = """
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: demo}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      securityContext: {runAsUser: 10001, runAsGroup: 10001, fsGroup: 10001}
      containers:
        - name: web
          image: localhost/smily/base:bookworm
          command: [python3, -m, http.server, "8080", -d, /srv]
          ports: [{name: http, containerPort: 8080}]
          # Liveness only once the server listens: on busy cores Python may take longer to
          # start than two liveness periods, and the restart must come from the 404.
          startupProbe: {tcpSocket: {port: http}, periodSeconds: 1, failureThreshold: 120}
          readinessProbe: {httpGet: {path: /, port: http}, periodSeconds: 1}
          # /healthz is not there: kubelet must restart the container.
          livenessProbe: {httpGet: {path: /healthz, port: http}, periodSeconds: 1, failureThreshold: 2}
          volumeMounts: [{name: srv, mountPath: /srv}]
      volumes: [{name: srv, emptyDir: {}}]
      terminationGracePeriodSeconds: 1
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: other, namespace: demo}
spec:
  replicas: 1
  selector: {matchLabels: {app: other}}
  template:
    metadata: {labels: {app: other}}
    spec:
      securityContext: {runAsUser: 10001, runAsGroup: 10001}
      containers:
        - name: other
          image: localhost/smily/base:bookworm
          command: [python3, -m, http.server, "8081"]
      terminationGracePeriodSeconds: 1
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-nobody, namespace: demo}
spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Ingress]}
"""


@pytest.mark.cluster_fast
def test_the_box_restarts_on_liveness_and_enforces_default_deny(tmp_path):
    require_box()
    import yaml

    from .cluster.controllers import Cluster
    from .cluster.rootfs import Registry

    objs = list(yaml.safe_load_all(PROBE_WORKLOAD))
    cache = Path(os.environ.get("SMILY_BOX_CACHE", "/var/tmp/smily-box")) / "rootfs"
    cluster = Cluster(objs, tmp_path, "sbt" + os.urandom(1).hex(), Registry(cache), {})
    try:
        web = cluster.workload("web")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pods = cluster.pods_of(web)
            if pods and pods[0].containers[0].restarts >= 1:
                break
            time.sleep(0.5)
        pod = cluster.pods_of(web)[0]
        assert pod.containers[0].restarts >= 1, cluster.describe()
        assert any("liveness probe failed: 404" in e for e in pod.events), pod.events
        # The node probes it, but no pod may open a connection to it (default deny, no edge).
        other = cluster.pods_of(cluster.workload("other"))[0]
        probe = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)"
        denied = subprocess.run(["ip", "netns", "exec", other.netns, sys.executable, "-c", probe, pod.ip, "8080"])
        allowed = subprocess.run(["ip", "netns", "exec", pod.netns, sys.executable, "-c", probe, other.ip, "8081"])
        assert denied.returncode != 0 and allowed.returncode == 0
    finally:
        cluster.close()
