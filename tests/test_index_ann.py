"""Index types, in-search filters, compaction and snapshots of the store."""

from __future__ import annotations

import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from smily.common.errors import InvalidArgument
from smily.index import ann
from smily.index.faiss_index import IndexConfig, TileIndex
from smily.index.shard import Query, TileBatch
from smily.index.storage import Slide

from .test_index_store import MODEL, tiles

DIM = 16
# A bound on the waits for background training, not a speed check: on 2 busy shared cores
# training has taken over 2 minutes (pyproject's timeout bounds the whole test).
TRAIN_WAIT_S = 600


def clustered(n, seed):
    """Unit vectors around a few centres, so an IVF index has structure to find."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((8, DIM))
    v = centres[rng.integers(0, 8, n)] + 0.3 * rng.standard_normal((n, DIM))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def fill(
    store,
    slides=12,
    per=100,
    gen="g1",
    meta=lambda i: {"organ": "lung" if i % 3 else "skin", "site": str(i % 2)},
    wait=True,
):
    for i in range(slides):
        sid = f"s{i:02d}"
        store.stage(TileBatch(MODEL, sid, gen, clustered(per, i), tiles(per)))
        store.commit_slide(MODEL, gen, Slide(sid, f"{sid}.svs", meta(i)), per)
    if wait:  # crossing the threshold trains in the background
        assert store.wait_trained(TRAIN_WAIT_S)


def ivf_config(**kw):
    return IndexConfig(**{"ivf_threshold": 1000, "nprobe": 2, "snapshot_interval_s": 0, **kw})


def test_grows_from_exact_to_trained_ivf_and_keeps_exact_quality(tmp_path):
    exact = TileIndex(str(tmp_path / "exact"), IndexConfig(factory="Flat", snapshot_interval_s=0))
    store = TileIndex(str(tmp_path / "ivf"), ivf_config())
    fill(exact)
    fill(store, slides=9)
    assert store.info().factory == "Flat"
    fill(store, gen="g2")  # re-ingest replaces; crosses the 1000-tile threshold
    info = store.info()
    assert info.factory.startswith("IVF") and info.train_vectors == 1000 and info.nlist > 2
    assert store.counts() == exact.counts() == (1200, 12)
    recall = []
    for q in clustered(20, 1000):
        want = {(h.slide_id, h.tile.x) for h in exact.search(Query(MODEL, q, 10))}
        got = store.search(Query(MODEL, q, 10))
        assert len(got) == 10 and all(a.score >= b.score for a, b in zip(got, got[1:]))
        recall.append(len(want & {(h.slide_id, h.tile.x) for h in got}) / 10)
    assert np.mean(recall) >= 0.9  # PQ codes re-ranked with the exact vectors
    full = store.search(Query(MODEL, clustered(1, 5)[0], 10, nprobe=info.nlist))
    assert [round(h.score, 4) for h in full] == [
        round(h.score, 4) for h in exact.search(Query(MODEL, clustered(1, 5)[0], 10))
    ]
    with pytest.raises(InvalidArgument):
        store.search(Query(MODEL, clustered(1, 5)[0], 10, nprobe=-1))


@pytest.mark.parametrize("config", [IndexConfig(snapshot_interval_s=0), ivf_config()], ids=["flat", "ivf"])
def test_filters_run_inside_the_search(tmp_path, config):
    store = TileIndex(str(tmp_path), config)
    fill(store)
    q = clustered(1, 0)[0]
    skin = store.search(Query(MODEL, q, 50, filters={"organ": "skin"}))
    assert len(skin) == 50 and {h.slide_id for h in skin} <= {"s00", "s03", "s06", "s09"}
    both = store.search(Query(MODEL, q, 1000, filters={"organ": "lung", "site": "1"}))
    assert len(both) == 400 and {h.slide_id for h in both} == {"s01", "s05", "s07", "s11"}
    some = store.search(Query(MODEL, q, 150, slide_ids=["s02", "s04"], exclude_slide_ids=["s04"]))
    assert len(some) == 100 and {h.slide_id for h in some} == {"s02"}
    rest = store.search(Query(MODEL, q, 1000, exclude_slide_ids=["s00"]))
    assert len(rest) == 1000 and "s00" not in {h.slide_id for h in rest}
    assert store.search(Query(MODEL, q, 5, filters={"organ": "brain"})) == []
    # exclude_filters: any matching key=value drops the slide, alone or with other filters.
    lung = store.search(Query(MODEL, q, 1000, exclude_filters={"organ": "skin"}))
    assert len(lung) == 800 and {h.metadata["organ"] for h in lung} == {"lung"}
    odd = store.search(Query(MODEL, q, 1000, filters={"site": "1"}, exclude_filters={"organ": "skin", "x": "y"}))
    assert len(odd) == 400 and {h.slide_id for h in odd} == {"s01", "s05", "s07", "s11"}


def test_delete_compacts_and_survives_restart(tmp_path):
    store = TileIndex(str(tmp_path), ivf_config())
    fill(store)
    for i in range(3):
        store.delete_slide(f"s{i:02d}")
    assert store.info().removed_since_compaction == 0  # 300 removed > 25% of the 900 left: compacted
    store.delete_slide("s03")
    assert store.info().removed_since_compaction == 100
    assert store.counts() == (800, 8)
    assert {h.slide_id for h in store.search(Query(MODEL, clustered(1, 0)[0], 1000))}.isdisjoint(
        {"s00", "s01", "s02", "s03"}
    )
    store.close()
    again = TileIndex(str(tmp_path), ivf_config())
    assert again.counts() == (800, 8) and again.info().factory.startswith("IVF")


def test_snapshot_plus_journal_replay(tmp_path):
    store = TileIndex(str(tmp_path), ivf_config())
    fill(store)
    assert store.snapshot() and not store.snapshot()  # nothing new: no second snapshot
    seq = store.info().journal_seq
    store.delete_slide("s00")
    fill(store, slides=2, per=50, gen="g2")  # replaces s00 (re-added) and s01 after the snapshot
    store.stage(TileBatch(MODEL, "new", "g1", clustered(7, 77), tiles(7)))
    store.commit_slide(MODEL, "g1", Slide("new", "new.svs"), 7)
    expected = store.counts()
    q = clustered(1, 3)[0]
    hits = [(h.slide_id, h.tile.x, round(h.score, 5)) for h in store.search(Query(MODEL, q, 20))]
    store._stop.set()  # no snapshot at close: start-up must replay the journal
    with store._rw.write():
        store.storage.close()
    again = TileIndex(str(tmp_path), ivf_config())
    info = again.info()
    assert info.snapshot_seq == seq and f"snapshot at sequence {seq}" in info.load_report
    assert again.counts() == expected == (1107, 13)
    assert [(h.slide_id, h.tile.x, round(h.score, 5)) for h in again.search(Query(MODEL, q, 20))] == hits


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_snapshot_is_reported_and_rebuilt(tmp_path, damage):
    store = TileIndex(str(tmp_path), ivf_config())
    fill(store)
    store.close()
    snap = glob.glob(os.path.join(tmp_path, "snapshot-*.faiss"))[0]
    if damage == "truncate":
        with open(snap, "r+b") as f:
            f.truncate(os.path.getsize(snap) // 2)
    elif damage == "flip":
        with open(snap, "r+b") as f:
            f.seek(os.path.getsize(snap) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        with open(os.path.join(tmp_path, "manifest.json"), "w") as f:
            f.write('{"format": 1, "fi')
    again = TileIndex(str(tmp_path), ivf_config())
    report = again.info().load_report
    assert report.startswith("rebuilt from the journal: snapshot unusable")
    assert {"truncate": "truncated", "flip": "checksum", "manifest": "unreadable"}[damage] in report
    assert again.counts() == (1200, 12)


def test_training_runs_off_the_write_lock(tmp_path, monkeypatch):
    """While the IVF index trains, searches are served exactly and commits and deletes go
    through; after the swap the index holds every published tile exactly once."""
    started, release = threading.Event(), threading.Event()
    real_build = ann.build

    def held_build(factory, dim, train):
        if factory != ann.FLAT:  # hold training until the test has searched and written
            started.set()
            assert release.wait(TRAIN_WAIT_S)
        return real_build(factory, dim, train)

    monkeypatch.setattr(ann, "build", held_build)
    exact = TileIndex(str(tmp_path / "exact"), IndexConfig(factory="Flat", snapshot_interval_s=0))
    store = TileIndex(str(tmp_path / "ivf"), ivf_config())
    fill(exact)
    fill(store, slides=10, wait=False)  # 1,000 tiles: training starts
    assert started.wait(TRAIN_WAIT_S)
    fill(store, slides=12, gen="g2", wait=False)  # commits while it trains: s00..s09 re-ingested, s10, s11 new

    def same_as_exact(q):
        want = [(h.slide_id, h.tile.x, h.tile.y, round(h.score, 5)) for h in exact.search(Query(MODEL, q, 20))]
        got = [(h.slide_id, h.tile.x, h.tile.y, round(h.score, 5)) for h in store.search(Query(MODEL, q, 20))]
        return got == want

    other = ThreadPoolExecutor(1)
    assert all(other.map(same_as_exact, clustered(5, 2000)))
    assert store.info().factory == "Flat"
    for s in (store, exact):  # writes while training: a delete, a replacing re-ingest, a new slide
        s.delete_slide("s00")
        s.stage(TileBatch(MODEL, "s01", "g3", clustered(50, 101), tiles(50)))
        s.commit_slide(MODEL, "g3", Slide("s01", "s01.svs", {"organ": "lung"}), 50)
        s.stage(TileBatch(MODEL, "late", "g1", clustered(20, 102), tiles(20)))
        s.commit_slide(MODEL, "g1", Slide("late", "late.svs", {"organ": "skin"}), 20)
    assert all(other.map(same_as_exact, clustered(5, 3000)))
    assert store.info().factory == "Flat"
    release.set()
    assert store.wait_trained(TRAIN_WAIT_S)
    other.shutdown()
    info = store.info()
    assert info.factory.startswith("IVF") and info.train_vectors == 1000
    assert store.counts() == exact.counts() == (1200 - 100 - 50 + 20, 12)  # no tile missing or duplicated
    everything = store.search(Query(MODEL, clustered(1, 4000)[0], 1000, nprobe=info.nlist))
    keys = [(h.slide_id, h.tile.x, h.tile.y) for h in everything]
    assert len(keys) == len(set(keys)) == 1000  # k at its maximum: all but the 70 least similar
    assert set(keys) == {
        (h.slide_id, h.tile.x, h.tile.y) for h in exact.search(Query(MODEL, clustered(1, 4000)[0], 1000))
    }
    assert "s00" not in {k[0] for k in keys}
