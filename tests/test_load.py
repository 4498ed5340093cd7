"""Bounded load with one backend frozen: 16 clients on loopback for about 20 s
against the gateway as its own process, the embedder SIGSTOPped after a warm-up.
Liveness stays SERVING throughout, the gateway's memory stays bounded, and
the only errors are UNAVAILABLE and DEADLINE_EXCEEDED; what needs no embedder
(ListSlides, cached queries) keeps succeeding.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections import Counter

import grpc
import numpy as np
from PIL import Image

from smily.client import Client
from smily.gateway.v1 import gateway_pb2 as g
from smily.gateway.v1 import gateway_pb2_grpc

from .conftest import CMU
from .helpers.procstack import SERVING, ProcStack, health
from .helpers.wait import wait_done

CLIENTS = 16
DURATION_S = 20.0
FREEZE_AT_S = 4.0
CALL_DEADLINE_S = 2.0
# The gateway's livenessProbe in deploy/k8s/base/gateway.yaml: a probe may take timeoutSeconds,
# and failureThreshold failures in a row restart the pod.
PROBE_TIMEOUT_S = 5.0
PROBE_FAILURES = 3
C = grpc.StatusCode


def _longest_failure_run(probes: list[str]) -> int:
    run = longest = 0
    for status in probes:
        run = 0 if status == "SERVING" else run + 1
        longest = max(longest, run)
    return longest


def _png(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_sixteen_clients_with_the_embedder_frozen(slide_dir, model_repo, redis_url, tmp_path):
    stack = ProcStack(
        {
            "SMILY_SLIDE_ROOTS": slide_dir,
            "SMILY_MODEL_REPOSITORY": model_repo,
            "SMILY_INDEX_DIR": str(tmp_path / "index"),
            "SMILY_REDIS_URL": redis_url,
            "SMILY_TILER_READERS": "1",
            "SMILY_LOG_LEVEL": "WARNING",
        },
        str(tmp_path),
    ).start_all()
    try:
        ch = grpc.insecure_channel(stack.target("gateway"))
        gw = gateway_pb2_grpc.GatewayServiceStub(ch)
        client = Client(stack.target("gateway"), timeout=60)
        op = wait_done(client, client.ingest(CMU, "cmu"))
        client.close()
        assert op.state == g.OPERATION_STATE_SUCCEEDED, op.error_message
        cached = _png(np.random.default_rng(99))
        gw.Search(g.SearchRequest(image=cached, k=5), timeout=60)

        outcomes: Counter = Counter()
        probes: list[str] = []  # each liveness answer, in order
        peak_rss_mb = [0.0]
        lock = threading.Lock()
        stop = threading.Event()

        def client(i: int) -> None:
            rng = np.random.default_rng(i)
            calls = [
                (
                    "Search(new image)",
                    lambda: gw.Search(g.SearchRequest(image=_png(rng), k=5), timeout=CALL_DEADLINE_S),
                ),
                (
                    "Search(cached image)",
                    lambda: gw.Search(g.SearchRequest(image=cached, k=5), timeout=CALL_DEADLINE_S),
                ),
                ("ListSlides", lambda: gw.ListSlides(g.ListSlidesRequest(), timeout=CALL_DEADLINE_S)),
                (
                    "ReadRegion",
                    lambda: gw.ReadRegion(
                        g.ReadRegionRequest(
                            region=g.Region(
                                slide_id="cmu",
                                x=int(rng.integers(0, 1500)),
                                y=int(rng.integers(0, 2000)),
                                width=448,
                                height=448,
                            )
                        ),
                        timeout=CALL_DEADLINE_S,
                    ),
                ),
            ]
            n = 0
            while not stop.is_set():
                name, call = calls[n % len(calls)]
                n += 1
                try:
                    call()
                    code = C.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                with lock:
                    outcomes[(name, code.name, stack_state[0])] += 1

        def watch() -> None:
            while not stop.is_set():
                status = health(stack.target("gateway"), "", timeout=PROBE_TIMEOUT_S)
                rss = stack.memory_mb("gateway")[0]
                with lock:
                    probes.append("SERVING" if status == SERVING else str(status))
                    peak_rss_mb[0] = max(peak_rss_mb[0], rss)
                time.sleep(0.25)

        stack_state = ["warm"]
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        threads.append(threading.Thread(target=watch))
        stack.reset_peak("gateway")
        start = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(FREEZE_AT_S)
        os.kill(stack.pid("embedder"), signal.SIGSTOP)
        stack_state[0] = "embedder frozen"
        time.sleep(DURATION_S - FREEZE_AT_S)
        stop.set()
        for t in threads:
            t.join(CALL_DEADLINE_S + 10)
        elapsed = time.monotonic() - start
        os.kill(stack.pid("embedder"), signal.SIGCONT)
        hwm = stack.memory_mb("gateway")[1]

        print(
            f"\n{CLIENTS} clients for {elapsed:.1f} s; gateway RSS peak sampled {peak_rss_mb[0]:.0f} MB, "
            f"VmHWM {hwm:.0f} MB; liveness answers {dict(Counter(probes))}"
        )
        for key, count in sorted(outcomes.items()):
            print(f"  {key}: {count}")
        frozen = {(name, code) for name, code, state in outcomes if state == "embedder frozen"}
        errors = {code for _, code in frozen if code != "OK"}
        assert errors <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, outcomes
        assert ("ListSlides", "OK") in frozen and ("Search(cached image)", "OK") in frozen
        # The kubelet restarts the pod after PROBE_FAILURES failed probes in a row, never fewer.
        assert probes and _longest_failure_run(probes) < PROBE_FAILURES, probes
        assert hwm < 1024  # the gateway's pod limit in deploy/k8s is 1 GiB
        assert health(stack.target("gateway"), timeout=PROBE_TIMEOUT_S) == SERVING
        ch.close()
    finally:
        stack.stop_all()
