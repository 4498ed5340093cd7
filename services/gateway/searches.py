"""Records of recent searches, so ExportSearch can re-derive their results.

A search id names the request (a digest of it without its paging fields);
the request itself is kept in the gateway's cache (Redis, HMAC'd like every
cached value, shared by the replicas; else in-process) for the cache's TTL.
Exporting re-runs the search under the caller's own rights, so an id grants
nothing by itself.

A record is written while the search it names runs, not after it: it is the
whole request (an uploaded image included) signed and sent to Redis, a hop
the OpenTelemetry trace of a cached query showed serial after the index search.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor

from smily.common.errors import NotFound
from smily.gateway.v1 import gateway_pb2


def _key(search_id: str) -> str:
    return f"smily:search:{search_id}"


class SearchRecords:
    def __init__(self, cache):
        self._cache = cache
        self._writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="search-record")

    def remember(self, request: gateway_pb2.SearchRequest) -> Future[str]:
        """Starts keeping the request (the caller must not change it meanwhile); the future gives its
        search id once the record is stored."""
        return self._writer.submit(self._store, request)

    def _store(self, request: gateway_pb2.SearchRequest) -> str:
        r = gateway_pb2.SearchRequest()
        r.CopyFrom(request)
        r.ClearField("page_token")
        r.ClearField("page_size")
        data = r.SerializeToString(deterministic=True)
        search_id = hashlib.sha256(data).hexdigest()[:32]
        self._cache.put_raw(_key(search_id), data)
        return search_id

    def recall(self, search_id: str) -> gateway_pb2.SearchRequest:
        data = self._cache.get_raw(_key(search_id))
        if data is None:
            raise NotFound(f"search {search_id} is unknown or expired: run it again")
        return gateway_pb2.SearchRequest.FromString(data)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
