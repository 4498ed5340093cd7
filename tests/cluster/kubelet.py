"""Pods as kubelet runs them: volumes, env, one process per container, probes and restarts.

A container is its image's filesystem (an overlay over the exported image, read-only
where readOnlyRootFilesystem says so) in private mount and PID namespaces inside the
pod's network namespace, with the volumes bound at their mountPaths, the pod's hosts
file at /etc/hosts, run as the securityContext's user with fsGroup as a supplementary
group. Secret and ConfigMap volumes are written the way kubelet writes them (files
behind a `..data` link swapped atomically), so an updated Secret reaches a running pod.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .controllers import Cluster

REPO = Path(__file__).resolve().parents[2]


class Prober:
    """kubelet's prober, run from the node's namespace (tests/cluster/agent.py)."""

    def __init__(self, node_ns: str, python: str):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", node_ns, python, "-m", "tests.cluster.agent", "probe"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        self._ids = itertools.count()
        self._waiting: dict[int, list] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout
        for line in self._proc.stdout:
            answer = json.loads(line)
            with self._lock:
                slot = self._waiting.pop(answer["id"], None)
            if slot:
                slot[1] = answer
                slot[0].set()

    def probe(self, request: dict) -> tuple[bool, str]:
        slot: list = [threading.Event(), None]
        with self._lock:
            request = {**request, "id": next(self._ids)}
            self._waiting[request["id"]] = slot
            assert self._proc.stdin
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        if not slot[0].wait(float(request.get("timeout", 1)) + 5):
            return False, "probe timed out"
        return slot[1]["ok"], slot[1]["detail"]

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values; $$ escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def write_atomic_dir(target: Path, files: dict[str, bytes], mode: int, gid: int | None) -> None:
    """kubelet's AtomicWriter: files in a timestamped dir, `..data` swapped to it in one rename."""
    target.mkdir(parents=True, exist_ok=True)
    stamp = target / f"..{time.time_ns()}"
    stamp.mkdir()
    for name, data in files.items():
        path = stamp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chown(path, 0, gid if gid is not None else 0)
        os.chmod(path, mode)
    os.chmod(stamp, 0o755)
    tmp = target / "..data_tmp"
    if tmp.is_symlink():
        tmp.unlink()
    old = os.readlink(target / "..data") if (target / "..data").is_symlink() else None
    os.symlink(stamp.name, tmp)
    os.rename(tmp, target / "..data")
    for name in files:
        top = name.split("/", 1)[0]
        if not (target / top).is_symlink():
            os.symlink(f"..data/{top}", target / top)
    if old:
        subprocess.run(["rm", "-rf", str(target / old)], check=True)


class Container:
    def __init__(self, pod: Pod, spec: dict):
        self.pod, self.spec, self.name = pod, spec, spec["name"]
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started = False  # the startup probe passed (or there is none)
        self.ready = False
        self.stopping = False
        self.log = pod.dir / "logs" / f"{self.name}.log"

    # -- process --------------------------------------------------------------

    def command(self) -> list[str]:
        pod, spec = self.pod, self.spec
        image = pod.cluster.registry.resolve(spec["image"])
        env = self.environment(image)
        argv = list(spec.get("command") or image.entrypoint)
        argv += list(spec.get("args") or ([] if spec.get("command") else image.cmd))
        argv = [expand(a, env) for a in argv]
        sec = {**(pod.spec.get("securityContext") or {}), **(spec.get("securityContext") or {})}
        uid = sec.get("runAsUser")
        gid = sec.get("runAsGroup", uid)
        if uid is None:
            raise RuntimeError(f"{pod.name}/{self.name}: the box needs runAsUser")
        if sec.get("runAsNonRoot") and int(uid) == 0:
            raise RuntimeError(f"{pod.name}/{self.name}: runAsNonRoot with uid 0")
        self.pre_stop_seconds()  # a hook the box cannot run fails the pod at its start
        groups = [str(g) for g in [pod.spec.get("securityContext", {}).get("fsGroup")] if g is not None]
        root = pod.dir / "rootfs" / self.name
        upper, work = pod.dir / "upper" / self.name, pod.dir / "work" / self.name
        script = ["set -e"]
        for d in (root, upper, work):
            script.append(f"rm -rf {shlex.quote(str(d))}; mkdir -p {shlex.quote(str(d))}")
        r = shlex.quote(str(root))
        script.append(
            f"mount -t overlay overlay -o lowerdir={shlex.quote(str(image.root))},"
            f"upperdir={shlex.quote(str(upper))},workdir={shlex.quote(str(work))} {r}"
        )
        script += [f"mount -t proc proc {r}/proc", f"mount --rbind /dev {r}/dev"]
        binds = [(str(pod.cluster.network.hosts_file(pod.netns)), "/etc/hosts", True)]
        binds.append((str(pod.dir / "resolv.conf"), "/etc/resolv.conf", True))
        for m in spec.get("volumeMounts") or []:
            source, read_only = pod.volume_path(m["name"])
            if m.get("subPath"):
                source = source / m["subPath"]
            binds.append((str(source), m["mountPath"], read_only or bool(m.get("readOnly"))))
        for source, path, read_only in binds:
            dest = shlex.quote(f"{root}{path}")
            make = "mkdir -p" if Path(source).is_dir() else "touch"
            script.append(f"[ -e {dest} ] || {make} {dest}")
            script.append(f"mount --bind {shlex.quote(source)} {dest}")
            if read_only:
                script.append(f"mount -o remount,bind,ro {dest}")
        if sec.get("readOnlyRootFilesystem"):
            script.append(f"mount -o remount,ro {r}")
        user = ["--userspec", f"{uid}:{gid}"] + (["--groups", ",".join(groups)] if groups else [])
        env_args = [f"{k}={v}" for k, v in env.items()]
        workdir = spec.get("workingDir") or image.workdir
        run = ["chroot", *user, str(root), "/usr/bin/env", "-i", "-C", workdir, *env_args, *argv]
        script.append("exec " + shlex.join(run))
        return [
            "ip", "netns", "exec", pod.netns,
            "unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
            "sh", "-c", "\n".join(script),
        ]  # fmt: skip

    def environment(self, image) -> dict[str, str]:
        pod, cluster = self.pod, self.pod.cluster
        env: dict[str, str] = dict(e.split("=", 1) for e in image.env)
        env["HOSTNAME"] = pod.name
        if pod.spec.get("enableServiceLinks", True):
            env.update(cluster.service_links(pod.namespace))
        for source in self.spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = cluster.configmap(pod.namespace, source["configMapRef"]["name"])
            else:
                data = {k: v.decode() for k, v in cluster.secret(pod.namespace, source["secretRef"]["name"]).items()}
            env.update({prefix + k: v for k, v in data.items()})
        for item in self.spec.get("env") or []:
            if "value" in item or "valueFrom" not in item:
                env[item["name"]] = expand(item.get("value", ""), env)
                continue
            ref = item["valueFrom"]
            if "secretKeyRef" in ref:
                env[item["name"]] = cluster.secret(pod.namespace, ref["secretKeyRef"]["name"])[
                    ref["secretKeyRef"]["key"]
                ].decode()
            elif "configMapKeyRef" in ref:
                env[item["name"]] = cluster.configmap(pod.namespace, ref["configMapKeyRef"]["name"])[
                    ref["configMapKeyRef"]["key"]
                ]
            elif "fieldRef" in ref:
                fields = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "status.podIP": pod.ip}
                env[item["name"]] = fields[ref["fieldRef"]["fieldPath"]]
            else:
                raise RuntimeError(f"env {item['name']}: {list(ref)} is not in the box")
        return env

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"--- start {time.strftime('%H:%M:%S')} restart {self.restarts}\n".encode())
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.started = "startupProbe" not in self.spec
        self.ready = False

    def main_pid(self) -> int | None:
        """The container's first process: the child of unshare (PID 1 of its namespace)."""
        if not self.proc:
            return None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def pre_stop_seconds(self) -> float:
        """The preStop hook's sleep (the only hook the manifests use); 0 without one."""
        hook = (self.spec.get("lifecycle") or {}).get("preStop")
        if not hook:
            return 0.0
        if "sleep" not in hook:
            raise RuntimeError(f"{self.pod.name}/{self.name}: preStop {list(hook)} is not in the box")
        return float(hook["sleep"]["seconds"])

    def stop(self, grace: float) -> None:
        """The preStop hook, then SIGTERM, then SIGKILL once the grace period (which counts the
        hook) is over, as kubelet stops a container."""
        if not self.proc or self.proc.poll() is not None:
            return
        deadline = time.monotonic() + grace
        time.sleep(min(self.pre_stop_seconds(), grace))
        pid = self.main_pid()
        if pid and grace > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(max(deadline - time.monotonic(), 0.1))
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    # -- probes ---------------------------------------------------------------

    def _request(self, probe: dict) -> dict:
        timeout = probe.get("timeoutSeconds", 1)
        ports = {p["name"]: p["containerPort"] for p in self.spec.get("ports") or [] if "name" in p}

        def port(value):
            return ports[value] if isinstance(value, str) else value

        if "grpc" in probe:
            return {"kind": "grpc", "host": self.pod.ip, "port": port(probe["grpc"]["port"]),
                    "service": probe["grpc"].get("service", ""), "timeout": timeout}  # fmt: skip
        if "httpGet" in probe:
            return {"kind": "http", "host": self.pod.ip, "port": port(probe["httpGet"]["port"]),
                    "path": probe["httpGet"].get("path", "/"), "timeout": timeout}  # fmt: skip
        if "tcpSocket" in probe:
            return {"kind": "tcp", "host": self.pod.ip, "port": port(probe["tcpSocket"]["port"]), "timeout": timeout}
        raise RuntimeError(f"{self.pod.name}/{self.name}: probe {list(probe)} is not in the box")

    def run_probes(self, stop: threading.Event) -> None:
        """kubelet's loop: startup first, then liveness and readiness; a failed liveness restarts."""
        counts = {"startupProbe": 0, "livenessProbe": 0, "readinessProbe": 0}
        next_at = {k: 0.0 for k in counts}
        began = time.monotonic()
        backoff = 10.0
        while not stop.wait(0.2):
            now = time.monotonic()
            if self.proc and self.proc.poll() is not None and not self.stopping:
                # restartPolicy Always, with kubelet's back-off (10 s, doubling, at most 5 min).
                self.ready = False
                self.pod.cluster.changed()
                if stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 300)
                self.restarts += 1
                self.start()
                began, counts = time.monotonic(), dict.fromkeys(counts, 0)
                next_at = dict.fromkeys(counts, 0.0)
                continue
            kinds = ["startupProbe"] if not self.started else ["livenessProbe", "readinessProbe"]
            for kind in kinds:
                probe = self.spec.get(kind)
                if probe is None:
                    if kind == "readinessProbe" and not self.ready:
                        self.ready = True
                        self.pod.cluster.changed()
                    continue
                if now < next_at[kind] or now - began < probe.get("initialDelaySeconds", 0):
                    continue
                next_at[kind] = now + probe.get("periodSeconds", 10)
                ok, detail = self.pod.cluster.prober.probe(self._request(probe))
                counts[kind] = 0 if ok else counts[kind] + 1
                if kind == "startupProbe":
                    if ok:
                        self.started = True
                    elif counts[kind] >= probe.get("failureThreshold", 3):
                        self._restart(f"startup probe failed: {detail}")
                elif kind == "livenessProbe" and counts[kind] >= probe.get("failureThreshold", 3):
                    self._restart(f"liveness probe failed: {detail}")
                elif kind == "readinessProbe":
                    ready = ok or (self.ready and counts[kind] < probe.get("failureThreshold", 3))
                    if ready != self.ready:
                        self.ready = ready
                        self.pod.cluster.changed()
            if self.ready:
                backoff = 10.0

    def _restart(self, why: str) -> None:
        with open(self.log, "ab") as out:
            out.write(f"--- kubelet: {why}; restarting\n".encode())
        self.pod.events.append(f"{self.name}: {why}")
        self.ready = False
        self.pod.cluster.changed()
        self.stopping = True
        self.stop(float(self.pod.spec.get("terminationGracePeriodSeconds", 30)))
        self.stopping = False
        self.restarts += 1
        self.start()


class Pod:
    def __init__(self, cluster: Cluster, namespace: str, name: str, spec: dict, labels: dict, owner: str):
        self.cluster, self.namespace, self.name = cluster, namespace, name
        self.spec, self.labels, self.owner = spec, labels, owner
        self.dir = cluster.state / "pods" / name
        self.netns = f"{cluster.prefix}-{name}"
        self.ip = ""
        self.terminating = False
        self.created = time.monotonic()
        self.ready_at: float | None = None
        self.events: list[str] = []
        inits = spec.get("initContainers") or []
        # Sidecars (init containers with restartPolicy Always) start first and keep running.
        self.sidecars = [c for c in inits if c.get("restartPolicy") == "Always"]
        self.inits = [c for c in inits if c.get("restartPolicy") != "Always"]
        self.containers = [Container(self, c) for c in self.sidecars + spec["containers"]]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def ready(self) -> bool:
        ready = not self.terminating and all(c.ready for c in self.containers)
        if ready and self.ready_at is None:
            self.ready_at = time.monotonic()
        return ready

    def ports(self) -> dict[str, int]:
        return {
            p["name"]: p["containerPort"]
            for c in self.sidecars + self.spec["containers"]
            for p in c.get("ports") or []
            if "name" in p
        }

    # -- volumes --------------------------------------------------------------

    def volume_path(self, name: str) -> tuple[Path, bool]:
        for vol in self.spec.get("volumes") or []:
            if vol["name"] == name:
                if "persistentVolumeClaim" in vol:
                    claim = vol["persistentVolumeClaim"]
                    return self.cluster.claim(self.namespace, claim["claimName"], self), bool(claim.get("readOnly"))
                return self.dir / "volumes" / name, False
        claim = self.cluster.template_claim(self, name)
        if claim is None:
            raise RuntimeError(f"{self.name}: volume {name} is not declared")
        return claim, False

    def write_volumes(self) -> None:
        for vol in self.spec.get("volumes") or []:
            path = self.dir / "volumes" / vol["name"]
            if "emptyDir" in vol:
                path.mkdir(parents=True, exist_ok=True)
                os.chmod(path, 0o777)
            elif "secret" in vol or "configMap" in vol:
                self.write_projected(vol)
            elif "persistentVolumeClaim" not in vol:
                raise RuntimeError(f"{self.name}: volume kind {list(vol)} is not in the box")
        self.dir.joinpath("resolv.conf").write_text("")

    def write_projected(self, vol: dict) -> None:
        """A Secret or ConfigMap volume: its keys (or items) as files, defaultMode, group fsGroup."""
        fs_group = (self.spec.get("securityContext") or {}).get("fsGroup")
        if "secret" in vol:
            source = vol["secret"]
            data = self.cluster.secret(self.namespace, source["secretName"])
        else:
            source = vol["configMap"]
            data = {k: v.encode() for k, v in self.cluster.configmap(self.namespace, source["name"]).items()}
        mode = source.get("defaultMode", 0o644)
        files = {i["path"]: data[i["key"]] for i in source["items"]} if source.get("items") else dict(data)
        write_atomic_dir(self.dir / "volumes" / vol["name"], files, mode, fs_group)

    def refresh(self, kind: str, name: str) -> bool:
        """A Secret or ConfigMap changed: update the volumes that project it (not env)."""
        touched = False
        for vol in self.spec.get("volumes") or []:
            if (kind == "Secret" and vol.get("secret", {}).get("secretName") == name) or (
                kind == "ConfigMap" and vol.get("configMap", {}).get("name") == name
            ):
                self.write_projected(vol)
                touched = True
        return touched

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ip = self.cluster.network.add(self.netns)
        self.cluster.pod_added(self)
        self.write_volumes()
        for spec in self.inits:  # each to completion, in order, before any other container
            init = Container(self, spec)
            init.start()
            assert init.proc
            if init.proc.wait() != 0:
                raise RuntimeError(f"{self.name}: init container {init.name} failed (see {init.log})")
        for c in self.containers:
            c.start()
            t = threading.Thread(target=c.run_probes, args=(self._stop,), daemon=True, name=f"{self.name}/{c.name}")
            t.start()
            self._threads.append(t)

    def delete(self, grace: float | None = None) -> None:
        """`kubectl delete pod`: out of the endpoints first, then SIGTERM with the grace period."""
        self.terminating = True
        self.cluster.changed()
        grace = float(self.spec.get("terminationGracePeriodSeconds", 30)) if grace is None else grace
        self._stop.set()
        for c in self.containers:
            c.stopping = True
        stoppers = [threading.Thread(target=c.stop, args=(grace,)) for c in self.containers]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        self.cluster.network.remove(self.netns)
        self.cluster.pod_removed(self)
        subprocess.run(["rm", "-rf", str(self.dir / "volumes"), str(self.dir / "upper"), str(self.dir / "work")])
