"""Running the HTTP process with uvicorn: `smily serve http`, `python -m smily.http`,
and in a thread for tests and `smily up`."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from smily.common import logs
from smily.common.channels import channel
from smily.common.config import Settings

from .app import build


def _server(settings: Settings, chan) -> uvicorn.Server:
    # log_config=None: uvicorn's loggers go through our JSON logging; no access
    # log (request paths carry slide ids, which the gateway's audit records).
    return uvicorn.Server(
        uvicorn.Config(
            build(settings, chan),
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        )
    )


def serve(settings: Settings | None = None) -> None:
    settings = settings or Settings.from_env()
    logs.setup(settings.log_level)
    chan = channel(settings.http_gateway_target)
    server = _server(settings, chan)
    server.config.host, server.config.port = settings.bind_host, settings.http_port
    try:
        server.run()  # stops on SIGTERM/SIGINT after in-flight requests finish
    finally:
        chan.close()


class Running:
    """An HTTP server on a free loopback port in a background thread."""

    def __init__(self, settings: Settings):
        self._chan = channel(settings.http_gateway_target)
        self._server = _server(settings, self._chan)
        self._sock = socket.socket()
        self._sock.bind((settings.bind_host, settings.http_port))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{settings.bind_host}:{self.port}"
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()
        self._chan.close()
