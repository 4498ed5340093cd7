"""The shared server bootstrap: health, reflection, metrics, error mapping, shutdown, config."""

from __future__ import annotations

import os
import signal
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from smily import stack
from smily.common import server
from smily.common.config import Settings
from smily.index.v1 import index_pb2, index_pb2_grpc
from smily.localstack import free_port
from smily.types.v1 import types_pb2

from .conftest import base_settings, rpc_code
from .helpers.procstack import NAMES, SERVING, ProcStack
from .helpers.wait import wait_until


def test_every_service_reports_serving(settings):
    for name, full in [
        ("tiler", "smily.tiler.v1.TilerService"),
        ("embedder", "smily.embedder.v1.EmbedderService"),
        ("index", "smily.index.v1.IndexService"),
        ("gateway", "smily.gateway.v1.GatewayService"),
    ]:
        ch = grpc.insecure_channel(f"127.0.0.1:{settings.port_of(name)}")
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", full):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, (name, service)


def _list_services(target: str):
    refl = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(target))
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    return {s.name for s in reply.list_services_response.service}


def test_reflection_is_off_unless_asked_for(settings, tmp_path):
    with pytest.raises(grpc.RpcError) as info:
        _list_services(settings.index.index_target)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    running, s = stack.start(["index"], base_settings(index_dir=str(tmp_path), reflection=True))
    try:
        assert "smily.index.v1.IndexService" in _list_services(s.index.index_target)
    finally:
        stack.stop(running, 0)


def test_errors_are_canonical_not_unknown(settings):
    index = index_pb2_grpc.IndexServiceStub(grpc.insecure_channel(settings.index.index_target))
    bad = index_pb2.SearchRequest(
        model_id="efficientnet-lite0/1", k=5, query=types_pb2.Tensor(data=b"\0" * 7, shape=[1280], dtype=1)
    )
    assert rpc_code(index.Search, bad) == grpc.StatusCode.INVALID_ARGUMENT


def test_metrics_endpoint_counts_rpcs(settings, client, ingested):
    port = free_port()
    server.start_metrics(port)
    client.slides()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'smily_grpc_requests_total{code="OK",method="ListSlides",service="gateway"}' in body
    assert "smily_grpc_request_seconds_bucket" in body


def test_sigterm_drains_in_order(tmp_path):
    """The process's own SIGTERM path: health watchers hear NOT_SERVING first, then new calls are
    refused, then the process exits cleanly."""
    procs = ProcStack(
        {"SMILY_INDEX_DIR": str(tmp_path / "index"), "SMILY_SHUTDOWN_GRACE_S": "2"}, log_dir=str(tmp_path)
    )
    procs.start("index")
    try:
        check = health_pb2.HealthCheckRequest(service=NAMES["index"])
        with grpc.insecure_channel(procs.target("index")) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            watch = stub.Watch(check, timeout=120)
            assert next(watch).status == SERVING
            os.kill(procs.pid("index"), signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING

            def refused():  # a new caller, on a connection of its own
                with grpc.insecure_channel(procs.target("index")) as fresh:
                    try:
                        status = health_pb2_grpc.HealthStub(fresh).Check(check, timeout=10).status
                    except grpc.RpcError as exc:
                        return exc.code()
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING  # never SERVING again
                return None

            # A new connection is refused (UNAVAILABLE), or, when it raced the listener's close,
            # cancelled; never served.
            assert wait_until("new calls refused while draining", refused) in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
            )
        assert procs.procs["index"].wait(60) == 0
    finally:
        procs.stop_all()


@pytest.mark.unit
def test_settings_from_env():
    s = Settings.from_env({"SMILY_TILER_PORT": "6000", "SMILY_SLIDE_ROOTS": "/a:/b", "SMILY_TILE_MPP": "0.5"})
    assert (s.tiler.tiler_port, s.tiler.slide_roots, s.gateway.tile_mpp) == (6000, ("/a", "/b"), 0.5)
    with pytest.raises(ValueError, match="SMILY_INDEX_PORT"):
        Settings.from_env({"SMILY_INDEX_PORT": "many"})
