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
ERRORS = prom.Counter("smily_cache_errors_total", "Embedding cache errors (counted as misses)")

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


class RedisCache:
    def __init__(self, url: str, ttl_s: int, timeout_s: float):
        self._ttl = ttl_s
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
        )
        self._closed_until = 0.0
        self._failing = False
        self._lock = threading.Lock()

    def _fail(self, exc: Exception) -> None:
        ERRORS.inc()
        with self._lock:
            self._closed_until = time.monotonic() + BREAKER_OPEN_S
            if not self._failing:
                self._failing = True
                log.warning("redis unavailable; serving without cache", extra={"error": type(exc).__name__})

    def _ok(self) -> None:
        if self._failing:
            with self._lock:
                if self._failing:
                    self._failing = False
                    log.info("redis reachable again")

    def get(self, key: str) -> np.ndarray | None:
        if time.monotonic() < self._closed_until:
            LOOKUPS.labels("miss").inc()
            return None
        try:
            data = self._client.get(key)
        except Exception as exc:  # any Redis trouble is a miss
            self._fail(exc)
            LOOKUPS.labels("miss").inc()
            return None
        self._ok()
        LOOKUPS.labels("hit" if data else "miss").inc()
        return _unpack(data) if data else None

    def put(self, key: str, vector: np.ndarray) -> None:
        if time.monotonic() < self._closed_until:
            return
        try:
            self._client.set(key, _pack(vector), ex=self._ttl)
            self._ok()
        except Exception as exc:
            self._fail(exc)


def make_cache(redis_url: str, ttl_s: int, timeout_s: float):
    if redis_url:
        return RedisCache(redis_url, ttl_s, timeout_s)
    log.warning("SMILY_REDIS_URL is not set: using an in-process cache (fine for one replica only)")
    return LocalCache(ttl_s)
