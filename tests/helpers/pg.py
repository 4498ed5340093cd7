"""A real PostgreSQL for the tests: initdb in a private folder, on a free loopback port."""

from __future__ import annotations

import shutil
import tempfile
import uuid

import pytest

from smily.localpg import LocalPostgres
from smily.localstack import free_port


@pytest.fixture(scope="module")
def postgres():
    folder = tempfile.mkdtemp(prefix="smily-pg-")
    try:
        server = LocalPostgres(folder, free_port()).start()
    except RuntimeError as exc:  # not installed: say how, never skip
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(str(exc))
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def fresh_database(server: LocalPostgres) -> str:
    """A new empty database on `server`; its URL."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.url.rsplit("/", 1)[0] + "/" + name
