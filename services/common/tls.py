"""TLS for every gRPC server and channel, from PEM files that may rotate.

Servers use gRPC's dynamic SSL credentials: before each handshake gRPC asks
for the current certificate, and we re-read the files only when they changed
(cert-manager renews them in place), so a rotation needs no restart. Client
channels have no such hook: ClientCredentials checks the files at most every
CLIENT_CHECK_S and hands out new credentials when they changed, and
channels.RotatingStub dials again with them. Under mTLS the backends also
check who the client is: the identity in its certificate must be on the
service's allow-list. Per RFC 6125 a certificate with SANs is matched on its
SANs only; its CN counts only when it has none.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .config import ConfigError, Settings
from .errors import PermissionDenied, ServiceError

log = logging.getLogger("smily.tls")

HEALTH_SERVICE = "grpc.health.v1.Health"
# How often a client looks at its certificate files (a stat each) for a renewal.
CLIENT_CHECK_S = 5.0
PLAINTEXT_WARNING = (
    "warning: plaintext gRPC without TLS (SMILY_PLAINTEXT=1): for a local run only, never on a network others share"
)


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _stamp(paths) -> tuple:
    """What changes when a file is replaced (a Secret mount swaps a symlink)."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _matching_pair(cert_pem: bytes, key_pem: bytes) -> bool:
    """A renewal half written (new key, old certificate) must not be served."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


class _CertificateFiles:
    """The server's certificate configuration, reloaded when its files change."""

    def __init__(self, cert_file: str, key_file: str, ca_file: str):
        self._paths = [p for p in (cert_file, key_file, ca_file) if p]
        self._cert, self._key, self._ca = cert_file, key_file, ca_file
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths)
        self.initial = self._load()
        if self.initial is None:
            raise ConfigError("SMILY_TLS_KEY_FILE does not match SMILY_TLS_CERT_FILE")

    def _load(self):
        cert, key = _read(self._cert), _read(self._key)
        if not _matching_pair(cert, key):
            return None
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=_read(self._ca) if self._ca else None
        )

    def fetch(self):
        """gRPC calls this before every handshake: None keeps the current certificate."""
        try:
            stamp = _stamp(self._paths)
            if stamp == self._stamp:
                return None
            with self._lock:
                if stamp == self._stamp:
                    return None
                config = self._load()
                if config is None:
                    return None  # mid-rotation: try again on the next handshake
                self._stamp = stamp
            log.info("TLS certificate reloaded")
            return config
        except Exception as exc:  # a missing file mid-swap: keep serving the old one
            log.warning("TLS certificate reload failed; keeping the current one", extra={"error": type(exc).__name__})
            return None


def mtls(settings: Settings) -> bool:
    return settings.tls.tls_client_auth.strip().lower() == "require"


def check(settings: Settings) -> None:
    """Refuse a configuration that would serve plaintext by accident, or half-TLS."""
    if settings.tls.tls_client_auth.strip().lower() not in ("none", "require"):
        raise ConfigError(f"SMILY_TLS_CLIENT_AUTH must be none or require, got {settings.tls.tls_client_auth!r}")
    if bool(settings.tls.tls_cert_file) != bool(settings.tls.tls_key_file):
        raise ConfigError("set both SMILY_TLS_CERT_FILE and SMILY_TLS_KEY_FILE")
    if mtls(settings) and not (settings.tls.tls_ca_file and settings.tls.tls_cert_file):
        raise ConfigError("SMILY_TLS_CLIENT_AUTH=require needs SMILY_TLS_CA_FILE and a certificate")
    if not settings.tls.tls_cert_file and not settings.tls.plaintext:
        raise ConfigError(
            "no TLS certificate: set SMILY_TLS_CERT_FILE and SMILY_TLS_KEY_FILE (or SMILY_PLAINTEXT=1 for a local run)"
        )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for a server, or None for plaintext."""
    check(settings)
    if not settings.tls.tls_cert_file:
        return None
    files = _CertificateFiles(
        settings.tls.tls_cert_file, settings.tls.tls_key_file, settings.tls.tls_ca_file if mtls(settings) else ""
    )
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch, require_client_authentication=mtls(settings))


class ClientCredentials:
    """A service's channel credentials, built again when its certificate files change.
    Its own certificate doubles as its client certificate (mTLS).

    current() is cheap: the files are stat'ed at most every CLIENT_CHECK_S. A
    changed pair whose key does not match its certificate (a renewal half
    written) is not used: the current credentials stay until the pair matches."""

    def __init__(self, cert_file: str, key_file: str, ca_file: str):
        self._cert, self._key, self._ca = cert_file, key_file, ca_file
        self._paths = [p for p in (cert_file, key_file, ca_file) if p]
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths)
        credentials = self._load()
        if credentials is None:
            raise ConfigError("SMILY_TLS_KEY_FILE does not match SMILY_TLS_CERT_FILE")
        self._current: tuple[int, grpc.ChannelCredentials] = (0, credentials)
        self._next_check = time.monotonic() + CLIENT_CHECK_S

    def _load(self) -> grpc.ChannelCredentials | None:
        key = _read(self._key) if self._key else None
        cert = _read(self._cert) if self._cert else None
        if cert is not None and key is not None and not _matching_pair(cert, key):
            return None
        return grpc.ssl_channel_credentials(_read(self._ca), key, cert)

    def current(self) -> tuple[int, grpc.ChannelCredentials]:
        """(generation, credentials): the generation grows by one at each reload."""
        if time.monotonic() >= self._next_check:
            self._check()
        return self._current

    def _check(self) -> None:
        with self._lock:
            if time.monotonic() < self._next_check:
                return  # another caller just looked
            self._next_check = time.monotonic() + CLIENT_CHECK_S
            try:
                stamp = _stamp(self._paths)
                if stamp == self._stamp:
                    return
                credentials = self._load()
            except Exception as exc:  # a file missing mid-swap: keep the current credentials
                log.warning(
                    "client certificate reload failed; keeping the current one", extra={"error": type(exc).__name__}
                )
                return
            if credentials is None:
                return  # mid-rotation: look again at the next check
            self._stamp = stamp
            self._current = (self._current[0] + 1, credentials)
        log.info("client certificate reloaded")


def client_credentials(settings: Settings) -> ClientCredentials | None:
    """The service's rotating client credentials, or None for plaintext."""
    if not settings.tls.tls_ca_file:
        return None
    return ClientCredentials(settings.tls.tls_cert_file, settings.tls.tls_key_file, settings.tls.tls_ca_file)


def allowed_clients(settings: Settings, service: str) -> frozenset[str] | None:
    """Identities a service accepts under mTLS; None = any certificate from the CA."""
    if not mtls(settings) or service == "gateway":
        return None  # the gateway authenticates its callers by token
    extra = {"index": settings.tls.tls_index_clients, "tiler": settings.tls.tls_tiler_clients}.get(service, ())
    return frozenset(settings.tls.tls_backend_clients) | frozenset(extra)


def peer_identities(context) -> set[str]:
    """The verified client certificate's SAN entries, or its CN when it has no SAN (RFC 6125 6.4.4)."""
    auth = context.auth_context() or {}
    values = auth.get("x509_subject_alternative_name") or auth.get("x509_common_name", [])
    return {v.decode() if isinstance(v, bytes) else v for v in values}


class PeerCheck(grpc.ServerInterceptor):
    """Under mTLS: only the listed certificate identities may call (health excepted)."""

    def __init__(self, allowed: frozenset[str]):
        self._allowed = allowed

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return handler
        allowed = self._allowed

        def check_peer(context) -> None:
            if not peer_identities(context) & allowed:
                raise PermissionDenied("this service accepts calls from the gateway only")

        return wrap(handler, check_peer)


def wrap(handler, before):
    """The handler with before(context) run ahead of it, for every call shape;
    a ServiceError from before() ends the call with its status."""

    def guarded(context) -> None:
        try:
            before(context)
        except ServiceError as exc:
            context.abort(exc.code, str(exc))

    kinds = [
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ]
    for attr, make in kinds:
        inner = getattr(handler, attr)
        if inner is None:
            continue
        if attr.endswith("_stream"):

            def behaviour(request, context, inner=inner):
                guarded(context)
                yield from inner(request, context)
        else:

            def behaviour(request, context, inner=inner):
                guarded(context)
                return inner(request, context)

        return make(behaviour, handler.request_deserializer, handler.response_serializer)
    return handler
