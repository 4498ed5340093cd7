"""The local stack of `make demo` / `make up`: a redis-server and the services.

Redis is started from the `redis-server` on PATH when there is one (no
persistence: it is a cache) with a password generated at start; without it
the gateway uses an in-process cache and says so. The local stack is the
one place that runs plaintext gRPC without authentication (it says so once).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

RUN_DIR = os.path.join("var", "run")
LOG_DIR = os.path.join("var", "log")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int | None = None, log_path: str = os.devnull,
                tls: tuple[str, str, str] | None = None) -> tuple[subprocess.Popen | None, str]:
    """Start redis-server on loopback with a fresh password; returns (process, url),
    or (None, "") when not installed. tls=(cert, key, ca) serves TLS only (rediss://)."""
    exe = shutil.which("redis-server")
    if not exe:
        return None, ""
    port = port or free_port()
    password = secrets.token_urlsafe(24)
    # The config goes in on stdin so the password never shows in `ps`.
    config = [f"port {0 if tls else port}", "bind 127.0.0.1", "protected-mode yes", 'save ""', "appendonly no",
              "maxmemory 256mb", "maxmemory-policy allkeys-lru", f"requirepass {password}"]
    if tls:
        config += [f"tls-port {port}", f"tls-cert-file {tls[0]}", f"tls-key-file {tls[1]}",
                   f"tls-ca-cert-file {tls[2]}", "tls-auth-clients no"]
    proc = subprocess.Popen([exe, "-"], stdin=subprocess.PIPE, stdout=open(log_path, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.stdin.write("\n".join(config).encode() + b"\n")
    proc.stdin.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"{'rediss' if tls else 'redis'}://:{password}@127.0.0.1:{port}/0"
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
                "index_dir": os.path.join(tmp, "index"), "redis_url": redis_url, "plaintext": True,
                "auth": "none", "audit_log": os.path.join(tmp, "audit.jsonl"),
                "cache_key": secrets.token_urlsafe(32), **overrides})
            running, settings = stack.start(stack.ORDER, settings)
            try:
                yield settings
            finally:
                stack.stop(running, 0)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait()


def _local_env() -> dict[str, str]:
    """Local use: plaintext and no identity provider unless the caller's environment says otherwise."""
    env = dict(os.environ)
    env.setdefault("SMILY_PLAINTEXT", "1")
    env.setdefault("SMILY_AUTH", "none")
    env.setdefault("SMILY_AUDIT_LOG", os.path.join(LOG_DIR, "audit.jsonl"))
    env.setdefault("SMILY_CACHE_KEY", secrets.token_urlsafe(32))
    return env


def up() -> int:
    """Start redis-server and `smily serve all` in the background."""
    os.makedirs(RUN_DIR, exist_ok=True)
    os.makedirs(LOG_DIR, exist_ok=True)
    if _running():
        print("the local stack is already running; `make down` stops it")
        return 1
    env = _local_env()
    redis_proc, url = start_redis(6390, os.path.join(LOG_DIR, "redis.log"))
    if redis_proc:
        _write_pid("redis", redis_proc.pid)
        env["SMILY_REDIS_URL"] = url
    else:
        print("warning: redis-server is not installed; the gateway uses an in-process cache")
    proc = subprocess.Popen([sys.executable, "-m", "smily.cli", "serve", "all"], env=env,
                            stdout=open(os.path.join(LOG_DIR, "smily.log"), "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    _write_pid("smily", proc.pid)
    http = subprocess.Popen([sys.executable, "-m", "smily.cli", "serve", "http"], env=env,
                            stdout=open(os.path.join(LOG_DIR, "http.log"), "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    _write_pid("http", http.pid)
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
            port = env.get("SMILY_HTTP_PORT", "8080")
            print(f"local stack up: gateway 127.0.0.1:50050, viewer and HTTP API http://127.0.0.1:{port}/, "
                  f"logs in {LOG_DIR}/, `make down` stops it")
            return 0
        except Exception:
            time.sleep(0.5)
    print("the stack did not come up in time; see var/log/smily.log")
    return 1


CLUSTER_PG_PORT = 5439
CLUSTER_INDEX_PORT = 50100


def up_cluster(shards: int, replicas: int) -> int:
    """PostgreSQL (initdb in var/pg once), shards x replicas index processes and the other
    services, each its own process, in the background; `make down` stops them."""
    from smily.localpg import LocalPostgres

    os.makedirs(RUN_DIR, exist_ok=True)
    os.makedirs(LOG_DIR, exist_ok=True)
    if _running():
        print("the local stack is already running; `make down` stops it")
        return 1
    pg = LocalPostgres(os.path.join("var", "pg"), CLUSTER_PG_PORT, os.path.abspath(os.path.join(LOG_DIR, "postgres.log")))
    pg.start()
    _write_pid("postgres", pg.proc.pid)
    env = dict(_local_env(), SMILY_INDEX_DATABASE_URL=pg.url)
    redis_proc, url = start_redis(6390, os.path.join(LOG_DIR, "redis.log"))
    if redis_proc:
        _write_pid("redis", redis_proc.pid)
        env["SMILY_REDIS_URL"] = url
    targets = []
    for shard in range(shards):
        ports = [CLUSTER_INDEX_PORT + shard * replicas + r for r in range(replicas)]
        targets.append("|".join(f"127.0.0.1:{p}" for p in ports))
        for r, port in enumerate(ports):
            name = f"index-s{shard}r{r}"
            _spawn(name, "index", dict(env, SMILY_INDEX_SHARD=str(shard), SMILY_INDEX_PORT=str(port),
                                       SMILY_INDEX_DIR=os.path.join("var", name), SMILY_METRICS_PORT="0"))
    for i, service in enumerate(("tiler", "embedder", "gateway")):
        _spawn(service, service, dict(env, SMILY_INDEX_TARGETS=",".join(targets), SMILY_METRICS_PORT=str(9100 + i)))
    return _wait_gateway(env, f"{shards} shards x {replicas} replicas on PostgreSQL 127.0.0.1:{CLUSTER_PG_PORT}")


def _spawn(name: str, service: str, env: dict) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "smily.cli", "serve", service], env=env,
                            stdout=open(os.path.join(LOG_DIR, f"{name}.log"), "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    _write_pid(name, proc.pid)


def _wait_gateway(env: dict, what: str) -> int:
    from smily.client import Client
    from smily.gateway.v1 import gateway_pb2
    client = Client(env.get("SMILY_GATEWAY", "127.0.0.1:50050"), timeout=2)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            client.stub.ListSlides(gateway_pb2.ListSlidesRequest(page_size=1), timeout=1)
            print(f"local cluster up: gateway 127.0.0.1:50050, {what}; logs in {LOG_DIR}/, `make down` stops it")
            return 0
        except Exception:
            time.sleep(0.5)
    print(f"the cluster did not come up in time; see {LOG_DIR}/")
    return 1


def down() -> int:
    stopped = 0
    names = sorted(f[:-4] for f in os.listdir(RUN_DIR) if f.endswith(".pid")) if os.path.isdir(RUN_DIR) else []
    # PostgreSQL last: the index processes hold connections to it.
    for name in sorted(names, key=lambda n: n == "postgres"):
        path = os.path.join(RUN_DIR, f"{name}.pid")
        with open(path) as fh:
            pid = int(fh.read().strip())
        try:
            os.kill(pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
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
        os.kill(int(open(path).read().strip()), 0)
        return True
    except (ProcessLookupError, ValueError):
        return False
