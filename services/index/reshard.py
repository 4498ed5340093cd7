"""Move slides between shards of the PostgreSQL store when the shard count changes.

Each slide whose rendezvous shard differs under the new count is moved in one
transaction: inserted into its new shard as that shard's next commit (new
tile ids) and deleted from the old one as its next commit, so the replicas of
both shards follow the move by sequence like any other commit and no slide is
ever lost or held twice by the store.
"""
from __future__ import annotations

import logging

import psycopg

from smily.common.placement import shard_of

from .pg_store import PgStorage, schema

log = logging.getLogger("smily.index")

TILE_COPY = "slide_id, generation, x, y, w, h, mpp, tissue, staged_at, vector"
SLIDE_COPY = "slide_id, source, metadata, generation, tile_count, indexed_at, slide_mpp"


def reshard(url: str, old: int, new: int) -> int:
    """Place every slide of shards 0..old-1 by `new` shards; returns how many slides moved."""
    for n in range(max(old, new)):
        PgStorage(url, n).close()  # creates the schemas that do not exist yet
    moved = 0
    with psycopg.connect(url, autocommit=True) as conn:
        for src in range(old):
            ids = [r[0] for r in conn.execute(f"SELECT slide_id FROM {schema(src)}.slides ORDER BY slide_id")]
            for slide_id in ids:
                dst = shard_of(slide_id, new)
                if dst != src:
                    _move(conn, slide_id, src, dst)
                    moved += 1
    log.info("index resharded", extra={"from": old, "to": new, "moved": moved})
    return moved


def _next_seq(conn, s: str, slide_id: str) -> int:
    seq = conn.execute(f"UPDATE {s}.seq SET value = value + 1 RETURNING value").fetchone()[0]
    conn.execute(f"INSERT INTO {s}.commits VALUES (%s, %s)", (seq, slide_id))
    return seq


def _move(conn, slide_id: str, src: int, dst: int) -> None:
    a, b = schema(src), schema(dst)
    with conn.transaction():
        for s in sorted((a, b)):  # both shards' commit locks, always in the same order
            conn.execute(f"SELECT value FROM {s}.seq FOR UPDATE")
        conn.execute(f"INSERT INTO {b}.meta SELECT * FROM {a}.meta ON CONFLICT DO NOTHING")
        dseq = _next_seq(conn, b, slide_id)
        conn.execute(f"DELETE FROM {b}.tiles WHERE slide_id = %s", (slide_id,))
        conn.execute(f"INSERT INTO {b}.tiles ({TILE_COPY}, committed) SELECT {TILE_COPY}, %s FROM {a}.tiles "
                     "WHERE slide_id = %s AND committed > 0 ORDER BY id", (dseq, slide_id))
        conn.execute(f"INSERT INTO {b}.slides ({SLIDE_COPY}) SELECT {SLIDE_COPY} FROM {a}.slides WHERE slide_id = %s "
                     "ON CONFLICT (slide_id) DO NOTHING", (slide_id,))
        sseq = _next_seq(conn, a, slide_id)
        conn.execute(f"INSERT INTO {a}.removed SELECT %s, id FROM {a}.tiles WHERE slide_id = %s AND committed > 0",
                     (sseq, slide_id))
        conn.execute(f"DELETE FROM {a}.tiles WHERE slide_id = %s", (slide_id,))
        conn.execute(f"DELETE FROM {a}.slides WHERE slide_id = %s", (slide_id,))
