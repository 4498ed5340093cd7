"""A LIS in its own namespace: the test's caller of the box, outside the cluster's pods.

`python -m tests.cluster.client` reads one JSON command a line and answers one JSON
line: it takes a token from the IdP (client_credentials), drives the HTTP API of
smily-http, and searches the gateway Service over gRPC with TLS, its client
certificate and the token, on the channel smily.client uses. A search loop runs in the background between
`loop_start` and `loop_stop`, which answers every failed call with its time.
"""

from __future__ import annotations

import base64
import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc

from smily.common.channels import channel
from smily.gateway.v1 import gateway_pb2, gateway_pb2_grpc


class Lis:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.token = ""
        with open(cfg["ca"], "rb") as f:
            ca = f.read()
        with open(cfg["cert"], "rb") as f:
            cert = f.read()
        with open(cfg["key"], "rb") as f:
            key = f.read()
        # The channel smily.client dials with: round_robin, UNAVAILABLE retried for idempotent calls.
        self.channel = channel(cfg["gateway"], grpc.ssl_channel_credentials(ca, key, cert))
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.loop: dict | None = None

    def get_token(self) -> dict:
        basic = base64.b64encode(f"{self.cfg['client_id']}:{self.cfg['client_secret']}".encode()).decode()
        req = urllib.request.Request(
            self.cfg["token_url"],
            data=urllib.parse.urlencode({"grant_type": "client_credentials"}).encode(),
            headers={"Authorization": f"Basic {basic}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            self.token = json.load(resp)["access_token"]
        return {"ok": True}

    def http(self, method: str, path: str, body: dict | None = None, raw: bool = False) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.cfg["http"] + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                payload = resp.read()
                status, ctype = resp.status, resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            payload, status, ctype = err.read(), err.code, err.headers.get("Content-Type", "")
        if raw or not ctype.startswith("application/json"):
            return {"status": status, "content_type": ctype, "bytes": len(payload), "head": payload[:8].hex()}
        return {"status": status, "json": json.loads(payload)}

    def connect(self, host: str, port: int) -> dict:
        """A TCP connection attempt: refused or dropped by a NetworkPolicy reads False."""
        try:
            with socket.create_connection((host, port), timeout=3):
                return {"connected": True}
        except OSError:
            return {"connected": False}

    def search(self, slide_id: str, x: int, y: int, size: int, k: int = 5) -> dict:
        req = gateway_pb2.SearchRequest(
            region=gateway_pb2.Region(slide_id=slide_id, x=x, y=y, width=size, height=size), k=k
        )
        resp = self.gateway.Search(req, metadata=[("authorization", f"Bearer {self.token}")], timeout=30)
        return {"hits": [h.slide_id for h in resp.hits]}

    def loop_start(self, query: dict) -> dict:
        state = {"stop": threading.Event(), "ok": 0, "failed": [], "slowest": 0.0}

        def run():
            while not state["stop"].is_set():
                started = time.monotonic()
                try:
                    hits = self.search(**query)["hits"]
                    if not hits:
                        raise RuntimeError("no hits")
                    state["ok"] += 1
                except (grpc.RpcError, RuntimeError) as exc:
                    code = exc.code().name if isinstance(exc, grpc.RpcError) else str(exc)
                    state["failed"].append({"at": time.time(), "error": code})
                state["slowest"] = max(state["slowest"], time.monotonic() - started)
                time.sleep(0.05)

        state["thread"] = threading.Thread(target=run, daemon=True)
        state["thread"].start()
        self.loop = state
        return {"ok": True}

    def loop_stop(self) -> dict:
        state = self.loop
        assert state is not None
        state["stop"].set()
        state["thread"].join()
        self.loop = None
        return {"ok": state["ok"], "failed": state["failed"], "slowest": state["slowest"]}

    def loop_status(self) -> dict:
        state = self.loop or {"ok": 0, "failed": []}
        return {"ok": state["ok"], "failed": len(state["failed"])}


def main() -> None:
    lis: Lis | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op, args = cmd.pop("op"), cmd
        try:
            if op == "configure":
                lis = Lis(args)
                out = {"ok": True}
            else:
                assert lis is not None
                out = getattr(lis, op)(**args)
        except grpc.RpcError as exc:
            out = {"error": exc.code().name, "details": exc.details()}
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the test, named
            out = {"error": type(exc).__name__, "details": str(exc)}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
