"""Redis is a cache: when it dies mid-traffic, no query fails."""

from __future__ import annotations

import pytest

from smily import stack
from smily.client import Client
from smily.localstack import start_redis

from .conftest import need


def test_queries_survive_redis_dying(settings, ingested):
    proc, url = start_redis()
    if proc is None:
        need("redis-server", "install it with `apt-get install redis-server` (make test does, as root)")
    gw_settings = settings.replace(gateway_port=0, redis_url=url)
    running, gw_settings = stack.start(["gateway"], gw_settings)
    client = Client(f"127.0.0.1:{gw_settings.gateway.gateway_port}", timeout=30)
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


def _rejected() -> float:
    from smily.gateway.cache import REJECTED

    return REJECTED._value.get()


def test_a_poisoned_cache_entry_is_a_miss_and_the_query_stays_true(settings, ingested):
    """Someone with Redis access overwrites cached embeddings: the HMAC check turns them into misses."""
    import numpy as np
    import redis as redis_lib

    proc, url = start_redis()
    if proc is None:
        need("redis-server", "install it with `apt-get install redis-server`")
    running, gw = stack.start(["gateway"], settings.replace(gateway_port=0, redis_url=url, cache_key="a-shared-secret"))
    client = Client(f"127.0.0.1:{gw.gateway.gateway_port}", timeout=60)
    region = dict(slide_id="synth-b", x=700, y=500, width=448, height=448)
    try:
        first = client.search(region=region, k=5)
        assert not first.cached and client.search(region=region, k=5).cached
        r = redis_lib.Redis.from_url(url)
        keys = r.keys("smily:emb:*")
        assert keys
        forged = np.random.default_rng(0).standard_normal(len(r.get(keys[0])) // 4 - 8).astype(np.float32)
        before = _rejected()
        for k in keys:  # a forged vector, and a genuine value moved to another key
            r.set(k, b"\0" * 32 + forged.tobytes())
        poisoned = client.search(region=region, k=5)
        assert not poisoned.cached
        assert [(h.slide_id, h.x, h.y) for h in poisoned.hits] == [(h.slide_id, h.x, h.y) for h in first.hits]
        assert _rejected() >= before + 1
        other = dict(slide_id="synth-a", x=500, y=600, width=448, height=448)
        client.search(region=other, k=3)
        genuine = {k: r.get(k) for k in r.keys("smily:emb:*")}
        src = next(k for k, v in genuine.items() if v != genuine.get(keys[0]))
        for k in genuine:
            r.set(k, genuine[src])
        moved = client.search(region=region, k=5)
        assert not moved.cached and [h.slide_id for h in moved.hits] == [h.slide_id for h in first.hits]
        # The local Redis has a password: without it nothing is read or written.
        bare = redis_lib.Redis(port=int(url.rsplit(":", 1)[1].split("/")[0]))
        with pytest.raises(redis_lib.AuthenticationError):
            bare.get(keys[0])
    finally:
        client.close()
        stack.stop(running, 0)
        proc.kill()
        proc.wait()


def test_redis_over_tls(tmp_path):
    """rediss:// with a password: the cache verifies Redis's certificate with the suite's CA."""
    import numpy as np

    from smily.gateway.cache import RedisCache, RedisGuard

    from .helpers.pki import CA

    ca = CA(str(tmp_path))
    cert, key = ca.issue("smily-redis")
    proc, url = start_redis(tls=(cert, key, ca.path))
    if proc is None:
        need("redis-server", "install it with `apt-get install redis-server`")
    try:
        assert url.startswith("rediss://")
        cache = RedisCache(RedisGuard(url, 2.0, ca.path), 60, b"k")
        cache.put("smily:emb:x", np.arange(4, dtype=np.float32))
        assert cache.get("smily:emb:x").tolist() == [0, 1, 2, 3]
        other = CA(str(tmp_path / "other"), "other-ca")
        untrusting = RedisCache(RedisGuard(url, 2.0, other.path), 60, b"k")
        assert untrusting.get("smily:emb:x") is None  # a server it cannot verify is an error: a miss
    finally:
        proc.kill()
        proc.wait()
