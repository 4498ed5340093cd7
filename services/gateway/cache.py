"""Cache of query embeddings: Redis when configured, else in-process.

Redis is only a cache: every error or timeout is a miss, the first one is
logged, and a breaker skips Redis for a few seconds after a failure so a
dead Redis costs queries nothing. Redis is also not trusted: every value
carries an HMAC over its key and bytes, and one that fails the check (written
by anyone without SMILY_CACHE_KEY, or moved to another key) is a miss.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict

import numpy as np
import prometheus_client as prom
import redis

log = logging.getLogger("smily.cache")

LOOKUPS = prom.Counter("smily_cache_lookups_total", "Embedding cache lookups", ["result"])
ERRORS = prom.Counter("smily_cache_errors_total", "Redis errors (cache misses, operations seen by one replica only)")
REJECTED = prom.Counter(
    "smily_cache_rejected_total", "Values in Redis that failed their HMAC check (cache misses, unknown operations)"
)

BREAKER_OPEN_S = 5.0


def _pack(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, np.float32).tobytes()


def _unpack(data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.float32)


class _VectorCache:
    """Vectors stored as raw float32 bytes; a subclass stores the bytes."""

    def get_raw(self, key: str) -> bytes | None:
        raise NotImplementedError

    def put_raw(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> np.ndarray | None:
        data = self.get_raw(key)
        return None if data is None else _unpack(data)

    def put(self, key: str, vector: np.ndarray) -> None:
        self.put_raw(key, _pack(vector))


class LocalCache(_VectorCache):
    """LRU with TTL, for a single gateway replica (`make demo` without redis-server)."""

    def __init__(self, ttl_s: int, capacity: int = 10000):
        self._ttl, self._capacity = ttl_s, capacity
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get_raw(self, key: str) -> bytes | None:
        with self._lock:
            item = self._data.get(key)
            if item and item[0] > time.monotonic():
                self._data.move_to_end(key)
                LOOKUPS.labels("hit").inc()
                return item[1]
        LOOKUPS.labels("miss").inc()
        return None

    def put_raw(self, key: str, value: bytes) -> None:
        with self._lock:
            self._data[key] = (time.monotonic() + self._ttl, value)
            self._data.move_to_end(key)
            while len(self._data) > self._capacity:
                self._data.popitem(last=False)


class RedisGuard:
    """A Redis client whose every error or timeout gives the caller a default:
    the first one is logged, and a breaker skips Redis for a few seconds
    after a failure so a dead Redis costs callers nothing."""

    def __init__(self, url: str, timeout_s: float, ca_file: str = "", password: str = ""):
        # rediss:// is TLS; the suite's CA verifies the server unless the URL names its own.
        options = (
            {"ssl_ca_certs": ca_file} if url.startswith("rediss://") and ca_file and "ssl_ca_certs" not in url else {}
        )
        if password:  # a password in the URL wins
            options["password"] = password
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False, **options
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


TAG = 32


def tag(secret: bytes, key: str, value: bytes) -> bytes:
    """HMAC-SHA256(secret, len(key) | key | value): binds a value to the Redis key it is stored under."""
    k = key.encode()
    return hmac.new(secret, len(k).to_bytes(4, "big") + k + value, hashlib.sha256).digest()


def signed(secret: bytes, key: str, value: bytes) -> bytes:
    return tag(secret, key, value) + value


def verified(secret: bytes, key: str, data: bytes | None) -> bytes | None:
    """The value of tag | value if its tag is right for this key, else None (counted and logged)."""
    if not data:
        return None
    if not hmac.compare_digest(data[:TAG], tag(secret, key, data[TAG:])):
        REJECTED.inc()
        log.warning("a value in Redis failed its HMAC check; ignored")
        return None
    return data[TAG:]


def hmac_key(secret: str) -> bytes:
    """SMILY_CACHE_KEY, or a random key per process (a replica then trusts only its own writes)."""
    if not secret:
        log.warning(
            "SMILY_CACHE_KEY is not set: a random key, so this replica trusts only its own writes "
            "(to Redis, and the operation records in the index)"
        )
        return secrets.token_bytes(32)
    return secret.encode()


class RedisCache(_VectorCache):
    """Values are tag(secret, key, value) followed by the value."""

    def __init__(self, redis: RedisGuard, ttl_s: int, secret: bytes):
        self._ttl = ttl_s
        self._redis = redis
        self._secret = secret

    def get_raw(self, key: str) -> bytes | None:
        data = verified(self._secret, key, self._redis.call(lambda r: r.get(key)))
        LOOKUPS.labels("hit" if data else "miss").inc()
        return data if data else None

    def put_raw(self, key: str, value: bytes) -> None:
        signed_value = signed(self._secret, key, value)
        self._redis.call(lambda r: r.set(key, signed_value, ex=self._ttl))


def make_cache(redis: RedisGuard | None, ttl_s: int, secret: bytes = b""):
    if redis is not None:
        return RedisCache(redis, ttl_s, secret)
    log.warning("SMILY_REDIS_URL is not set: using an in-process cache (fine for one replica only)")
    return LocalCache(ttl_s)
