"""Regions of a slide as a DICOM Microscopy Bulk Simple Annotations object (Sup 222), built
with highdicom, for PACS viewers (BuildBulkAnnotations).

Made in the tiler, which alone reaches the configured archives: the regions come from the
gateway (a search's hits), the slide's level-0 image instance from the archive (DICOMweb),
whose study and frame of reference the annotations join. What names the patient, the visit or
the specimen is withheld (smily.common.phi): `smily export --stow` restores it from the archive.
Coordinates are level-0 pixels of that image (2D, pixel origin VOLUME).
"""

from __future__ import annotations

import io
from importlib.metadata import version

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from smily.common import phi
from smily.common.errors import FailedPrecondition, NotFound

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
    if not found:
        raise NotFound("the archive has no such study or series")
    best, size = None, -1
    for item in found:
        ds = Dataset.from_json(item)
        if ds.get("SOPClassUID") != WSI:
            continue
        meta = Dataset.from_json(
            dicomweb.retrieve_instance_metadata(study, series, ds.SOPInstanceUID), bulk_data_uri_handler=_no_bulk_data
        )
        if "VOLUME" in list(meta.get("ImageType", [])) and int(meta.TotalPixelMatrixColumns) > size:
            best, size = meta, int(meta.TotalPixelMatrixColumns)
    if best is None:
        raise FailedPrecondition("the series holds no whole-slide VOLUME image")
    # Type 2 attributes an archive may leave out are present, empty; an image without a frame of
    # reference (some converters write none) gets one for the annotations to share.
    for keyword in _TYPE2:
        if keyword not in best:
            setattr(best, keyword, "")
    if "FrameOfReferenceUID" not in best:
        best.FrameOfReferenceUID = hd.UID()
    return best


def bulk_annotations(regions, description: str, source: Dataset, series_number: int = 99) -> bytes:
    """One annotation group: a rectangle per region (tiler_pb2.AnnotatedRegion, best first),
    with its score and rank as measurements; a DICOM Part 10 file."""

    def corners(r) -> np.ndarray:
        return np.array(
            [[r.x, r.y], [r.x + r.width, r.y], [r.x + r.width, r.y + r.height], [r.x, r.y + r.height]], dtype=np.float32
        )

    group = hd.ann.AnnotationGroup(
        number=1,
        uid=hd.UID(),
        label="SMILY hits",
        annotated_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        annotated_property_type=codes.SCT.Tissue,
        graphic_type=hd.ann.GraphicTypeValues.POLYGON,
        graphic_data=[corners(r) for r in regions],
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="SMILY similar-image search", version=VERSION, family=codes.cid7162.ArtificialIntelligence
        ),
        measurements=[
            hd.ann.Measurements(
                name=hd.sr.CodedConcept("score", "99SMILY", "Cosine similarity to the query"),
                values=np.array([r.score for r in regions], dtype=np.float32),
                unit=codes.UCUM.NoUnits,
            ),
            hd.ann.Measurements(
                name=hd.sr.CodedConcept("rank", "99SMILY", "Rank among the search's hits"),
                values=np.array([r.rank for r in regions], dtype=np.float32),
                unit=codes.UCUM.NoUnits,
            ),
        ],
        description=description,
    )
    ann = hd.ann.MicroscopyBulkSimpleAnnotations(
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
    phi.withhold(ann)  # the API returns it: whoever stores it restores these from their archive
    buf = io.BytesIO()
    ann.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
