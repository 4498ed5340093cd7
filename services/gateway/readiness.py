"""The gateway is ready while every backend answers its health check.

Kubernetes' readiness probe asks for the gateway's service name: a gateway
whose tiler, embedder or an index shard is unreachable reads NOT_SERVING
there and gets no new traffic, while liveness ("") stays the process's own,
so a backend outage never makes Kubernetes restart healthy gateways.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smily.common.channels import RotatingStub
from smily.embedder.v1 import embedder_pb2
from smily.index.v1 import index_pb2
from smily.tiler.v1 import tiler_pb2

log = logging.getLogger("smily.gateway.readiness")

INTERVAL_S = 2.0
CHECK_TIMEOUT_S = 1.0
SERVICES = {
    "tiler": tiler_pb2.DESCRIPTOR.services_by_name["TilerService"].full_name,
    "embedder": embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name,
    "index": index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name,
}


class Readiness:
    def __init__(self, stubs: dict[str, list[list[RotatingStub]]]):
        # A group is one shard's replicas (or a lone backend): it is down only
        # when none of them serves.
        self._checks = [(name, group) for name, groups in stubs.items() for group in groups]
        self._stop = threading.Event()
        self.down: list[str] = []

    def _probe(self) -> list[str]:
        down = []
        for name, group in self._checks:
            if not any(self._serving(stub, SERVICES[name]) for stub in group):
                down.append(name)
        return down

    @staticmethod
    def _serving(stub: RotatingStub, service: str) -> bool:
        # The channel as it is now: a renewed client certificate replaces it.
        health = health_pb2_grpc.HealthStub(stub.channel)
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CHECK_TIMEOUT_S).status
        except grpc.RpcError:
            return False
        return status == health_pb2.HealthCheckResponse.SERVING

    def watch(self, set_ready: Callable[[bool], None]) -> None:
        """Probe now and every INTERVAL_S in the background, calling set_ready(all backends serving)."""

        def loop():
            while True:
                down = self._probe()
                if down and down != self.down:
                    log.warning("backends not serving", extra={"backends": down})
                elif self.down and not down:
                    log.info("every backend serving again")
                self.down = down
                set_ready(not down)
                if self._stop.wait(INTERVAL_S):
                    return

        threading.Thread(target=loop, name="readiness", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
