"""Start any set of the four services in this process, backends first."""

from __future__ import annotations

import dataclasses
from typing import Any

from smily.common import server
from smily.common.config import Settings

ORDER = ("tiler", "embedder", "index", "gateway")


def _registration(name: str, settings: Settings):
    # Imported lazily: a tiler pod never loads ONNX Runtime or FAISS.
    if name == "tiler":
        from smily.tiler.server import registration
    elif name == "embedder":
        from smily.embedder.server import registration
    elif name == "index":
        from smily.index.server import registration
    elif name == "gateway":
        from smily.gateway.server import registration
    else:
        raise ValueError(f"unknown service {name!r}; choose from {', '.join(ORDER)}")
    return registration(settings)


def start(names, settings: Settings) -> tuple[dict[str, server.RunningServer], Settings]:
    """Start the named services; with port 0 each picks a free port, and the
    gateway is pointed at the backends started here. Returns the servers and
    the settings with the real ports filled in."""
    running: dict[str, server.RunningServer] = {}
    if settings.health_port and len(set(names)) > 1:
        raise ValueError("SMILY_HEALTH_PORT serves one service per process; unset it for `serve all`")
    server.warn_if_plaintext(settings)
    try:
        for name in sorted(set(names), key=ORDER.index):
            reg = _registration(name, settings)
            srv = server.start(
                [reg],
                settings.bind_host,
                getattr(settings, f"{name}_port"),
                max_concurrent_rpcs=settings.max_concurrent_rpcs,
                worker_threads=settings.worker_threads,
                **server.security(settings, name),
            )
            srv.servicer = reg.servicer
            running[name] = srv
            updates: dict[str, Any] = {f"{name}_port": srv.port}
            if name != "gateway":
                updates[f"{name}_target"] = f"{_dial_host(settings.bind_host)}:{srv.port}"
            settings = dataclasses.replace(settings, **updates)
    except BaseException:
        stop(running, 0)
        raise
    return running, settings


def _dial_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "[::]") else bind_host


def stop(running: dict[str, server.RunningServer], grace: float) -> None:
    for name in reversed(ORDER):
        srv = running.get(name)
        if srv is not None:
            srv.stop(grace)
            close = getattr(srv.servicer, "close", None)
            if close:
                close()
