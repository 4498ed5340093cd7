"""Running the HTTP process with uvicorn, on the one start and stop path of every
smily process (smily.common.server.run): `python -m smily.http`, `smily serve http`,
and in a thread for tests and `smily up`."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import uvicorn

from smily.common import server, tls
from smily.common.channels import RotatingStub
from smily.common.config import ConfigError, Settings

from .app import build


def _itself(channel: grpc.Channel) -> grpc.Channel:
    return channel


def gateway_channel(settings: Settings) -> RotatingStub:
    """The channel to the gateway, dialled as the gateway dials its backends: TLS
    verified with SMILY_TLS_CA_FILE, presenting this process's own certificate
    (SMILY_TLS_CERT_FILE/KEY_FILE) under mTLS, dialled again when it is renewed.
    Plaintext only under SMILY_PLAINTEXT=1."""
    credentials = tls.client_credentials(settings)
    if credentials is None and not settings.tls.plaintext:
        raise ConfigError(
            "no CA to verify the gateway with: set SMILY_TLS_CA_FILE (and SMILY_TLS_CERT_FILE and "
            "SMILY_TLS_KEY_FILE when the gateway requires client certificates), or SMILY_PLAINTEXT=1 for a local run"
        )
    if credentials is None:
        server.warn_if_plaintext(settings)
    return RotatingStub(settings.http.http_gateway_target, credentials, _itself)


class Running:
    """The HTTP server on settings.bind_host:settings.http_port (0 picks a free
    port) in a background thread; stop() lets in-flight requests finish."""

    def __init__(self, settings: Settings):
        self._chan = gateway_channel(settings)
        # log_config=None: uvicorn's loggers go through our JSON logging; no access
        # log (request paths carry slide ids, which the gateway's audit records).
        self._server = uvicorn.Server(
            uvicorn.Config(
                build(settings, self._chan),
                log_config=None,
                access_log=False,
                proxy_headers=False,
                server_header=False,
                timeout_graceful_shutdown=int(settings.server.shutdown_grace_s),
            )
        )
        self._sock = socket.socket(socket.AF_INET6 if ":" in settings.server.bind_host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((settings.server.bind_host, settings.http.http_port))
        except OSError as exc:
            self._sock.close()
            self._chan.close()
            raise OSError(
                f"cannot bind {settings.server.bind_host}:{settings.http.http_port} (SMILY_HTTP_PORT): {exc}"
            ) from None
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{server.dial_host(settings.server.bind_host)}:{self.port}"
        # uvicorn installs no signal handlers off the main thread: run() below waits for them.
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop(0)
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)

    def stop(self, grace: float = 0) -> None:
        # uvicorn waits for in-flight requests up to its timeout_graceful_shutdown.
        self._server.should_exit = True
        self._thread.join(max(grace, 0) + 30)
        self._sock.close()
        self._chan.close()


def serve() -> None:
    """`python -m smily.http` and `smily serve http`."""
    server.run(lambda settings: [Running(settings)], metrics=False)
