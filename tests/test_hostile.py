"""Issue 13's hostile requests, each sent through the real gateway running as its
own process (`python -m smily.gateway`, backends likewise): the status it
answers, that it keeps serving, and for images the gateway's peak RSS (the
kernel's VmHWM, reset before each case).

Run with -s to see the table of case, status and peak memory.
"""

from __future__ import annotations

import io
import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from smily.common.server import MAX_MESSAGE_BYTES
from smily.gateway.v1 import gateway_pb2 as g
from smily.gateway.v1 import gateway_pb2_grpc
from smily.localstack import free_port

from .conftest import CMU, TEST_SLIDES
from .helpers.procstack import NAMES, SERVING, ProcStack, health
from .helpers.wait import wait_until

C = grpc.StatusCode
BAD, NOT_FOUND, BUSY, UNAVAILABLE = C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED, C.UNAVAILABLE
MEMORY_BUDGET_MB = 200
ROWS: list[tuple[str, str, str, str]] = []  # case, status, gateway peak growth, embedder peak growth


@pytest.fixture(scope="module")
def stack(slide_dir, model_repo, redis_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    env = {
        "SMILY_SLIDE_ROOTS": slide_dir,
        "SMILY_MODEL_REPOSITORY": model_repo,
        "SMILY_INDEX_DIR": str(tmp / "index"),
        "SMILY_REDIS_URL": redis_url,
        "SMILY_TILER_READERS": "1",
        "SMILY_LOG_LEVEL": "WARNING",
    }
    gateway = {
        "SMILY_MAX_RPCS_PER_CALLER": "6",
        "SMILY_MAX_QUEUED_INGESTS": "3",
        "SMILY_MAX_CONCURRENT_INGESTS": "1",
        "SMILY_MAX_SLIDE_QUERIES": "1",
        "SMILY_METRICS_PORT": str(free_port()),
    }
    s = ProcStack(env, str(tmp), {"gateway": gateway}).start_all()
    yield s
    s.stop_all()
    print_table()


@pytest.fixture(scope="module")
def gw(stack):
    ch = grpc.insecure_channel(
        stack.target("gateway"),
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    stub = gateway_pb2_grpc.GatewayServiceStub(ch)
    op = stub.IngestSlide(g.IngestSlideRequest(source=CMU, slide_id="cmu", metadata={"case_id": "c1"}), timeout=60)
    deadline = time.monotonic() + 300
    while (
        op.operation.state not in (g.OPERATION_STATE_SUCCEEDED, g.OPERATION_STATE_FAILED)
        and time.monotonic() < deadline
    ):
        time.sleep(0.3)
        op = stub.GetOperation(g.GetOperationRequest(operation_id=op.operation.operation_id), timeout=10)
    assert op.operation.state == g.OPERATION_STATE_SUCCEEDED, op.operation.error_message
    yield stub
    ch.close()


def print_table() -> None:
    print("\n| case | status | gateway peak RSS growth | embedder peak RSS growth |\n| --- | --- | --- | --- |")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")


def status_of(fn) -> tuple[C, str]:
    try:
        fn()
        return C.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def metric(port: int, sample: str) -> float:
    """One sample of a process's /metrics (0 when it has none yet)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return next((float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(sample + " ")), 0.0)


def alive(stack, gw) -> None:
    assert health(stack.target("gateway")) == SERVING
    gw.ListSlides(g.ListSlidesRequest(), timeout=10)


def case(stack, gw, name: str, fn, expected: C, *, memory: bool = False, says: str = "") -> str:
    """Run one hostile request and check its status, message and the gateway's health afterwards."""
    if memory:
        for svc in ("gateway", "embedder"):
            stack.reset_peak(svc)
        base = {svc: stack.memory_mb(svc)[0] for svc in ("gateway", "embedder")}
    code, details = fn()
    growth = {svc: stack.memory_mb(svc)[1] - base[svc] for svc in ("gateway", "embedder")} if memory else {}
    ROWS.append(
        (
            name,
            code.name,
            f"{growth['gateway']:.0f} MB" if memory else "-",
            f"{growth['embedder']:.0f} MB" if memory else "-",
        )
    )
    assert code == expected, (name, code, details)
    assert says in details, (name, details)
    for leak in ("127.0.0.1", "ipv4", "ipv6", "unix:"):
        assert leak not in details, (name, details)
    alive(stack, gw)
    if memory:
        assert growth["gateway"] < MEMORY_BUDGET_MB, (name, growth)
    return details


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def search_image(gw, data: bytes, timeout: float = 60):
    return lambda: gw.Search(g.SearchRequest(image=data, k=3), timeout=timeout)


@pytest.fixture
def frozen(stack):
    """Freeze a backend with SIGSTOP for the test's duration (always thawed)."""
    stopped = []

    def freeze(name: str) -> None:
        os.kill(stack.pid(name), signal.SIGSTOP)
        stopped.append(name)

    yield freeze
    for name in stopped:
        os.kill(stack.pid(name), signal.SIGCONT)


# -- images ------------------------------------------------------------------------
def test_image_bombs_and_formats_are_refused_from_the_header(stack, gw):
    bomb = png(Image.new("1", (11000, 11000)))
    assert len(bomb) < 20_000
    details = case(
        stack,
        gw,
        "PNG 11000x11000 (15 KB)",
        lambda: status_of(search_image(gw, bomb)),
        BAD,
        memory=True,
        says="over the limit",
    )
    assert "\n" not in details and "16777216" in details

    def three_at_once():
        with ThreadPoolExecutor(3) as pool:
            codes = list(pool.map(lambda _: status_of(search_image(gw, bomb)), range(3)))
        assert len({c for c, _ in codes}) == 1
        return codes[0]

    case(stack, gw, "3 x PNG 11000x11000 at once", three_at_once, BAD, memory=True, says="over the limit")
    small = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    for fmt in ("TIFF", "BMP", "WEBP"):
        case(
            stack,
            gw,
            f"{fmt} image",
            lambda fmt=fmt: status_of(search_image(gw, png(small, fmt))),
            BAD,
            memory=True,
            says="PNG or JPEG",
        )
    whole = png(small)
    case(stack, gw, "truncated PNG", lambda: status_of(search_image(gw, whole[: len(whole) // 2])), BAD, memory=True)


def test_the_largest_allowed_image_is_embedded_within_the_memory_budget(stack, gw):
    ramp = np.linspace(0, 255, 4096, dtype=np.uint8)
    big = png(Image.fromarray(np.stack([np.tile(ramp, (4096, 1))] * 3, axis=-1)))
    case(stack, gw, "PNG 4096x4096 (the limit)", lambda: status_of(search_image(gw, big)), C.OK, memory=True)
    # The second time it comes from the cache, looked up by content hash before any decoding.
    assert gw.Search(g.SearchRequest(image=big, k=3), timeout=60).cached
    case(stack, gw, "PNG 4096x4096 again (cached)", lambda: status_of(search_image(gw, big)), C.OK, memory=True)


# -- ingest ----------------------------------------------------------------------------
def ingest(gw, source: str, slide_id: str = "", slide_mpp: float = 0.0, metadata=None):
    return gw.IngestSlide(
        g.IngestSlideRequest(source=source, slide_id=slide_id, slide_mpp=slide_mpp, metadata=metadata or {}), timeout=30
    ).operation


def test_implausible_resolutions_and_tile_counts_are_refused_before_planning(stack, gw):
    big = TEST_SLIDES[2].name  # the 40x sample
    case(
        stack,
        gw,
        "IngestSlide slide_mpp=50",
        lambda: status_of(lambda: ingest(gw, big, slide_mpp=50)),
        BAD,
        says="0.05..20",
    )
    case(
        stack,
        gw,
        "IngestSlide slide_mpp=NaN",
        lambda: status_of(lambda: ingest(gw, big, slide_mpp=float("nan"))),
        BAD,
        says="0.05..20",
    )
    details = case(
        stack,
        gw,
        "IngestSlide slide_mpp=20 on the 40x sample (103,788 tiles)",
        lambda: status_of(lambda: ingest(gw, big, slide_mpp=20)),
        BAD,
        says="tiles per slide",
    )
    assert "103788" in details and "100000" in details
    case(
        stack,
        gw,
        "SearchSlides by file slide_mpp=20",
        lambda: status_of(lambda: gw.SearchSlides(g.SearchSlidesRequest(source=big, slide_mpp=20), timeout=30)),
        BAD,
        says="tiles per slide",
    )


def test_ingests_are_deduplicated_by_id_and_source_and_the_queue_is_bounded(stack, gw, frozen):
    frozen("embedder")  # the first ingest cannot finish: the others wait in the queue
    a, b = TEST_SLIDES[0].name, TEST_SLIDES[1].name
    first = ingest(gw, a, "dup")
    assert ingest(gw, a, "dup").operation_id == first.operation_id
    other_file = ingest(gw, b, "dup")
    assert other_file.operation_id != first.operation_id
    ops, refused = [first, other_file], []
    for i in range(8):
        try:
            ops.append(ingest(gw, a, f"q{i}"))
        except grpc.RpcError as exc:
            refused.append(exc)
    # One running (once its worker took it) and three queued; the rest refused.
    assert len(ops) in (4, 5) and len(refused) == 10 - len(ops), [o.state for o in ops]
    ROWS.append(("IngestSlide x10 with 3 queued already", refused[0].code().name, "-", "-"))
    assert refused and all(e.code() == BUSY for e in refused)
    assert "retry in about" in refused[0].details()
    assert ("retry-after-s", "60") in tuple(refused[0].trailing_metadata())
    for op in ops:
        gw.CancelOperation(g.CancelOperationRequest(operation_id=op.operation_id), timeout=10)
    alive(stack, gw)


def test_whole_slide_searches_by_file_are_bounded(stack, gw, frozen):
    gw.Search(g.SearchRequest(image=png(Image.new("RGB", (224, 224), (200, 120, 160))), k=1), timeout=60)
    frozen("embedder")  # the first whole-slide search holds its slot
    port = int(stack.per_service["gateway"]["SMILY_METRICS_PORT"])
    miss = 'smily_cache_lookups_total{result="miss"}'
    misses = metric(port, miss)
    first = gw.SearchSlides.future(g.SearchSlidesRequest(source=TEST_SLIDES[1].name), timeout=60)
    # Its mosaic is not cached: after the miss it takes its slot at once (no I/O in between) and
    # waits for the frozen embedder.
    wait_until("the first whole-slide search misses the cache", lambda: metric(port, miss) > misses, deadline_s=60)
    code, details = status_of(lambda: gw.SearchSlides(g.SearchSlidesRequest(source=TEST_SLIDES[0].name), timeout=5))
    ROWS.append(("SearchSlides by file while one runs", code.name, "-", "-"))
    assert code == BUSY and "whole-slide searches" in details
    os.kill(stack.pid("embedder"), signal.SIGCONT)
    assert first.result().slides  # the indexed slides, ranked
    alive(stack, gw)


# -- saturation: health outside the limits --------------------------------------------
def test_health_answers_while_the_gateway_is_saturated_and_readiness_follows_backends(stack, gw, frozen):
    frozen("embedder")
    rng = np.random.default_rng(1)
    images = [png(Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8))) for _ in range(12)]
    with ThreadPoolExecutor(12) as pool:
        calls = [pool.submit(status_of, search_image(gw, data, timeout=8)) for data in images]
        time.sleep(2)
        # Saturated: six searches in flight (the caller quota), the rest refused; probes still answer.
        assert health(stack.target("gateway"), "", timeout=1) == SERVING
        deadline = time.monotonic() + 10
        while health(stack.target("gateway"), NAMES["gateway"]) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "readiness did not follow the frozen embedder"
            time.sleep(0.3)
        assert health(stack.target("gateway"), "", timeout=1) == SERVING  # liveness: the process only
        codes = [c.result() for c in calls]
    seen = {c for c, _ in codes}
    ROWS.append(("12 searches, embedder frozen, quota 6/caller", "+".join(sorted(c.name for c in seen)), "-", "-"))
    assert seen <= {BUSY, C.DEADLINE_EXCEEDED}, codes
    assert sum(c == BUSY for c, _ in codes) >= 6
    assert any("this caller" in d for c, d in codes if c == BUSY)
    os.kill(stack.pid("embedder"), signal.SIGCONT)
    deadline = time.monotonic() + 10
    while health(stack.target("gateway"), NAMES["gateway"]) != SERVING:
        assert time.monotonic() < deadline, "readiness did not come back"
        time.sleep(0.3)


# -- ids, metadata, filters ------------------------------------------------------------------
@pytest.mark.parametrize(
    "slide_id",
    ["a\0b", "evil\u202eFDP", " ", "../../etc/passwd", "x" * 129, " lead", "tail ", "a/b", "zero\u200bwidth"],
)
def test_hostile_slide_ids_are_refused(stack, gw, slide_id):
    name = f"slide_id {slide_id[:20]!r}"
    case(stack, gw, f"IngestSlide {name}", lambda: status_of(lambda: ingest(gw, CMU, slide_id)), BAD, says="slide_id")
    case(
        stack,
        gw,
        f"DeleteSlide {name}",
        lambda: status_of(lambda: gw.DeleteSlide(g.DeleteSlideRequest(slide_id=slide_id), timeout=10)),
        BAD,
        says="slide_id",
    )
    case(
        stack,
        gw,
        f"Search region {name}",
        lambda: status_of(
            lambda: gw.Search(g.SearchRequest(region=g.Region(slide_id=slide_id, width=100, height=100)), timeout=10)
        ),
        BAD,
        says="slide_id",
    )


def test_metadata_and_filters_are_bounded(stack, gw):
    case(
        stack,
        gw,
        "metadata value of 1.5 MB",
        lambda: status_of(lambda: ingest(gw, CMU, "m1", metadata={"note": "x" * 1_500_000})),
        BAD,
        says="1024",
    )
    case(
        stack,
        gw,
        "metadata with 65 keys",
        lambda: status_of(lambda: ingest(gw, CMU, "m2", metadata={f"k{i}": "v" for i in range(65)})),
        BAD,
        says="64 keys",
    )
    case(
        stack,
        gw,
        "metadata of 17 KiB in all",
        lambda: status_of(lambda: ingest(gw, CMU, "m3", metadata={f"k{i}": "v" * 1000 for i in range(17)})),
        BAD,
        says="16384",
    )
    case(
        stack,
        gw,
        "metadata key with NUL",
        lambda: status_of(lambda: ingest(gw, CMU, "m4", metadata={"a\0": "v"})),
        BAD,
        says="non-printable",
    )
    case(
        stack,
        gw,
        "Search with 1000 filter keys",
        lambda: status_of(
            lambda: gw.Search(
                g.SearchRequest(
                    region=g.Region(slide_id="cmu", width=448, height=448), filters={f"k{i}": "v" for i in range(1000)}
                ),
                timeout=30,
            )
        ),
        BAD,
        says="32 keys",
    )
    case(
        stack,
        gw,
        "Search with 2000 exclude_slide_ids",
        lambda: status_of(
            lambda: gw.Search(
                g.SearchRequest(
                    region=g.Region(slide_id="cmu", width=448, height=448),
                    exclude_slide_ids=[f"s{i}" for i in range(2000)],
                ),
                timeout=30,
            )
        ),
        BAD,
        says="1000",
    )


# -- one error vocabulary ------------------------------------------------------------------
def test_caller_mistakes_keep_their_status(stack, gw):
    case(
        stack,
        gw,
        "Search region of an unknown slide",
        lambda: status_of(
            lambda: gw.Search(
                g.SearchRequest(region=g.Region(slide_id="no-such-slide", width=100, height=100)), timeout=10
            )
        ),
        NOT_FOUND,
    )
    case(
        stack,
        gw,
        "ReadRegion off the slide",
        lambda: status_of(
            lambda: gw.ReadRegion(
                g.ReadRegionRequest(region=g.Region(slide_id="cmu", x=10**9, y=0, width=100, height=100)), timeout=10
            )
        ),
        BAD,
        says="outside the slide",
    )
    case(stack, gw, "IngestSlide of a missing file", lambda: status_of(lambda: ingest(gw, "nope.svs")), NOT_FOUND)


def test_a_reader_that_died_idle_is_replaced_and_the_next_read_succeeds(stack, gw):
    readers = psutil.Process(stack.pid("tiler")).children()
    assert readers
    for r in readers:
        r.kill()
    psutil.wait_procs(readers, timeout=10)
    case(
        stack,
        gw,
        "ReadRegion after the idle reader was killed",
        lambda: status_of(
            lambda: gw.ReadRegion(
                g.ReadRegionRequest(region=g.Region(slide_id="cmu", x=100, y=100, width=448, height=448)), timeout=60
            )
        ),
        C.OK,
    )


def test_metrics_listen_on_the_bind_host_only(stack):
    port = int(stack.per_service["gateway"]["SMILY_METRICS_PORT"])
    listening = [
        c.laddr
        for c in psutil.Process(stack.pid("gateway")).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening


def test_a_backend_down_is_unavailable_naming_it_without_addresses(stack, gw):
    stack.stop("tiler")
    try:
        details = case(
            stack,
            gw,
            "ReadRegion with the tiler stopped",
            lambda: status_of(
                lambda: gw.ReadRegion(
                    g.ReadRegionRequest(region=g.Region(slide_id="cmu", x=100, y=100, width=448, height=448)),
                    timeout=20,
                )
            ),
            UNAVAILABLE,
            says="tiler",
        )
        assert "connect" not in details.lower()
        deadline = time.monotonic() + 10
        while health(stack.target("gateway"), NAMES["gateway"]) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert health(stack.target("gateway")) == SERVING
    finally:
        stack.start("tiler")
    deadline = time.monotonic() + 20
    while health(stack.target("gateway"), NAMES["gateway"]) != SERVING:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    gw.ReadRegion(g.ReadRegionRequest(region=g.Region(slide_id="cmu", x=100, y=100, width=448, height=448)), timeout=60)
