"""The four services as separate processes (`python -m smily.<service>`), as
they run in production: for tests that measure one process's memory or
freeze one with SIGSTOP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smily.localstack import free_port

SERVICES = ("tiler", "embedder", "index", "gateway")
NAMES = {
    "tiler": "smily.tiler.v1.TilerService",
    "embedder": "smily.embedder.v1.EmbedderService",
    "index": "smily.index.v1.IndexService",
    "gateway": "smily.gateway.v1.GatewayService",
}


def health(target: str, service: str = "", timeout: float = 1.0):
    """The health status of `service` at target, or None when it does not answer."""
    with grpc.insecure_channel(target) as ch:
        try:
            return (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
                .status
            )
        except grpc.RpcError:
            return None


SERVING = health_pb2.HealthCheckResponse.SERVING


class ProcStack:
    def __init__(self, env: dict[str, str], log_dir: str, per_service: dict[str, dict[str, str]] | None = None):
        self.ports = {name: free_port() for name in SERVICES}
        self.env = dict(
            os.environ,
            **{"SMILY_PLAINTEXT": "1", "SMILY_AUTH": "none", **env},
            SMILY_BIND_HOST="127.0.0.1",
            SMILY_METRICS_PORT="0",
            **{f"SMILY_{n.upper()}_PORT": str(p) for n, p in self.ports.items()},
            **{f"SMILY_{n.upper()}_TARGET": f"127.0.0.1:{self.ports[n]}" for n in SERVICES[:3]},
        )
        self.per_service = per_service or {}
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start(self, name: str, timeout: float = 120) -> None:
        env = dict(self.env, **self.per_service.get(name, {}))
        with open(os.path.join(self.log_dir, f"{name}.log"), "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", f"smily.{name}"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while health(self.target(name), NAMES[name]) != SERVING:
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {log.name}")
            time.sleep(0.2)

    def start_all(self) -> ProcStack:
        try:
            for name in SERVICES:
                self.start(name)
        except BaseException:
            self.stop_all()
            raise
        return self

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGCONT)  # a frozen process cannot act on SIGTERM
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        for name in reversed(SERVICES):
            self.stop(name)

    # -- memory: the kernel's own peak RSS (VmHWM) of one process --------------
    def reset_peak(self, name: str) -> None:
        with open(f"/proc/{self.pid(name)}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS

    def memory_mb(self, name: str) -> tuple[float, float]:
        """(current RSS, peak RSS since the last reset_peak) in MB."""
        fields = {}
        with open(f"/proc/{self.pid(name)}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) / 1024
        return fields["VmRSS"], fields["VmHWM"]
