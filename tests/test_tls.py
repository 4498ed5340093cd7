"""TLS and mTLS on the servers: who may connect, identities, rotation, the health port."""

from __future__ import annotations

import os
import shutil
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smily import stack
from smily.client import Client
from smily.common import channels, tls
from smily.common.channels import RotatingStub, channel
from smily.gateway.v1 import gateway_pb2
from smily.index.v1 import index_pb2, index_pb2_grpc
from smily.localstack import free_port
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc

from .conftest import TEST_SLIDES, base_settings, rpc_code
from .helpers.pki import CA
from .helpers.wait import wait_done


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    ca = CA(d)
    other = CA(os.path.join(d, "other"), "other-ca")
    return {
        "ca": ca,
        "other": other,
        "gateway": ca.issue("smily-gateway"),
        "tooling": ca.issue("smily-tooling"),
        "stranger": ca.issue("stranger"),
        "outsider": ca.issue("outsider", ca=other),
        # CN smily-gateway but SAN smily-http: a SAN-bearing certificate is its SANs only.
        "masquerade": ca.issue("smily-http", cn="smily-gateway", directory=os.path.join(d, "masquerade")),
        "cn-only": ca.issue("smily-gateway", san=False, directory=os.path.join(d, "cn-only")),
    }


def mtls_settings(pki, **changes):
    cert, key = pki["gateway"]
    return base_settings(
        plaintext=False,
        tls_cert_file=cert,
        tls_key_file=key,
        tls_ca_file=pki["ca"].path,
        tls_client_auth="require",
        **changes,
    )


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
    assert _list(backends.index.index_target, None) == grpc.StatusCode.UNAVAILABLE  # plaintext client
    assert _list(backends.index.index_target, creds(ca)) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    assert _list(backends.index.index_target, creds(ca, pki["outsider"])) == grpc.StatusCode.UNAVAILABLE  # other CA
    assert _list(backends.index.index_target, creds(ca, pki["stranger"])) == grpc.StatusCode.PERMISSION_DENIED
    assert _list(backends.index.index_target, creds(ca, pki["gateway"])) == grpc.StatusCode.OK
    assert _list(backends.index.index_target, creds(ca, pki["tooling"])) == grpc.StatusCode.OK  # tooling: index only
    assert _tiler(backends.tiler.tiler_target, creds(ca, pki["tooling"])) == grpc.StatusCode.PERMISSION_DENIED
    assert _tiler(backends.tiler.tiler_target, creds(ca, pki["stranger"])) == grpc.StatusCode.PERMISSION_DENIED
    assert _tiler(backends.tiler.tiler_target, creds(ca, pki["gateway"])) == grpc.StatusCode.OK


def test_a_certificate_with_sans_is_not_matched_on_its_cn(pki, backends):
    """RFC 6125: CN smily-gateway with SAN smily-http is smily-http, which no backend admits."""
    ca = pki["ca"].path
    assert _list(backends.index.index_target, creds(ca, pki["masquerade"])) == grpc.StatusCode.PERMISSION_DENIED
    assert _tiler(backends.tiler.tiler_target, creds(ca, pki["masquerade"])) == grpc.StatusCode.PERMISSION_DENIED
    # Without any SAN the CN is the identity.
    assert _list(backends.index.index_target, creds(ca, pki["cn-only"])) == grpc.StatusCode.OK


def test_the_gateway_dials_backends_with_its_certificate(pki, backends):
    """The credentials the gateway's Backends dial with (tls.client_credentials)."""
    assert _list(backends.index.index_target, tls.client_credentials(backends).current()[1]) == grpc.StatusCode.OK


def test_a_client_that_does_not_trust_the_server_ca_fails(pki, backends):
    assert _list(backends.index.index_target, creds(pki["other"].path, pki["gateway"])) == grpc.StatusCode.UNAVAILABLE


def test_health_answers_in_plaintext_on_its_own_port_only(pki, tmp_path):
    """kubelet's gRPC probes speak no TLS: the health service alone, in plaintext, on SMILY_HEALTH_PORT."""
    running, s = stack.start(["index"], mtls_settings(pki, index_dir=str(tmp_path), health_port=free_port()))
    srv = running["index"]
    try:
        plain = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{s.server.health_port}"))
        reply = plain.Check(health_pb2.HealthCheckRequest(service="smily.index.v1.IndexService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The health port serves nothing else.
        other = index_pb2_grpc.IndexServiceStub(grpc.insecure_channel(f"127.0.0.1:{s.server.health_port}"))
        assert rpc_code(other.ListSlides, index_pb2.ListSlidesRequest(), timeout=5) == grpc.StatusCode.UNIMPLEMENTED
        # On the TLS port, health needs a certificate from the CA but no particular identity.
        tls_health = health_pb2_grpc.HealthStub(channel(s.index.index_target, creds(pki["ca"].path, pki["stranger"])))
        assert (
            tls_health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        srv.health.enter_graceful_shutdown()
        assert (
            plain.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
        )
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
        assert _list(s.index.index_target, creds(ca1.path)) == grpc.StatusCode.OK
        assert _list(s.index.index_target, creds(ca2.path)) == grpc.StatusCode.UNAVAILABLE
        # Renewal by the other CA, written over the same paths.
        new_cert, new_key = ca2.issue("smily-index")
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        assert _list(s.index.index_target, creds(ca2.path)) == grpc.StatusCode.OK
        assert _list(s.index.index_target, creds(ca1.path)) == grpc.StatusCode.UNAVAILABLE
    finally:
        stack.stop(running, 0)


def test_a_server_without_certificates_refuses_to_start_unless_plaintext_is_asked_for(tmp_path):
    s = base_settings(plaintext=False, index_dir=str(tmp_path))
    with pytest.raises(ValueError, match="SMILY_PLAINTEXT=1"):
        stack.start(["index"], s)
    with pytest.raises(ValueError, match="SMILY_TLS_CA_FILE"):
        stack.start(["index"], s.replace(tls_client_auth="require", tls_cert_file="c", tls_key_file="k"))


def test_plaintext_prints_one_warning_line(tmp_path, caplog):
    running, _ = stack.start(["index"], base_settings(index_dir=str(tmp_path)))
    stack.stop(running, 0)
    lines = [r for r in caplog.records if r.getMessage() == tls.PLAINTEXT_WARNING]
    assert len(lines) == 1


def renew(pair: tuple[str, str], into: tuple[str, str]) -> None:
    """Write a new pair over a mounted one as kubelet does: each file swapped whole, key first."""
    for src, dst in ((pair[1], into[1]), (pair[0], into[0])):
        shutil.copy(src, dst + ".new")
        os.replace(dst + ".new", dst)


def mounted(pair: tuple[str, str], directory: str) -> tuple[str, str]:
    """A copy of the pair at the paths a Secret mount gives the service."""
    os.makedirs(directory, exist_ok=True)
    paths = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
    for src, dst in zip(pair, paths):
        shutil.copy(src, dst)
    return paths


def until(condition, what: str, limit_s: float = 60.0):
    """Poll condition() until it returns something true; fail naming what never happened."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        got = condition()
        if got:
            return got
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen within {limit_s:.0f} s")


def test_client_credentials_follow_the_files_but_not_a_half_written_pair(pki, tmp_path, monkeypatch):
    monkeypatch.setattr(tls, "CLIENT_CHECK_S", 0.0)
    files = mounted(pki["gateway"], str(tmp_path / "mount"))
    creds = tls.ClientCredentials(*files, pki["ca"].path)
    generation, first = creds.current()
    assert creds.current() == (generation, first)  # unchanged files: same credentials
    renewed = pki["ca"].issue("smily-gateway", directory=str(tmp_path / "renewed"))
    shutil.copy(renewed[1], files[1])  # the new key is there, the certificate is still the old one
    assert creds.current() == (generation, first)
    shutil.copy(renewed[0], files[0])
    assert creds.current()[0] == generation + 1


def test_a_call_in_flight_ends_on_the_channel_it_started_on(pki, backends, tmp_path, monkeypatch):
    """A renewal dials a new channel; the old one is closed only once its calls have ended."""
    monkeypatch.setattr(tls, "CLIENT_CHECK_S", 0.0)
    monkeypatch.setattr(channels, "RETIRE_GRACE_S", 0.0)
    closing: list = []  # (channel, stream still open) per close; calling a closing channel is not safe
    close = channels._close_soon
    monkeypatch.setattr(channels, "_close_soon", lambda ch: (closing.append((ch, stream.is_active())), close(ch)))
    files = mounted(pki["gateway"], str(tmp_path / "mount"))
    stub = RotatingStub(
        backends.tiler.tiler_target, tls.ClientCredentials(*files, pki["ca"].path), tiler_pb2_grpc.TilerServiceStub
    )
    old = stub.channel
    stream = stub.StreamTiles(tiler_pb2.StreamTilesRequest(slide="synth-a.tiff"), timeout=60)
    first = next(stream)
    renew(pki["ca"].issue("smily-gateway", directory=str(tmp_path / "renewed")), files)
    assert stub.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide="synth-a.tiff"), timeout=10).info.width > 0
    assert stub.channel is not old
    tiles = list(first.tiles) + [t for m in stream for t in m.tiles]
    assert len(tiles) == first.tiles_total
    assert until(lambda: closing, "closing the replaced channel") == [(old, False)]
    stub.close()


def _trust(path: str, *cas: CA) -> None:
    with open(path + ".new", "wb") as fh:
        fh.write(b"".join(read(ca.path) for ca in cas))
    os.replace(path + ".new", path)


def test_the_gateway_presents_its_renewed_certificate_without_a_restart(slide_dir, model_repo, tmp_path, monkeypatch):
    """The gateway's client certificate is renewed (here by a new CA), the backends stop trusting the
    old one and restart, so every connection is new: calls through the same gateway keep succeeding."""
    monkeypatch.setattr(tls, "CLIENT_CHECK_S", 0.0)  # look at the files on every call: nothing to wait for
    d = str(tmp_path)
    old_ca, new_ca = CA(os.path.join(d, "old"), "ca-old"), CA(os.path.join(d, "new"), "ca-new")
    trusted = os.path.join(d, "backends-trust.pem")  # the client CAs the backends accept, mid CA rotation
    _trust(trusted, old_ca, new_ca)
    cert, key = new_ca.issue("smily-backend")
    # The backends share one certificate here; the tiler admits it as the embedder's (EmbedSlide).
    s = base_settings(
        plaintext=False,
        tls_cert_file=cert,
        tls_key_file=key,
        tls_ca_file=trusted,
        tls_client_auth="require",
        tls_tiler_clients=("smily-backend",),
        slide_roots=(slide_dir,),
        model_repository=model_repo,
        index_dir=os.path.join(d, "index"),
    )
    back, s = stack.start(["tiler", "embedder", "index"], s)
    old_pair = old_ca.issue("smily-gateway")
    files = mounted(old_pair, os.path.join(d, "gateway-tls"))
    front, gw = stack.start(
        ["gateway"],
        s.replace(tls_cert_file=files[0], tls_key_file=files[1], tls_ca_file=new_ca.path, tls_client_auth="none"),
    )
    callers_ca = os.path.join(d, "callers-trust.pem")  # the gateway serves its own certificate too
    _trust(callers_ca, old_ca, new_ca)
    client = Client(
        f"127.0.0.1:{gw.gateway.gateway_port}", timeout=120, tls_ca=callers_ca, token="", cert_file="", key_file=""
    )
    try:
        slide = TEST_SLIDES[0].name
        op = wait_done(client, client.ingest(slide, "synth-a"))
        assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, op.error_message

        new_pair = new_ca.issue("smily-gateway")
        # Half written (the new key beside the old certificate): the gateway keeps its current pair.
        shutil.copy(new_pair[1], files[1] + ".new")
        os.replace(files[1] + ".new", files[1])
        assert [x.slide_id for x in client.slides()] == ["synth-a"]
        renew(new_pair, files)

        # The CA rotation ends: the backends trust the new CA only, and restart (every connection anew).
        _trust(trusted, new_ca)
        stack.stop(back, 0)
        back, _ = stack.start(["tiler", "embedder", "index"], s)
        for pair, code in ((old_pair, grpc.StatusCode.UNAVAILABLE), (new_pair, grpc.StatusCode.OK)):
            assert _list(s.index.index_target, creds(new_ca.path, pair)) == code
            assert _tiler(s.tiler.tiler_target, creds(new_ca.path, pair)) == code

        # Through the same gateway: the index, the tiler (the query region) and the embedder.
        ready = health_pb2_grpc.HealthStub(channel(f"127.0.0.1:{gw.gateway.gateway_port}", creds(callers_ca)))
        until(
            lambda: (
                ready.Check(health_pb2.HealthCheckRequest(service="smily.gateway.v1.GatewayService"), timeout=5).status
                == health_pb2.HealthCheckResponse.SERVING
            ),
            "the gateway's readiness with every backend",
        )
        assert [x.slide_id for x in client.slides()] == ["synth-a"]
        hits = client.search(region=dict(slide_id="synth-a", x=0, y=0, width=224, height=224), k=3).hits
        assert len(hits) == 3 and {h.slide_id for h in hits} == {"synth-a"}
        op = wait_done(client, client.ingest(slide, "synth-a-again"))
        assert op.state == gateway_pb2.OPERATION_STATE_SUCCEEDED, op.error_message
    finally:
        client.close()
        stack.stop(front, 0)
        stack.stop(back, 0)


def test_the_http_front_end_dials_a_tls_gateway_with_its_own_certificate(pki, slide_dir, model_repo, tmp_path):
    """smily-http against a gateway that requires client certificates: ready, and it answers /v1/slides."""
    import httpx

    from smily.http.server import Running

    s = mtls_settings(pki, slide_roots=(slide_dir,), model_repository=model_repo, index_dir=str(tmp_path / "index"))
    running, s = stack.start(stack.ORDER, s)
    cert, key = pki["ca"].issue("smily-http")
    front = s.replace(
        tls_cert_file=cert, tls_key_file=key, http_port=0, http_gateway_target=f"127.0.0.1:{s.gateway.gateway_port}"
    )
    http = Running(front)
    # Without a client certificate the gateway's handshake refuses it: readiness says so.
    anonymous = Running(front.replace(tls_cert_file="", tls_key_file=""))
    try:
        until(lambda: httpx.get(f"{http.url}/readyz").status_code == 200, "the front end's readiness")
        r = httpx.get(f"{http.url}/v1/slides")
        assert r.status_code == 200, r.text
        assert r.json().get("slides", []) == []
        assert httpx.get(f"{anonymous.url}/readyz").status_code == 503
    finally:
        anonymous.stop()
        http.stop()
        stack.stop(running, 0)


def test_the_http_front_end_without_a_ca_refuses_to_start_unless_plaintext_is_asked_for():
    from smily.common.config import ConfigError
    from smily.http.server import Running

    with pytest.raises(ConfigError, match="SMILY_TLS_CA_FILE.*SMILY_PLAINTEXT=1"):
        Running(base_settings(plaintext=False, http_port=0))


@pytest.mark.parametrize("service", ["index", "http"])
def test_a_process_without_tls_settings_says_what_to_set_in_one_line(service, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SMILY_")}
    env.update(SMILY_INDEX_DIR=str(tmp_path), SMILY_METRICS_PORT="0", SMILY_INDEX_PORT="0", SMILY_HTTP_PORT="0")
    proc = subprocess.run(
        [sys.executable, "-m", f"smily.{service}"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "SMILY_PLAINTEXT=1" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
