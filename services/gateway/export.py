"""A search's results as files (ExportSearch).

GeoJSON: a FeatureCollection of the hits as level-0 rectangles, in the shape
QuPath imports (objectType "annotation", a classification, measurements),
with score, rank, slide and query id as plain properties too.
"""

from __future__ import annotations

import json
import uuid

from google.api import httpbody_pb2

GEOJSON = "application/geo+json"


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
