"""Redis is a cache: when it dies mid-traffic, no query fails."""
from __future__ import annotations

import dataclasses

from smily import stack
from smily.client import Client
from smily.localstack import start_redis

from .conftest import need


def test_queries_survive_redis_dying(settings, ingested):
    proc, url = start_redis()
    if proc is None:
        need("redis-server", "install it with `apt-get install redis-server` (make test does, as root)")
    gw_settings = dataclasses.replace(settings, gateway_port=0, redis_url=url)
    running, gw_settings = stack.start(["gateway"], gw_settings)
    client = Client(f"127.0.0.1:{gw_settings.gateway_port}", timeout=30)
    regions = [dict(slide_id="synth-a", x=x, y=600, width=448, height=448) for x in (500, 900, 1300)]
    results = []
    try:
        for i in range(30):
            if i == 12:
                proc.kill()
                proc.wait()
            resp = client.search(region=regions[i % len(regions)], k=3)
            results.append((i, resp.cached, len(resp.hits)))
    finally:
        client.close()
        stack.stop(running, 0)
        if proc.poll() is None:
            proc.kill()
    assert all(n == 3 for _, _, n in results)
    assert any(cached for i, cached, _ in results if i < 12), "the cache was never hit while Redis was up"
    assert not any(cached for i, cached, _ in results if i >= 12)
