"""Move slides between shards of the PostgreSQL store when the shard count changes.

A slide whose rendezvous shard differs under the new count moves in two
commits, so searches keep finding it exactly once while it moves:

1. copy: inserted into its new shard as that shard's next commit (new tile
   ids), in one transaction; the old shard still holds it;
2. wait (bounded) until every live replica of the new shard reports serving
   that commit (replicas record how far they serve in the shard's `replicas`
   table);
3. drop: deleted from the old shard as its next commit.

Between 1 and 3 two shards hold the slide; the gateway de-duplicates hits by
tile identity, so a search sees it once, and it is never on no shard.
Slides move in batches (one wait per batch). An interrupted run leaves some
slides on both shards: run it again, it copies them afresh and drops the old
copy.
"""

from __future__ import annotations

import logging
import time

import psycopg

from smily.common.placement import shard_of

from .pg_store import PgStorage, schema

log = logging.getLogger("smily.index")

TILE_COPY = "slide_id, generation, x, y, w, h, mpp, tissue, staged_at, vector, model_id"
SLIDE_COPY = "slide_id, source, metadata, generation, tile_count, indexed_at, slide_mpp"
# Slides copied before each wait for the new shards' replicas.
BATCH = 64
# A replica that reported within this long is live, and is waited for at most this long per batch.
LIVE_S, WAIT_S = 30.0, 120.0


def reshard(url: str, old: int, new: int, batch: int = BATCH) -> int:
    """Place every slide of shards 0..old-1 by `new` shards; returns how many slides moved."""
    for n in range(max(old, new)):
        PgStorage(url, n).close()  # creates the schemas that do not exist yet
    moves = []
    with psycopg.connect(url, autocommit=True) as conn:
        for src in range(old):
            for (slide_id,) in conn.execute(f"SELECT slide_id FROM {schema(src)}.slides ORDER BY slide_id"):
                dst = shard_of(slide_id, new)
                if dst != src:
                    moves.append((slide_id, src, dst))
        for i in range(0, len(moves), batch):
            part = moves[i : i + batch]
            reached: dict[int, int] = {}
            for slide_id, src, dst in part:
                reached[dst] = max(reached.get(dst, 0), _copy(conn, slide_id, src, dst))
            for dst, seq in reached.items():
                _wait_served(conn, dst, seq)
            for slide_id, src, _ in part:
                _drop(conn, slide_id, src)
    log.info("index resharded", extra={"from": old, "to": new, "moved": len(moves)})
    return len(moves)


def _next_seq(conn, s: str, slide_id: str) -> int:
    seq = conn.execute(f"UPDATE {s}.seq SET value = value + 1 RETURNING value").fetchone()[0]
    conn.execute(f"INSERT INTO {s}.commits VALUES (%s, %s)", (seq, slide_id))
    return seq


def _copy(conn, slide_id: str, src: int, dst: int) -> int:
    """The slide as the new shard's next commit; returns that commit's sequence."""
    a, b = schema(src), schema(dst)
    with conn.transaction():
        for s in sorted((a, b)):  # both shards' commit locks, always in the same order
            conn.execute(f"SELECT value FROM {s}.seq FOR UPDATE")
        conn.execute(f"INSERT INTO {b}.meta SELECT * FROM {a}.meta ON CONFLICT DO NOTHING")
        seq = _next_seq(conn, b, slide_id)
        conn.execute(f"DELETE FROM {b}.tiles WHERE slide_id = %s", (slide_id,))
        conn.execute(
            f"INSERT INTO {b}.tiles ({TILE_COPY}, committed) SELECT {TILE_COPY}, %s FROM {a}.tiles "
            "WHERE slide_id = %s AND committed > 0 ORDER BY id",
            (seq, slide_id),
        )
        conn.execute(f"DELETE FROM {b}.slides WHERE slide_id = %s", (slide_id,))
        conn.execute(
            f"INSERT INTO {b}.slides ({SLIDE_COPY}) SELECT {SLIDE_COPY} FROM {a}.slides WHERE slide_id = %s",
            (slide_id,),
        )
    return seq


def _wait_served(conn, shard: int, seq: int) -> None:
    """Bounded wait for every live replica of `shard` to serve commit `seq`."""
    deadline = time.monotonic() + WAIT_S
    while True:
        behind = conn.execute(
            f"SELECT COUNT(*) FROM {schema(shard)}.replicas WHERE seq < %s "
            "AND seen_at > EXTRACT(EPOCH FROM now()) - %s",
            (seq, LIVE_S),
        ).fetchone()[0]
        if not behind:
            return
        if time.monotonic() > deadline:
            log.warning(
                "replicas of a shard did not catch up in time; moving on", extra={"shard": shard, "behind": behind}
            )
            return
        time.sleep(0.1)


def _drop(conn, slide_id: str, src: int) -> None:
    """The slide deleted from its old shard, as that shard's next commit."""
    a = schema(src)
    with conn.transaction():
        conn.execute(f"SELECT value FROM {a}.seq FOR UPDATE")
        seq = _next_seq(conn, a, slide_id)
        conn.execute(
            f"INSERT INTO {a}.removed SELECT %s, id FROM {a}.tiles WHERE slide_id = %s AND committed > 0",
            (seq, slide_id),
        )
        conn.execute(f"DELETE FROM {a}.tiles WHERE slide_id = %s", (slide_id,))
        conn.execute(f"DELETE FROM {a}.slides WHERE slide_id = %s", (slide_id,))
