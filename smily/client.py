"""A small client of the public gateway API, used by the CLI and the demo."""

from __future__ import annotations

import os
import time

import grpc

from smily.common.channels import channel
from smily.gateway.v1 import gateway_pb2, gateway_pb2_grpc

DONE = (
    gateway_pb2.OPERATION_STATE_SUCCEEDED,
    gateway_pb2.OPERATION_STATE_FAILED,
    gateway_pb2.OPERATION_STATE_CANCELLED,
)


def credentials(
    tls_ca: str = "", token: str = "", cert_file: str = "", key_file: str = ""
) -> grpc.ChannelCredentials | None:
    """TLS verified with the CA in tls_ca (plus a client certificate when the
    gateway demands one) and the bearer token on every call; None = plaintext."""
    if not tls_ca:
        if token:
            raise ValueError("a token is only sent over TLS: give the gateway's CA (--tls-ca / SMILY_TLS_CA_FILE)")
        return None
    with open(tls_ca, "rb") as fh:
        ca = fh.read()
    key = cert = None
    if cert_file and key_file:
        with open(key_file, "rb") as fh:
            key = fh.read()
        with open(cert_file, "rb") as fh:
            cert = fh.read()
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


class OperationTimeout(TimeoutError):
    """An operation was not done by the caller's deadline (it may still be running on the gateway)."""

    def __init__(self, op: gateway_pb2.Operation, deadline_s: float):
        state = gateway_pb2.OperationState.Name(op.state)
        super().__init__(f"operation {op.operation_id} still {state} after {deadline_s:g} s")
        self.operation = op


class Client:
    """tls_ca, token, cert_file, key_file: see credentials(); they default to
    SMILY_TLS_CA_FILE, SMILY_TOKEN, SMILY_TLS_CERT_FILE and SMILY_TLS_KEY_FILE."""

    def __init__(
        self,
        target: str,
        timeout: float = 60.0,
        *,
        tls_ca: str | None = None,
        token: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ):
        env = os.environ
        self._channel = channel(
            target,
            credentials(
                env.get("SMILY_TLS_CA_FILE", "") if tls_ca is None else tls_ca,
                env.get("SMILY_TOKEN", "") if token is None else token,
                env.get("SMILY_TLS_CERT_FILE", "") if cert_file is None else cert_file,
                env.get("SMILY_TLS_KEY_FILE", "") if key_file is None else key_file,
            ),
        )
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self.timeout = timeout

    def ingest(
        self, source: str, slide_id: str = "", metadata: dict | None = None, slide_mpp: float = 0.0
    ) -> gateway_pb2.Operation:
        return self.stub.IngestSlide(
            gateway_pb2.IngestSlideRequest(
                source=source, slide_id=slide_id, metadata=metadata or {}, slide_mpp=slide_mpp
            ),
            timeout=self.timeout,
        ).operation

    def ingest_case(
        self, accession_number: str, archive: str = "", slide_ids: dict | None = None, metadata: dict | None = None
    ) -> gateway_pb2.Operation:
        return self.stub.IngestCase(
            gateway_pb2.IngestCaseRequest(
                accession_number=accession_number, archive=archive, slide_ids=slide_ids or {}, metadata=metadata or {}
            ),
            timeout=self.timeout,
        ).operation

    def wait(
        self, op: gateway_pb2.Operation, on_progress=None, poll_s: float = 0.2, deadline_s: float | None = None
    ) -> gateway_pb2.Operation:
        """Poll op until it is done. deadline_s: seconds to wait at most, then OperationTimeout
        (None waits as long as the operation runs: a person at a terminal can stop it)."""
        start = time.monotonic()
        while op.state not in DONE:
            if deadline_s is not None and time.monotonic() - start >= deadline_s:
                raise OperationTimeout(op, deadline_s)
            time.sleep(poll_s)
            op = self.operation(op.operation_id)
            if on_progress:
                on_progress(op)
        return op

    def search(
        self,
        *,
        image: bytes | None = None,
        region: dict | None = None,
        k: int | None = None,
        exclude_query_slide: bool = False,
        positives=(),
        negatives=(),
        negative_weight: float | None = None,
        concepts: dict[str, float] | None = None,
        max_hits_per_slide: int = 0,
        page_size: int = 0,
        page_token: str = "",
        slide_ids=(),
        filters: dict[str, str] | None = None,
        exclude_slide_ids=(),
        exclude_query_case: bool = False,
        nprobe: int = 0,
        image_mpp: float = 0.0,
        partial: bool = False,
    ) -> gateway_pb2.SearchResponse:
        """Examples in positives/negatives are image bytes or region dicts; image_mpp: µm/px of image queries;
        partial: answer from the live index shards when one has no live replica."""
        req = gateway_pb2.SearchRequest(
            partial=partial,
            exclude_query_slide=exclude_query_slide,
            exclude_query_case=exclude_query_case,
            slide_ids=slide_ids,
            image_mpp=image_mpp,
            filters=filters or {},
            exclude_slide_ids=exclude_slide_ids,
            nprobe=nprobe,
            positives=[example(e) for e in positives],
            negatives=[example(e) for e in negatives],
            max_hits_per_slide=max_hits_per_slide,
            page_size=page_size,
            page_token=page_token,
            concepts=[gateway_pb2.WeightedConcept(name=n, weight=w) for n, w in (concepts or {}).items()],
        )
        if k is not None:
            req.k = k
        if negative_weight is not None:
            req.negative_weight = negative_weight
        if image is not None:
            req.image = image
        if region is not None:
            req.region.CopyFrom(gateway_pb2.Region(**region))
        return self.stub.Search(req, timeout=self.timeout)

    def search_slides(
        self,
        *,
        slide_id: str = "",
        source: str = "",
        k: int | None = None,
        mosaic_size: int | None = None,
        exclude_query_slide: bool = False,
        slide_mpp: float = 0.0,
        partial: bool = False,
    ) -> gateway_pb2.SearchSlidesResponse:
        req = gateway_pb2.SearchSlidesRequest(
            exclude_query_slide=exclude_query_slide, slide_mpp=slide_mpp, partial=partial
        )
        if slide_id:
            req.slide_id = slide_id
        if source:
            req.source = source
        if k is not None:
            req.k = k
        if mosaic_size is not None:
            req.mosaic_size = mosaic_size
        return self.stub.SearchSlides(req, timeout=self.timeout)

    def read_region(
        self, region: dict, mpp: float = 0.0, max_side: int = 0, jpeg: bool = False
    ) -> gateway_pb2.ReadRegionResponse:
        fmt = gateway_pb2.IMAGE_FORMAT_JPEG if jpeg else gateway_pb2.IMAGE_FORMAT_PNG
        return self.stub.ReadRegion(
            gateway_pb2.ReadRegionRequest(region=gateway_pb2.Region(**region), mpp=mpp, max_side=max_side, format=fmt),
            timeout=self.timeout,
        )

    def slide_heatmap(
        self, slide_id: str, search: gateway_pb2.SearchRequest, max_tiles: int | None = None
    ) -> gateway_pb2.GetSlideHeatmapResponse:
        """The query of `search` scored over every indexed tile of the slide."""
        req = gateway_pb2.GetSlideHeatmapRequest(slide_id=slide_id, search=search)
        if max_tiles is not None:
            req.max_tiles = max_tiles
        return self.stub.GetSlideHeatmap(req, timeout=self.timeout)

    def export_search(self, search_id: str, fmt: str = "geojson", slide_id: str = "") -> tuple[str, bytes]:
        """(content type, bytes) of an earlier search's results (SearchResponse.search_id)."""
        body = self.stub.ExportSearch(
            gateway_pb2.ExportSearchRequest(search_id=search_id, format=fmt, slide_id=slide_id), timeout=self.timeout
        )
        return body.content_type, body.data

    def create_concept(self, name: str, with_examples, without_examples) -> gateway_pb2.Concept:
        return self.stub.CreateConcept(
            gateway_pb2.CreateConceptRequest(
                name=name,
                with_examples=[example(e) for e in with_examples],
                without_examples=[example(e) for e in without_examples],
            ),
            timeout=self.timeout,
        ).concept

    def concepts(self) -> list[gateway_pb2.Concept]:
        return list(self.stub.ListConcepts(gateway_pb2.ListConceptsRequest(), timeout=self.timeout).concepts)

    def delete_concept(self, name: str) -> None:
        self.stub.DeleteConcept(gateway_pb2.DeleteConceptRequest(name=name), timeout=self.timeout)

    def operation(self, operation_id: str) -> gateway_pb2.Operation:
        return self.stub.GetOperation(
            gateway_pb2.GetOperationRequest(operation_id=operation_id), timeout=self.timeout
        ).operation

    def cancel(self, operation_id: str) -> gateway_pb2.Operation:
        return self.stub.CancelOperation(
            gateway_pb2.CancelOperationRequest(operation_id=operation_id), timeout=self.timeout
        ).operation

    def slides(self, find: str = "", find_key: str = "") -> list[gateway_pb2.Slide]:
        """Every slide the caller may read; with `find`, those whose searchable metadata (under
        `find_key` alone when given) starts with it."""
        out, token = [], ""
        while True:
            resp = self.stub.ListSlides(
                gateway_pb2.ListSlidesRequest(
                    page_size=500, page_token=token, metadata_query=find, metadata_key=find_key
                ),
                timeout=self.timeout,
            )
            out.extend(resp.slides)
            token = resp.next_page_token
            if not token:
                return out

    def delete(self, slide_id: str) -> int:
        return self.stub.DeleteSlide(
            gateway_pb2.DeleteSlideRequest(slide_id=slide_id), timeout=self.timeout
        ).deleted_tiles

    def index_info(self) -> gateway_pb2.GetIndexInfoResponse:
        """The index's model and tiling record (the gateway's settings before the first ingest)."""
        return self.stub.GetIndexInfo(gateway_pb2.GetIndexInfoRequest(), timeout=self.timeout)

    def tenants(self) -> list[gateway_pb2.TenantSummary]:
        """Every tenant in the index with its counts (the smily.operator role)."""
        return list(self.stub.ListTenants(gateway_pb2.ListTenantsRequest(), timeout=self.timeout).tenants)

    def move_slide(self, slide_id: str, from_tenant: str, to_tenant: str) -> gateway_pb2.MoveSlideResponse:
        """Move a slide with its tiles between tenants (the smily.operator role)."""
        return self.stub.MoveSlide(
            gateway_pb2.MoveSlideRequest(slide_id=slide_id, from_tenant=from_tenant, to_tenant=to_tenant),
            timeout=self.timeout,
        )

    def migrate_index(self, model_id: str, max_tiles_per_s: float = 0.0, cutover: bool = False):
        """Start re-embedding the index with another model; returns its operation."""
        return self.stub.MigrateIndex(
            gateway_pb2.MigrateIndexRequest(model_id=model_id, max_tiles_per_s=max_tiles_per_s, cutover=cutover),
            timeout=self.timeout,
        ).operation

    def cutover_index(self, model_id: str = "", allow_missing: bool = False) -> gateway_pb2.CutoverIndexResponse:
        """Serve another model the index holds (none named: the one other; a rollback after a cutover)."""
        return self.stub.CutoverIndex(
            gateway_pb2.CutoverIndexRequest(model_id=model_id, allow_missing=allow_missing), timeout=self.timeout
        )

    def drop_index_model(self, model_id: str) -> int:
        return self.stub.DropIndexModel(
            gateway_pb2.DropIndexModelRequest(model_id=model_id), timeout=self.timeout
        ).dropped_tiles

    def close(self) -> None:
        self._channel.close()


def example(e) -> gateway_pb2.Example:
    """An Example from image bytes or a region dict."""
    if isinstance(e, (bytes, bytearray)):
        return gateway_pb2.Example(image=bytes(e))
    return gateway_pb2.Example(region=gateway_pb2.Region(**e))


def hit_dict(hit: gateway_pb2.Hit) -> dict:
    return {
        "tenant": hit.tenant,
        "slide_id": hit.slide_id,
        "x": hit.x,
        "y": hit.y,
        "width": hit.width,
        "height": hit.height,
        "mpp": round(hit.mpp, 4),
        "score": round(float(hit.score), 4),
        "metadata": dict(hit.metadata),
        **{k: getattr(hit, k) for k in ("study_instance_uid", "series_instance_uid", "viewer_url") if getattr(hit, k)},
    }
