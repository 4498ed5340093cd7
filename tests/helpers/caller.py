"""The gateway as one caller, for tests that speak as several (tenants, roles)."""

from __future__ import annotations

import uuid


class As:
    """Each method is the gateway RPC with this caller's token and a fresh request id."""

    def __init__(self, stub, bearer: str):
        self._stub, self._bearer = stub, bearer
        self.last_request_id = ""

    def __getattr__(self, name):
        fn = getattr(self._stub, name)

        def call(request):
            self.last_request_id = uuid.uuid4().hex
            md = [("authorization", f"Bearer {self._bearer}"), ("x-request-id", self.last_request_id)]
            return fn(request, metadata=md, timeout=300)

        return call
