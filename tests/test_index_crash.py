"""SIGKILL the index server at random moments during ingest; nothing acknowledged is lost or doubled."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import grpc
import numpy as np

from smily.common.tensors import to_tensor
from smily.index.v1 import index_pb2, index_pb2_grpc

from .conftest import ROOT
from .helpers.wait import pages

KILLS = 20
DIM = 8
MODEL = "m/1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(index_dir: str, port: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        SMILY_INDEX_PORT=str(port),
        SMILY_INDEX_DIR=index_dir,
        SMILY_METRICS_PORT="0",
        SMILY_INDEX_SNAPSHOT_INTERVAL_S="0.2",
        SMILY_LOG_LEVEL="WARNING",
        SMILY_PLAINTEXT="1",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "smily.cli", "serve", "index"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_ready(stub, proc) -> index_pb2.GetIndexInfoResponse:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "the index server exited on its own"
        try:
            return stub.GetIndexInfo(index_pb2.GetIndexInfoRequest(), timeout=2)
        except grpc.RpcError:
            assert time.monotonic() < deadline, "the index server did not come back"
            time.sleep(0.05)


class Writer(threading.Thread):
    """Stages and commits slides (some re-ingests) until stopped; records what was acknowledged."""

    def __init__(self, stub):
        super().__init__(daemon=True)
        self.stub, self.stop = stub, threading.Event()
        self.acked: dict[str, np.ndarray] = {}  # slide -> vectors of its acknowledged version
        self.in_doubt: dict[str, list[np.ndarray]] = {}  # commits cut off by a kill: either version may hold
        self.rng = np.random.default_rng(1)

    def ingest(self, sid: str) -> None:
        n = int(self.rng.integers(3, 12))
        v = self.rng.standard_normal((n, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        gen = uuid.uuid4().hex
        rects = [index_pb2.TileRect(x=i * 10, y=0, width=10, height=10, mpp=1.0) for i in range(n)]
        for part in (slice(0, n // 2), slice(n // 2, n)):
            self.stub.AddTiles(
                index_pb2.AddTilesRequest(
                    model_id=MODEL, slide_id=sid, generation=gen, embeddings=to_tensor(v[part]), tiles=rects[part]
                ),
                timeout=5,
            )
        self.in_doubt.setdefault(sid, []).append(v)
        self.stub.CommitSlide(
            index_pb2.CommitSlideRequest(
                model_id=MODEL,
                generation=gen,
                expected_tiles=n,
                slide=index_pb2.Slide(slide_id=sid, source=f"{sid}.svs"),
            ),
            timeout=5,
        )
        self.in_doubt.pop(sid)
        self.acked[sid] = v

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            # Every fourth ingest replaces an acknowledged slide: replaced tiles must not linger.
            sid = f"slide-{i}" if i % 4 or not self.acked else sorted(self.acked)[i % len(self.acked)]
            try:
                self.ingest(sid)
                i += 1
            except grpc.RpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.ABORTED,
                ):
                    raise
                time.sleep(0.02)


def check(stub, writer: Writer) -> None:

    def page(token):
        resp = stub.ListSlides(index_pb2.ListSlidesRequest(page_size=1000, page_token=token), timeout=10)
        return [(s.slide_id, s.tile_count) for s in resp.slides], resp.next_page_token

    slides = dict(item for p in pages(page) for item in p)
    info = stub.GetIndexInfo(index_pb2.GetIndexInfoRequest(), timeout=10)
    assert info.tile_count == sum(slides.values()), "the search index holds duplicated or orphaned vectors"
    assert set(slides) <= set(writer.acked) | set(writer.in_doubt)
    for sid, v in writer.acked.items():
        versions = [v] + writer.in_doubt.get(sid, [])
        assert slides.get(sid) in {len(x) for x in versions}, sid
        version = next(x for x in versions if len(x) == slides[sid])
        hits = stub.Search(
            index_pb2.SearchRequest(model_id=MODEL, query=to_tensor(version[0]), k=len(version), slide_ids=[sid]),
            timeout=10,
        ).hits
        assert len(hits) == len(version) and hits[0].tile.x == 0 and hits[0].score > 0.999, sid


def test_sigkill_during_ingest_loses_nothing_acknowledged(tmp_path):
    port, index_dir = free_port(), str(tmp_path / "index")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = index_pb2_grpc.IndexServiceStub(channel)
    proc = start(index_dir, port)
    writer = Writer(stub)
    rng = random.Random(5)
    try:
        wait_ready(stub, proc)
        writer.start()
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.05, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc = start(index_dir, port)
            wait_ready(stub, proc)
        writer.stop.set()
        writer.join(30)
        assert not writer.is_alive()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = start(index_dir, port)
        info = wait_ready(stub, proc)
        assert len(writer.acked) > KILLS  # ingest really ran between the kills
        check(stub, writer)
        assert "snapshot at sequence" in info.load_report  # snapshots were taken and reloaded
    finally:
        writer.stop.set()
        proc.kill()
        proc.wait()
        channel.close()
