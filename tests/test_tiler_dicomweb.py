"""The tiler reading DICOM WSI series from a real Orthanc over DICOMweb."""

from __future__ import annotations

import io
import os

import grpc
import highdicom as hd
import numpy as np
import pydicom
import pytest

from smily import stack
from smily.common.channels import channel
from smily.synthetic import SlideSpec, write_samples
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc

from .conftest import base_settings, rpc_code, streamed_tiles
from .helpers.orthanc import PHI, Orthanc

SPEC = SlideSpec("square.tiff", "tiff", 2048, 2048, 0.5, 21)
ACCESSION = "ACC-T-0001"
CONTAINER = "SLIDE-T-1"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    work = tmp_path_factory.mktemp("orthanc")
    slides = tmp_path_factory.mktemp("dicom-slides")
    (tiff,) = write_samples(str(slides), (SPEC,))
    orthanc = Orthanc(str(work), user="smily", password=os.urandom(8).hex())
    study, series = orthanc.push_slide(
        tiff,
        SPEC.width,
        SPEC.height,
        SPEC.mpp,
        str(work),
        AccessionNumber=ACCESSION,
        ContainerIdentifier=CONTAINER,
        SpecimenDescriptionSequence=[
            {
                "SpecimenIdentifier": "SPEC-1",
                "SpecimenUID": "1.2.826.0.1.3680043.8.498.7",
                "SpecimenShortDescription": "breast core biopsy",
                "IssuerOfTheSpecimenIdentifierSequence": [],
                "SpecimenPreparationSequence": [],
            }
        ],
    )
    creds = work / "dicomweb-credentials"
    creds.write_text(
        f"# archive kind secret\npacs basic {orthanc.user}:{orthanc.password}\n"
        f"wrong basic {orthanc.user}:not-the-password\n"
    )
    settings = base_settings(
        slide_roots=(str(slides),),
        tiler_readers=1,
        dicomweb_url=(f"pacs={orthanc.dicomweb}", f"wrong={orthanc.dicomweb}", "down=http://127.0.0.1:9/dicom-web"),
        dicomweb_credentials_file=str(creds),
    )
    running, settings = stack.start(("tiler",), settings)
    stub = tiler_pb2_grpc.TilerServiceStub(channel(settings.tiler.tiler_target))
    yield stub, study, series
    stack.stop(running, 0)
    orthanc.stop()


@pytest.mark.parametrize(
    "name",
    [
        "http://127.0.0.1:8042/dicom-web/studies/1.2/series/3.4",
        "https://example.org/slide.svs",
        "file:///etc/passwd",
        "s3:bucket/slide.svs",
        "dicomweb:unknown/1.2.3/4.5.6",
        "dicomweb:pacs/1.2.3",
        "dicomweb:pacs/1.2.x/4.5.6",
        "dicomweb:pacs/1.2.3/4.5.6/7.8",
        "dicomweb:/1.2.3/4.5.6",
        "dicomweb:http://127.0.0.1/1.2/3.4",
    ],
)
def test_only_configured_archives_and_uids(pacs, name):
    stub, _, _ = pacs
    assert rpc_code(stub.GetSlideInfo, tiler_pb2.GetSlideInfoRequest(slide=name)) == grpc.StatusCode.INVALID_ARGUMENT


def test_info_from_the_dicom_series(pacs):
    stub, study, series = pacs
    info = stub.GetSlideInfo(tiler_pb2.GetSlideInfoRequest(slide=f"dicomweb:pacs/{study}/{series}")).info
    assert (info.width, info.height) == (SPEC.width, SPEC.height)
    assert info.mpp_x == pytest.approx(SPEC.mpp, rel=1e-3) and info.mpp_y == pytest.approx(SPEC.mpp, rel=1e-3)
    assert len(info.levels) >= 2 and info.levels[0].downsample == 1
    assert info.dicom == tiler_pb2.DicomIdentifiers(
        accession_number=ACCESSION,
        study_instance_uid=study,
        series_instance_uid=series,
        container_identifier=CONTAINER,
        specimen_description="breast core biopsy",
    )
    assert not any(v in str(info) for v in PHI.values())


def test_same_tiles_as_the_file(pacs):
    """A series and the file it was made from: the same tissue tiles, near-identical pixels."""
    stub, study, series = pacs
    params = tiler_pb2.TilingParams(mpp=1.0, tile_size=224)
    from_file = streamed_tiles(stub, tiler_pb2.StreamTilesRequest(slide=SPEC.name, params=params))
    from_pacs = streamed_tiles(
        stub, tiler_pb2.StreamTilesRequest(slide=f"dicomweb:pacs/{study}/{series}", params=params)
    )
    assert len(from_file) >= 4
    assert [(t.x, t.y, t.width) for t in from_pacs] == [(t.x, t.y, t.width) for t in from_file]
    assert [t.mpp for t in from_pacs] == pytest.approx([t.mpp for t in from_file], rel=1e-6)
    a = np.frombuffer(b"".join(t.image.data for t in from_file), np.uint8).astype(int)
    b = np.frombuffer(b"".join(t.image.data for t in from_pacs), np.uint8).astype(int)
    assert np.abs(a - b).mean() < 2.0


def test_region_from_the_series(pacs):
    stub, study, series = pacs
    req = dict(x=512, y=512, width=448, height=448, mpp=1.0)
    got = stub.ReadRegion(tiler_pb2.ReadRegionRequest(slide=f"dicomweb:pacs/{study}/{series}", **req))
    assert (got.image.width, got.image.height, got.mpp) == (224, 224, 1.0)


def test_case_series_by_accession(pacs):
    stub, study, series = pacs
    found = stub.ListCaseSeries(tiler_pb2.ListCaseSeriesRequest(accession_number=ACCESSION, archive="pacs")).series
    assert [(s.source, s.study_instance_uid, s.series_instance_uid, s.container_identifier) for s in found] == [
        (f"dicomweb:pacs/{study}/{series}", study, series, CONTAINER)
    ]
    # The first archive configured is the default.
    assert len(stub.ListCaseSeries(tiler_pb2.ListCaseSeriesRequest(accession_number=ACCESSION)).series) == 1
    assert not stub.ListCaseSeries(tiler_pb2.ListCaseSeriesRequest(accession_number="NO-SUCH-ACC")).series


@pytest.mark.parametrize("accession", ["", "ACC*", "A?C", "A\\B", "X" * 17])
def test_case_query_refuses_wildcards(pacs, accession):
    stub, _, _ = pacs
    assert (
        rpc_code(stub.ListCaseSeries, tiler_pb2.ListCaseSeriesRequest(accession_number=accession))
        == grpc.StatusCode.INVALID_ARGUMENT
    )


def test_archive_errors_are_clear(pacs):
    stub, study, series = pacs
    assert (
        rpc_code(stub.GetSlideInfo, tiler_pb2.GetSlideInfoRequest(slide=f"dicomweb:wrong/{study}/{series}"))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        rpc_code(stub.GetSlideInfo, tiler_pb2.GetSlideInfoRequest(slide=f"dicomweb:down/{study}/{series}"))
        == grpc.StatusCode.UNAVAILABLE
    )
    assert (
        rpc_code(stub.GetSlideInfo, tiler_pb2.GetSlideInfoRequest(slide=f"dicomweb:pacs/{study}/1.2.3.4"))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        rpc_code(stub.ListCaseSeries, tiler_pb2.ListCaseSeriesRequest(accession_number=ACCESSION, archive="wrong"))
        == grpc.StatusCode.FAILED_PRECONDITION
    )


def _regions(n: int = 2) -> list[tiler_pb2.AnnotatedRegion]:
    return [
        tiler_pb2.AnnotatedRegion(x=224 * i, y=448, width=224, height=224, score=0.9 - i / 10, rank=i + 1)
        for i in range(n)
    ]


def test_bulk_annotations_join_the_series(pacs):
    stub, study, series = pacs
    got = stub.BuildBulkAnnotations(
        tiler_pb2.BuildBulkAnnotationsRequest(
            slide=f"dicomweb:pacs/{study}/{series}", regions=_regions(), description="SMILY search test"
        )
    )
    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(io.BytesIO(got.dicom)))
    assert (ann.StudyInstanceUID, ann.ReferencedSeriesSequence[0].SeriesInstanceUID) == (study, series)
    (group,) = ann.get_annotation_groups()
    corners = group.get_graphic_data(ann.AnnotationCoordinateType)
    assert [c[0].tolist() for c in corners] == [[0, 448], [224, 448]]
    assert group.AnnotationGroupDescription == "SMILY search test"


def test_bulk_annotations_errors(pacs):
    stub, study, series = pacs

    def code(slide: str, n: int = 1) -> grpc.StatusCode:
        request = tiler_pb2.BuildBulkAnnotationsRequest(slide=slide, regions=_regions(n))
        return rpc_code(stub.BuildBulkAnnotations, request)

    assert code(f"dicomweb:pacs/{study}/{series}", 0) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(SPEC.name) == grpc.StatusCode.FAILED_PRECONDITION  # a file slide
    assert code("http://127.0.0.1:8042/dicom-web") == grpc.StatusCode.FAILED_PRECONDITION
    assert code("dicomweb:unknown/1.2.3/4.5.6") == grpc.StatusCode.INVALID_ARGUMENT
    assert code(f"dicomweb:wrong/{study}/{series}") == grpc.StatusCode.FAILED_PRECONDITION
    assert code(f"dicomweb:down/{study}/{series}") == grpc.StatusCode.UNAVAILABLE
    assert code(f"dicomweb:pacs/{study}/1.2.3.4") == grpc.StatusCode.NOT_FOUND
