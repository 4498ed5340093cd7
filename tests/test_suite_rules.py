"""The suite's own rules, run on a throw-away test file under this project's pytest
configuration and conftest: what would let a test pass without testing fails instead."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]

TYPO = """
import pytest


@pytest.mark.no_such_marker
def test_a_typo_in_a_marker():
    pass
"""

CASES = """
import threading
import time

import pytest

from smily.client import Client
from smily.gateway.v1 import gateway_pb2
from tests.helpers.wait import wait_done, wait_until


def test_an_error_in_a_thread():
    t = threading.Thread(target=lambda: 1 / 0)
    t.start()
    t.join()


def test_an_operation_that_never_ends(monkeypatch):
    client = Client("127.0.0.1:9")  # never dialled: the gateway's answer is stubbed below
    running = gateway_pb2.Operation(operation_id="op-1", state=gateway_pb2.OPERATION_STATE_RUNNING)
    monkeypatch.setattr(client, "operation", lambda operation_id: running)
    wait_done(client, running, deadline_s=0.5, poll_s=0.05)


def test_a_condition_that_never_holds():
    wait_until("the moon turns blue", lambda: False, deadline_s=0.3)


@pytest.mark.timeout(3)
def test_a_hang():
    time.sleep(60)


@pytest.mark.xfail(reason="known bug")
def test_an_expected_failure():
    assert False


def test_a_skip():
    pytest.skip("no GPU")


@pytest.mark.unit
def test_a_unit_test_that_asks_for_a_server(redis_url):
    pass
"""


def test_what_would_pass_untested_fails_by_name(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the copied conftest imports tests.helpers
    pytester.makepyprojecttoml((ROOT / "pyproject.toml").read_text())
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text().replace("from .helpers", "from tests.helpers"))
    pytester.makepyfile(test_cases=CASES, test_typo=TYPO)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-rA", "--continue-on-collection-errors", "test_cases.py", "test_typo.py"
    )
    out = result.stdout.str()
    result.assert_outcomes(failed=6, errors=2)
    assert "ERROR test_typo.py" in out and "'no_such_marker' not found in `markers`" in out, out
    for outcome, test, reason in (
        ("FAILED", "test_an_error_in_a_thread", "PytestUnhandledThreadExceptionWarning"),
        (
            "FAILED",
            "test_an_operation_that_never_ends",
            "OperationTimeout: operation op-1 still OPERATION_STATE_RUNNING",
        ),
        ("FAILED", "test_a_condition_that_never_holds", "WaitTimeout: the moon turns blue: not within 0.3 s"),
        ("FAILED", "test_a_hang", "Timeout (>3.0s) from pytest-timeout"),
        ("FAILED", "test_an_expected_failure", "an expected failure (xfail), and this suite allows none: known bug"),
        ("FAILED", "test_a_skip", "this suite allows no skips: Skipped: no GPU"),
        ("ERROR", "test_a_unit_test_that_asks_for_a_server", "marked unit, but needs redis_url"),
    ):
        assert f"{outcome} test_cases.py::{test}" in out, (test, out)
        assert reason in out, (test, reason, out)
    assert "ZeroDivisionError" in out
