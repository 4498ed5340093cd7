"""The box: a site overlay rendered and applied, the IdP and a LIS around it.

The site overlay is what an operator writes (docs/deploy.md): the repository's overlay
plus the issuer of the hospital's IdP, and the image digests `make images` wrote. The
IdP (npm's oidc-provider, run by node) and the LIS client each get a namespace of
their own; the LIS's carries the label the gateway's NetworkPolicy admits.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from . import operators
from .controllers import Cluster
from .manifests import named
from .policy import Endpoint
from .rootfs import DOCKER, Registry

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
IDP_PORT = 443
IDP_HOST = "idp.idp.svc.cluster.local"
# Plain HTTP on the HTTPS port in the box (a real IdP serves TLS there).
ISSUER = f"http://{IDP_HOST}:{IDP_PORT}"
# The public image the manifests name for Redis, and what stands for it here.
MIRRORS = {"docker.io/library/redis": operators.STORES_IMAGE}
ROLES = ["smily.ingest", "smily.search"]


def k8s_tree(directory: Path) -> Path:
    """deploy/k8s with its generated Secret values (`make k8s-secrets`, which a fresh clone
    lacks), in the box's own folder: the tests never write into the source tree."""
    from smily import k8s_secrets

    tree = directory / "k8s"
    shutil.copytree(REPO / "deploy" / "k8s", tree, ignore=shutil.ignore_patterns("*.env"))
    k8s_secrets.write(str(tree / "base" / "secrets"))
    return tree


def site_overlay(directory: Path, base: Path, overlay: str, extra_components: list[str] = ()) -> Path:
    """An operator's overlay of <base>/overlays/<overlay> (base: a copy of deploy/k8s), with the
    box's IdP as issuer."""
    directory.mkdir(parents=True, exist_ok=True)
    components = [os.path.relpath(base / "components" / c, directory) for c in extra_components]
    digests = base / "components" / "image-digests"
    if (digests / "kustomization.yaml").exists():
        components.append(os.path.relpath(digests, directory))
    lines = [
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        "resources:",
        f"  - {os.path.relpath(base / 'overlays' / overlay, directory)}",
    ]
    if components:
        lines += ["components:"] + [f"  - {c}" for c in components]
    lines += [
        "configMapGenerator:",
        "  - name: smily-config",
        "    namespace: smily",
        "    behavior: merge",
        "    literals:",
        f"      - SMILY_OIDC_ISSUER={ISSUER}",
        "      - SMILY_OIDC_AUDIENCE=smily",
    ]
    (directory / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return directory


def build_stores_image() -> None:
    if subprocess.run([DOCKER, "image", "inspect", operators.STORES_IMAGE], capture_output=True).returncode == 0:
        return
    subprocess.run(
        [DOCKER, "build", "--network", "host", "-t", operators.STORES_IMAGE,
         "-f", str(HERE / "images" / "stores.Dockerfile"), str(HERE / "images")],
        check=True, env=dict(os.environ, DOCKER_BUILDKIT="1"),
    )  # fmt: skip


class Agent:
    """A harness process in a namespace, spoken to in JSON lines."""

    def __init__(self, netns: str, argv: list[str], log: Path):
        self.log = open(log, "ab")  # noqa: SIM115 - the agent's stderr, for its lifetime
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )

    def call(self, op: str, **args) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the agent died: see {self.log.name}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


class Box:
    def __init__(self, state: Path, overlay: str = "cpu", slides: Path | None = None):
        self.state = state
        self.prefix = "sb" + secrets.token_hex(2)
        self.timings: dict[str, float] = {}
        self._procs: list[subprocess.Popen] = []
        self.agents: list[Agent] = []
        self.client_secret = secrets.token_urlsafe(32)
        started = time.monotonic()
        site = site_overlay(state / "site", k8s_tree(state), overlay)
        # The deploy guide's own steps apply it (docs/examples/deploy.sh, with the box's kubectl).
        self.deploy_script("namespace", "apply", overlay=site)
        self.objs = self._applied()
        objs = []
        for o in self.objs:
            objs += operators.cnpg(o) if o["kind"] == "Cluster" else [o]
        build_stores_image()
        self.registry = Registry(Path(os.environ.get("SMILY_BOX_CACHE", "/var/tmp/smily-box")) / "rootfs", MIRRORS)
        for o in objs:  # every image exported before the first pod starts
            if o["kind"] in ("Deployment", "StatefulSet"):
                for c in o["spec"]["template"]["spec"]["containers"]:
                    self.registry.resolve(c["image"])
        if slides:
            target = state / "volumes" / "smily" / "smily-slides"
            shutil.copytree(slides, target, dirs_exist_ok=True)
        self.cluster = Cluster(
            objs, state, self.prefix, self.registry,
            {"idp": {}, "lis": {"smily.io/gateway-client": "true"}},
        )  # fmt: skip
        self._start_idp()
        self._start_lis()
        self._closed = threading.Event()
        threading.Thread(target=self._publisher, daemon=True).start()
        self.timings["apply"] = time.monotonic() - started

    def deploy_script(self, *steps: str, overlay: Path | None = None, timeout: float = 1800) -> str:
        """docs/examples/deploy.sh STEPS against the box; returns its output."""
        kubectl = f"{sys.executable} {HERE / 'kubectl.py'}"
        env = dict(os.environ, KUBECTL=kubectl, BOX_DIR=str(self.state))
        if overlay:
            env["OVERLAY"] = str(overlay)
        out = subprocess.run(
            [str(REPO / "docs" / "examples" / "deploy.sh"), *steps],
            env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if out.returncode:
            raise RuntimeError(f"deploy.sh {' '.join(steps)} failed:\n{out.stdout}{out.stderr}")
        return out.stdout

    def _applied(self) -> list[dict]:
        """What deploy.sh applied, in order; a later object of the same name replaces the earlier."""
        objs: dict[tuple, dict] = {}
        for f in sorted((self.state / "applied").glob("*.yaml")):
            for o in yaml.safe_load_all(f.read_text()):
                if o:
                    objs[(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])] = o
        return list(objs.values())

    def publish_status(self) -> None:
        """What the box's kubectl reads: each workload settled, each certificate issued."""
        cluster = self.cluster
        out: dict[str, dict[str, bool]] = {"deployment": {}, "statefulset": {}, "certificate": {}}
        for w in cluster.workloads:
            out[w.kind.lower()][w.name] = cluster.settled(w)
        for cert in cluster.cert_manager.certificates:
            key = (cert["metadata"].get("namespace"), cert["spec"]["secretName"])
            out["certificate"][cert["metadata"]["name"]] = key in cluster.secrets
        tmp = self.state / "status.json.tmp"
        tmp.write_text(json.dumps(out))
        tmp.rename(self.state / "status.json")

    def _publisher(self) -> None:
        while not self._closed.wait(0.5):
            self.publish_status()

    def _outside(self, name: str, namespace: str, labels: dict) -> str:
        """A namespace outside the cluster's pods (IdP, LIS), known to policies and names."""
        netns = f"{self.prefix}-{name}"
        self.cluster.add_outside(netns, Endpoint(name, namespace, labels, self.cluster.network.add(netns), {}))
        return netns

    def _start_idp(self) -> None:
        netns = self._outside("idp", "idp", {"app": "idp"})
        self.cluster.extra_hosts[IDP_HOST] = [self.cluster.network.namespaces[netns]]
        idp = HERE / "idp"
        if not (idp / "node_modules" / "oidc-provider").exists():
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=idp, check=True)
        clients = {"lis": {"secret": self.client_secret, "roles": ROLES}}
        env = dict(os.environ, ISSUER=ISSUER, PORT=str(IDP_PORT), AUDIENCE="smily", ROLES_CLAIM="roles")
        env["CLIENTS"] = json.dumps(clients)
        log = open(self.state / "idp.log", "ab")  # noqa: SIM115 - the IdP's output, for its lifetime
        self._procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", netns, "node", str(idp / "idp.mjs")], env=env, stdout=log, stderr=log
            )
        )
        self.cluster.changed()

    def _start_lis(self) -> None:
        self.lis_netns = self._outside("lis", "lis", {"app": "lis"})
        self.cluster.changed()

    def lis(self) -> Agent:
        """The LIS client, with the tooling certificate the tls component issues."""
        tls = self.state / "lis-tls"
        tls.mkdir(exist_ok=True)
        for key, data in self.cluster.secret("smily", "smily-tooling-tls").items():
            (tls / key).write_bytes(data)
        agent = Agent(self.lis_netns, [sys.executable, "-m", "tests.cluster.client"], self.state / "lis.log")
        self.agents.append(agent)
        out = agent.call(
            "configure",
            ca=str(tls / "ca.crt"), cert=str(tls / "tls.crt"), key=str(tls / "tls.key"),
            gateway="dns:///smily-gateway.smily.svc.cluster.local:50050",
            http="http://smily-http.smily.svc.cluster.local:8080",
            token_url=f"{ISSUER}/token", client_id="lis", client_secret=self.client_secret,
        )  # fmt: skip
        assert out == {"ok": True}, out
        return agent

    def config(self) -> dict[str, str]:
        cm = next(o for o in self.objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("smily-config"))
        return dict(cm["data"])

    def object(self, kind: str, name: str) -> dict:
        return named(self.objs, kind, name)

    def close(self) -> None:
        self._closed.set()
        for agent in self.agents:
            agent.close()
        for p in self._procs:
            p.kill()
            p.wait()
        self.cluster.close()
