"""Kubernetes deployment (deploy/k8s, deploy/docker): render, validate, police.

Every overlay, and the components combined with them, is rendered with
`kubectl kustomize` and every object is validated offline against a pinned
Kubernetes version with `kubernetes-validate --strict` (a warning, such as an
unknown apiVersion, counts as a failure). Policy tests then check what the
schema cannot: security settings, probes, resources, GPU placement, headless
Services for the gateway's round_robin, and that image names, ports and
settings agree with the code's defaults and with `make images`.

kubectl and kubernetes-validate come with the `dev` extra (pyproject.toml).
A missing tool fails the tests with the command that installs it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import yaml

from smily.common.config import FIELDS, Settings, variable

from .conftest import need

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
# The oldest Kubernetes release the manifests support (native gRPC probes,
# preStop sleep, PDB unhealthyPodEvictionPolicy are all GA or on by then).
KUBERNETES_VERSION = "1.31.0"

SERVICES = ("tiler", "embedder", "index", "gateway")
GRPC_NAMES = {
    "tiler": "smily.tiler.v1.TilerService",
    "embedder": "smily.embedder.v1.EmbedderService",
    "index": "smily.index.v1.IndexService",
    "gateway": "smily.gateway.v1.GatewayService",
}
GPU_SERVICES = ("embedder", "index")
DEFAULTS = Settings()

# name -> (overlay, extra components). Each is rendered once per session.
RENDERS = {
    "cpu": ("overlays/cpu", []),
    "gpu": ("overlays/gpu", []),
    "cpu+external-redis": ("overlays/cpu", ["components/external-redis"]),
    "gpu+external-redis": ("overlays/gpu", ["components/external-redis"]),
}


def _kubectl() -> str:
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    if not found:
        need("kubectl", "install the dev extra: pip install -e '.[dev]'")
    return found


@pytest.fixture(scope="session")
def kubectl() -> str:
    return _kubectl()


@pytest.fixture(scope="session")
def rendered(kubectl, tmp_path_factory) -> dict[str, tuple[str, list[dict]]]:
    """name -> (YAML text, objects) of every overlay and combination, rendered from a copy of
    deploy/k8s: the Secret files `make k8s-secrets` writes go there, never into the source tree."""
    from smily import k8s_secrets

    k8s = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, k8s, ignore=shutil.ignore_patterns("redis.env"))
    k8s_secrets.write(str(k8s / "base" / "secrets" / "redis.env"))  # what `make k8s-secrets` does once
    out = {}
    for name, (overlay, components) in RENDERS.items():
        target = k8s / overlay
        if components:
            # A throw-away overlay on top of the real one, as a user would write.
            target = tmp_path_factory.mktemp(name.replace("+", "_"))

            def rel(p, target=target):
                return os.path.relpath(k8s / p, target)

            (target / "kustomization.yaml").write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "kustomize.config.k8s.io/v1beta1",
                        "kind": "Kustomization",
                        "namespace": "smily",
                        "resources": [rel(overlay)],
                        "components": [rel(c) for c in components],
                    }
                )
            )
        proc = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kubectl kustomize {name} failed:\n{proc.stderr}"
        objs = [o for o in yaml.safe_load_all(proc.stdout) if o]
        assert objs, f"{name} rendered nothing"
        out[name] = (proc.stdout, objs)
    return out


@pytest.fixture(params=list(RENDERS))
def render(request, rendered):
    return request.param, rendered[request.param][1]


# -- helpers ---------------------------------------------------------------------


def find(objs, kind, name=None):
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return hits


def one(objs, kind, name):
    hits = find(objs, kind, name)
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def workloads(objs):
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")]


def pod_spec(w):
    return w["spec"]["template"]["spec"]


def containers(w):
    spec = pod_spec(w)
    return spec.get("initContainers", []) + spec["containers"]


def smily_name(service) -> str:
    """The workload (and Service) of a service; for the index, its shard 0 (index_shards: all of them)."""
    return "smily-index-0" if service == "index" else f"smily-{service}"


def smily_workload(objs, service):
    kind = "StatefulSet" if service == "index" else "Deployment"
    return one(objs, kind, smily_name(service))


def index_shards(objs) -> list[dict]:
    """The index's StatefulSets, one per shard, in shard order."""
    shards = sorted(find(objs, "StatefulSet"), key=lambda o: o["metadata"]["name"])
    assert [o["metadata"]["name"] for o in shards] == [f"smily-index-{n}" for n in range(len(shards))]
    return shards


def index_targets(objs) -> list[str]:
    return config(objs)["SMILY_INDEX_TARGETS"].split(",")


def container_of(objs, service):
    (c,) = [c for c in pod_spec(smily_workload(objs, service))["containers"] if c["name"] == service]
    return c


def config(objs) -> dict[str, str]:
    (cm,) = [o for o in find(objs, "ConfigMap") if o["metadata"]["name"].startswith("smily-config")]
    return cm["data"]


def namespace(objs) -> str:
    (ns,) = find(objs, "Namespace")
    return ns["metadata"]["name"]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# -- rendering and schema validation ------------------------------------------

# Custom resources kubernetes-validate has no offline schema for: left out of
# the strict validation and checked by hand in test_offline_custom_resources.
OFFLINE_CRDS = {
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("postgresql.cnpg.io/v1", "Cluster"),
}


def _crd(o) -> bool:
    return (o["apiVersion"], o["kind"]) in OFFLINE_CRDS


@pytest.mark.parametrize("name", list(RENDERS))
def test_renders_and_validates_strictly(name, rendered, tmp_path):
    if importlib.util.find_spec("kubernetes_validate") is None:
        need("kubernetes-validate", "install the dev extra: pip install -e '.[dev]'")
    _, objs = rendered[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all([o for o in objs if not _crd(o)]))
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    # --quiet prints only WARN/ERROR/FATAL lines: any line at all is a failure
    # (a WARN means no schema was found, e.g. an unknown apiVersion).
    assert proc.returncode == 0 and not problems, "\n".join(problems) or f"exit {proc.returncode}"
    assert len(objs) >= 15


def test_every_object_is_namespaced_in_smily_namespace(render):
    _, objs = render
    ns = namespace(objs)
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == ns, f"{o['kind']}/{o['metadata']['name']}"


# -- pod security, resources, probes ------------------------------------------

ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def test_namespace_enforces_restricted_pod_security(render):
    _, objs = render
    (ns,) = find(objs, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_container_is_locked_down(render):
    _, objs = render
    for w in workloads(objs):
        spec = pod_spec(w)
        where = f"{w['kind']}/{w['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{where}: {key}"
        for v in spec.get("volumes", []):
            kinds = set(v) - {"name"}
            assert kinds <= ALLOWED_VOLUMES, f"{where}: volume {v['name']} is {kinds}"
        for c in containers(w):
            at = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, at
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, at
            assert sc.get("allowPrivilegeEscalation") is False, at
            assert not sc.get("privileged"), at
            assert sc.get("readOnlyRootFilesystem") is True, at
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], at
            assert not sc.get("capabilities", {}).get("add"), at
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", at
            for port in c.get("ports", []):
                assert "hostPort" not in port, at


def test_every_container_has_requests_and_limits(render):
    _, objs = render
    for w in workloads(objs):
        for c in containers(w):
            at = f"{w['metadata']['name']}/{c['name']}"
            res = c.get("resources", {})
            for bound in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    assert r in res.get(bound, {}), f"{at}: no {bound}.{r}"


def test_every_container_has_probes_and_liveness_is_local(render):
    _, objs = render
    for w in workloads(objs):
        for c in w["spec"]["template"]["spec"]["containers"]:
            at = f"{w['metadata']['name']}/{c['name']}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{at}: no {probe}"
            live = c["livenessProbe"]
            # Liveness looks at this container only: never exec (a script could
            # call Redis or a backend), never an HTTP check of another host.
            assert "exec" not in live, at
            assert "host" not in live.get("httpGet", {}) and "host" not in live.get("tcpSocket", {}), at


def test_grpc_services_use_native_grpc_probes(render):
    _, objs = render
    # kubelet's gRPC probes cannot speak TLS: they ask the plaintext health-only port.
    port = int(config(objs)["SMILY_HEALTH_PORT"])
    assert port not in (DEFAULTS.server.metrics_port, *(DEFAULTS.port_of(s) for s in SERVICES))
    for s in SERVICES:
        c = container_of(objs, s)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port, f"{s} {probe}"
        # Readiness names this service; liveness asks the server as a whole
        # (its health never depends on Redis or another service).
        assert c["readinessProbe"]["grpc"]["service"] == GRPC_NAMES[s]
        assert c["livenessProbe"]["grpc"].get("service", "") == ""


def startup_budget_s(probe) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3) + probe.get("initialDelaySeconds", 0)


def test_startup_probes_allow_model_and_index_loading(render):
    _, objs = render
    assert startup_budget_s(container_of(objs, "embedder")["startupProbe"]) >= 300
    assert startup_budget_s(container_of(objs, "index")["startupProbe"]) >= 900


def test_scratch_is_an_emptydir_and_slides_are_read_only(render):
    _, objs = render
    for w in workloads(objs):
        vols = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
        for c in containers(w):
            for m in c.get("volumeMounts", []):
                if m["mountPath"] == "/tmp":
                    assert "emptyDir" in vols[m["name"]]
    for s in SERVICES:
        mounts = {m["mountPath"]: m for m in container_of(objs, s).get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{s} has no scratch emptyDir at /tmp"
    tiler = smily_workload(objs, "tiler")
    vols = {v["name"]: v for v in pod_spec(tiler)["volumes"]}
    mounts = {m["mountPath"]: m for m in container_of(objs, "tiler")["volumeMounts"]}
    slides = mounts[config(objs)["SMILY_SLIDE_ROOTS"]]
    assert slides["readOnly"] is True
    assert vols[slides["name"]]["persistentVolumeClaim"]["readOnly"] is True
    # Nobody else sees the slide archive.
    for s in ("embedder", "index", "gateway"):
        for v in pod_spec(smily_workload(objs, s)).get("volumes", []):
            assert v.get("persistentVolumeClaim", {}).get("claimName") != "smily-slides", s


# -- GPU placement ----------------------------------------------------------------


def _gpu(c) -> bool:
    res = c.get("resources", {})
    return "nvidia.com/gpu" in res.get("limits", {}) or "nvidia.com/gpu" in res.get("requests", {})


def test_gpu_workloads_only_in_gpu_overlay(render):
    name, objs = render
    for w in workloads(objs):
        spec = pod_spec(w)
        service = w["metadata"]["name"].removeprefix("smily-").split("-")[0]
        wants_gpu = name.startswith("gpu") and service in GPU_SERVICES
        for c in containers(w):
            assert _gpu(c) == wants_gpu, f"{name}: {w['metadata']['name']}/{c['name']}"
            assert c["image"].endswith("-gpu") == wants_gpu, c["image"]
        if wants_gpu:
            assert spec["nodeSelector"], w["metadata"]["name"]
            assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
            for c in spec["containers"]:
                assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
        else:
            assert not spec.get("tolerations"), w["metadata"]["name"]
            assert not spec.get("nodeSelector"), w["metadata"]["name"]


# -- Services, targets, ports, images, settings -------------------------------

TARGET = re.compile(r"^dns:///(?P<svc>[a-z0-9-]+)\.(?P<ns>[a-z0-9-]+)\.svc\.cluster\.local:(?P<port>\d+)$")


def test_every_backend_the_gateway_dials_is_headless(render):
    _, objs = render
    cfg = config(objs)
    dialled = [(s, cfg[f"SMILY_{s.upper()}_TARGET"], smily_workload(objs, s)) for s in ("tiler", "embedder")]
    # The index: one dns:/// target per shard, in shard order, each resolving to all the shard's replicas.
    shards = index_shards(objs)
    assert len(index_targets(objs)) == len(shards) >= 2
    dialled += [("index", t, w) for t, w in zip(index_targets(objs), shards)]
    for s, target, workload in dialled:
        m = TARGET.match(target)
        assert m, target
        assert m["ns"] == namespace(objs)
        assert int(m["port"]) == DEFAULTS.port_of(s)
        svc = one(objs, "Service", m["svc"])
        assert svc["spec"].get("clusterIP") == "None", f"{m['svc']} must be headless for round_robin"
        assert int(m["port"]) in [p["port"] for p in svc["spec"]["ports"]]
        assert svc["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]
        assert selects(svc["spec"]["selector"], workload["spec"]["template"]["metadata"]["labels"])
    assert "SMILY_INDEX_TARGET" not in cfg
    gw = one(objs, "Service", "smily-gateway")
    assert gw["spec"].get("clusterIP") != "None"
    assert gw["spec"]["ports"][0]["port"] == DEFAULTS.gateway.gateway_port


def test_ports_args_and_images_agree_with_code_and_make_images(render):
    name, objs = render
    listed = subprocess.run(
        [sys.executable, "tools/images.py", "--list"],
        cwd=ROOT,
        env={**os.environ, "VARIANTS": "cpu gpu"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    built = set(listed.split())
    version = project_version()
    for s in SERVICES:
        c = container_of(objs, s)
        assert c["command"] == ["python", "-m", f"smily.{s}"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {
            "grpc": DEFAULTS.port_of(s),
            "metrics": DEFAULTS.server.metrics_port,
            "health": int(config(objs)["SMILY_HEALTH_PORT"]),
        }
        svc = one(objs, "Service", smily_name(s))
        by_name = {p["name"]: p for p in svc["spec"]["ports"]}
        assert by_name["grpc"]["port"] == ports["grpc"] and by_name["grpc"]["targetPort"] == "grpc"
        variant = ("-gpu" if name.startswith("gpu") else "-cpu") if s in GPU_SERVICES else ""
        assert c["image"] == f"localhost/smily/{s}:{version}{variant}"
        assert c["image"] in built, f"{c['image']} is not built by `make images`"
    cfg = config(objs)
    assert int(cfg["SMILY_METRICS_PORT"]) == DEFAULTS.server.metrics_port
    assert cfg["SMILY_BIND_HOST"] == "0.0.0.0"


def test_config_names_only_real_settings(render):
    _, objs = render
    fields = {variable(name) for name in FIELDS}
    names = set(config(objs))
    for w in workloads(objs):
        for c in containers(w):
            names |= {e["name"] for e in c.get("env", []) if e["name"].startswith("SMILY_")}
    assert names <= fields, f"unknown settings: {sorted(names - fields)}"
    Settings.from_env(config(objs))  # every value parses
    assert Settings.from_env(config(objs)).embedder.model == DEFAULTS.embedder.model


def test_paths_in_config_are_mounted(render):
    _, objs = render
    cfg = config(objs)
    mounts = {m["mountPath"] for m in container_of(objs, "index")["volumeMounts"]}
    assert cfg["SMILY_INDEX_DIR"] in mounts
    # The model is baked into the embedder image at this path (deploy/docker/embedder.Dockerfile).
    assert f"SMILY_MODEL_REPOSITORY={cfg['SMILY_MODEL_REPOSITORY']}" in (DOCKER / "embedder.Dockerfile").read_text()


# -- index, Redis, autoscaling, disruption budgets -----------------------------


def test_index_shards_of_replicas_on_postgres(render):
    """One StatefulSet per shard, >= 2 interchangeable replicas (its HPA), a PDB of its own,
    replicas on different nodes (production), PostgreSQL's URL from a Secret."""
    name, objs = render
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in find(objs, "HorizontalPodAutoscaler")}
    pdbs = find(objs, "PodDisruptionBudget")
    for n, sts in enumerate(index_shards(objs)):
        at = sts["metadata"]["name"]
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert labels["smily.io/shard"] == str(n) and sts["spec"]["selector"]["matchLabels"]["smily.io/shard"] == str(n)
        svc = one(objs, "Service", sts["spec"]["serviceName"])
        assert svc["spec"]["clusterIP"] == "None" and svc["metadata"]["name"] == at
        assert sts["spec"]["volumeClaimTemplates"], "each replica keeps its local copy on its own PVC"
        assert "replicas" not in sts["spec"], "the shard's HPA sets its replicas"
        assert hpas[at]["spec"]["minReplicas"] >= 2 and hpas[at]["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
        (pdb,) = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], labels)]
        assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
        assert pdb["spec"]["maxUnavailable"] == 1
        (c,) = [c for c in pod_spec(sts)["containers"] if c["name"] == "index"]
        env = {e["name"]: e for e in c["env"]}
        assert env["SMILY_INDEX_SHARD"]["value"] == str(n)
        assert env["SMILY_INDEX_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] in (
            "smily-index-database",
            "smily-pg-app",
        )
        affinity = pod_spec(sts).get("affinity")
        if name.startswith("cpu"):  # one node: replicas share it
            assert affinity is None
        else:
            (term,) = affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert term["topologyKey"] == "kubernetes.io/hostname"
            assert term["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]


def test_redis_is_a_bounded_lru_cache_without_persistence(render):
    name, objs = render
    external = "external-redis" in name
    gateway = container_of(objs, "gateway")
    env = {e["name"]: e for e in gateway.get("env", [])}
    if external:
        assert not find(objs, "Deployment", "smily-redis") and not find(objs, "Service", "smily-redis")
        assert env["SMILY_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "smily-redis-external"
        return
    assert "SMILY_REDIS_URL" not in env
    assert config(objs)["SMILY_REDIS_URL"] == f"rediss://smily-redis.{namespace(objs)}.svc.cluster.local:6379/0"
    one(objs, "Service", "smily-redis")
    (redis,) = pod_spec(one(objs, "Deployment", "smily-redis"))["containers"]
    args = redis["args"]
    flags = {args[i]: args[i + 1] for i in range(0, len(args), 2)}
    # A password from the generated Secret, shared with the gateway only; protected-mode on.
    assert flags["--protected-mode"] == "yes" and flags["--requirepass"] == "$(REDIS_PASSWORD)"
    (secret,) = [o for o in find(objs, "Secret") if o["metadata"]["name"].startswith("smily-redis")]
    redis_env = {e["name"]: e for e in redis["env"]}
    for ref, key in (
        (redis_env["REDIS_PASSWORD"], "password"),
        (env["SMILY_REDIS_PASSWORD"], "password"),
        (env["SMILY_CACHE_KEY"], "cache-key"),
    ):
        assert ref["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": key}
        assert len(secret["data"][key]) >= 40
    assert flags["--maxmemory-policy"] == "allkeys-lru"
    assert flags["--maxmemory"] and flags["--save"] == "" and flags["--appendonly"] == "no"
    assert not any("persistentVolumeClaim" in v for v in pod_spec(one(objs, "Deployment", "smily-redis"))["volumes"])


def test_redis_serves_tls_only_with_a_certificate_the_gateway_verifies(render):
    name, objs = render
    if "external-redis" in name:  # the hospital's Redis: rediss:// in its Secret (components/external-redis)
        assert not [c for c in find(objs, "Certificate") if c["spec"]["secretName"] == "smily-redis-tls"]
        return
    cfg = config(objs)
    url = urllib.parse.urlsplit(cfg["SMILY_REDIS_URL"])
    assert url.scheme == "rediss"
    spec = pod_spec(one(objs, "Deployment", "smily-redis"))
    (redis,) = spec["containers"]
    args = redis["args"]
    flags = {args[i]: args[i + 1] for i in range(0, len(args), 2)}
    # No plaintext port; TLS on the port the Service and the NetworkPolicy name.
    assert flags["--port"] == "0" and int(flags["--tls-port"]) == url.port == 6379
    (port,) = one(objs, "Service", "smily-redis")["spec"]["ports"]
    assert port["port"] == url.port and port["targetPort"] == "redis"
    assert {p["name"]: p["containerPort"] for p in redis["ports"]} == {"redis": url.port}
    # The certificate files come from the Secret cert-manager writes, signed by the suite's CA,
    # which the gateway verifies Redis with (SMILY_TLS_CA_FILE), naming the host the gateway dials.
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in redis["volumeMounts"]}
    mount = os.path.dirname(flags["--tls-cert-file"])
    assert {flags["--tls-key-file"], flags["--tls-ca-cert-file"]} == {f"{mount}/tls.key", f"{mount}/ca.crt"}
    assert mounts[mount]["readOnly"] is True
    secret = vols[mounts[mount]["name"]]["secret"]["secretName"]
    (cert,) = [c["spec"] for c in find(objs, "Certificate") if c["spec"]["secretName"] == secret]
    assert url.hostname in cert["dnsNames"] and "server auth" in cert["usages"]
    assert cert["issuerRef"] == one(objs, "Certificate", "smily-gateway")["spec"]["issuerRef"]
    assert cfg["SMILY_TLS_CA_FILE"] == f"{mount}/ca.crt"
    # Redis does not re-read its files: a sidecar has it load them (CONFIG SET) when they change,
    # over TLS to a name on the certificate, with the password from the Secret.
    (reload,) = spec["initContainers"]
    assert reload["restartPolicy"] == "Always" and reload["image"] == redis["image"]
    script = " ".join(reload["args"])
    for flag in ("--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file"):
        assert f"{flag.removeprefix('--')} {flags[flag].replace(mount, '$dir')}" in script, flag
    assert f"dir={mount}" in script and "CONFIG SET" in script and "--tls" in script
    host = re.search(r"-h (\S+)", script)
    assert host and host[1] in cert["dnsNames"] and f"-p {url.port}" in script
    assert {m["mountPath"]: m["name"] for m in reload["volumeMounts"]} == {mount: mounts[mount]["name"]}
    env = {e["name"]: e for e in reload["env"]}
    redis_env = {e["name"]: e for e in redis["env"]}
    assert env["REDISCLI_AUTH"]["valueFrom"] == redis_env["REDIS_PASSWORD"]["valueFrom"]


def test_autoscaling(render):
    name, objs = render
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in find(objs, "HorizontalPodAutoscaler")}
    for s in ("gateway", "tiler"):
        (metric,) = hpas[f"smily-{s}"]["spec"]["metrics"]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert {t for t in hpas if t.startswith("smily-index")} == {s["metadata"]["name"] for s in index_shards(objs)}
    if name.startswith("gpu"):
        (metric,) = hpas["smily-embedder"]["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "smily_grpc_in_flight"
    for target, hpa in hpas.items():
        ref = hpa["spec"]["scaleTargetRef"]
        w = one(objs, ref["kind"], target)
        # A replica count in the manifest would fight the HPA on every apply.
        assert "replicas" not in w["spec"], target
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_disruption_budgets_cover_every_service(render):
    _, objs = render
    pdbs = find(objs, "PodDisruptionBudget")
    for s in SERVICES:
        labels = smily_workload(objs, s)["spec"]["template"]["metadata"]["labels"]
        assert any(selects(p["spec"]["selector"]["matchLabels"], labels) for p in pdbs), s


# -- network policies ---------------------------------------------------------------


def _peers_allowed(policies, labels, direction):
    """The rules of every policy selecting pods with these labels, in one direction."""
    rules = []
    for p in policies:
        if selects(p["spec"]["podSelector"].get("matchLabels", {}), labels) and direction in p["spec"]["policyTypes"]:
            rules += p["spec"].get(direction.lower(), [])
    return rules


def test_network_policies(render):
    name, objs = render
    policies = find(objs, "NetworkPolicy")
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}

    def labels(s):
        return smily_workload(objs, s)["spec"]["template"]["metadata"]["labels"]

    gateway_sel = {"app.kubernetes.io/name": "smily-gateway"}
    for s in ("tiler", "embedder", "index"):
        grpc_rules = [
            r
            for r in _peers_allowed(policies, labels(s), "Ingress")
            if any(p["port"] == DEFAULTS.port_of(s) for p in r.get("ports", []))
        ]
        assert grpc_rules, f"gateway cannot reach {s}"
        allowed = [{"podSelector": {"matchLabels": gateway_sel}}]
        if s == "index":  # its own replicas and tooling too
            allowed += [
                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": n}}}
                for n in ("smily-index", "smily-tooling")
            ]
        if s == "tiler":  # the embedder reads a slide's tiles itself (EmbedSlide)
            allowed += [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "smily-embedder"}}}]
        for r in grpc_rules:
            assert r["from"] == allowed, f"{s} open to more than {allowed}"
        # Backends dial nobody but DNS; index replicas PostgreSQL too; the embedder the tiler.
        egress = [{p["port"] for p in r["ports"]} for r in _peers_allowed(policies, labels(s), "Egress")]
        assert all(
            ports == {53}
            or (s == "index" and ports == {5432})
            or (s == "embedder" and ports == {DEFAULTS.tiler.tiler_port})
            for ports in egress
        ), s
        assert (s == "index") == ({5432} in egress), s
        assert (s == "embedder") == ({DEFAULTS.tiler.tiler_port} in egress), s
    gw_egress = _peers_allowed(policies, labels("gateway"), "Egress")
    gw_ports = {p["port"] for r in gw_egress for p in r.get("ports", [])}
    assert {DEFAULTS.tiler.tiler_port, DEFAULTS.embedder.embedder_port, DEFAULTS.index.index_port, 6379} <= gw_ports
    gw_ingress = _peers_allowed(policies, labels("gateway"), "Ingress")
    (client_rule,) = [r for r in gw_ingress if any(p["port"] == DEFAULTS.gateway.gateway_port for p in r["ports"])]
    # Only labelled client namespaces and pods (docs/security.md), not the whole cluster.
    client = {"smily.io/gateway-client": "true"}
    assert client_rule["from"] == [
        {"namespaceSelector": {"matchLabels": client}},
        {"podSelector": {"matchLabels": client}},
    ]
    if "external-redis" in name:
        assert not find(objs, "NetworkPolicy", "smily-redis")
        assert any("ipBlock" in peer for r in gw_egress for peer in r.get("to", []))
    else:
        redis_labels = (
            pod_spec(one(objs, "Deployment", "smily-redis"))
            and one(objs, "Deployment", "smily-redis")["spec"]["template"]["metadata"]["labels"]
        )
        for r in _peers_allowed(policies, redis_labels, "Ingress"):
            if any(p["port"] == 6379 for p in r["ports"]):
                assert r["from"] == [{"podSelector": {"matchLabels": gateway_sel}}]


# -- images: Dockerfiles and pinned requirements (no container runtime needed) ---


def _requirements(name: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (DOCKER / "requirements" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            pins.update(_requirements(line[3:].strip()))
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[a-z0-9,]+\])?==([A-Za-z0-9_.+-]+)", line)
        assert m, f"{name}: {line!r} is not pinned with =="
        pins[m[1].lower()] = m[3]
    return pins


@pytest.mark.parametrize(
    "req",
    [
        "tiler.txt",
        "embedder-cpu.txt",
        "embedder-gpu.txt",
        "index-cpu.txt",
        "index-gpu.txt",
        "gateway.txt",
        "build.txt",
        "export.txt",
    ],
)
def test_requirements_are_pinned_and_agree_with_pyproject(req):
    pins = _requirements(req)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"] + project["optional-dependencies"]["export"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", dep.replace(" ", ""))
        if m and m[1].lower() in pins:
            assert pins[m[1].lower()] == m[2], f"{req}: {m[1]}"


def test_serving_images_carry_only_their_own_heavy_deps():
    heavy = {"torch", "onnxruntime", "onnxruntime-gpu", "faiss-cpu", "faiss-gpu", "openslide-bin", "redis"}
    own = {
        "tiler.txt": {"openslide-bin"},
        "gateway.txt": {"redis"},
        "embedder-cpu.txt": {"onnxruntime"},
        "embedder-gpu.txt": {"onnxruntime-gpu"},
        "index-cpu.txt": {"faiss-cpu"},
        "index-gpu.txt": {"faiss-gpu"},
    }
    for req, expected in own.items():
        assert set(_requirements(req)) & heavy == expected, req


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfiles(service):
    raw = (DOCKER / f"{service}.Dockerfile").read_text()
    text = "\n".join(line for line in raw.splitlines() if not line.lstrip().startswith("#"))
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    names = [s.split("\n", 1)[0].split(" AS ")[-1].strip() for s in stages]
    finals = ["cpu", "gpu"] if service in GPU_SERVICES else ["runtime"]
    assert set(finals) <= set(names)
    assert len(stages) >= 2, "multi-stage"
    final_text = {n: s for n, s in zip(names, stages)}
    for f in finals:
        body = final_text[f]
        user = re.findall(r"^USER (\S+)", body, flags=re.M) or re.findall(
            r"^USER (\S+)", final_text["runtime"], flags=re.M
        )
        assert user and user[-1].split(":")[0] not in ("0", "root") and user[-1].split(":")[0].isdigit(), f
        # Serving stages install nothing themselves; torch only in the model stage.
        assert "pip install" not in body and "torch" not in body, f
    assert f'ENTRYPOINT ["python", "-m", "smily.{service}"]' in text
    assert f"EXPOSE {DEFAULTS.port_of(service)} {DEFAULTS.server.metrics_port}" in text
    for req in re.findall(r"/req/([a-z-]+\.txt)", text):
        assert (DOCKER / "requirements" / req).exists(), req
    if service == "embedder":
        assert "smily model export" in text and "COPY --from=model /models" in text
    else:
        assert "torch" not in text


# -- TLS: certificates as files, cert-manager custom resources checked by hand ------


def test_offline_custom_resources(render):
    """What kubernetes-validate cannot check offline: cert-manager's Issuers and Certificates,
    CloudNativePG's Cluster."""
    name, objs = render
    crds = [o for o in objs if _crd(o)]
    cnpg = ("postgresql.cnpg.io/v1", "Cluster")
    expected = OFFLINE_CRDS if name.startswith("cpu") else OFFLINE_CRDS - {cnpg}  # gpu: external PostgreSQL
    assert {(o["apiVersion"], o["kind"]) for o in crds} == expected
    for pg in find(objs, "Cluster"):
        spec = pg["spec"]
        known = {
            "instances",
            "imageName",
            "primaryUpdateStrategy",
            "bootstrap",
            "postgresql",
            "affinity",
            "resources",
            "storage",
            "walStorage",
            "monitoring",
        }
        assert set(spec) <= known, f"unknown fields {set(spec) - known}"
        assert (
            spec["instances"] >= 1
            and spec["storage"]["size"]
            and spec["imageName"].startswith("ghcr.io/cloudnative-pg/postgresql:")
        )
        assert set(spec["bootstrap"]["initdb"]) == {"database", "owner"}
        assert spec["affinity"]["podAntiAffinityType"] in ("required", "preferred")
        for sts in index_shards(objs):  # the operator's Secret for the application role, key uri
            (c,) = pod_spec(sts)["containers"]
            env = {e["name"]: e for e in c["env"]}
            assert env["SMILY_INDEX_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
                "name": f"{pg['metadata']['name']}-app",
                "key": "uri",
            }
    issuers = {o["metadata"]["name"]: o for o in find(objs, "Issuer")}
    for o in issuers.values():
        assert set(o["spec"]) <= {"selfSigned", "ca"} and len(o["spec"]) == 1
        if "ca" in o["spec"]:
            assert set(o["spec"]["ca"]) == {"secretName"}
    certs = {o["metadata"]["name"]: o for o in find(objs, "Certificate")}
    known = {
        "secretName",
        "commonName",
        "dnsNames",
        "duration",
        "renewBefore",
        "privateKey",
        "usages",
        "issuerRef",
        "isCA",
    }
    for name, c in certs.items():
        spec = c["spec"]
        assert set(spec) <= known, f"{name}: unknown fields {set(spec) - known}"
        assert spec["issuerRef"]["kind"] == "Issuer" and spec["issuerRef"]["name"] in issuers
        assert spec["privateKey"]["algorithm"] in ("ECDSA", "RSA", "Ed25519")
        if not spec.get("isCA"):
            assert set(spec["usages"]) == {"server auth", "client auth"}
            assert spec["privateKey"]["rotationPolicy"] == "Always"
    assert certs["smily-ca"]["spec"]["isCA"] is True
    assert issuers["smily-ca"]["spec"]["ca"]["secretName"] == certs["smily-ca"]["spec"]["secretName"]


def test_every_service_mounts_its_certificate_and_the_names_match(render):
    _, objs = render
    cfg = config(objs)
    certs = {o["spec"]["secretName"]: o["spec"] for o in find(objs, "Certificate")}
    mount = os.path.dirname(cfg["SMILY_TLS_CERT_FILE"])
    assert {cfg["SMILY_TLS_KEY_FILE"], cfg["SMILY_TLS_CA_FILE"]} == {f"{mount}/tls.key", f"{mount}/ca.crt"}
    assert cfg["SMILY_TLS_CLIENT_AUTH"] == "require"
    for s in SERVICES:
        vols = {v["name"]: v for v in pod_spec(smily_workload(objs, s))["volumes"]}
        (m,) = [m for m in container_of(objs, s)["volumeMounts"] if m["mountPath"] == mount]
        assert m["readOnly"] is True
        secret = vols[m["name"]]["secret"]["secretName"]
        assert secret == f"smily-{s}-tls" and secret in certs, s
        if s != "gateway":  # the host names the gateway dials must be on the backend's certificate
            for target in index_targets(objs) if s == "index" else [cfg[f"SMILY_{s.upper()}_TARGET"]]:
                host = TARGET.match(target)
                assert f"{host['svc']}.{host['ns']}.svc.cluster.local" in certs[secret]["dnsNames"], s
    # The identities the backends accept are the gateway's (and tooling's) certificate names.
    assert cfg["SMILY_TLS_BACKEND_CLIENTS"] in certs["smily-gateway-tls"]["dnsNames"]
    assert cfg["SMILY_TLS_INDEX_CLIENTS"] in certs["smily-tooling-tls"]["dnsNames"]


def test_oidc_and_audit_settings_are_in_the_config(render):
    _, objs = render
    cfg = config(objs)
    s = Settings.from_env(cfg)
    assert s.auth.auth == "oidc" and s.auth.oidc_issuer.startswith("https://") and s.auth.oidc_audience
    assert not s.tls.plaintext and s.server.reflection is False
    assert "SMILY_AUDIT_LOG" in cfg


# -- the HTTP API and viewer (issues 14 and 18) ----------------------------------


def test_http_deployment_calls_only_the_gateway(render):
    name, objs = render
    deploy = one(objs, "Deployment", "smily-http")
    (c,) = pod_spec(deploy)["containers"]
    assert c["command"] == ["python", "-m", "smily.http"]
    assert c["image"] == f"localhost/smily/gateway:{project_version()}"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": DEFAULTS.http.http_port}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/livez"
    m = TARGET.match(config(objs)["SMILY_HTTP_GATEWAY_TARGET"])
    assert m and m["svc"] == "smily-gateway" and int(m["port"]) == DEFAULTS.gateway.gateway_port
    assert m["ns"] == namespace(objs)
    # It dials the gateway over TLS with its own certificate, at the paths SMILY_TLS_* name.
    cfg = config(objs)
    mount = os.path.dirname(cfg["SMILY_TLS_CERT_FILE"])
    (tls_mount,) = [v for v in c["volumeMounts"] if v["mountPath"] == mount]
    vols = {v["name"]: v for v in pod_spec(deploy)["volumes"]}
    secret = vols[tls_mount["name"]]["secret"]["secretName"]
    assert secret in {o["spec"]["secretName"] for o in find(objs, "Certificate")}
    assert not Settings.from_env(cfg).tls.plaintext
    svc = one(objs, "Service", "smily-http")
    assert selects(svc["spec"]["selector"], deploy["spec"]["template"]["metadata"]["labels"])
    if name.startswith("gpu") or "netpol" in name:
        labels = deploy["spec"]["template"]["metadata"]["labels"]
        policies = find(objs, "NetworkPolicy")
        egress = [r for r in _peers_allowed(policies, labels, "Egress") if {p["port"] for p in r["ports"]} != {53}]
        assert egress == [
            {
                "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "smily-gateway"}}}],
                "ports": [{"protocol": "TCP", "port": DEFAULTS.gateway.gateway_port}],
            }
        ]
        assert any(
            p["port"] == DEFAULTS.http.http_port
            for r in _peers_allowed(policies, labels, "Ingress")
            for p in r["ports"]
        )
