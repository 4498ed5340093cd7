"""Start any set of the four services in this process, backends first."""

from __future__ import annotations

from smily.common import server
from smily.common.config import Settings

ORDER = ("tiler", "embedder", "index", "gateway")


def registration(name: str):
    """The service's registration function; imported lazily: a tiler pod never loads ONNX Runtime or FAISS."""
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
    return registration


def start(names, settings: Settings) -> tuple[dict[str, server.RunningServer], Settings]:
    """Start the named services in this process (server.start_services); with port 0
    each picks a free port, and the gateway is pointed at the backends started here."""
    ordered = sorted(set(names), key=ORDER.index)
    return server.start_services([(name, registration(name)) for name in ordered], settings)


def stop(running: dict[str, server.RunningServer], grace: float) -> None:
    """Stop the servers, the gateway first; each closes its servicer."""
    for name in reversed(ORDER):
        srv = running.get(name)
        if srv is not None:
            srv.stop(grace)
