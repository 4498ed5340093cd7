"""Orthanc's Lua OnStableSeries callback (deploy/orthanc/smily-ingest.lua) asks for a case ingest.

A small HTTP receiver on loopback stands in for SMILY's HTTP API and records
the call Orthanc makes when a slide series becomes stable."""
from __future__ import annotations

import http.server
import json
import os
import queue
import threading

from smily.synthetic import SlideSpec, write_samples

from .conftest import ROOT
from .orthanc import Orthanc

SCRIPT = os.path.join(ROOT, "deploy", "orthanc", "smily-ingest.lua")


def test_stable_slide_series_requests_its_case(tmp_path):
    calls: queue.Queue = queue.Queue()

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            calls.put((self.path, self.headers["Authorization"], self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"operation": {}}')

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    spec = SlideSpec("trigger.tiff", "tiff", 1024, 1024, 0.5, 41)
    (tiff,) = write_samples(str(tmp_path / "slides"), (spec,))
    (tmp_path / "orthanc").mkdir()
    orthanc = Orthanc(str(tmp_path / "orthanc"), lua=[SCRIPT],
                      extra={"Smily": {"Url": f"http://127.0.0.1:{server.server_port}", "Token": "test-token"}})
    try:
        orthanc.push_slide(tiff, spec.width, spec.height, spec.mpp, str(tmp_path), AccessionNumber="ACC-LUA-0001")
        path, auth, content_type, body = calls.get(timeout=60)  # StableAge is 1 s; Orthanc checks every second
    finally:
        orthanc.stop()
        server.shutdown()
    assert (path, auth, content_type) == ("/v1/cases:ingest", "Bearer test-token", "application/json")
    assert json.loads(body) == {"accessionNumber": "ACC-LUA-0001"}
    assert calls.empty()  # one call per series
