"""A search's results as files (ExportSearch).

GeoJSON: a FeatureCollection of the hits as level-0 rectangles, in the shape
QuPath imports (objectType "annotation", a classification, measurements),
with score, rank, slide and query id as plain properties too.

dicom-ann: one slide's hits as a DICOM Microscopy Bulk Simple Annotations object,
for a slide ingested from a configured DICOMweb archive. The tiler builds it (it
alone reaches the archives, whose slide image the object must join); a caller
never names an archive's address.
"""

from __future__ import annotations

import json
import uuid

from google.api import httpbody_pb2

from smily.common.errors import FailedPrecondition
from smily.tiler.v1 import tiler_pb2

GEOJSON = "application/geo+json"
DICOM = "application/dicom"
DICOMWEB = "dicomweb:"


def _feature(rank: int, hit, search_id: str) -> dict:
    t = hit.tile
    ring = [[t.x, t.y], [t.x + t.width, t.y], [t.x + t.width, t.y + t.height], [t.x, t.y + t.height], [t.x, t.y]]
    score = round(float(hit.score), 6)
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"smily:{search_id}:{rank}")),
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "annotation",
            "name": f"SMILY hit {rank}",
            "classification": {"name": "SMILY hit", "color": [255, 200, 0]},
            "measurements": {"score": score, "rank": rank},
            "score": score,
            "rank": rank,
            "query_id": search_id,
            "slide_id": hit.slide_id,
            "mpp": hit.tile.mpp,
        },
    }


def geojson(ranked, search_id: str) -> httpbody_pb2.HttpBody:
    """ranked: (rank, index hit) pairs, best first."""
    doc = {"type": "FeatureCollection", "features": [_feature(rank, h, search_id) for rank, h in ranked]}
    return httpbody_pb2.HttpBody(content_type=GEOJSON, data=json.dumps(doc).encode())


def dicom_ann_request(ranked, search_id: str, source: str) -> tiler_pb2.BuildBulkAnnotationsRequest:
    """ranked: one slide's (rank, index hit) pairs, best first; source: the slide's."""
    if not source.startswith(DICOMWEB):
        raise FailedPrecondition("format dicom-ann needs a slide ingested from a DICOMweb archive")
    if not ranked:
        raise FailedPrecondition("the search has no hits on this slide")
    regions = [
        tiler_pb2.AnnotatedRegion(
            x=h.tile.x, y=h.tile.y, width=h.tile.width, height=h.tile.height, score=h.score, rank=rank
        )
        for rank, h in ranked
    ]
    return tiler_pb2.BuildBulkAnnotationsRequest(slide=source, regions=regions, description=f"SMILY search {search_id}")


def dicom_ann(response: tiler_pb2.BuildBulkAnnotationsResponse) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type=DICOM, data=response.dicom)
