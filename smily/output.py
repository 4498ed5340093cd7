"""What the `smily` command and the demo print: hit tables for people."""
from __future__ import annotations

from smily.client import hit_dict


def print_hits(resp) -> None:
    hits = [hit_dict(h) for h in resp.hits]
    print(f"{len(hits)} hits (model {resp.model_id}{', cached query' if resp.cached else ''})")
    print(f"{'rank':>4}  {'score':>6}  {'slide':<24} {'x':>7} {'y':>7} {'w':>5} {'h':>5}  metadata")
    for i, h in enumerate(hits, 1):
        meta = ", ".join(f"{k}={v}" for k, v in sorted(h["metadata"].items()))
        print(f"{i:>4}  {h['score']:>6.3f}  {h['slide_id']:<24} {h['x']:>7} {h['y']:>7} "
              f"{h['width']:>5} {h['height']:>5}  {meta}")
