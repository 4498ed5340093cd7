"""What the `smily` command and the demo print: JSON for programs, tables and
progress for people."""

from __future__ import annotations

import json
import sys
import time

from google.protobuf import json_format

from smily.client import hit_dict


def message_dict(message) -> dict:
    """Every field of a response, defaults included, with proto field names and enum names."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(obj) -> None:
    """One JSON object per call on stdout."""
    print(json.dumps(message_dict(obj) if hasattr(obj, "DESCRIPTOR") else obj, indent=2))


def print_hits(resp) -> None:
    hits = [hit_dict(h) for h in resp.hits]
    print(f"{len(hits)} hits (model {resp.model_id}{', cached query' if resp.cached else ''})")
    print(f"{'rank':>4}  {'score':>6}  {'tenant':<12} {'slide':<24} {'x':>7} {'y':>7} {'w':>5} {'h':>5}  metadata")
    for i, h in enumerate(hits, 1):
        meta = ", ".join(f"{k}={v}" for k, v in sorted(h["metadata"].items()))
        print(
            f"{i:>4}  {h['score']:>6.3f}  {h['tenant']:<12} {h['slide_id']:<24} {h['x']:>7} {h['y']:>7} "
            f"{h['width']:>5} {h['height']:>5}  {meta}"
        )


class Progress:
    """Tiles indexed of one ingest on stderr: a tqdm bar on a terminal; elsewhere (logs,
    pipes) a plain line at most every `every_s` seconds, with the rate and an ETA."""

    def __init__(self, label: str, stream=None, every_s: float = 5.0):
        self._stream = stream or sys.stderr
        self._label = label
        self._every_s = every_s
        self._start = self._last = time.monotonic()
        self._bar = None
        if self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(desc=label, unit="tile", file=self._stream, dynamic_ncols=True)

    def update(self, done: int, total: int) -> None:
        if self._bar is not None:
            if total and self._bar.total != total:
                self._bar.total = total
            self._bar.update(done - self._bar.n)
            return
        now = time.monotonic()
        if now - self._last < self._every_s or not total:
            return
        self._last = now
        rate = done / max(now - self._start, 1e-9)
        eta = f", ETA {_duration((total - done) / rate)}" if rate > 0 else ""
        self._stream.write(
            f"{self._label}: {done}/{total} tiles indexed ({100 * done // total}%), {rate:.0f} tiles/s{eta}\n"
        )
        self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"
