"""The local stack of `make demo` / `make up`: a redis-server and the services.

Redis is started from the `redis-server` on PATH when there is one (no
persistence: it is a cache); without it the gateway uses an in-process
cache and says so.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

RUN_DIR = os.path.join("var", "run")
LOG_DIR = os.path.join("var", "log")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int | None = None, log_path: str = os.devnull) -> tuple[subprocess.Popen | None, str]:
    """Start redis-server on loopback; returns (process, url), or (None, "") when not installed."""
    exe = shutil.which("redis-server")
    if not exe:
        return None, ""
    port = port or free_port()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


@contextmanager
def local_stack(slide_roots: tuple[str, ...], **overrides) -> Iterator:
    """Redis (when installed) and the four services on free loopback ports with a
    fresh index; yields their Settings and stops everything in order: the
    services before their index folder goes (the index snapshots on stop)."""
    from smily import stack
    from smily.common.config import Settings

    redis_proc, redis_url = start_redis()
    try:
        with tempfile.TemporaryDirectory(prefix="smily-") as tmp:
            settings = Settings.from_env(**{
                "bind_host": "127.0.0.1", "gateway_port": 0, "tiler_port": 0, "embedder_port": 0,
                "index_port": 0, "metrics_port": 0, "slide_roots": tuple(slide_roots),
                "index_dir": os.path.join(tmp, "index"), "redis_url": redis_url, **overrides})
            running, settings = stack.start(stack.ORDER, settings)
            try:
                yield settings
            finally:
                stack.stop(running, 0)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait()


def up() -> int:
    """Start redis-server and `smily serve all` in the background."""
    os.makedirs(RUN_DIR, exist_ok=True)
    os.makedirs(LOG_DIR, exist_ok=True)
    if _running():
        print("the local stack is already running; `make down` stops it")
        return 1
    env = dict(os.environ)
    redis_proc, url = start_redis(6390, os.path.join(LOG_DIR, "redis.log"))
    if redis_proc:
        _write_pid("redis", redis_proc.pid)
        env["SMILY_REDIS_URL"] = url
    else:
        print("warning: redis-server is not installed; the gateway uses an in-process cache")
    with open(os.path.join(LOG_DIR, "smily.log"), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "smily.cli", "serve", "all"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _write_pid("smily", proc.pid)
    from smily.client import Client
    from smily.gateway.v1 import gateway_pb2
    client = Client(env.get("SMILY_GATEWAY", "127.0.0.1:50050"), timeout=2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"smily serve all exited; see {LOG_DIR}/smily.log")
            return 1
        try:
            client.stub.ListSlides(gateway_pb2.ListSlidesRequest(page_size=1), timeout=1)
            print(f"local stack up: gateway 127.0.0.1:50050, logs in {LOG_DIR}/, `make down` stops it")
            return 0
        except Exception:
            time.sleep(0.5)
    print("the stack did not come up in time; see var/log/smily.log")
    return 1


def down() -> int:
    stopped = 0
    for name in ("smily", "redis"):
        path = os.path.join(RUN_DIR, f"{name}.pid")
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            pid = int(fh.read().strip())
        try:
            os.kill(pid, signal.SIGTERM)
            stopped += 1
            for _ in range(150):
                os.kill(pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            pass
        os.remove(path)
    print("local stack stopped" if stopped else "nothing was running")
    return 0


def _write_pid(name: str, pid: int) -> None:
    with open(os.path.join(RUN_DIR, f"{name}.pid"), "w") as fh:
        fh.write(str(pid))


def _running() -> bool:
    path = os.path.join(RUN_DIR, "smily.pid")
    if not os.path.exists(path):
        return False
    try:
        with open(path) as fh:
            os.kill(int(fh.read().strip()), 0)
        return True
    except (ProcessLookupError, ValueError):
        return False
