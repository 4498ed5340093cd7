"""The gateway's RPCs as HTTP/JSON routes: each RPC's `google.api.http`
option in gateway.proto names its HTTP method, path and body, and the
descriptor gives the rest (request and response types, fields), so
gateway.proto stays the one contract.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor, message_factory

from smily.common import rpcmeta
from smily.common.rpcmeta import HttpRule
from smily.gateway.v1 import gateway_pb2

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]


# Method name -> route: (google.api.http) in gateway.proto.
RULES = rpcmeta.RULES
path_fields = rpcmeta.path_fields


@dataclass(frozen=True)
class Method:
    name: str
    rule: HttpRule
    input: descriptor.Descriptor
    output: descriptor.Descriptor

    def new_request(self):
        return message_factory.GetMessageClass(self.input)()


def methods() -> list[Method]:
    """Every gateway RPC that has a route, in proto order."""
    return [Method(m.name, RULES[m.name], m.input_type, m.output_type) for m in SERVICE.methods if m.name in RULES]


# https://github.com/googleapis/googleapis/blob/master/google/rpc/code.proto
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


class Gateway:
    """Unary calls to the gateway from the event loop, without a thread per call."""

    def __init__(self, channel: grpc.Channel, timeout_s: float):
        # A RotatingStub over the channel (smily.http.server): each call asks it for the
        # current channel, which changes when the client certificate is renewed.
        self._channel = channel
        self._timeout = timeout_s

    def _callable(self, name: str, request_type, response_type) -> grpc.UnaryUnaryMultiCallable:
        return self._channel.unary_unary(
            f"/{SERVICE.full_name}/{name}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=message_factory.GetMessageClass(response_type).FromString,
        )

    async def call(self, name: str, request, metadata: list[tuple[str, str]]):
        """The RPC's response; raises grpc.RpcError with the gateway's status."""
        method = SERVICE.methods_by_name[name]
        return await resolve(
            self._callable(name, type(request), method.output_type).future(
                request, metadata=metadata, timeout=self._timeout
            )
        )


async def resolve(future: grpc.Future):
    """Await a gRPC future on the running event loop; cancels the RPC if the awaiting task is cancelled
    (the HTTP client went away). Raises grpc.RpcError on a failed call."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def finished(_):
        loop.call_soon_threadsafe(lambda: None if done.done() else done.set_result(None))

    future.add_done_callback(finished)
    try:
        await done
    except asyncio.CancelledError:
        future.cancel()
        raise
    return future.result()
