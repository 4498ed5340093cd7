"""schemathesis, with every check, against `smily serve http` in front of a real
gateway stack: a request the OpenAPI document declares valid is accepted, an
answer matches the document, and nothing is a server error (issue 29).

Positive data only, by the fuzzing and stateful phases: the document states
strings more narrowly than the gateway accepts them (printable ASCII for any
printable text, which JSON Schema cannot say), so a "schema-violating" string
may rightly be accepted; and the coverage phase's boundary strings ignore the
hooks that make images real and page tokens the server's."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from smily import stack as local_stack

from .conftest import base_settings
from .helpers.httpproc import HttpProcess

HOOKS = os.path.join(os.path.dirname(__file__), "schemathesis_hooks.py")
SCHEMATHESIS = os.path.join(os.path.dirname(sys.executable), "schemathesis")
# Examples per operation and phase: about a minute for the 14 routes on 2 cores.
MAX_EXAMPLES = 25
# CI replays one seed, so that a red run is one anyone can replay; elsewhere each run
# explores afresh (SMILY_FUZZ_SEED replays a seed a run printed).
SEED = os.environ.get("SMILY_FUZZ_SEED") or ("20261203" if os.environ.get("CI") == "true" else "")


@pytest.fixture(scope="module")
def http(slide_dir, model_repo, tmp_path_factory):
    """Its own stack and index: fuzzed ingests, concepts and deletes must not touch other tests' state."""
    running, s = local_stack.start(
        local_stack.ORDER,
        base_settings(
            slide_roots=(slide_dir,),
            model_repository=model_repo,
            tiler_readers=1,
            index_dir=str(tmp_path_factory.mktemp("openapi-index")),
        ),
    )
    proc = HttpProcess(f"127.0.0.1:{s.gateway.gateway_port}", str(tmp_path_factory.mktemp("openapi-http") / "http.log"))
    yield proc
    proc.stop()
    local_stack.stop(running, 0)


def test_schemathesis_finds_nothing(http, tmp_path):
    if not os.path.isfile(SCHEMATHESIS):
        pytest.fail("schemathesis is missing: pip install -e '.[dev]'")
    run = subprocess.run(
        [
            SCHEMATHESIS,
            "run",
            f"{http.url}/openapi.json",
            "--checks",
            "all",
            "--mode",
            "positive",
            "--phases",
            "examples,fuzzing,stateful",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--no-color",
            *(["--seed", SEED] if SEED else []),
        ],
        cwd=tmp_path,  # anything it writes stays out of the source tree
        env=dict(os.environ, SCHEMATHESIS_HOOKS=HOOKS),
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(run.stdout[-20000:], run.stderr[-4000:])
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-4000:]
    assert "No issues found" in run.stdout or " passed" in run.stdout, run.stdout[-4000:]


def test_405_names_every_method_of_the_path(http):
    for method, path, allowed in (
        ("PUT", "/v1/slides/some-slide", {"GET", "HEAD", "DELETE"}),
        ("DELETE", "/v1/concepts", {"GET", "HEAD", "POST"}),
        ("GET", "/v1/search", {"POST"}),
        ("PATCH", "/v1/operations/some-op:cancel", {"POST"}),
    ):
        r = httpx.request(method, http.url + path, timeout=30)
        assert r.status_code == 405, (method, path, r.text)
        assert {m.strip() for m in r.headers["allow"].split(",")} == allowed, (method, path, r.headers)
        assert r.json()["code"] == "UNIMPLEMENTED"
