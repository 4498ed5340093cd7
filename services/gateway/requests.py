"""Every caller-input rule of a public request, in one function per RPC, run
before the handler calls any backend.

The bounds are smily.common.limits' (stated in gateway.proto and declared by
the HTTP API's OpenAPI document). What only a backend can know (an unknown
slide, a region off the slide, an image that does not decode) is its answer,
passed on as it is (backends.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from smily.common import images, limits, tenancy
from smily.common.errors import InvalidArgument, require
from smily.gateway.v1 import gateway_pb2

from . import paging

DEFAULT_NEGATIVE_WEIGHT = 0.5
_FORMATS = (gateway_pb2.IMAGE_FORMAT_PNG, gateway_pb2.IMAGE_FORMAT_JPEG)


def region(r: gateway_pb2.Region, what: str = "region") -> None:
    limits.slide_id(r.slide_id, f"{what}.slide_id")
    require(r.width > 0 and r.height > 0, f"{what} width and height must be positive")
    require(r.x >= 0 and r.y >= 0, f"{what} x and y must not be negative")
    if r.polygon:
        require(
            3 <= len(r.polygon) <= limits.MAX_POLYGON_VERTICES,
            f"{what}.polygon needs 3..{limits.MAX_POLYGON_VERTICES} vertices",
        )
        require(
            all(r.x <= p.x <= r.x + r.width and r.y <= p.y <= r.y + r.height for p in r.polygon),
            f"{what}.polygon must lie inside its bounding box (x, y, width, height)",
        )


def _image(data: bytes, what: str) -> None:
    require(0 < len(data) <= limits.MAX_QUERY_IMAGE_BYTES, f"{what} must be 1 byte to 32 MiB of PNG or JPEG")
    images.header(data)  # format and pixel limit, without decoding


def _examples(examples, what: str) -> None:
    require(len(examples) <= limits.MAX_EXAMPLES, f"at most {limits.MAX_EXAMPLES} {what} examples")
    for ex in examples:
        which = ex.WhichOneof("example")
        if which == "image":
            _image(ex.image, "image")
        elif which == "region":
            region(ex.region)
        else:
            raise InvalidArgument(f"each {what} example needs an image or a region")


def _source(source: str) -> None:
    require(bool(source), "source (the slide's path under the slide roots) is required")
    limits.text(source, "source", limits.MAX_SOURCE_CHARS)


def ingest_slide(request: gateway_pb2.IngestSlideRequest) -> None:
    _source(request.source)
    if request.slide_id:
        limits.slide_id(request.slide_id)
    limits.metadata(request.metadata)
    limits.slide_mpp(request.slide_mpp)


def ingest_case(request: gateway_pb2.IngestCaseRequest) -> None:
    require(bool(request.accession_number), "accession_number is required")
    limits.text(request.accession_number, "accession_number", limits.MAX_ID_CHARS)
    require(
        limits.ACCESSION.fullmatch(request.accession_number) is not None,
        "accession_number must be 1..16 characters, without wildcards (* ?) or backslashes",
    )
    limits.text(request.archive, "archive", limits.MAX_ID_CHARS)
    limits.slide_ids(request.slide_ids.values(), "slide_ids")
    limits.metadata(request.metadata)


def operation(request) -> None:
    """GetOperation, CancelOperation."""
    require(bool(request.operation_id), "operation_id is required")
    limits.text(request.operation_id, "operation_id", limits.MAX_TOKEN_CHARS)


@dataclass(frozen=True)
class Search:
    k: int
    offset: int  # of the page asked for
    fingerprint: str  # of the request, for the next page's token ("" when not paged)
    negative_weight: float


def search(request: gateway_pb2.SearchRequest) -> Search:
    limits.filters(request.filters)
    limits.slide_ids(request.slide_ids, "slide_ids")
    limits.slide_ids(request.exclude_slide_ids, "exclude_slide_ids")
    limits.text(request.page_token, "page_token", limits.MAX_TOKEN_CHARS)
    k = request.k if request.HasField("k") else limits.DEFAULT_K
    require(0 < k <= limits.MAX_K, f"k must be in 1..{limits.MAX_K}, got {k}")
    require(request.page_size >= 0, "page_size must not be negative")
    require(request.max_hits_per_slide >= 0, "max_hits_per_slide must not be negative")
    require(request.nprobe >= 0, "nprobe must not be negative")
    require(
        request.image_mpp == 0 or limits.plausible_mpp(request.image_mpp),
        "image_mpp must be 0 (1.0 µm/px) or a plausible resolution in µm/px",
    )
    which = request.WhichOneof("query")
    if which == "image":
        _image(request.image, "image")
    elif which == "region":
        region(request.region)
    require(
        which is not None or len(request.positives) > 0, "a query needs an image or a region (or positive examples)"
    )
    _examples(request.positives, "positive")
    _examples(request.negatives, "negative")
    b = request.negative_weight if request.HasField("negative_weight") else DEFAULT_NEGATIVE_WEIGHT
    require(0 <= b <= 1, "negative_weight must be in 0..1")
    require(len(request.concepts) <= limits.MAX_CONCEPTS, f"at most {limits.MAX_CONCEPTS} concepts")
    for wc in request.concepts:
        concept_name(wc)
        require(
            math.isfinite(wc.weight) and abs(wc.weight) <= limits.MAX_CONCEPT_WEIGHT,
            f"a concept weight must be in -{limits.MAX_CONCEPT_WEIGHT:g}..{limits.MAX_CONCEPT_WEIGHT:g}",
        )
    require(not request.exclude_query_case or which == "region", "exclude_query_case needs a region query")
    # Only paged requests need the fingerprint (it serialises the whole request, image and all).
    fp = paging.fingerprint(request) if request.page_token or request.page_size else ""
    return Search(k, paging.read_token(request.page_token, fp), fp, b)


@dataclass(frozen=True)
class SearchSlides:
    k: int
    mosaic_size: int
    regions_per_slide: int


def search_slides(request: gateway_pb2.SearchSlidesRequest) -> SearchSlides:
    k = request.k if request.HasField("k") else limits.DEFAULT_SLIDE_MATCHES
    size = request.mosaic_size if request.HasField("mosaic_size") else limits.DEFAULT_MOSAIC
    per_slide = request.regions_per_slide if request.HasField("regions_per_slide") else limits.DEFAULT_REGIONS
    require(0 < k <= limits.MAX_SLIDE_MATCHES, f"k must be in 1..{limits.MAX_SLIDE_MATCHES}")
    require(0 < size <= limits.MAX_MOSAIC, f"mosaic_size must be in 1..{limits.MAX_MOSAIC}")
    require(0 <= per_slide <= limits.MAX_REGIONS, f"regions_per_slide must be in 0..{limits.MAX_REGIONS}")
    which = request.WhichOneof("query")
    if which == "slide_id":
        limits.slide_id(request.slide_id)
    elif which == "source":
        _source(request.source)
        limits.slide_mpp(request.slide_mpp)
    else:
        raise InvalidArgument("a slide query needs a slide_id or a source")
    return SearchSlides(k, size, per_slide)


def read_region(request: gateway_pb2.ReadRegionRequest) -> tuple[int, gateway_pb2.ImageFormat]:
    """(max_side, format) with their defaults."""
    region(request.region)
    max_side = request.max_side or limits.DEFAULT_MAX_SIDE
    require(0 < max_side <= limits.MAX_SIDE, f"max_side must be in 1..{limits.MAX_SIDE}")
    require(request.mpp >= 0 and math.isfinite(request.mpp), "mpp must not be negative")
    fmt = request.format or gateway_pb2.IMAGE_FORMAT_PNG
    require(fmt in _FORMATS, "format must be PNG or JPEG")
    return max_side, fmt


def create_concept(request: gateway_pb2.CreateConceptRequest) -> None:
    concept_name(request)
    require(
        len(request.with_examples) > 0 and len(request.without_examples) > 0,
        "a concept needs at least one example with it and one without",
    )
    _examples(request.with_examples, "with")
    _examples(request.without_examples, "without")


def concept_name(request) -> None:
    """CreateConcept, DeleteConcept."""
    require(
        limits.CONCEPT_NAME.fullmatch(request.name) is not None,
        "a concept name is 1..64 of letters, digits, '.', '_' and '-'",
    )


def list_slides(request: gateway_pb2.ListSlidesRequest, search_keys: tuple[str, ...]) -> tuple[str, ...]:
    """The metadata keys metadata_query matches under (none without a query)."""
    require(request.page_size >= 0, "page_size must not be negative")
    limits.text(request.page_token, "page_token", limits.MAX_TOKEN_CHARS)
    limits.text(request.metadata_query, "metadata_query", limits.MAX_METADATA_QUERY_CHARS)
    if request.metadata_key:
        require(
            request.metadata_key in search_keys,
            f"metadata_key must be one of the searchable keys: {', '.join(search_keys)}",
        )
    require(bool(request.metadata_query) or not request.metadata_key, "metadata_key needs a metadata_query")
    if not request.metadata_query:
        return ()
    return (request.metadata_key,) if request.metadata_key else search_keys


def slide(request) -> None:
    """GetSlide, DeleteSlide."""
    limits.slide_id(request.slide_id)


def move_slide(request: gateway_pb2.MoveSlideRequest) -> None:
    limits.slide_id(request.slide_id)
    tenancy.tenant(request.from_tenant, "from_tenant")
    tenancy.tenant(request.to_tenant, "to_tenant")  # the same as from_tenant: ALREADY_EXISTS, as the id is there


def slide_heatmap(request: gateway_pb2.GetSlideHeatmapRequest) -> int:
    """max_tiles with its default; the query is checked as a Search's."""
    limits.slide_id(request.slide_id)
    search(request.search)
    n = request.max_tiles if request.HasField("max_tiles") else limits.MAX_HEATMAP_TILES
    require(0 < n <= limits.MAX_HEATMAP_TILES, f"max_tiles must be in 1..{limits.MAX_HEATMAP_TILES}")
    return n


EXPORT_FORMATS = ("geojson", DICOM_ANN := "dicom-ann")


def export_search(request: gateway_pb2.ExportSearchRequest) -> str:
    """The format, "geojson" by default."""
    require(
        len(request.search_id) == 32 and all(c in "0123456789abcdef" for c in request.search_id),
        "search_id is not one this service issued",
    )
    fmt = request.format or "geojson"
    require(fmt in EXPORT_FORMATS, f"format must be one of {', '.join(EXPORT_FORMATS)}")
    require(fmt != DICOM_ANN or bool(request.slide_id), "format dicom-ann needs slide_id (one slide's hits)")
    if request.slide_id:
        limits.slide_id(request.slide_id)
    return fmt


def _model_id(model_id: str, what: str = "model_id") -> None:
    require(
        limits.MODEL_ID.fullmatch(model_id) is not None,
        f"{what} must be NAME/VERSION (letters, digits, '.', '_', '-'; 64 characters each at most)",
    )


def migrate_index(request: gateway_pb2.MigrateIndexRequest) -> None:
    _model_id(request.model_id)
    require(
        math.isfinite(request.max_tiles_per_s) and 0 <= request.max_tiles_per_s <= limits.MAX_MIGRATION_TILES_PER_S,
        f"max_tiles_per_s must be in 0..{limits.MAX_MIGRATION_TILES_PER_S:g} (0: no limit)",
    )


def cutover_index(request: gateway_pb2.CutoverIndexRequest) -> None:
    if request.model_id:
        _model_id(request.model_id)


def drop_index_model(request: gateway_pb2.DropIndexModelRequest) -> None:
    _model_id(request.model_id)
