"""What the harness runs inside a network namespace: kubelet's prober (in the node's).

`python -m tests.cluster.agent probe` reads one JSON request a line on stdin
({"id", "kind": grpc|http|tcp, "host", "port", "service"|"path", "timeout"}) and answers
{"id", "ok", "detail"} a line on stdout, each probe in its own thread, as kubelet's are.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def probe(req: dict) -> tuple[bool, str]:
    host, port, timeout = req["host"], int(req["port"]), float(req.get("timeout", 1))
    try:
        if req["kind"] == "grpc":
            with grpc.insecure_channel(f"{host}:{port}") as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=req.get("service", "")), timeout=timeout
                )
            return (
                resp.status == health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status),
            )
        if req["kind"] == "http":
            url = f"http://{host}:{port}{req.get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return 200 <= resp.status < 400, str(resp.status)
            except urllib.error.HTTPError as err:
                return False, str(err.code)
        if req["kind"] == "tcp":
            with socket.create_connection((host, port), timeout=timeout):
                return True, "connected"
    except grpc.RpcError as err:
        return False, err.code().name
    except OSError as err:
        return False, type(err).__name__
    return False, f"unknown probe {req['kind']}"


def serve_probes() -> None:
    lock = threading.Lock()

    def answer(req: dict) -> None:
        ok, detail = probe(req)
        with lock:
            sys.stdout.write(json.dumps({"id": req["id"], "ok": ok, "detail": detail}) + "\n")
            sys.stdout.flush()

    for line in sys.stdin:
        threading.Thread(target=answer, args=(json.loads(line),), daemon=True).start()


if __name__ == "__main__":
    if sys.argv[1:] == ["probe"]:
        serve_probes()
    else:
        sys.exit("usage: python -m tests.cluster.agent probe")
