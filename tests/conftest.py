"""Fixtures: real slides, a real redis-server and the real services on loopback."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

import grpc
import pytest

from smily import stack
from smily.client import Client
from smily.common.config import Settings
from smily.localstack import start_redis
from smily.synthetic import SlideSpec, write_samples

from .helpers.wait import wait_done

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
MODELS = os.path.join(ROOT, "models")
CMU = "cmu_small_region.svs"

# Small enough to write in seconds, big enough for a few dozen tiles each.
TEST_SLIDES = (
    SlideSpec("synth-a.tiff", "tiff", 3072, 2304, 0.5, 11),
    SlideSpec("synth-b.svs", "svs", 3072, 2304, 0.5, 12),
    SlideSpec("synth-c-40x.svs", "svs", 4096, 3072, 0.25, 13),
)


def need(what: str, why: str):
    """A missing dependency fails the test, naming what installs it: a test that did not run must not pass."""
    pytest.fail(f"{what} is required: {why}", pytrace=False)


# No test may pass by not running: a skip (pytest.skip, importorskip, a skip mark) or an
# expected failure (xfail) is reported as a failure, unless the test is marked
# may_skip(reason) for hardware that a machine may lack. `make test` installs the system
# packages (tools/system-deps.sh).
NO_SKIP = (
    "skipped, and this suite allows no skips: {reason}. Install what is missing "
    "(`make test` does: tools/system-deps.sh, the dev extra) or mark the test may_skip."
)
NO_XFAIL = "an expected failure (xfail), and this suite allows none: {reason}. Fix the test or the code."


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not item.get_closest_marker("may_skip"):
        xfail = getattr(report, "wasxfail", None)
        report.outcome = "failed"
        report.longrepr = (
            NO_SKIP.format(reason=_skip_reason(report)) if xfail is None else NO_XFAIL.format(reason=xfail)
        )


# The `unit` lane (`make unit`) runs without a model or a server: a unit test that asks
# for one of these fixtures is an error, not a slow lane.
SERVER_FIXTURES = {
    "services",
    "settings",
    "client",
    "ingested",
    "http_url",
    "model_repo",
    "redis_url",
    "slide_dir",
    "postgres",
}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    needs = SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
    if item.get_closest_marker("unit") and needs:
        pytest.fail(f"marked unit, but needs {', '.join(sorted(needs))}: the unit lane has no model and no servers")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped:  # a module-level importorskip
        report.outcome = "failed"
        report.longrepr = NO_SKIP.format(reason=_skip_reason(report))


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory):
    """The test slides, read by every test; a test's own files go to `scratch`."""
    path = tmp_path_factory.mktemp("slides")
    write_samples(str(path), TEST_SLIDES)
    shutil.copy(os.path.join(DATA, CMU), path / CMU)
    written = sorted(os.listdir(path))
    yield str(path)
    if sorted(os.listdir(path)) != written:
        pytest.fail(f"a test wrote into the shared slide folder: {sorted(set(os.listdir(path)) - set(written))}")


@pytest.fixture(scope="session")
def scratch_root(tmp_path_factory) -> str:
    """The services' second slide root, for the files tests make (broken, odd or extra slides):
    slide_dir holds only the test slides, shared by every test, and no test writes there."""
    return str(tmp_path_factory.mktemp("scratch-slides"))


@dataclasses.dataclass(frozen=True)
class Scratch:
    """A folder of one test's own under scratch_root: files go to path(name), and the
    services know them as slide(name)."""

    root: str
    folder: str

    @property
    def dir(self) -> str:
        return os.path.join(self.root, self.folder)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def slide(self, name: str) -> str:
        return f"{self.folder}/{name}"


def scratch_for(root: str, folder: str) -> Scratch:
    os.makedirs(os.path.join(root, folder))
    return Scratch(root, folder)


@pytest.fixture
def scratch(scratch_root, request) -> Scratch:
    return scratch_for(scratch_root, re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name))


@pytest.fixture(scope="session")
def model_repo():
    if not os.path.isfile(os.path.join(MODELS, "efficientnet-lite0", "1", "model.onnx")):
        pytest.fail("the default model is missing: run `make model` (make test does)")
    return MODELS


@pytest.fixture(scope="session")
def redis_url():
    proc, url = start_redis()
    if proc is None:
        need("redis-server", "install it with `apt-get install redis-server` (make test does, as root)")
    yield url
    proc.terminate()
    proc.wait()


def base_settings(**overrides) -> Settings:
    return Settings().replace(
        bind_host="127.0.0.1",
        gateway_port=0,
        tiler_port=0,
        embedder_port=0,
        index_port=0,
        metrics_port=0,
        # Keys shared as a Secret is: view sessions verify across the HTTP front end and the
        # gateways, and every gateway replica trusts the others' writes to Redis.
        **{
            "plaintext": True,
            "auth": "none",
            "view_session_key": "test-view-session-key",
            "cache_key": "test-cache-key",
            **overrides,
        },
    )


def archive_settings(tmp_path, model_repo, redis_url, dicomweb: str, **extra) -> Settings:
    """The stack's settings against a test archive (Orthanc's DICOMweb URL); slides only from
    DICOMweb (an empty slide root)."""
    (tmp_path / "roots").mkdir()
    return base_settings(
        slide_roots=(str(tmp_path / "roots"),),
        model_repository=model_repo,
        index_dir=str(tmp_path / "index"),
        redis_url=redis_url,
        tiler_readers=1,
        dicomweb_url=(f"pacs={dicomweb}",),
        **extra,
    )


@pytest.fixture(scope="session")
def services(slide_dir, scratch_root, model_repo, redis_url, tmp_path_factory):
    """The four services on free loopback ports, sharing one fresh index."""
    settings = base_settings(
        slide_roots=(slide_dir, scratch_root),
        model_repository=model_repo,
        index_dir=str(tmp_path_factory.mktemp("index")),
        redis_url=redis_url,
        # Label statistics over the slides' `file` metadata (each test slide is its own "label").
        label_key="file",
        # Find slides by metadata: by file name too (the viewer's search box).
        slide_search_keys=("file", "organ"),
    )
    running, settings = stack.start(stack.ORDER, settings)
    yield running, settings
    stack.stop(running, 0)


@pytest.fixture(scope="session")
def settings(services):
    return services[1]


@pytest.fixture(scope="session")
def client(settings):
    c = Client(f"127.0.0.1:{settings.gateway.gateway_port}", timeout=300)
    yield c
    c.close()


@pytest.fixture(scope="session")
def ingested(client):
    """Every test slide ingested once; returns {file name: operation}."""
    from smily.gateway.v1 import gateway_pb2

    ops = {}
    for name in [s.name for s in TEST_SLIDES] + [CMU]:
        op = wait_done(client, client.ingest(name, os.path.splitext(name)[0], {"file": name, "organ": "test"}))
        assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, (name, op.error_code, op.error_message)
        ops[name] = op
    return ops


def streamed_tiles(stub, request) -> list:
    """Every tile of a StreamTiles call in order; each message must give the stream's true total."""
    msgs = list(stub.StreamTiles(request))
    tiles = [t for m in msgs for t in m.tiles]
    assert all(m.tiles and m.tiles_total == len(tiles) for m in msgs)
    return tiles


def rpc_code(fn, *args, **kwargs) -> grpc.StatusCode:
    """Call fn and return the status code of the error it raises."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value.code()


@pytest.fixture(scope="session")
def http_url(settings):
    """`smily serve http` on a free loopback port, calling the test gateway."""
    from smily.http.server import Running

    server = Running(settings.replace(http_port=0, http_gateway_target=f"127.0.0.1:{settings.gateway.gateway_port}"))
    yield server.url
    server.stop()
