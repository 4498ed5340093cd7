"""A search's hits as a DICOM Microscopy Bulk Simple Annotations object (Sup 222), built
with highdicom beside the archive, for PACS viewers.

The gateway never holds patient data, so the object is made where the archive is
reachable: the hits come from ExportSearch (GeoJSON), the slide's level-0 image
instance from the archive (DICOMweb), whose patient, study and frame of reference the
annotations join. Coordinates are level-0 pixels of that image (2D, pixel origin VOLUME).
"""

from __future__ import annotations

import json
from importlib.metadata import version

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
VERSION = version("smily")
_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _no_bulk_data(tag, vr, uri):
    return None  # ICC profiles and the like: nothing the annotations copy


def source_image(dicomweb, study: str, series: str) -> Dataset:
    """The series' level-0 image (ImageType VOLUME, the largest), as metadata (no pixels)."""
    found = dicomweb.search_for_instances(study_instance_uid=study, series_instance_uid=series)
    best, size = None, -1
    for item in found:
        ds = Dataset.from_json(item)
        if ds.get("SOPClassUID") != WSI:
            continue
        meta = Dataset.from_json(dicomweb.retrieve_instance_metadata(study, series, ds.SOPInstanceUID))
        if "VOLUME" in list(meta.get("ImageType", [])) and int(meta.TotalPixelMatrixColumns) > size:
            best, size = meta, int(meta.TotalPixelMatrixColumns)
    if best is None:
        raise ValueError(f"series {series} holds no whole-slide VOLUME image")
    # Type 2 attributes an archive may leave out are present, empty; an image without a frame of
    # reference (some converters write none) gets one for the annotations to share.
    for keyword in _TYPE2:
        if keyword not in best:
            setattr(best, keyword, "")
    if "FrameOfReferenceUID" not in best:
        best.FrameOfReferenceUID = hd.UID()
    return best


def bulk_annotations(geojson: bytes, source: Dataset, series_number: int = 99) -> Dataset:
    """One annotation group: a rectangle per hit, with its score and rank as measurements."""
    features = json.loads(geojson)["features"]
    if not features:
        raise ValueError("the search has no hits on this slide")
    query = features[0]["properties"]["query_id"]
    group = hd.ann.AnnotationGroup(
        number=1,
        uid=hd.UID(),
        label="SMILY hits",
        annotated_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        annotated_property_type=codes.SCT.Tissue,
        graphic_type=hd.ann.GraphicTypeValues.POLYGON,
        graphic_data=[np.array(f["geometry"]["coordinates"][0][:-1], dtype=np.float32) for f in features],
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="SMILY similar-image search", version=VERSION, family=codes.cid7162.ArtificialIntelligence
        ),
        measurements=[
            hd.ann.Measurements(
                name=hd.sr.CodedConcept("score", "99SMILY", "Cosine similarity to the query"),
                values=np.array([f["properties"]["score"] for f in features], dtype=np.float32),
                unit=codes.UCUM.NoUnits,
            ),
            hd.ann.Measurements(
                name=hd.sr.CodedConcept("rank", "99SMILY", "Rank among the search's hits"),
                values=np.array([f["properties"]["rank"] for f in features], dtype=np.float32),
                unit=codes.UCUM.NoUnits,
            ),
        ],
        description=f"SMILY search {query}: similar tiles, best first",
    )
    return hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=[group],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="SMILY",
        manufacturer_model_name="SMILY",
        software_versions=VERSION,
        device_serial_number="0",
        content_description="SMILY search hits",
        content_label="SMILY",
    )
