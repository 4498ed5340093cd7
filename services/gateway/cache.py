"""Cache of query embeddings: Redis when configured, else in-process.

Redis is only a cache: every error or timeout is a miss, the first one is
logged, and a breaker skips Redis for a few seconds after a failure so a
dead Redis costs queries nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import numpy as np
import prometheus_client as prom
import redis

log = logging.getLogger("smily.cache")

LOOKUPS = prom.Counter("smily_cache_lookups_total", "Embedding cache lookups", ["result"])
ERRORS = prom.Counter("smily_cache_errors_total", "Redis errors (cache misses, operations seen by one replica only)")

BREAKER_OPEN_S = 5.0


def _pack(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, np.float32).tobytes()


def _unpack(data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.float32)


class LocalCache:
    """LRU with TTL, for a single gateway replica (`make demo` without redis-server)."""

    def __init__(self, ttl_s: int, capacity: int = 10000):
        self._ttl, self._capacity = ttl_s, capacity
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            item = self._data.get(key)
            if item and item[0] > time.monotonic():
                self._data.move_to_end(key)
                LOOKUPS.labels("hit").inc()
                return _unpack(item[1])
        LOOKUPS.labels("miss").inc()
        return None

    def put(self, key: str, vector: np.ndarray) -> None:
        with self._lock:
            self._data[key] = (time.monotonic() + self._ttl, _pack(vector))
            self._data.move_to_end(key)
            while len(self._data) > self._capacity:
                self._data.popitem(last=False)


class RedisGuard:
    """A Redis client whose every error or timeout gives the caller a default:
    the first one is logged, and a breaker skips Redis for a few seconds
    after a failure so a dead Redis costs callers nothing."""

    def __init__(self, url: str, timeout_s: float):
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
        )
        self._closed_until = 0.0
        self._failing = False
        self._lock = threading.Lock()

    def call(self, fn, default=None):
        """fn(client), or default when Redis is failing or fails now."""
        if time.monotonic() < self._closed_until:
            return default
        try:
            result = fn(self.client)
        except Exception as exc:  # any Redis trouble: the default
            ERRORS.inc()
            with self._lock:
                self._closed_until = time.monotonic() + BREAKER_OPEN_S
                if not self._failing:
                    self._failing = True
                    log.warning("redis unavailable; serving without it", extra={"error": type(exc).__name__})
            return default
        if self._failing:
            with self._lock:
                if self._failing:
                    self._failing = False
                    log.info("redis reachable again")
        return result


class RedisCache:
    def __init__(self, redis: RedisGuard, ttl_s: int):
        self._ttl = ttl_s
        self._redis = redis

    def get(self, key: str) -> np.ndarray | None:
        data = self._redis.call(lambda r: r.get(key))
        LOOKUPS.labels("hit" if data else "miss").inc()
        return _unpack(data) if data else None

    def put(self, key: str, vector: np.ndarray) -> None:
        self._redis.call(lambda r: r.set(key, _pack(vector), ex=self._ttl))


def make_cache(redis: RedisGuard | None, ttl_s: int):
    if redis is not None:
        return RedisCache(redis, ttl_s)
    log.warning("SMILY_REDIS_URL is not set: using an in-process cache and operations (fine for one replica only)")
    return LocalCache(ttl_s)
