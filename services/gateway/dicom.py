"""DICOM identifiers in slide metadata, and links that open a hit in a viewer.

A slide ingested from a DICOMweb archive keeps the tiler's allow-listed
identifiers as metadata: the accession number under the case key (so
exclude_query_case works on it), the study and series UIDs a PACS viewer
opens, the container identifier an LIS knows the slide by, and specimen
description and stain when the archive has them.
"""

from __future__ import annotations

import string
from urllib.parse import quote

from smily.tiler.v1 import tiler_pb2

STUDY = "study_instance_uid"
SERIES = "series_instance_uid"
_COPIED = (STUDY, SERIES, "container_identifier", "specimen_description", "stain")
FIELDS = ("study", "series", "slide_id", "x", "y", "width", "height")


def slide_metadata(ids: tiler_pb2.DicomIdentifiers, case_key: str) -> dict[str, str]:
    """The non-empty identifiers as slide metadata (empty for a file slide)."""
    out = {key: getattr(ids, key) for key in _COPIED if getattr(ids, key)}
    if ids.accession_number:
        out[case_key] = ids.accession_number
    return out


class ViewerLinks:
    """SMILY_VIEWER_URL_TEMPLATE with {study}, {series}, {slide_id}, {x}, {y},
    {width}, {height}; a hit gets a link only when every field it uses is known."""

    def __init__(self, template: str):
        self._fields = []
        for _, name, spec, conversion in string.Formatter().parse(template):
            if name is None:
                continue
            if name not in FIELDS or spec or conversion:
                raise ValueError(f"SMILY_VIEWER_URL_TEMPLATE: unknown field {{{name}}}; use {', '.join(FIELDS)}")
            self._fields.append(name)
        self._template = template

    def link(self, slide_id: str, metadata, x: int = 0, y: int = 0, width: int = 0, height: int = 0) -> str:
        if not self._template:
            return ""
        values = {
            "study": metadata.get(STUDY, ""),
            "series": metadata.get(SERIES, ""),
            "slide_id": slide_id,
            "x": str(x),
            "y": str(y),
            "width": str(width),
            "height": str(height),
        }
        if not all(values[f] for f in self._fields):
            return ""
        return self._template.format(**{k: quote(v, safe="") for k, v in values.items()})
