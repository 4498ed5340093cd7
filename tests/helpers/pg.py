"""A real PostgreSQL for the tests: initdb in a private folder, on a free loopback port."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import uuid

import pytest

from smily.localpg import LocalPostgres
from smily.localstack import free_port


@pytest.fixture(scope="module")
def postgres():
    folder = tempfile.mkdtemp(prefix="smily-pg-")
    # A free port can be taken by another process before PostgreSQL binds it: another port then.
    for attempt in range(3):
        try:
            server = LocalPostgres(folder, free_port()).start()
            break
        except RuntimeError as exc:  # not installed: say how, never skip
            if attempt == 2:
                log = os.path.join(folder, "postgres.log")
                tail = pathlib.Path(log).read_text(errors="replace")[-1500:] if os.path.exists(log) else ""
                shutil.rmtree(folder, ignore_errors=True)
                pytest.fail(f"{exc}\n{tail}")
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
