"""Gateway operation records, kept in the system of record so any gateway answers for them.

A record is opaque here: the gateway signs it (and the cancel mark) with a
key the index never sees, so a writer to this table cannot forge either.
Kept apart from the tile store, as concepts are, so that an ingest's
progress writes never wait on the tile store's lock: SQLite in its own file
on one machine, a table in the first shard's schema on PostgreSQL
(pg_store.PgOperations). Records expire; expired ones are never read, and
are deleted at most once per PURGE_S by the next write.
"""

from __future__ import annotations

import os
import time

from .journal import Sql
from .sqlite_store import OnFile

# Expired records are deleted by a write at most this often.
PURGE_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS operations (
  operation_id TEXT PRIMARY KEY, record BLOB NOT NULL, cancel BLOB NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS operations_by_expiry ON operations (expires_at);
"""


class OperationTable(Sql):
    """The operations table, in either store's dialect."""

    _purged_at = 0.0  # this process's last purge

    def put(self, operation_id: str, record: bytes, cancel: bytes, keep_s: float) -> None:
        """Keep a record (non-empty: replaces the one kept) and a cancel mark (non-empty: set)
        until keep_s from now."""
        now = time.time()
        expires = now + keep_s
        with self._writing():
            if record:
                self._x(
                    "INSERT INTO {s}operations VALUES (?, ?, ?, ?) ON CONFLICT (operation_id) "
                    "DO UPDATE SET record = excluded.record, expires_at = excluded.expires_at",
                    (operation_id, record, b"", expires),
                )
            if cancel:
                self._x(
                    "INSERT INTO {s}operations VALUES (?, ?, ?, ?) ON CONFLICT (operation_id) "
                    "DO UPDATE SET cancel = excluded.cancel, expires_at = excluded.expires_at",
                    (operation_id, b"", cancel, expires),
                )
            if self._purge_due(now):
                self._x("DELETE FROM {s}operations WHERE expires_at < ?", (now,))

    def get(self, operation_id: str) -> tuple[bytes, bytes] | None:
        """(record, cancel mark) of an operation; None when none is kept (or it expired)."""
        with self._session():
            row = self._x(
                "SELECT record, cancel FROM {s}operations WHERE operation_id = ? AND expires_at >= ?",
                (operation_id, time.time()),
            ).fetchone()
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    def _purge_due(self, now: float) -> bool:
        """Inside _writing (which serialises the writers)."""
        if now - self._purged_at < PURGE_S:
            return False
        self._purged_at = now
        return True


class OperationStore(OnFile, OperationTable):
    """Operation records in their own SQLite file in `directory`."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        super().__init__(os.path.join(directory, "operations.sqlite3"), SCHEMA)
