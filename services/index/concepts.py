"""Concepts: named query directions per model, in their own SQLite file.

Kept apart from the tile store so that neither's schema or locking
constrains the other; every gateway replica reads the same rows.
A concept's examples are kept beside it, whatever the model, so that the
gateway can refit it for another model: regions as the gateway's Region
message (opaque here), uploaded patches by content (SHA-256), each stored once.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from smily.common import tenancy
from smily.common.errors import FailedPrecondition, InvalidArgument, NotFound

from .journal import Sql
from .sqlite_store import OnFile

NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_DIM = 65536
# A concept's stored examples in all: the gateway's own bounds on a request's examples keep well under it.
MAX_CONCEPT_EXAMPLE_BYTES = 64 << 20

SCHEMA = """
CREATE TABLE IF NOT EXISTS concepts (
  name TEXT NOT NULL, model_id TEXT NOT NULL, vector BLOB NOT NULL,
  with_examples INTEGER NOT NULL, without_examples INTEGER NOT NULL,
  train_accuracy REAL NOT NULL, created_at REAL NOT NULL,
  PRIMARY KEY (name, model_id));
CREATE TABLE IF NOT EXISTS concept_examples (
  name TEXT NOT NULL, position INTEGER NOT NULL, positive INTEGER NOT NULL,
  region BLOB, image_sha256 TEXT, PRIMARY KEY (name, position));
CREATE TABLE IF NOT EXISTS concept_patches (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL);
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
    # Stored examples: None leaves them as they are (put) or unread (get).
    examples: list[Example] | None = None


@dataclass
class Example:
    positive: bool
    region: bytes | None = None  # the gateway's Region message, serialised
    image: bytes | None = None


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
        with self._writing():
            if c.examples is not None:
                self._put_examples(c.name, c.examples)
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

    def _put_examples(self, name: str, examples: list[Example]) -> None:
        """Inside _writing: the concept's examples replaced; each patch stored once by its content."""
        self._x("DELETE FROM {s}concept_examples WHERE name = ?", (name,))
        rows = []
        for i, e in enumerate(examples):
            sha = None
            if e.image is not None:
                sha = hashlib.sha256(e.image).hexdigest()
                self._x("INSERT INTO {s}concept_patches VALUES (?, ?) ON CONFLICT (sha256) DO NOTHING", (sha, e.image))
            rows.append((name, i, int(e.positive), e.region, sha))
        self._x_many("INSERT INTO {s}concept_examples VALUES (?, ?, ?, ?, ?)", rows)
        self._drop_unused_patches()

    def _drop_unused_patches(self) -> None:
        self._x(
            "DELETE FROM {s}concept_patches WHERE sha256 NOT IN "
            "(SELECT image_sha256 FROM {s}concept_examples WHERE image_sha256 IS NOT NULL)"
        )

    def get(self, name: str, model_id: str, with_examples: bool = False) -> Concept:
        """The concept fitted for the model; FailedPrecondition when it is held for other models only."""
        with self._session():
            row = self._x(
                "SELECT name, model_id, vector, with_examples, without_examples, train_accuracy, created_at "
                "FROM {s}concepts WHERE name = ? AND model_id = ?",
                (name, model_id),
            ).fetchone()
            others = [] if row else [r[0] for r in self._x("SELECT model_id FROM {s}concepts WHERE name = ?", (name,))]
            examples = (
                [
                    Example(bool(r[0]), None if r[1] is None else bytes(r[1]), None if r[2] is None else bytes(r[2]))
                    for r in self._x(
                        "SELECT e.positive, e.region, p.data FROM {s}concept_examples e LEFT JOIN {s}concept_patches p "
                        "ON p.sha256 = e.image_sha256 WHERE e.name = ? ORDER BY e.position",
                        (name,),
                    )
                ]
                if with_examples and row
                else None
            )
        if others:
            raise FailedPrecondition(
                f"concept {tenancy.split(name)[1]!r} is fitted for model {', '.join(sorted(others))}, not {model_id}: "
                "its examples could not be re-read at the cutover; create it again"
            )
        if not row:
            raise NotFound(f"no concept {tenancy.split(name)[1]!r} for model {model_id}")
        vector = np.frombuffer(bytes(row[2]), np.float32)
        return Concept(row[0], row[1], vector, row[3], row[4], row[5], row[6], examples)

    def adopt_untenanted(self, default_tenant: str) -> None:
        """Concepts named before tenancy become the default tenant's (names hold no "/" otherwise)."""
        with self._session():
            self._x(
                "UPDATE {s}concepts SET name = ? || name WHERE name NOT LIKE ?",
                (default_tenant + tenancy.SEP, f"%{tenancy.SEP}%"),
            )

    def list(self, model_id: str, tenant: str | None) -> list[Concept]:
        """The tenant's concepts (names are keys: tenancy.key(tenant, name)); every tenant's with None."""
        within, args = "", [model_id]
        if tenant is not None:
            within, args = " AND name{text_order} >= ? AND name{text_order} < ?", [model_id, *tenancy.key_range(tenant)]
        with self._session():
            rows = self._x(
                "SELECT name, model_id, with_examples, without_examples, train_accuracy, created_at "
                "FROM {s}concepts WHERE model_id = ?" + within + " ORDER BY name{text_order}",
                args,
            ).fetchall()
        return [Concept(r[0], r[1], None, *r[2:]) for r in rows]

    def delete(self, name: str, model_id: str) -> None:
        """The concept gone, its fits for every model and its examples with it; NotFound when it has
        no fit for `model_id`."""
        with self._writing():
            if not self._x("SELECT 1 FROM {s}concepts WHERE name = ? AND model_id = ?", (name, model_id)).fetchone():
                raise NotFound(f"no concept {tenancy.split(name)[1]!r} for model {model_id}")
            self._x("DELETE FROM {s}concepts WHERE name = ?", (name,))
            self._x("DELETE FROM {s}concept_examples WHERE name = ?", (name,))
            self._drop_unused_patches()


class ConceptStore(OnFile, ConceptTable):
    """Concepts in their own SQLite file in `directory`."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        super().__init__(os.path.join(directory, "concepts.sqlite3"), SCHEMA)
