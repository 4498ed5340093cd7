"""A private PostgreSQL on loopback for `smily up --shards` and the tests.

Debian's postgresql-15 server binaries are used from /usr/lib/postgresql;
`initdb` runs once in the given folder (trust authentication, loopback
only). PostgreSQL refuses to run as root, so as root the folder is handed to
the `nobody` user and the server runs as that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import time

INSTALL = "apt-get install -y postgresql-15"
USER = "smily"


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    path = found[-1] if found else shutil.which(name)
    if not path:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: {INSTALL}")
    return path


class LocalPostgres:
    """One postgres server on 127.0.0.1:`port` with its data in `directory`."""

    def __init__(self, directory: str, port: int, log_path: str | None = None):
        self.directory, self.port = os.path.abspath(directory), port
        self.data = os.path.join(self.directory, "data")
        self.log_path = log_path or os.path.join(self.directory, "postgres.log")
        self.proc: subprocess.Popen | None = None
        # Root may not run postgres: hand the folder to an unprivileged user.
        self._user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def _as_user(self) -> dict:
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []} if self._user else {}

    def _own(self) -> None:
        if self._user:
            for root, dirs, files in os.walk(self.directory):
                for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                    os.chown(name, self._user.pw_uid, self._user.pw_gid)

    def start(self, timeout: float = 60) -> LocalPostgres:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._own()
        if not os.path.exists(os.path.join(self.data, "PG_VERSION")):
            subprocess.run(
                [_binary("initdb"), "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8", "--no-instructions"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                **self._as_user(),
            )
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    _binary("postgres"),
                    "-D",
                    self.data,
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self.directory}",
                    "-c",
                    "max_connections=200",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._as_user(),
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import psycopg

        assert self.proc is not None, "start() starts it"
        proc, deadline = self.proc, time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start; see {self.log_path}") from None
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGINT) -> None:
        """SIGINT: a fast shutdown; SIGKILL: a crash (the next start recovers from the WAL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)
        self.proc = None
