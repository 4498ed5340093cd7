"""The DICOM attributes that name a patient, a visit or a specimen: an object the API returns
(a search's hits as bulk annotations) carries none of them, and whoever stores it in their
archive restores them from the archive itself, with their own access to it.

Type 2 attributes are left empty; the specimen identifiers, which the object must carry, name
no one: they read WITHHELD until restored."""

from __future__ import annotations

from pydicom.dataset import Dataset

# Emptied (Type 2 in the Patient and General Study modules, or optional).
EMPTIED = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "InstitutionName",
    "InstitutionAddress",
)
# Required where present, so replaced: the slide's container (often the accession) and specimens.
WITHHELD = "WITHHELD"


def withhold(ds: Dataset) -> Dataset:
    """The dataset without what names a patient, a visit or a specimen (in place)."""
    for keyword in EMPTIED:
        if keyword in ds:
            if ds[keyword].VR == "SQ":  # a sequence: emptied, it would still hold its items
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, "")
    if "ContainerIdentifier" in ds:
        ds.ContainerIdentifier = WITHHELD
    for item in ds.get("SpecimenDescriptionSequence", []):
        item.SpecimenIdentifier = WITHHELD
    return ds


def restore(ds: Dataset, source: Dataset) -> Dataset:
    """What `withhold` took, back from the image the object annotates (in place)."""
    for keyword in (*EMPTIED, "ContainerIdentifier"):
        if keyword in source:
            setattr(ds, keyword, source.get(keyword))
    specimens = {i.get("SpecimenUID"): i for i in source.get("SpecimenDescriptionSequence", [])}
    for item in ds.get("SpecimenDescriptionSequence", []):
        if (original := specimens.get(item.get("SpecimenUID"))) is not None:
            item.SpecimenIdentifier = original.SpecimenIdentifier
    return ds


def annotated_image(archive, ann: Dataset) -> Dataset:
    """Metadata of an instance of the slide series a bulk annotations object annotates, from a
    DICOMweb client of the archive that holds it (the caller's own access)."""
    study, series = ann.StudyInstanceUID, ann.ReferencedSeriesSequence[0].SeriesInstanceUID
    found = archive.search_for_instances(study_instance_uid=study, series_instance_uid=series)
    if not found:
        raise LookupError("the archive no longer holds the annotated slide's series")
    sop = Dataset.from_json(found[0]).SOPInstanceUID
    return Dataset.from_json(
        archive.retrieve_instance_metadata(study, series, sop), bulk_data_uri_handler=lambda *_: None
    )
