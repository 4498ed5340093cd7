"""The cluster: objects applied, controllers reconciling them, Services kept in the hosts files.

Deployments keep their replicas (a deleted pod is replaced) and roll out a restart with
their strategy (maxSurge, maxUnavailable; Recreate). StatefulSets keep `<name>-<i>`
pods, started in order, each with its own volumeClaimTemplates claim, and roll out in
reverse order. HorizontalPodAutoscalers set the starting replicas (minReplicas).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import secrets as random
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import policy
from .certs import CertManager
from .kubelet import Pod, Prober
from .manifests import replicas, selects
from .network import Network, service_names
from .rootfs import Registry


def _percent(value, total: int, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        share = total * int(value[:-1]) / 100
        return math.ceil(share) if round_up else math.floor(share)
    return int(value)


class Workload:
    def __init__(self, obj: dict, desired: int):
        self.obj, self.kind, self.name = obj, obj["kind"], obj["metadata"]["name"]
        self.namespace = obj["metadata"]["namespace"]
        self.desired = desired
        self.revision = self._hash(obj["spec"]["template"])
        self.rolling = False

    @staticmethod
    def _hash(template: dict) -> str:
        return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]

    def restart(self) -> None:
        """`kubectl rollout restart`: a new template revision (the restartedAt annotation)."""
        template = self.obj["spec"]["template"]
        annotations = template.setdefault("metadata", {}).setdefault("annotations", {})
        annotations["kubectl.kubernetes.io/restartedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ")
        self.revision = self._hash(template)
        self.rolling = True


class Cluster:
    def __init__(
        self, objs: list[dict], state: Path, prefix: str, registry: Registry, extra_namespaces: dict[str, dict]
    ):
        self.objs, self.state, self.prefix, self.registry = objs, state, prefix, registry
        self.lock = threading.RLock()
        self.pods: list[Pod] = []
        self.network = Network(prefix)
        self.prober = Prober(self.network.node_ns, sys.executable)
        self.namespaces = {
            o["metadata"]["name"]: dict(o["metadata"].get("labels") or {}) for o in objs if o["kind"] == "Namespace"
        }
        self.namespaces.update(extra_namespaces)
        for name, labels in self.namespaces.items():
            labels["kubernetes.io/metadata.name"] = name
        self.secrets: dict[tuple[str | None, str], dict] = {}
        self.configmaps: dict[tuple[str | None, str], dict[str, str]] = {}
        self.services: list[dict] = []
        self.policies: list[dict] = []
        self.workloads: list[Workload] = []
        self.cert_manager = CertManager([])
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._pods_changed = True
        self.extra_hosts: dict[str, list[str]] = {}  # names outside the Services (the IdP's)
        # Namespaces of the box outside the pods (IdP, LIS): policy peers, with hosts files.
        self.outside: list[policy.Endpoint] = []
        self.outside_netns: dict[str, str] = {}
        self.apply(objs)
        self._threads = [threading.Thread(target=self._loop, daemon=True, name="controllers")]
        self._threads[0].start()

    # -- objects --------------------------------------------------------------

    def apply(self, objs: list[dict]) -> None:
        """`kubectl apply`: every object, kinds the box does not run are refused by name."""
        runnable = {"Deployment", "StatefulSet"}
        config = {"Namespace", "ConfigMap", "Secret", "Service", "NetworkPolicy", "Issuer", "Certificate"}
        # Declared, checked by tests/test_k8s.py, and without effect on one node.
        inert = {"HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim", "ServiceAccount"}
        with self.lock:
            for o in objs:
                kind, meta = o["kind"], o["metadata"]
                key = (meta.get("namespace"), meta["name"])
                if kind == "ConfigMap":
                    self.configmaps[key] = dict(o.get("data") or {})
                elif kind == "Secret":
                    data = {k: base64.b64decode(v) for k, v in (o.get("data") or {}).items()}
                    data.update({k: v.encode() for k, v in (o.get("stringData") or {}).items()})
                    self.secrets[key] = {"type": o.get("type", "Opaque"), "data": data}
                elif kind == "Service":
                    self.services.append(o)
                elif kind == "NetworkPolicy":
                    self.policies.append(o)
                elif kind in runnable:
                    self.workloads.append(Workload(o, replicas(self.objs, o)))
                elif kind not in config | inert:
                    raise RuntimeError(f"{kind} {meta['name']}: the box does not run this kind")
            certificates = [o for o in objs if o["kind"] in ("Issuer", "Certificate")]
            if certificates:
                self.cert_manager = CertManager(certificates)
                self.cert_manager.issue_all(self.secrets)
        self._changed.set()

    def secret(self, namespace: str, name: str) -> dict[str, bytes]:
        if (namespace, name) not in self.secrets:
            raise RuntimeError(f"Secret {namespace}/{name} does not exist")
        return self.secrets[(namespace, name)]["data"]

    def configmap(self, namespace: str, name: str) -> dict[str, str]:
        if (namespace, name) not in self.configmaps:
            raise RuntimeError(f"ConfigMap {namespace}/{name} does not exist")
        return self.configmaps[(namespace, name)]

    def reissue_certificates(self) -> list[str]:
        """cert-manager renews every Certificate (new keys); kubelet updates the mounted Secrets."""
        with self.lock:
            names = []
            for cert in self.cert_manager.certificates:
                if not cert["spec"].get("isCA"):
                    self.cert_manager.issue(cert, self.secrets)
                    names.append(cert["spec"]["secretName"])
            for pod in self.pods:
                for name in names:
                    pod.refresh("Secret", name)
        return names

    def claim(self, namespace: str, name: str, pod: Pod) -> Path:
        """A PersistentVolumeClaim bound to a directory (the box's provisioner), owned by fsGroup."""
        path = self.state / "volumes" / namespace / name
        if not path.exists():
            path.mkdir(parents=True)
            fs_group = (pod.spec.get("securityContext") or {}).get("fsGroup")
            if fs_group is not None:
                os.chown(path, 0, fs_group)
                os.chmod(path, 0o2775)
        return path

    def template_claim(self, pod: Pod, name: str) -> Path | None:
        for w in self.workloads:
            if w.kind == "StatefulSet" and pod.owner == w.name:
                for t in w.obj["spec"].get("volumeClaimTemplates") or []:
                    if t["metadata"]["name"] == name:
                        return self.claim(pod.namespace, f"{name}-{pod.name}", pod)
        return None

    def service_links(self, namespace: str) -> dict[str, str]:
        """The docker-link variables kubelet adds for each Service unless enableServiceLinks is false."""
        env = {}
        for svc in self.services:
            if svc["metadata"]["namespace"] != namespace or not svc["spec"].get("ports"):
                continue
            name = svc["metadata"]["name"].upper().replace("-", "_")
            port = svc["spec"]["ports"][0]["port"]
            host = ",".join(p.ip for p in self.endpoints(svc)[:1])
            env[f"{name}_SERVICE_HOST"], env[f"{name}_SERVICE_PORT"] = host, str(port)
            env[f"{name}_PORT"] = f"tcp://{host}:{port}"
        return env

    # -- pods and endpoints ---------------------------------------------------

    def endpoints(self, svc: dict) -> list[Pod]:
        ns = svc["metadata"]["namespace"]
        selector = svc["spec"].get("selector")
        if not selector:
            return []
        with self.lock:
            return [
                p for p in self.pods
                if p.namespace == ns and p.ip and selects({"matchLabels": selector}, p.labels)
                and (p.ready or svc["spec"].get("publishNotReadyAddresses"))
            ]  # fmt: skip

    def pod_added(self, pod: Pod) -> None:
        with self.lock:
            self.pods.append(pod)
            self._pods_changed = True
        self.sync_network()

    def add_outside(self, netns: str, endpoint: policy.Endpoint) -> None:
        """A namespace outside the pods (IdP, LIS) joins the policies' peers: every pod's rules
        are rewritten, as a CNI does for a new peer (else a pod started before it never admits it)."""
        with self.lock:
            self.outside.append(endpoint)
            self.outside_netns[netns] = endpoint.namespace
            self._pods_changed = True
        self.sync_network()

    def pod_removed(self, pod: Pod) -> None:
        with self.lock:
            if pod in self.pods:
                self.pods.remove(pod)
            self._pods_changed = True
        self._changed.set()

    def changed(self) -> None:
        self._changed.set()

    def sync_network(self) -> None:
        """Hosts files from the ready endpoints; nftables from the pods' labels and IPs."""
        with self.lock:
            pods = [p for p in self.pods if p.ip and p.netns in self.network.namespaces]
            records: dict[str, dict[str, list[str]]] = {}
            for ns in self.namespaces:
                recs: dict[str, list[str]] = {k: list(v) for k, v in self.extra_hosts.items()}
                for svc in self.services:
                    svc_ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
                    self._check_ports(svc)
                    ready = self.endpoints(svc)
                    for n in service_names(name, svc_ns, ns):
                        if ready:
                            recs[n] = [p.ip for p in ready]
                    if svc["spec"].get("clusterIP") == "None":
                        for p in ready:
                            if p.spec.get("subdomain") == name and p.spec.get("hostname"):
                                for n in service_names(f"{p.spec['hostname']}.{name}", svc_ns, ns):
                                    recs[n] = [p.ip]
                records[ns] = recs
            for p in pods:
                own = [p.spec.get("hostname", p.name)]
                if p.spec.get("subdomain"):
                    own.insert(0, f"{own[0]}.{p.spec['subdomain']}.{p.namespace}.svc.cluster.local")
                self.network.write_hosts(p.netns, own, records[p.namespace])
            for netns, ns in self.outside_netns.items():
                self.network.write_hosts(netns, [netns], records[ns])
            if self._pods_changed:
                self._pods_changed = False
                eps = [policy.Endpoint(p.name, p.namespace, p.labels, p.ip, p.ports()) for p in pods] + self.outside
                for p, ep in zip(pods, eps[: len(pods)]):
                    try:
                        policy.apply(
                            p.netns, policy.ruleset(ep, self.policies, eps, self.namespaces, self.network.node_ip)
                        )
                    except subprocess.CalledProcessError:
                        if p.netns in self.network.namespaces:
                            raise  # else: the pod went away meanwhile

    @staticmethod
    def _check_ports(svc: dict) -> None:
        # No kube-proxy here: a Service reaches its pods on the port it names.
        for port in svc["spec"].get("ports") or []:
            target = port.get("targetPort", port["port"])
            if isinstance(target, int) and target != port["port"]:
                raise RuntimeError(
                    f"Service {svc['metadata']['name']}: port {port['port']} -> {target} needs kube-proxy"
                )

    # -- controllers ----------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._changed.wait(0.5)
            self._changed.clear()
            try:
                for w in list(self.workloads):
                    self.reconcile(w)
                self.sync_network()
            except Exception as exc:  # noqa: BLE001 - a controller keeps running, as Kubernetes' do
                print(f"controllers: {exc!r}", file=sys.stderr)

    def pods_of(self, w: Workload) -> list[Pod]:
        with self.lock:
            return [p for p in self.pods if p.owner == w.name and p.namespace == w.namespace and not p.terminating]

    def _new_pod(self, w: Workload, name: str) -> Pod:
        template = json.loads(json.dumps(w.obj["spec"]["template"]))
        labels = dict(template["metadata"].get("labels") or {})
        spec = template["spec"]
        if w.kind == "StatefulSet":
            labels["statefulset.kubernetes.io/pod-name"] = name
            spec.setdefault("hostname", name)
            spec.setdefault("subdomain", w.obj["spec"].get("serviceName"))
        else:
            labels["pod-template-hash"] = w.revision
        pod = Pod(self, w.namespace, name, spec, labels, w.name)
        pod.revision = w.revision  # type: ignore[attr-defined]
        return pod

    def _start(self, pod: Pod) -> None:
        try:
            pod.start()
        except Exception as exc:  # noqa: BLE001 - kubelet reports a pod that cannot start; its owner makes another
            print(f"controllers: pod {pod.name} failed to start: {exc!r}", file=sys.stderr)
            pod.delete(0)

    def reconcile(self, w: Workload) -> None:
        pods = self.pods_of(w)
        if w.kind == "StatefulSet":
            self._reconcile_statefulset(w, pods)
        else:
            self._reconcile_deployment(w, pods)

    def _reconcile_deployment(self, w: Workload, pods: list[Pod]) -> None:
        new = [p for p in pods if p.revision == w.revision]  # type: ignore[attr-defined]
        old = [p for p in pods if p not in new]
        strategy = w.obj["spec"].get("strategy") or {}
        if strategy.get("type") == "Recreate":
            for p in old:
                threading.Thread(target=p.delete, daemon=True).start()
            with self.lock:
                going = [p for p in self.pods if p.owner == w.name and p.terminating]
            if old or going:
                return  # Recreate: the new pods only once every old one is gone
        rolling = strategy.get("rollingUpdate") or {}
        surge = _percent(rolling.get("maxSurge", "25%"), w.desired, True)
        unavailable = _percent(rolling.get("maxUnavailable", "25%"), w.desired, False)
        if not old:
            w.rolling = False
        if len(new) < w.desired and len(pods) < w.desired + surge:
            self._start(self._new_pod(w, f"{w.name}-{w.revision[:5]}-{random.token_hex(3)[:5]}"))
            return
        available = sum(p.ready for p in pods)
        for p in sorted(old, key=lambda p: p.ready):
            if available - p.ready >= w.desired - unavailable:
                available -= p.ready
                threading.Thread(target=p.delete, daemon=True).start()
        for p in new[w.desired :]:
            threading.Thread(target=p.delete, daemon=True).start()

    def _reconcile_statefulset(self, w: Workload, pods: list[Pod]) -> None:
        by_name = {p.name: p for p in pods}
        with self.lock:
            going = {p.name for p in self.pods if p.owner == w.name and p.terminating}
        parallel = w.obj["spec"].get("podManagementPolicy") == "Parallel"
        first = int((w.obj["spec"].get("ordinals") or {}).get("start", 0))
        for i in range(first, first + w.desired):
            name = f"{w.name}-{i}"
            if name in going:
                return  # the same identity comes back only once the old pod is gone
            pod = by_name.get(name)
            if pod is None:
                self._start(self._new_pod(w, name))
                if not parallel:
                    return
            elif not pod.ready and not parallel:
                return
        for name, pod in by_name.items():
            if int(name.rsplit("-", 1)[1]) >= first + w.desired:
                threading.Thread(target=pod.delete, daemon=True).start()
        # RollingUpdate: highest ordinal first, one at a time, each once the rest are ready.
        stale = sorted((p for p in pods if p.revision != w.revision), key=lambda p: -int(p.name.rsplit("-", 1)[1]))  # type: ignore[attr-defined]
        if stale and all(p.ready for p in pods):
            stale[0].delete()
        elif not stale:
            w.rolling = False

    # -- operations the tests use ---------------------------------------------

    def workload(self, name: str) -> Workload:
        return next(w for w in self.workloads if w.name == name)

    def scale(self, name: str, count: int) -> None:
        self.workload(name).desired = count
        self._changed.set()

    def settled(self, w: Workload) -> bool:
        pods = self.pods_of(w)
        return (
            not w.rolling and len(pods) == w.desired and all(p.ready for p in pods)
            and all(p.revision == w.revision for p in pods)  # type: ignore[attr-defined]
        )  # fmt: skip

    def wait_settled(self, timeout: float, names: list[str] | None = None) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if all(self.settled(w) for w in self.workloads if names is None or w.name in names):
                return time.monotonic() - started
            time.sleep(0.5)
        raise TimeoutError(self.describe())

    def describe(self) -> str:
        lines = []
        with self.lock:
            for p in self.pods:
                states = ", ".join(
                    f"{c.name} started={c.started} ready={c.ready} restarts={c.restarts}" for c in p.containers
                )
                lines.append(f"{p.name} {p.ip} terminating={p.terminating}: {states} {p.events[-3:]}")
        return "\n".join(lines)

    def close(self) -> None:
        self._stop.set()
        with self.lock:
            pods = list(self.pods)
            self.workloads.clear()
        threads = [threading.Thread(target=p.delete, args=(2,)) for p in pods]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.prober.close()
        self.network.close()
        # Each pod's logs stay under state/pods/<pod>/logs for a failed test to show.
