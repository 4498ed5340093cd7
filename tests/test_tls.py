"""TLS and mTLS on the servers: who may connect, identities, rotation, the health port."""
from __future__ import annotations

import dataclasses
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smily import stack
from smily.common import tls
from smily.common.channels import channel
from smily.index.v1 import index_pb2, index_pb2_grpc
from smily.localstack import free_port
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc

from .conftest import base_settings, rpc_code
from .pki import CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    ca = CA(d)
    other = CA(os.path.join(d, "other"), "other-ca")
    return {"ca": ca, "other": other, "gateway": ca.issue("smily-gateway"), "tooling": ca.issue("smily-tooling"),
            "stranger": ca.issue("stranger"), "outsider": ca.issue("outsider", ca=other)}


def mtls_settings(pki, **changes):
    cert, key = pki["gateway"]
    return base_settings(plaintext=False, tls_cert_file=cert, tls_key_file=key, tls_ca_file=pki["ca"].path,
                         tls_client_auth="require", **changes)


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def creds(ca_path: str, pair=None) -> grpc.ChannelCredentials:
    if pair is None:
        return grpc.ssl_channel_credentials(read(ca_path))
    return grpc.ssl_channel_credentials(read(ca_path), read(pair[1]), read(pair[0]))


@pytest.fixture(scope="module")
def backends(pki, slide_dir, tmp_path_factory):
    s = mtls_settings(pki, slide_roots=(slide_dir,), index_dir=str(tmp_path_factory.mktemp("tls-index")))
    running, s = stack.start(["tiler", "index"], s)
    yield s
    stack.stop(running, 0)


def _list(target: str, credentials) -> grpc.StatusCode:
    stub = index_pb2_grpc.IndexServiceStub(channel(target, credentials))
    try:
        stub.ListSlides(index_pb2.ListSlidesRequest(page_size=1), timeout=5)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def _tiler(target: str, credentials) -> grpc.StatusCode:
    stub = tiler_pb2_grpc.TilerServiceStub(channel(target, credentials))
    try:
        stub.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide="synth-a.tiff"), timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def test_backends_accept_only_the_gateway_identity(pki, backends):
    ca = pki["ca"].path
    assert _list(backends.index_target, None) == grpc.StatusCode.UNAVAILABLE  # plaintext client
    assert _list(backends.index_target, creds(ca)) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    assert _list(backends.index_target, creds(ca, pki["outsider"])) == grpc.StatusCode.UNAVAILABLE  # other CA
    assert _list(backends.index_target, creds(ca, pki["stranger"])) == grpc.StatusCode.PERMISSION_DENIED
    assert _list(backends.index_target, creds(ca, pki["gateway"])) == grpc.StatusCode.OK
    assert _list(backends.index_target, creds(ca, pki["tooling"])) == grpc.StatusCode.OK  # tooling: index only
    assert _tiler(backends.tiler_target, creds(ca, pki["tooling"])) == grpc.StatusCode.PERMISSION_DENIED
    assert _tiler(backends.tiler_target, creds(ca, pki["stranger"])) == grpc.StatusCode.PERMISSION_DENIED
    assert _tiler(backends.tiler_target, creds(ca, pki["gateway"])) == grpc.StatusCode.OK


def test_the_gateway_dials_backends_with_its_certificate(pki, backends):
    """tls.channel_credentials is what the gateway's Backends use."""
    assert _list(backends.index_target, tls.channel_credentials(backends)) == grpc.StatusCode.OK


def test_a_client_that_does_not_trust_the_server_ca_fails(pki, backends):
    assert _list(backends.index_target, creds(pki["other"].path, pki["gateway"])) == grpc.StatusCode.UNAVAILABLE


def test_health_answers_in_plaintext_on_its_own_port_only(pki, tmp_path):
    """kubelet's gRPC probes speak no TLS: the health service alone, in plaintext, on SMILY_HEALTH_PORT."""
    running, s = stack.start(["index"], mtls_settings(pki, index_dir=str(tmp_path), health_port=free_port()))
    srv = running["index"]
    try:
        plain = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{s.health_port}"))
        reply = plain.Check(health_pb2.HealthCheckRequest(service="smily.index.v1.IndexService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The health port serves nothing else.
        other = index_pb2_grpc.IndexServiceStub(grpc.insecure_channel(f"127.0.0.1:{s.health_port}"))
        assert rpc_code(other.ListSlides, index_pb2.ListSlidesRequest(), timeout=5) == grpc.StatusCode.UNIMPLEMENTED
        # On the TLS port, health needs a certificate from the CA but no particular identity.
        tls_health = health_pb2_grpc.HealthStub(channel(s.index_target, creds(pki["ca"].path, pki["stranger"])))
        assert tls_health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        srv.health.enter_graceful_shutdown()
        assert plain.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        stack.stop(running, 0)


def test_one_health_port_cannot_serve_several_services(tmp_path):
    with pytest.raises(ValueError, match="one service per process"):
        stack.start(["tiler", "index"], base_settings(index_dir=str(tmp_path), health_port=free_port()))


def test_certificates_are_reloaded_when_the_files_change(pki, tmp_path):
    """cert-manager rewrites the files in place: new handshakes get the new certificate, no restart."""
    d = str(tmp_path / "rotating")
    ca1, ca2 = CA(os.path.join(d, "1"), "ca-one"), CA(os.path.join(d, "2"), "ca-two")
    cert, key = ca1.issue("smily-index")
    s = base_settings(plaintext=False, tls_cert_file=cert, tls_key_file=key, index_dir=str(tmp_path / "index"))
    running, s = stack.start(["index"], s)
    try:
        assert _list(s.index_target, creds(ca1.path)) == grpc.StatusCode.OK
        assert _list(s.index_target, creds(ca2.path)) == grpc.StatusCode.UNAVAILABLE
        # Renewal by the other CA, written over the same paths.
        new_cert, new_key = ca2.issue("smily-index")
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        assert _list(s.index_target, creds(ca2.path)) == grpc.StatusCode.OK
        assert _list(s.index_target, creds(ca1.path)) == grpc.StatusCode.UNAVAILABLE
    finally:
        stack.stop(running, 0)


def test_a_server_without_certificates_refuses_to_start_unless_plaintext_is_asked_for(tmp_path):
    s = base_settings(plaintext=False, index_dir=str(tmp_path))
    with pytest.raises(ValueError, match="SMILY_PLAINTEXT=1"):
        stack.start(["index"], s)
    with pytest.raises(ValueError, match="SMILY_TLS_CA_FILE"):
        stack.start(["index"], dataclasses.replace(s, tls_client_auth="require", tls_cert_file="c", tls_key_file="k"))


def test_plaintext_prints_one_warning_line(tmp_path, caplog):
    running, _ = stack.start(["index"], base_settings(index_dir=str(tmp_path)))
    stack.stop(running, 0)
    lines = [r for r in caplog.records if r.getMessage() == tls.PLAINTEXT_WARNING]
    assert len(lines) == 1
