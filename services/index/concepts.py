"""Concepts: named query directions per model, in their own SQLite file.

Kept apart from the tile store so that neither's schema or locking
constrains the other; every gateway replica reads the same rows.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import numpy as np

from smily.common import tenancy
from smily.common.errors import InvalidArgument, NotFound

from .journal import Sql
from .sqlite_store import OnFile

NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_DIM = 65536

SCHEMA = """
CREATE TABLE IF NOT EXISTS concepts (
  name TEXT NOT NULL, model_id TEXT NOT NULL, vector BLOB NOT NULL,
  with_examples INTEGER NOT NULL, without_examples INTEGER NOT NULL,
  train_accuracy REAL NOT NULL, created_at REAL NOT NULL,
  PRIMARY KEY (name, model_id));
"""


@dataclass
class Concept:
    name: str
    model_id: str
    vector: np.ndarray | None
    with_examples: int = 0
    without_examples: int = 0
    train_accuracy: float = 0.0
    created_at: float = 0.0


def check_name(name: str) -> None:
    if not NAME.match(name or ""):
        raise InvalidArgument("a concept name is 1..64 of letters, digits, '.', '_' and '-'")


def normalised(c: Concept) -> Concept:
    """The concept checked, its vector made unit length and its time set; InvalidArgument if unfit.
    Its name is the per-tenant key, tenancy.key(tenant, name)."""
    check_name(tenancy.split(c.name)[1])
    if not c.model_id:
        raise InvalidArgument("model_id is required")
    v = np.asarray(c.vector, np.float32).reshape(-1)
    norm = float(np.linalg.norm(v))
    if not 0 < len(v) <= MAX_DIM or not np.isfinite(v).all() or norm == 0:
        raise InvalidArgument("a concept vector must be non-zero and finite")
    c.vector, c.created_at = v / norm, time.time()
    return c


def vector_bytes(c: Concept) -> bytes:
    """A normalised concept's vector as stored."""
    assert c.vector is not None, "normalised() sets it"
    return c.vector.tobytes()


class ConceptTable(Sql):
    """The concepts table, in either store's dialect."""

    def put(self, c: Concept) -> Concept:
        c = normalised(c)
        with self._session():
            self._x(
                "INSERT INTO {s}concepts VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name, model_id) DO UPDATE "
                "SET vector = excluded.vector, with_examples = excluded.with_examples, "
                "without_examples = excluded.without_examples, train_accuracy = excluded.train_accuracy, "
                "created_at = excluded.created_at",
                (
                    c.name,
                    c.model_id,
                    vector_bytes(c),
                    c.with_examples,
                    c.without_examples,
                    c.train_accuracy,
                    c.created_at,
                ),
            )
        return c

    def get(self, name: str, model_id: str) -> Concept:
        with self._session():
            row = self._x(
                "SELECT name, model_id, vector, with_examples, without_examples, train_accuracy, created_at "
                "FROM {s}concepts WHERE name = ? AND model_id = ?",
                (name, model_id),
            ).fetchone()
        if not row:
            raise NotFound(f"no concept {tenancy.split(name)[1]!r} for model {model_id}")
        return Concept(row[0], row[1], np.frombuffer(bytes(row[2]), np.float32), *row[3:])

    def adopt_untenanted(self, default_tenant: str) -> None:
        """Concepts named before tenancy become the default tenant's (names hold no "/" otherwise)."""
        with self._session():
            self._x(
                "UPDATE {s}concepts SET name = ? || name WHERE name NOT LIKE ?",
                (default_tenant + tenancy.SEP, f"%{tenancy.SEP}%"),
            )

    def list(self, model_id: str, tenant: str) -> list[Concept]:
        """The tenant's concepts (names are keys: tenancy.key(tenant, name))."""
        lo, hi = tenancy.key_range(tenant)
        with self._session():
            rows = self._x(
                "SELECT name, model_id, with_examples, without_examples, train_accuracy, created_at "
                "FROM {s}concepts WHERE model_id = ? AND name{text_order} >= ? AND name{text_order} < ? "
                "ORDER BY name{text_order}",
                (model_id, lo, hi),
            ).fetchall()
        return [Concept(r[0], r[1], None, *r[2:]) for r in rows]

    def delete(self, name: str, model_id: str) -> None:
        with self._session():
            if not self._x("DELETE FROM {s}concepts WHERE name = ? AND model_id = ?", (name, model_id)).rowcount:
                raise NotFound(f"no concept {tenancy.split(name)[1]!r} for model {model_id}")


class ConceptStore(OnFile, ConceptTable):
    """Concepts in their own SQLite file in `directory`."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        super().__init__(os.path.join(directory, "concepts.sqlite3"), SCHEMA)
