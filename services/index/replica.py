"""A serving replica of one shard whose system of record is PostgreSQL.

Writes go to PostgreSQL (pg_store), which acknowledges them: one transaction
per slide commit. The replica serves from a local copy: an SQLite mirror of
its shard plus the FAISS index over it (faiss_index.TileIndex), snapshotted
and checksummed on the pod's volume as a single index is. A follower thread
polls the shard's commit sequence and applies each changed slide to the
mirror and FAISS together, so searches go on from the local copy while the
database is down, and a restarted replica catches up from its snapshot
instead of rebuilding. Replicas are interchangeable: any one takes a write.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time

from smily.common import tiling as tilings
from smily.common.errors import FailedPrecondition, Unavailable
from smily.common.tiling import Tiling

from .faiss_index import IndexConfig, TileIndex, check_model, check_stage
from .pg_store import PgStorage
from .shard import Hit, IndexInfo, Query, TileBatch
from .sqlite_store import SqliteStorage
from .storage import MetadataMatch, Slide

log = logging.getLogger("smily.index")

# Commits read per step while catching up.
FOLLOW_BATCH = 256
# How often a replica tells the store how far it serves when nothing changes (reshard waits on it).
REPORT_S = 5.0
# How long a starting replica waits for its database (in a cluster, PostgreSQL may come up
# after the index pods: waiting beats exiting into kubelet's crash-loop back-off).
DATABASE_WAIT_S = 120.0


def _open_store(url: str, shard: int, wait_s: float = DATABASE_WAIT_S) -> PgStorage:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return PgStorage(url, shard)
        except Unavailable:
            if time.monotonic() >= deadline:
                raise
            log.warning("waiting for the index database", extra={"shard": shard})
            time.sleep(2.0)


class Replica:
    """A shard.ShardIndex: writes go to the database, reads to the local copy."""

    def __init__(self, directory: str, config: IndexConfig, url: str, shard: int, follow_interval_s: float = 0.2):
        self.store = _open_store(url, shard)
        self.store.adopt_untenanted(config.default_tenant)
        # The local copy the replica serves from: SQLite, mirrored from PostgreSQL.
        self._mirror = SqliteStorage(directory)
        self.local = TileIndex(directory, config, storage=self._mirror)
        self._follow_lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = follow_interval_s
        # Stable across restarts of this replica: the pod (host) and its volume.
        self.name = f"{socket.gethostname()}:{os.path.abspath(directory)}"
        self._reported = (-1, 0.0)
        self.catch_up()
        self._follower = threading.Thread(target=self._follow, name="index-follow", daemon=True)
        self._follower.start()

    @property
    def model_id(self) -> str:
        return self.local.model_id

    @property
    def dim(self) -> int:
        return self.local.dim

    # -- following the store --------------------------------------------------
    def _follow(self) -> None:
        down = False
        while not self._stop.wait(self._interval):
            try:
                self.catch_up()
                if down:
                    log.info("index database reachable again", extra={"journal_seq": self.local.info().journal_seq})
                down = False
            except Unavailable:
                if not down:
                    log.warning("index database unreachable; serving the local copy")
                down = True
            except Exception:
                log.exception("following the index database failed; retrying")

    def catch_up(self) -> int:
        """Apply every commit the store holds beyond the local copy; returns the sequence reached."""
        with self._follow_lock:
            while True:
                seq = self.local.info().journal_seq
                states = self.store.changes_after(seq, FOLLOW_BATCH)
                if not states:
                    self._report(seq)
                    return seq
                if not self.local.model_id:
                    self.local.bind(*self.store.binding())
                models = self.store.models()
                for model_id, dim in models.items():  # a migration's target, before its vectors arrive
                    self.local.hold(model_id, dim)
                if self.local.tiling is None and (recorded := Tiling.from_json(self.store.tiling())):
                    self.local.record_tiling(recorded)
                for st in states:
                    if st.event:
                        write = functools.partial(
                            self._mirror.mirror_event, st.seq, st.event, st.event_model, models.get(st.event_model, 0)
                        )
                    else:
                        write = functools.partial(
                            self._mirror.mirror, st.seq, st.slide_id, st.slide, st.generation, st.rows
                        )
                    self.local.apply(write)

    def _report(self, seq: int) -> None:
        last_seq, last_at = self._reported
        if seq != last_seq or time.monotonic() - last_at > REPORT_S:
            self.store.report_served(self.name, seq)
            self._reported = (seq, time.monotonic())

    # -- writes: acknowledged by the store ------------------------------------
    @property
    def tiling(self) -> Tiling | None:
        return self.local.tiling

    def stage(self, batch: TileBatch) -> int:
        check_stage(batch)
        model_id, dim = batch.model_id, batch.vectors.shape[1]
        check_model(self.store.models(), self.store.binding()[0], model_id, dim, batch.register_model)
        if batch.tiling is not None:
            tilings.check(Tiling.from_json(self.store.record_tiling(batch.tiling.to_json())), batch.tiling)
        serving, _ = self.store.bind(model_id, dim)
        if self.store.add_model(model_id, dim) != dim:
            check_model(self.store.models(), serving, model_id, dim)  # another writer added it with another dim
        return self.store.stage(batch.slide_id, batch.generation, batch.tiles, batch.vectors, model_id)

    def commit_slide(self, model_id: str, generation: str, slide: Slide, expected_tiles: int) -> tuple[Slide, int]:
        check_model(self.store.models(), self.store.binding()[0], model_id)
        commit = self.store.commit_slide(generation, slide, expected_tiles, model_id)
        self._serve(commit.seq)
        assert commit.slide is not None, "a commit publishes the slide"
        return commit.slide, len(commit.removed)

    def serve(self, model_id: str) -> int:
        commit = self.store.serve(model_id)
        self._serve(commit.seq)
        return commit.seq

    def drop_model(self, model_id: str) -> int:
        commit = self.store.drop_model(model_id)
        self._serve(commit.seq)
        return len(commit.removed)

    def models(self) -> dict[str, tuple[int, int]]:
        # A model added through another replica is journalled by no commit until its first vectors: hold
        # it from the store now, so that every replica names it at once (the gateway then writes every
        # ingest for it too). With the database down, the local copy's word.
        try:
            # (An unbound copy binds at its first commit, holding every model then.)
            if self.local.model_id and set(self.store.models()) - set(self.local.models()):
                with self._follow_lock:  # read and held in one step, so a drop that follows is applied after
                    for model_id, dim in self.store.models().items():
                        self.local.hold(model_id, dim)
        except Unavailable:
            pass
        return self.local.models()

    def missing_slides(self, model_id: str, limit: int) -> tuple[list[str], int]:
        return self.store.missing_slides(model_id, limit)

    def lease(self, owner: str, lease_s: float, record: str) -> tuple[bool, str, bool]:
        return self.store.lease(owner, lease_s, record)

    def delete_slide(self, slide_id: str) -> int:
        commit = self.store.delete_slide(slide_id)
        self._serve(commit.seq)
        return len(commit.removed)

    def _serve(self, seq: int) -> None:
        """Serve an acknowledged commit here before answering; the store holds it whatever happens."""
        try:
            self.catch_up()
        except Unavailable:
            log.warning("index database lost after a commit; the follower will apply it", extra={"seq": seq})

    # -- reads: the local copy ------------------------------------------------
    def search(self, query: Query) -> list[Hit]:
        return self.local.search(query)

    def get_slide(self, slide_id: str) -> Slide:
        return self.local.get_slide(slide_id)

    def list_slides(
        self, page_size: int, page_token: str, tenants=(), match: MetadataMatch | None = None, lacking: str = ""
    ) -> tuple[list[Slide], str]:
        return self.local.list_slides(page_size, page_token, tenants, match, lacking)

    def slide_tiles(self, slide_id: str, after: int, limit: int):
        return self.local.slide_tiles(slide_id, after, limit)

    def add_model(self, model_id: str, dim: int) -> None:
        serving, _ = self.store.binding()
        if not serving:
            raise FailedPrecondition("the index holds nothing yet: ingest slides, which bind it to their model")
        check_model(self.store.models(), serving, model_id, dim, register=True)
        if self.store.add_model(model_id, dim) != dim:
            check_model(self.store.models(), serving, model_id, dim)  # another writer added it with another dim
        self._serve(self.local.info().journal_seq)

    def counts(self, tenants=()) -> tuple[int, int]:
        return self.local.counts(tenants)

    def info(self) -> IndexInfo:
        return self.local.info()

    def close(self) -> None:
        self._stop.set()
        self._follower.join()
        self.local.close()
        self.store.close()
