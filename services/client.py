"""A small client of the public gateway API, used by the CLI and the demo."""
from __future__ import annotations

import time

import grpc

from protos.smily.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.channels import channel

DONE = (gateway_pb2.OPERATION_STATE_SUCCEEDED, gateway_pb2.OPERATION_STATE_FAILED)


class Client:
    def __init__(self, target: str, timeout: float = 60.0):
        self._channel = channel(target)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self.timeout = timeout

    def ingest(self, source: str, slide_id: str = "", metadata: dict | None = None) -> gateway_pb2.Operation:
        return self.stub.IngestSlide(gateway_pb2.IngestSlideRequest(
            source=source, slide_id=slide_id, metadata=metadata or {}), timeout=self.timeout).operation

    def wait(self, op: gateway_pb2.Operation, on_progress=None, poll_s: float = 0.2) -> gateway_pb2.Operation:
        while op.state not in DONE:
            time.sleep(poll_s)
            op = self.stub.GetOperation(gateway_pb2.GetOperationRequest(operation_id=op.operation_id),
                                        timeout=self.timeout).operation
            if on_progress:
                on_progress(op)
        return op

    def search(self, *, image: bytes | None = None, region: dict | None = None, k: int | None = None,
               exclude_query_slide: bool = False) -> gateway_pb2.SearchResponse:
        req = gateway_pb2.SearchRequest(exclude_query_slide=exclude_query_slide)
        if k is not None:
            req.k = k
        if image is not None:
            req.image = image
        if region is not None:
            req.region.CopyFrom(gateway_pb2.Region(**region))
        return self.stub.Search(req, timeout=self.timeout)

    def slides(self) -> list[gateway_pb2.Slide]:
        out, token = [], ""
        while True:
            resp = self.stub.ListSlides(gateway_pb2.ListSlidesRequest(page_size=500, page_token=token),
                                        timeout=self.timeout)
            out.extend(resp.slides)
            token = resp.next_page_token
            if not token:
                return out

    def delete(self, slide_id: str) -> int:
        return self.stub.DeleteSlide(gateway_pb2.DeleteSlideRequest(slide_id=slide_id),
                                     timeout=self.timeout).deleted_tiles

    def close(self) -> None:
        self._channel.close()


def hit_dict(hit: gateway_pb2.Hit) -> dict:
    return {"slide_id": hit.slide_id, "x": hit.x, "y": hit.y, "width": hit.width, "height": hit.height,
            "mpp": round(hit.mpp, 4), "score": round(float(hit.score), 4), "metadata": dict(hit.metadata)}


def is_unavailable(exc: grpc.RpcError) -> bool:
    return hasattr(exc, "code") and exc.code() == grpc.StatusCode.UNAVAILABLE
