"""`smily serve http` as its own process, as it runs in production, in front of a test gateway."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from smily.localstack import free_port

SMILY = os.path.join(os.path.dirname(sys.executable), "smily")


class HttpProcess:
    """The HTTP/JSON API on loopback; ready once its /readyz says the gateway serves."""

    def __init__(self, gateway_target: str, log_path: str, port: int = 0, env: dict[str, str] | None = None):
        if not os.path.isfile(SMILY):
            pytest.fail(f"the smily command is missing next to {sys.executable}: pip install -e .")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(
            os.environ,
            SMILY_BIND_HOST="127.0.0.1",
            SMILY_HTTP_PORT=str(self.port),
            SMILY_PLAINTEXT="1",
            SMILY_HTTP_GATEWAY_TARGET=gateway_target,
            **(env or {}),
        )
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([SMILY, "serve", "http"], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"`smily serve http` did not become ready; see {log_path}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=5) as resp:
                return resp.status == 200
        except OSError:  # refused, or an HTTP error status (503 until the gateway serves)
            return False

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
