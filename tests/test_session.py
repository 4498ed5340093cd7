"""The README's walk-through (docs/examples/session.sh) against a stack started as
`make up` starts it, on ports other than the defaults, from a fresh index."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from smily.localstack import free_port
from smily.synthetic import write_samples

from .conftest import MODELS, ROOT

SMILY = os.path.join(os.path.dirname(sys.executable), "smily")
SCRIPT = os.path.join(ROOT, "docs", "examples", "session.sh")
CURL_SCRIPT = os.path.join(ROOT, "docs", "examples", "curl-session.sh")


def _free_block(n: int, taken: set[int]) -> int:
    """The first of n consecutive free loopback ports, none of them already taken."""
    while True:
        base = free_port()
        block = range(base, base + n)
        if taken.isdisjoint(block) and all(_bindable(p) for p in block[1:]):
            return base


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(port: int) -> bool:
    """Whether anything still accepts on the port. A plain bind would also fail on the
    TIME_WAIT sockets a stopped server leaves behind, which is what failed in CI."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture()
def stack_env(tmp_path, model_repo):
    """The environment of a `make up` with every port moved; cwd (var/run, var/log) in tmp_path."""
    slides = tmp_path / "slides"
    write_samples(str(slides))
    # Metrics and the local index replicas take consecutive ports from theirs: a block each.
    taken: set[int] = set()
    blocks = {"SMILY_METRICS_PORT": 3, "SMILY_LOCAL_INDEX_PORT": 3}
    ports = {}
    for v in (
        "SMILY_GATEWAY_PORT",
        "SMILY_TILER_PORT",
        "SMILY_EMBEDDER_PORT",
        "SMILY_INDEX_PORT",
        "SMILY_METRICS_PORT",
        "SMILY_HTTP_PORT",
        "SMILY_LOCAL_REDIS_PORT",
        "SMILY_LOCAL_PG_PORT",
        "SMILY_LOCAL_INDEX_PORT",
    ):
        base = _free_block(blocks.get(v, 1), taken)
        taken.update(range(base, base + blocks.get(v, 1)))
        ports[v] = str(base)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMILY_")}
    env.update(
        ports,
        SMILY_SLIDE_ROOTS=str(slides),
        SMILY_INDEX_DIR=str(tmp_path / "index"),
        SMILY_MODEL_REPOSITORY=MODELS,
        SMILY=SMILY,
    )
    return env


def run(args, env, cwd, timeout=300):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_readme_session_runs_top_to_bottom(stack_env, tmp_path):
    up = run([SMILY, "up"], stack_env, tmp_path)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        gateway = f"127.0.0.1:{stack_env['SMILY_GATEWAY_PORT']}"
        assert f"gateway {gateway}" in up.stdout and f":{stack_env['SMILY_LOCAL_REDIS_PORT']}" in up.stdout
        assert f":{stack_env['SMILY_METRICS_PORT']}/metrics" in up.stdout
        # The generated Redis password: in a file only its owner reads, never on the terminal.
        secret = tmp_path / "var" / "run" / "redis-password"
        assert oct(secret.stat().st_mode & 0o777) == "0o600" and "password in var/run/redis-password" in up.stdout
        assert secret.read_text().strip() not in up.stdout + up.stderr

        session = run(["bash", SCRIPT], stack_env, ROOT, timeout=600)
        assert session.returncode == 0, session.stdout[-3000:] + session.stderr[-3000:]
        out = session.stdout
        assert "ingested case-0" in out and "ingested case-1-40x" in out and "training accuracy" in out
        objects = _json_objects(out)
        # --filter organ=breast --exclude-query-case: only case-0 is left.
        filtered = next(
            o
            for o in objects
            if "hits" in o and o.get("next_page_token") is not None and {h["slide_id"] for h in o["hits"]} == {"case-0"}
        )
        assert filtered["model_id"] and filtered["hits"]
        # The big ingest was followed by its id and cancelled: nothing of it committed.
        final = objects[-1]
        assert final["slide_id"] == "big" and final["state"] == "OPERATION_STATE_CANCELLED"
        assert final["cancel_requested"] is True

        # docs/integration.md's curl session, on the HTTP API of the same stack; it deletes its slides.
        curl = run(["bash", CURL_SCRIPT], stack_env, ROOT, timeout=600)
        assert curl.returncode == 0, curl.stdout[-3000:] + curl.stderr[-3000:]
        calls = _json_objects(curl.stdout)
        assert calls[0]["operation"]["state"] == "OPERATION_STATE_SUCCEEDED"  # polled by the id ingest returned
        assert {s["slideId"] for s in calls[2]["slides"]} >= {"S-0001", "S-0002"}  # camelCase, as documented
        assert calls[4]["hits"][0]["slideId"] == "S-0001"
        assert "HTTP/1.1 404" in curl.stdout and '"code":"NOT_FOUND"' in curl.stdout

        slides = json.loads(run([SMILY, "slides", "--json"], stack_env, tmp_path).stdout)["slides"]
        assert {s["slide_id"] for s in slides} == {"case-1", "case-1-40x"}
    finally:
        down = run([SMILY, "down"], stack_env, tmp_path)
    assert down.returncode == 0 and "stopped http, smily and redis" in down.stdout, down.stdout + down.stderr
    assert not os.listdir(tmp_path / "var" / "run")
    assert not _listening(int(stack_env["SMILY_GATEWAY_PORT"]))


def test_up_names_a_taken_port_and_starts_nothing(stack_env, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(stack_env["SMILY_METRICS_PORT"])))
        taken.listen()
        up = run([SMILY, "up"], stack_env, tmp_path)
    assert up.returncode == 1
    assert f"port {stack_env['SMILY_METRICS_PORT']} (SMILY_METRICS_PORT) already in use" in up.stdout
    assert not os.listdir(tmp_path / "var" / "run")


def test_up_cluster_names_a_taken_port_and_starts_nothing(stack_env, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(stack_env["SMILY_LOCAL_PG_PORT"])))
        taken.listen()
        up = run([SMILY, "up", "--shards", "1", "--replicas", "1"], stack_env, tmp_path)
    assert up.returncode == 1
    assert f"port {stack_env['SMILY_LOCAL_PG_PORT']} (SMILY_LOCAL_PG_PORT) already in use" in up.stdout
    assert not os.listdir(tmp_path / "var" / "run")


@pytest.fixture()
def cluster_dir():
    """The working directory of `make up-cluster` (var/pg, var/run, var/log): one that
    PostgreSQL's unprivileged user can reach when the tests run as root."""
    d = tempfile.mkdtemp(prefix="smily-cluster-")
    os.chmod(d, 0o755)
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_up_cluster_runs_on_the_port_variables(stack_env, cluster_dir):
    """Every port moved: PostgreSQL, the replicas, the services, metrics; the CLI finds the gateway."""
    up = run([SMILY, "up", "--shards", "1", "--replicas", "2"], stack_env, cluster_dir, timeout=400)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        gateway = f"127.0.0.1:{stack_env['SMILY_GATEWAY_PORT']}"
        assert f"gateway {gateway}" in up.stdout and f"127.0.0.1:{stack_env['SMILY_LOCAL_PG_PORT']}" in up.stdout
        assert run([SMILY, "slides"], stack_env, cluster_dir).stdout.strip() == "0 slides"
        first = int(stack_env["SMILY_LOCAL_INDEX_PORT"])
        for port in (first, first + 1, int(stack_env["SMILY_METRICS_PORT"])):
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) == 0, port
    finally:
        down = run([SMILY, "down"], stack_env, cluster_dir)
    assert down.returncode == 0 and "postgres" in down.stdout, down.stdout
    assert not os.listdir(cluster_dir / "var" / "run")


def test_up_cluster_stops_what_it_started_when_a_start_fails(stack_env, cluster_dir):
    """The gateway refuses its settings (OIDC without an issuer): nothing is left running."""
    env = dict(stack_env, SMILY_AUTH="oidc")
    up = run([SMILY, "up", "--shards", "1", "--replicas", "1"], env, cluster_dir, timeout=400)
    assert up.returncode == 1 and "gateway exited" in up.stdout and "Stopped what was started" in up.stdout
    assert not os.listdir(cluster_dir / "var" / "run")
    assert not _listening(int(stack_env["SMILY_LOCAL_PG_PORT"]))  # PostgreSQL is gone
    with open(cluster_dir / "var" / "log" / "gateway.log") as fh:
        log = fh.read()
    assert "SMILY_OIDC_ISSUER" in log and "Traceback" not in log


def _json_objects(text: str) -> list[dict]:
    """The JSON objects printed one after another among plain lines."""
    decoder, objects, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) >= 0:
        if text.startswith("{\n", i):
            obj, i = decoder.raw_decode(text, i)
            objects.append(obj)
        else:
            i += 1
    return objects
