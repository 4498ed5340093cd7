"""Changing the model without downtime, through the real servers: migrate to the INT8 version of the
default model while searches run, cut over, roll back, drop; ingests and deletes during a migration;
a slide whose source vanished; concepts refitted at the cutover; a gateway SIGKILLed mid-migration.

Each test runs twice: on one SQLite index, and on a cluster of 2 index shards x 2 replica processes on
a real PostgreSQL behind the gateway's shard router (with more gateways where a test needs them)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest

from smily import stack
from smily.cli import main as smily_main
from smily.client import Client
from smily.common import tenancy
from smily.common.tensors import from_tensor
from smily.gateway.migration import GUARD_PAUSE_S, Latencies, Throttle
from smily.gateway.shards import connect
from smily.gateway.v1 import gateway_pb2
from smily.index.v1 import index_pb2
from smily.localstack import free_port

from .conftest import base_settings, rpc_code
from .helpers.pg import fresh_database, postgres  # noqa: F401 (fixture)
from .helpers.procstack import NAMES, SERVING, health
from .helpers.wait import wait_done, wait_until
from .test_index_cluster import Cluster

OLD, NEW = "efficientnet-lite0/1", "efficientnet-lite0/1-int8"
REGION = dict(slide_id="synth-a", x=1024, y=768, width=448, height=448)
# Searches the loop runs at most: it stops earlier, a few searches after the cutover.
MAX_SEARCHES = 20000
OK = gateway_pb2.OPERATION_STATE_SUCCEEDED


@pytest.fixture(scope="module")
def repo(model_repo, tmp_path_factory):
    """A repository holding the default model (linked, read-only) and its INT8 version, made by the CLI."""
    path = tmp_path_factory.mktemp("repo")
    os.makedirs(path / "efficientnet-lite0")
    os.symlink(os.path.join(model_repo, "efficientnet-lite0", "1"), path / "efficientnet-lite0" / "1")
    assert (
        smily_main(["model", "quantize", "--model", OLD, "--calibration-tiles", "16", "--output-dir", str(path)]) == 0
    )
    return str(path)


@pytest.fixture(scope="module", params=["sqlite", "cluster"])
def world(request, repo, slide_dir, scratch_root, redis_url, tmp_path_factory):
    """tiler, an embedder per model, an index and a gateway that knows both embedders. The index is one
    SQLite index, or 2 shards x 2 replica processes on one PostgreSQL (settings.index.index_targets)."""
    base = base_settings(
        slide_roots=(slide_dir, scratch_root),
        model_repository=repo,
        model=OLD,
        index_dir=str(tmp_path_factory.mktemp("index")),
        redis_url=redis_url,
    )
    cluster, services = None, ["tiler", "embedder", "index"]
    if request.param == "cluster":
        url = fresh_database(request.getfixturevalue("postgres"))
        cluster = Cluster(url, str(tmp_path_factory.mktemp("cluster")))
        base, services = base.replace(index_targets=tuple("|".join(t) for t in cluster.targets)), services[:2]
    running = []
    try:
        backends, settings = stack.start(services, base)
        running.append(backends)
        int8, int8_settings = stack.start(["embedder"], settings.replace(model=NEW, embedder_port=0))
        running.append(int8)
        settings = settings.replace(model_embedder_targets=(int8_settings.embedder.embedder_target,))
        gateway, settings = stack.start(["gateway"], settings)
        running.append(gateway)
        client = Client(f"127.0.0.1:{settings.gateway.gateway_port}", timeout=300)
        for name, slide_id in (("synth-a.tiff", "synth-a"), ("synth-b.svs", "synth-b")):
            assert wait_done(client, client.ingest(name, slide_id, {"file": name})).state == OK
        yield client, settings, int8_settings
        client.close()
    finally:
        for started in reversed(running):
            stack.stop(started, 0)
        if cluster is not None:
            cluster.close()


def _index_stub(settings):
    """The index as the gateway sees it: a call goes to the shard that holds what it asks for."""
    index, _ = connect(settings.index.index_targets or (settings.index.index_target,))
    return index


def _models(client) -> dict[str, tuple[int, bool]]:
    return {m.model_id: (m.tile_count, m.serving) for m in client.index_info().models}


def _hits(resp) -> list[tuple]:
    return [(h.slide_id, h.x, h.y, round(h.score, 4)) for h in resp.hits]


def _serve_old_only(client) -> None:
    """Back to the state before any migration: the old model alone (each test starts there)."""
    if client.index_info().model_id != OLD:
        client.cutover_index(OLD, allow_missing=True)
    if NEW in _models(client):
        client.drop_index_model(NEW)


def test_migrate_to_int8_while_searching(world, tmp_path_factory):
    client, settings, int8_settings = world
    _serve_old_only(client)
    before = client.search(region=REGION, k=5)
    assert before.model_id == OLD and before.hits
    results: list = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set() and len(results) < MAX_SEARCHES:
            try:
                results.append(("ok", client.search(region=REGION, k=5).model_id))
            except grpc.RpcError as exc:
                results.append(("failed", exc.code()))

    searching = threading.Thread(target=loop)
    searching.start()
    try:
        op = wait_done(client, client.migrate_index(NEW))
        assert op.state == OK and op.model_id == NEW, (op.error_code, op.error_message)
        assert [(s.slide_id, s.state) for s in op.slides] == [("synth-a", OK), ("synth-b", OK)]
        assert op.progress.tiles_indexed == op.progress.tiles_total > 0
        assert client.index_info().model_id == OLD  # migrated, not yet serving
        started = len(results)
        switched = client.cutover_index()
        ended = len(results)
        assert (switched.model_id, switched.previous_model_id, switched.missing_count) == (NEW, OLD, 0)
        while len(results) < ended + 5 and searching.is_alive():
            stop.wait(0.05)
    finally:
        stop.set()
        searching.join()
    assert started > 0 and not [r for r in results if r[0] == "failed"], results
    models = [m for _, m in results]
    # Old until the cutover began; new once it returned (but the one search in flight then).
    assert set(models[:started]) == {OLD} and set(models[ended + 1 :]) == {NEW}
    after = client.search(region=REGION, k=5)
    assert after.model_id == NEW
    tiles = _models(client)
    assert tiles[NEW] == (tiles[OLD][0], True)

    # The same slides ingested afresh with the new model give the same results.
    fresh, fresh_settings = stack.start(
        ["index", "gateway"],
        settings.replace(
            index_dir=str(tmp_path_factory.mktemp("fresh")),
            embedder_target=int8_settings.embedder.embedder_target,
            model_embedder_targets=(),
            index_targets=(),  # a fresh single index, whatever the world's
            index_port=0,
            gateway_port=0,
        ),
    )
    other = Client(f"127.0.0.1:{fresh_settings.gateway.gateway_port}", timeout=300)
    try:
        for name, slide_id in (("synth-a.tiff", "synth-a"), ("synth-b.svs", "synth-b")):
            assert wait_done(other, other.ingest(name, slide_id, {"file": name})).state == OK
        again = other.search(region=REGION, k=5)
        assert again.model_id == NEW and _hits(again) == _hits(after)
    finally:
        other.close()
        stack.stop(fresh, 0)


def test_ingest_and_delete_during_migration_then_cutover(world):
    client, _, _ = world
    _serve_old_only(client)
    assert wait_done(client, client.ingest("synth-c-40x.svs", "gone-soon", {"file": "c"})).state == OK
    # Slow (throttled) so the ingest and the delete land while it runs.
    op = client.migrate_index(NEW, max_tiles_per_s=20)
    assert op.state == gateway_pb2.OPERATION_STATE_RUNNING
    added = wait_done(client, client.ingest("synth-c-40x.svs", "added-meanwhile", {"file": "c"}))
    assert added.state == OK
    assert client.delete("gone-soon") > 0
    running = client.operation(op.operation_id)
    assert running.state == gateway_pb2.OPERATION_STATE_RUNNING, "the migration ended before the ingest and delete"
    assert client.cancel(op.operation_id).cancel_requested
    assert wait_done(client, op).state == gateway_pb2.OPERATION_STATE_CANCELLED
    # Cancelled part way: the rest is missing, and a cutover names it rather than switch.
    assert rpc_code(client.cutover_index) == grpc.StatusCode.FAILED_PRECONDITION
    # Run again, it re-embeds what the first left; the slide ingested meanwhile was written for both
    # models by its ingest, so it is not among them.
    done = wait_done(client, client.migrate_index(NEW))
    assert done.state == OK, done.error_message
    left = {s.slide_id for s in done.slides}
    assert left and left <= {"synth-a", "synth-b"} and all(s.state == OK for s in done.slides)
    assert client.cutover_index().missing_count == 0
    slides = {s.slide_id for s in client.slides()}
    assert "added-meanwhile" in slides and "gone-soon" not in slides
    tiles = _models(client)
    assert tiles[NEW][0] == tiles[OLD][0] > 0
    hit_slides = {h.slide_id for h in client.search(region=REGION, k=50).hits}
    assert "gone-soon" not in hit_slides
    client.delete("added-meanwhile")


def test_rollback_cutover_again_and_drop(world, capsys):
    client, settings, _ = world
    _serve_old_only(client)
    op = wait_done(client, client.migrate_index(NEW, cutover=True))
    assert op.state == OK
    assert client.index_info().model_id == NEW  # --cutover switched at the end
    gateway = ["--gateway", f"127.0.0.1:{settings.gateway.gateway_port}"]
    assert smily_main(["status", op.operation_id, *gateway]) == 0  # progress per slide
    assert "  synth-a: succeeded" in capsys.readouterr().out
    assert smily_main(["index", "rollback", *gateway]) == 0
    assert f"serving {OLD} (was {NEW})" in capsys.readouterr().out
    assert client.search(region=REGION, k=3).model_id == OLD
    assert smily_main(["index", "cutover", *gateway]) == 0
    assert client.search(region=REGION, k=3).model_id == NEW
    assert rpc_code(client.drop_index_model, NEW) == grpc.StatusCode.FAILED_PRECONDITION  # serving
    assert smily_main(["info", *gateway]) == 0
    assert f"also holds model {OLD}" in capsys.readouterr().out
    assert client.drop_index_model(OLD) > 0
    assert _models(client) == {NEW: (_models(client)[NEW][0], True)}
    assert rpc_code(client.cutover_index, OLD) == grpc.StatusCode.NOT_FOUND  # dropped
    assert rpc_code(client.drop_index_model, OLD) == grpc.StatusCode.NOT_FOUND
    assert rpc_code(client.migrate_index, "no-such/1") == grpc.StatusCode.NOT_FOUND  # no embedder serves it
    assert rpc_code(client.migrate_index, "not a model") == grpc.StatusCode.INVALID_ARGUMENT
    # Back to the old model for the next test: the old one is migrated to like any other.
    assert wait_done(client, client.migrate_index(OLD, cutover=True)).state == OK
    client.drop_index_model(NEW)


def test_a_vanished_source_is_failed_precondition_and_named_at_cutover(world, scratch, slide_dir):
    client, _, _ = world
    _serve_old_only(client)
    shutil.copy(os.path.join(slide_dir, "synth-a.tiff"), scratch.path("vanishing.tiff"))
    assert wait_done(client, client.ingest(scratch.slide("vanishing.tiff"), "vanishing")).state == OK
    os.remove(scratch.path("vanishing.tiff"))
    op = wait_done(client, client.migrate_index(NEW))
    states = {s.slide_id: (s.state, s.error_code) for s in op.slides}
    assert states["vanishing"] == (gateway_pb2.OPERATION_STATE_FAILED, "FAILED_PRECONDITION")
    assert states["synth-a"] == (OK, "") and op.state == OK
    with pytest.raises(grpc.RpcError) as refused:
        client.cutover_index()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "vanishing" in refused.value.details()
    switched = client.cutover_index(allow_missing=True)
    assert switched.model_id == NEW and list(switched.missing_slide_ids) == ["vanishing"]
    client.delete("vanishing")


def test_an_ingest_begun_before_the_migration_is_not_missing_in_the_new_model(world):
    """The ingest read the models the index holds before the migration added its target, so it writes the
    serving model only; the slide is in the new model all the same (the ingest asks again once its slide is
    in, and the migration lists what the index lacks once more before it completes)."""
    client, _, _ = world
    _serve_old_only(client)
    early = client.ingest("synth-c-40x.svs", "begun-early", {"file": "c"})
    # Its tile count is known once it has read the models and tiled the slide; its embedding is under way.
    wait_until("the ingest writing", lambda: client.operation(early.operation_id).progress.tiles_total > 0, 120)
    op = client.migrate_index(NEW)
    assert client.operation(early.operation_id).state == gateway_pb2.OPERATION_STATE_RUNNING, "ended too soon"
    assert wait_done(client, early).state == OK
    assert wait_done(client, op).state == OK
    assert client.cutover_index().missing_count == 0
    tiles = _models(client)
    assert tiles[NEW][0] == tiles[OLD][0] > 0
    client.delete("begun-early")


def _region(hit) -> dict:
    return dict(slide_id=hit.slide_id, x=hit.x, y=hit.y, width=hit.width, height=hit.height)


def test_concepts_are_refitted_at_cutover(world, capsys):
    """Fitted again from their stored examples (regions re-read, patches by content) with the new model,
    so they still steer; one whose example slide is gone is named, and refused for the new model."""
    client, settings, _ = world
    _serve_old_only(client)
    ranked = client.search(region=REGION, k=200).hits
    total = len(ranked)
    # "with": the tiles least like the query; "without": the query and its neighbours, one as an upload.
    with_ = [_region(h) for h in ranked[-4:]]
    without = [_region(h) for h in ranked[:4]]
    patch = client.read_region(without[0]).image
    created = client.create_concept("far", with_, [patch, *without[1:]])
    assert created.model_id == OLD
    assert wait_done(client, client.ingest("synth-c-40x.svs", "doomed", {"file": "c"})).state == OK
    doomed = client.search(region=REGION, k=1, slide_ids=["doomed"]).hits[0]
    client.create_concept("doomed-concept", [_region(doomed)], [without[0]])
    assert client.delete("doomed") > 0

    index = _index_stub(settings)

    def vector(name: str, model_id: str) -> np.ndarray:
        got = index.GetConcept(index_pb2.GetConceptRequest(name=name, model_id=model_id, with_examples=True)).concept
        assert [e.positive for e in got.examples] == [True] * 4 + [False] * 4
        assert [e.WhichOneof("example") for e in got.examples] == ["region"] * 4 + ["image"] + ["region"] * 3
        return from_tensor(got.vector)

    old_vector = vector("far", OLD)
    # Cut over as the migration completes: the operation names what it could not refit.
    op = wait_done(client, client.migrate_index(NEW, cutover=True))
    assert op.state == OK and client.index_info().model_id == NEW
    assert [tenancy.split(c)[1] for c in op.unrefitted_concepts] == ["doomed-concept"]
    gateway = ["--gateway", f"127.0.0.1:{settings.gateway.gateway_port}"]
    assert smily_main(["status", op.operation_id, *gateway]) == 0
    assert f"concepts not refitted (create them again): {op.unrefitted_concepts[0]}" in capsys.readouterr().err
    switched = client.cutover_index(OLD)  # a rollback refits too
    assert switched.model_id == OLD
    assert [tenancy.split(c)[1] for c in switched.unrefitted_concepts] == []  # doomed-concept's fit is OLD's
    assert np.allclose(vector("far", OLD), old_vector, atol=1e-5)  # the same examples, the same model
    assert smily_main(["index", "cutover", *gateway]) == 0
    assert f"serving {NEW} (was {OLD})" in (out := capsys.readouterr()).out
    assert f"concepts not refitted (create them again): {op.unrefitted_concepts[0]}" in out.err
    assert {c.name: c.model_id for c in client.concepts()} == {"far": NEW}
    new_vector = vector("far", NEW)
    assert new_vector.shape == old_vector.shape and not np.allclose(new_vector, old_vector)

    def mean_rank(weight: float) -> float:
        resp = client.search(region=REGION, concepts={"far": weight} if weight else {}, k=total)
        assert resp.model_id == NEW
        order = [(h.slide_id, h.x, h.y) for h in resp.hits]
        return float(np.mean([order.index((r["slide_id"], r["x"], r["y"])) for r in with_]))

    plain, more, less = mean_rank(0), mean_rank(0.5), mean_rank(-0.5)
    assert more < plain <= less
    with pytest.raises(grpc.RpcError) as refused:
        client.search(region=REGION, concepts={"doomed-concept": 0.5})
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and OLD in refused.value.details()
    # Deleted, a concept is gone for every model: its old fit and its examples with it.
    client.delete_concept("far")
    assert rpc_code(client.search, region=REGION, concepts={"far": 0.5}) == grpc.StatusCode.NOT_FOUND
    client.cutover_index(OLD)
    client.delete_concept("doomed-concept")
    assert client.concepts() == []


def _gateway_process(settings, log_path: str) -> tuple[subprocess.Popen, Client]:
    """A gateway of its own process, on the backends of `settings` (so it can be SIGKILLed)."""
    port = free_port()
    env = dict(
        os.environ,
        SMILY_PLAINTEXT="1",
        SMILY_AUTH="none",
        SMILY_BIND_HOST="127.0.0.1",
        SMILY_METRICS_PORT="0",
        SMILY_GATEWAY_PORT=str(port),
        SMILY_TILER_TARGET=settings.tiler.tiler_target,
        SMILY_EMBEDDER_TARGET=settings.embedder.embedder_target,
        SMILY_MODEL_EMBEDDER_TARGETS=",".join(settings.embedder.model_embedder_targets),
        SMILY_INDEX_TARGET=settings.index.index_target,
        SMILY_INDEX_TARGETS=",".join(settings.index.index_targets),
        SMILY_REDIS_URL=settings.gateway.redis_url,
        SMILY_CACHE_KEY="test-cache-key",
        SMILY_VIEW_SESSION_KEY="test-view-session-key",
    )
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "smily.gateway"], env=env, stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    wait_until(f"a gateway process serving (log {log_path})", lambda: health(target, NAMES["gateway"]) == SERVING, 120)
    return proc, Client(target, timeout=300)


def test_a_migration_resumes_on_another_gateway_after_sigkill(world, tmp_path):
    """Its state is in the system of record: another gateway takes the lease the dead one stopped renewing,
    and re-embeds only the slides the index still lacks."""
    client, settings, _ = world
    _serve_old_only(client)
    (a, on_a), (b, on_b) = (_gateway_process(settings, str(tmp_path / f"{n}.log")) for n in "ab")
    try:
        op = on_a.migrate_index(NEW, max_tiles_per_s=15)  # slow enough to be killed part way

        def one_done():
            seen = on_b.operation(op.operation_id)  # a's progress, through Redis
            return seen if any(s.state == OK for s in seen.slides) else None

        before = {
            s.slide_id for s in wait_until("a slide migrated on gateway a", one_done, 300).slides if s.state == OK
        }
        os.kill(a.pid, signal.SIGKILL)
        a.wait()
        final = wait_done(on_b, op, deadline_s=600)
        assert final.state == OK and final.operation_id == op.operation_id, (final.error_code, final.error_message)
        resumed = {s.slide_id for s in final.slides}
        assert all(s.state == OK for s in final.slides)
        assert resumed and not resumed & before  # no slide embedded twice
        assert resumed | before == {"synth-a", "synth-b"}
        tiles = _models(on_b)
        assert tiles[NEW][0] == tiles[OLD][0]
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        on_a.close()
        on_b.close()


@pytest.mark.unit
def test_the_p95_guard_pauses_the_migration_while_searches_are_slower():
    latencies = Latencies()
    for _ in range(50):
        latencies.add(0.010)
    # Searches 5x slower than when the migration started; the pause's cancellation point sees them recover.
    throttle = Throttle(0, latencies, stop=lambda: [latencies.add(0.010) for _ in range(200)])
    assert throttle.spend(10) == 0.0
    for _ in range(200):
        latencies.add(0.050)
    assert throttle.spend(10) == GUARD_PAUSE_S
    assert throttle.spend(10) == 0.0
    # No baseline (too few searches before it started): no guard.
    few = Latencies()
    unguarded = Throttle(0, few)
    for _ in range(200):
        few.add(1.0)
    assert unguarded.spend(10) == 0.0
