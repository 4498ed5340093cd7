"""The local stack of `make demo` / `make up`: a redis-server and the services.

Redis is started from the `redis-server` on PATH when there is one (no
persistence: it is a cache) with a password generated at start; without it
the gateway uses an in-process cache and says so. The local stack is the
one place that runs plaintext gRPC without authentication (it says so once).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit, urlunsplit

RUN_DIR = os.path.join("var", "run")
LOG_DIR = os.path.join("var", "log")
# Where `make up` keeps the generated Redis password (mode 0600), rather than printing it.
REDIS_PASSWORD_FILE = os.path.join(RUN_DIR, "redis-password")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(
    port: int | None = None, log_path: str = os.devnull, tls: tuple[str, str, str] | None = None
) -> tuple[subprocess.Popen | None, str]:
    """Start redis-server on loopback with a fresh password; returns (process, url),
    or (None, "") when not installed. tls=(cert, key, ca) serves TLS only (rediss://)."""
    exe = shutil.which("redis-server")
    if not exe:
        return None, ""
    port = port or free_port()
    password = secrets.token_urlsafe(24)
    # The config goes in on stdin so the password never shows in `ps`.
    config = [
        f"port {0 if tls else port}",
        "bind 127.0.0.1",
        "protected-mode yes",
        'save ""',
        "appendonly no",
        "maxmemory 256mb",
        "maxmemory-policy allkeys-lru",
        f"requirepass {password}",
    ]
    if tls:
        config += [
            f"tls-port {port}",
            f"tls-cert-file {tls[0]}",
            f"tls-key-file {tls[1]}",
            f"tls-ca-cert-file {tls[2]}",
            "tls-auth-clients no",
        ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [exe, "-"], stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    assert proc.stdin is not None  # stdin=PIPE
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


def keep_password(url: str, path: str) -> str:
    """Write the URL's password to `path` (mode 0600) and return the URL without it, fit to print."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, 0o600)  # a file left by an earlier run keeps its mode otherwise
        fh.write(unquote(parts.password) + "\n")
    netloc = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return f"{urlunsplit((parts.scheme, netloc, parts.path, parts.query, ''))} (password in {path})"


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
            settings = Settings.from_env(
                **{
                    "bind_host": "127.0.0.1",
                    "gateway_port": 0,
                    "tiler_port": 0,
                    "embedder_port": 0,
                    "index_port": 0,
                    "metrics_port": 0,
                    "slide_roots": tuple(slide_roots),
                    "index_dir": os.path.join(tmp, "index"),
                    "redis_url": redis_url,
                    "plaintext": True,
                    "auth": "none",
                    "audit_log": os.path.join(tmp, "audit.jsonl"),
                    "cache_key": secrets.token_urlsafe(32),
                    "view_session_key": secrets.token_urlsafe(32),
                    **overrides,
                }
            )
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
    # One view-session key for the HTTP front end and the gateway (both get this environment).
    env.setdefault("SMILY_VIEW_SESSION_KEY", secrets.token_urlsafe(32))
    return env


# The servers `make up` starts, and the variable that sets each one's port.
PORT_VARIABLES = {
    "gateway": "SMILY_GATEWAY_PORT",
    "tiler": "SMILY_TILER_PORT",
    "embedder": "SMILY_EMBEDDER_PORT",
    "index": "SMILY_INDEX_PORT",
}
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
    if _started():
        print("the local stack is already running; `make down` stops it")
        return 1
    settings = Settings.from_env()
    host = dial_host(settings.server.bind_host)
    ports = {PORT_VARIABLES[name]: settings.port_of(name) for name in PORT_VARIABLES}
    if settings.server.metrics_port:
        ports["SMILY_METRICS_PORT"] = settings.server.metrics_port
    ports["SMILY_HTTP_PORT"] = settings.http.http_port
    env = _local_env()
    # The HTTP process calls the gateway started here, wherever SMILY_GATEWAY_PORT put it.
    env.setdefault("SMILY_HTTP_GATEWAY_TARGET", f"{host}:{settings.gateway.gateway_port}")
    redis_port = 0
    if not settings.gateway.redis_url and shutil.which("redis-server"):
        redis_port = int(os.environ.get(REDIS_PORT_VARIABLE) or REDIS_PORT)
        ports[REDIS_PORT_VARIABLE] = redis_port
    if _refuse_taken(settings.server.bind_host, ports):
        return 1
    try:
        if redis_port:
            redis_proc, env["SMILY_REDIS_URL"] = start_redis(redis_port, os.path.join(LOG_DIR, "redis.log"))
            if redis_proc:  # found on PATH above
                _write_pid("redis", redis_proc.pid)
        elif not settings.gateway.redis_url:
            print("warning: redis-server is not installed; the gateway uses an in-process cache")
        with open(os.path.join(LOG_DIR, "smily.log"), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "smily.cli", "serve", "all"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _write_pid("smily", proc.pid)
        with open(os.path.join(LOG_DIR, "http.log"), "ab") as log:
            http = subprocess.Popen(
                [sys.executable, "-m", "smily.cli", "serve", "http"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _write_pid("http", http.pid)
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
    gateway = f"{host}:{settings.gateway.gateway_port}"
    backends = ", ".join(f"{name} :{settings.port_of(name)}" for name in ("tiler", "embedder", "index"))
    if redis_port:
        cache = f"Redis {keep_password(env['SMILY_REDIS_URL'], REDIS_PASSWORD_FILE)}"
    else:
        cache = "Redis at SMILY_REDIS_URL" if settings.gateway.redis_url else "in-process cache"
    metrics = (
        f"metrics http://{host}:{settings.server.metrics_port}/metrics"
        if settings.server.metrics_port
        else "metrics off"
    )
    print(f"local stack up: gateway {gateway} ({backends}), {cache}, {metrics}; logs in {LOG_DIR}/")
    print(f"viewer and HTTP API: http://{host}:{settings.http.http_port}/")
    if settings.gateway.gateway_port != 50050:
        print(f"the smily command finds it with the same SMILY_GATEWAY_PORT, or --gateway {gateway}")
    print("`make down` stops it")
    return 0


def _wait_ready(proc: subprocess.Popen, host: str, settings) -> str:
    """'' once every service says SERVING, else what went wrong."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from smily.common.channels import channel

    pending = {name: f"{host}:{settings.port_of(name)}" for name in PORT_VARIABLES}
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


# A word the command line of each process `make up` starts holds, so a pid file
# outliving its process never stops another that got the same pid.
WORDS = {"redis": "redis-server", "postgres": "postgres"}


def _pid_names() -> list[str]:
    """What `make up` or `make up-cluster` started, in the order `make down` stops it:
    the services, then Redis, then PostgreSQL (the index processes hold connections to it)."""
    names = [f[:-4] for f in os.listdir(RUN_DIR) if f.endswith(".pid")] if os.path.isdir(RUN_DIR) else []
    return sorted(names, key=lambda n: (n == "postgres", n == "redis", n))


def _started() -> bool:
    return any(_alive(name) for name in _pid_names())


def down(quiet: bool = False) -> int:
    stopped = []
    for name in _pid_names():
        pid = _alive(name)
        if pid:  # PostgreSQL: SIGINT is its fast shutdown
            _stop_group(pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
            stopped.append(name)
        with contextlib.suppress(FileNotFoundError):
            os.remove(_pid_path(name))
    with contextlib.suppress(FileNotFoundError):
        os.remove(REDIS_PASSWORD_FILE)
    if not quiet:
        print(
            f"stopped {' and '.join([', '.join(stopped[:-1]), stopped[-1]] if len(stopped) > 1 else stopped)}"
            if stopped
            else "nothing was running"
        )
    return 0


def _stop_group(pid: int, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> None:
    """Signal the process group (its reader processes too), SIGKILL what outlives grace_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
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
    return pid if WORDS.get(name, "smily") in cmdline else 0


def _refuse_taken(host: str, ports: dict[str, int]) -> bool:
    """Print the taken ports, each with the variable that moves it; True if any."""
    busy = [f"{port} ({variable})" for variable, port in ports.items() if not _free(host, port)]
    if busy:
        print(
            f"port {', '.join(busy)} already in use: set the variable to a free port "
            f"(SMILY_METRICS_PORT=0 turns metrics off); nothing was started"
        )
    return bool(busy)


# `make up-cluster`'s PostgreSQL, and the first of its index replicas' ports (one each, in a row).
CLUSTER_PG_PORT_VARIABLE, CLUSTER_PG_PORT = "SMILY_LOCAL_PG_PORT", 5439
CLUSTER_INDEX_PORT_VARIABLE, CLUSTER_INDEX_PORT = "SMILY_LOCAL_INDEX_PORT", 50100
CLUSTER_SERVICES = ("tiler", "embedder", "gateway")


def up_cluster(shards: int, replicas: int) -> int:
    """PostgreSQL (initdb in var/pg once), shards x replicas index processes and the other
    services, each its own process, in the background; `make down` stops them. Ports come
    from SMILY_LOCAL_PG_PORT, SMILY_LOCAL_INDEX_PORT (the replicas, in a row), the services'
    SMILY_<NAME>_PORT and SMILY_METRICS_PORT (tiler, embedder, gateway in a row; 0 = off).
    A taken port is refused naming its variable; a failed start stops what it started."""
    from smily.common.config import Settings

    os.makedirs(RUN_DIR, exist_ok=True)
    os.makedirs(LOG_DIR, exist_ok=True)
    if _started():
        print("the local stack is already running; `make down` stops it")
        return 1
    settings = Settings.from_env()
    pg_port = int(os.environ.get(CLUSTER_PG_PORT_VARIABLE) or CLUSTER_PG_PORT)
    first_index = int(os.environ.get(CLUSTER_INDEX_PORT_VARIABLE) or CLUSTER_INDEX_PORT)
    ports = {CLUSTER_PG_PORT_VARIABLE: pg_port}
    redis_port = 0
    if not settings.gateway.redis_url and shutil.which("redis-server"):
        redis_port = ports[REDIS_PORT_VARIABLE] = int(os.environ.get(REDIS_PORT_VARIABLE) or REDIS_PORT)
    index_ports = [first_index + i for i in range(shards * replicas)]
    for i, port in enumerate(index_ports):
        ports[f"{CLUSTER_INDEX_PORT_VARIABLE} + {i}" if i else CLUSTER_INDEX_PORT_VARIABLE] = port
    for i, service in enumerate(CLUSTER_SERVICES):
        ports[PORT_VARIABLES[service]] = settings.port_of(service)
        if settings.server.metrics_port:
            ports[f"SMILY_METRICS_PORT + {i}" if i else "SMILY_METRICS_PORT"] = settings.server.metrics_port + i
    if _refuse_taken("127.0.0.1", ports):
        return 1
    where = f"{shards} shards x {replicas} replicas on PostgreSQL 127.0.0.1:{pg_port}"
    try:
        waiting = _start_cluster(shards, replicas, settings, pg_port, index_ports, redis_port)
    except (Exception, KeyboardInterrupt):
        down(quiet=True)
        raise
    if waiting:
        down(quiet=True)
        print(f"{waiting}; see {LOG_DIR}/. Stopped what was started.")
        return 1
    gateway = f"{dial_host(settings.server.bind_host)}:{settings.gateway.gateway_port}"
    print(f"local cluster up: gateway {gateway}, {where}; logs in {LOG_DIR}/, `make down` stops it")
    if settings.gateway.gateway_port != 50050:
        print(f"the smily command finds it with the same SMILY_GATEWAY_PORT, or --gateway {gateway}")
    return 0


def _start_cluster(shards: int, replicas: int, settings, pg_port: int, index_ports: list[int], redis_port: int) -> str:
    """Start every process of the cluster; '' once the gateway answers, else what went wrong."""
    from smily.localpg import LocalPostgres

    pg = LocalPostgres(os.path.join("var", "pg"), pg_port, os.path.abspath(os.path.join(LOG_DIR, "postgres.log")))
    try:
        pg.start()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        if pg.proc is not None:
            _write_pid("postgres", pg.proc.pid)
        return f"PostgreSQL did not start on {pg_port} ({CLUSTER_PG_PORT_VARIABLE}): {exc}"
    assert pg.proc is not None  # start() raises unless it runs
    _write_pid("postgres", pg.proc.pid)
    env = dict(_local_env(), SMILY_INDEX_DATABASE_URL=pg.url)
    if redis_port:
        try:
            redis_proc, env["SMILY_REDIS_URL"] = start_redis(redis_port, os.path.join(LOG_DIR, "redis.log"))
        except RuntimeError as exc:
            return str(exc)
        if redis_proc:
            _write_pid("redis", redis_proc.pid)
    targets = []
    for shard in range(shards):
        ports = index_ports[shard * replicas : (shard + 1) * replicas]
        targets.append("|".join(f"127.0.0.1:{p}" for p in ports))
        for r, port in enumerate(ports):
            name = f"index-s{shard}r{r}"
            _spawn(
                name,
                "index",
                dict(
                    env,
                    SMILY_INDEX_SHARD=str(shard),
                    SMILY_INDEX_PORT=str(port),
                    SMILY_INDEX_DIR=os.path.join("var", name),
                    SMILY_METRICS_PORT="0",
                ),
            )
    for i, service in enumerate(CLUSTER_SERVICES):
        metrics = settings.server.metrics_port + i if settings.server.metrics_port else 0
        _spawn(service, service, dict(env, SMILY_INDEX_TARGETS=",".join(targets), SMILY_METRICS_PORT=str(metrics)))
    return _wait_gateway(f"{dial_host(settings.server.bind_host)}:{settings.gateway.gateway_port}")


def _spawn(name: str, service: str, env: dict) -> None:
    with open(os.path.join(LOG_DIR, f"{name}.log"), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smily.cli", "serve", service],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _write_pid(name, proc.pid)


def _wait_gateway(target: str) -> str:
    """'' once the gateway at target answers a call through every shard, else why not."""
    import grpc

    from smily.client import Client
    from smily.gateway.v1 import gateway_pb2

    client = Client(target, timeout=2, tls_ca="", token="")
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            dead = [name for name in _pid_names() if not _alive(name)]
            if dead:
                return f"{', '.join(dead)} exited"
            try:
                client.stub.ListSlides(gateway_pb2.ListSlidesRequest(page_size=1), timeout=1)
                return ""
            except grpc.RpcError:
                time.sleep(0.5)
    finally:
        client.close()
    return f"the gateway on {target} (SMILY_GATEWAY_PORT) did not answer within {READY_TIMEOUT_S} s"
