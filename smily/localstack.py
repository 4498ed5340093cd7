"""The local stack of `make demo` / `make up`: a redis-server and the services.

Redis is started from the `redis-server` on PATH when there is one (no
persistence: it is a cache); without it the gateway uses an in-process
cache and says so.
"""
from __future__ import annotations

import contextlib
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


# The servers `make up` starts, and the variable that sets each one's port.
PORT_VARIABLES = {"gateway": "SMILY_GATEWAY_PORT", "tiler": "SMILY_TILER_PORT",
                  "embedder": "SMILY_EMBEDDER_PORT", "index": "SMILY_INDEX_PORT"}
# Port of the redis-server `make up` starts when SMILY_REDIS_URL names none.
REDIS_PORT_VARIABLE, REDIS_PORT = "SMILY_LOCAL_REDIS_PORT", 6390
READY_TIMEOUT_S = 120


def up() -> int:
    """Start redis-server and `smily serve all` in the background, with the ports the
    SMILY_* variables set; wait until every service is SERVING. A failed start stops
    what it started; `make down` stops a started stack (pid files in var/run/)."""
    from smily.common.config import Settings

    os.makedirs(RUN_DIR, exist_ok=True)
    os.makedirs(LOG_DIR, exist_ok=True)
    if any(_alive(name) for name in PIDS):
        print("the local stack is already running; `make down` stops it")
        return 1
    settings = Settings.from_env()
    host = dial_host(settings.bind_host)
    ports = {PORT_VARIABLES[name]: getattr(settings, f"{name}_port") for name in PORT_VARIABLES}
    if settings.metrics_port:
        ports["SMILY_METRICS_PORT"] = settings.metrics_port
    env = dict(os.environ)
    redis_port = 0
    if not settings.redis_url and shutil.which("redis-server"):
        redis_port = int(os.environ.get(REDIS_PORT_VARIABLE) or REDIS_PORT)
        ports[REDIS_PORT_VARIABLE] = redis_port
    busy = [f"{port} ({variable})" for variable, port in ports.items() if not _free(settings.bind_host, port)]
    if busy:
        print(f"port {', '.join(busy)} already in use: set the variable to a free port "
              f"(SMILY_METRICS_PORT=0 turns metrics off); nothing was started")
        return 1
    try:
        if redis_port:
            redis_proc, env["SMILY_REDIS_URL"] = start_redis(redis_port, os.path.join(LOG_DIR, "redis.log"))
            if redis_proc:  # found on PATH above
                _write_pid("redis", redis_proc.pid)
        elif not settings.redis_url:
            print("warning: redis-server is not installed; the gateway uses an in-process cache")
        with open(os.path.join(LOG_DIR, "smily.log"), "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "smily.cli", "serve", "all"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _write_pid("smily", proc.pid)
        waiting = _wait_ready(proc, host, settings)
    except RuntimeError as exc:  # redis-server did not start
        waiting = str(exc)
    except (Exception, KeyboardInterrupt):
        down(quiet=True)
        raise
    if waiting:
        down(quiet=True)
        print(f"{waiting}; see {LOG_DIR}/smily.log. Stopped what was started.")
        return 1
    gateway = f"{host}:{settings.gateway_port}"
    backends = ", ".join(f"{name} :{getattr(settings, f'{name}_port')}" for name in ("tiler", "embedder", "index"))
    cache = f"Redis {env['SMILY_REDIS_URL']}" if env.get("SMILY_REDIS_URL") else "in-process cache"
    metrics = f"metrics http://{host}:{settings.metrics_port}/metrics" if settings.metrics_port else "metrics off"
    print(f"local stack up: gateway {gateway} ({backends}), {cache}, {metrics}; logs in {LOG_DIR}/")
    if settings.gateway_port != 50050:
        print(f"the smily command finds it with the same SMILY_GATEWAY_PORT, or --gateway {gateway}")
    print("`make down` stops it")
    return 0


def _wait_ready(proc: subprocess.Popen, host: str, settings) -> str:
    """'' once every service says SERVING, else what went wrong."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from smily.common.channels import channel

    pending = {name: f"{host}:{getattr(settings, f'{name}_port')}" for name in PORT_VARIABLES}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"smily serve all exited with status {proc.returncode}"
        for name, target in list(pending.items()):
            with channel(target) as ch:
                try:
                    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.RpcError:
                    continue
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                del pending[name]
        time.sleep(0.5)
    if not pending:
        return ""
    return f"not serving after {READY_TIMEOUT_S} s: {', '.join(f'{n} on {t}' for n, t in pending.items())}"


# What `make down` stops, in order, and a word its command line holds (a pid file
# outliving its process must not stop another that got the same pid).
PIDS = {"smily": "smily", "redis": "redis-server"}


def down(quiet: bool = False) -> int:
    stopped = []
    for name in PIDS:
        pid = _alive(name)
        if pid:
            _stop_group(pid)
            stopped.append(name)
        with contextlib.suppress(FileNotFoundError):
            os.remove(_pid_path(name))
    if not quiet:
        print(f"stopped {' and '.join(stopped)}" if stopped else "nothing was running")
    return 0


def _stop_group(pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM the process group (its reader processes too), SIGKILL what outlives grace_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0]:  # our own child (a failed up): reap it
                    return
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)


def dial_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "[::]", "") else bind_host


def _free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _pid_path(name: str) -> str:
    return os.path.join(RUN_DIR, f"{name}.pid")


def _write_pid(name: str, pid: int) -> None:
    with open(_pid_path(name), "w") as fh:
        fh.write(str(pid))


def _alive(name: str) -> int:
    """The pid in var/run/<name>.pid if that process is still the one started, else 0."""
    try:
        with open(_pid_path(name)) as fh:
            pid = int(fh.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().decode(errors="replace")
    except (OSError, ValueError):
        return 0
    return pid if PIDS[name] in cmdline else 0
