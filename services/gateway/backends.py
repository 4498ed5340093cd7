"""Stubs to the three backends, with deadlines derived from the caller's."""
from __future__ import annotations

from smily.common.channels import channel
from smily.common.config import Settings
from smily.embedder.v1 import embedder_pb2_grpc
from smily.index.v1 import index_pb2_grpc
from smily.tiler.v1 import tiler_pb2_grpc

from .shards import ShardedIndex


class Backends:
    def __init__(self, settings: Settings):
        shards = settings.index_targets or (settings.index_target,)
        self._channels = [channel(t) for t in (settings.tiler_target, settings.embedder_target, *shards)]
        self.tiler = tiler_pb2_grpc.TilerServiceStub(self._channels[0])
        self.embedder = embedder_pb2_grpc.EmbedderServiceStub(self._channels[1])
        self.index = ShardedIndex([index_pb2_grpc.IndexServiceStub(c) for c in self._channels[2:]])
        self.default_timeout = settings.backend_timeout_s

    def timeout(self, context=None) -> float:
        """What is left of the caller's deadline, or the default when it set none."""
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            return self.default_timeout
        return max(0.001, min(remaining, self.default_timeout))

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
