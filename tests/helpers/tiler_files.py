"""Slide files the tiler must survive, written byte by byte or with tifffile."""

from __future__ import annotations

import struct

import numpy as np
from PIL import Image


def huge_tile_tiff(path: str, side: int = 1 << 20) -> None:
    """A one-tile TIFF declaring a side x side tile backed by 64 bytes.

    Opening it works; reading any pixel makes libtiff/OpenSlide allocate
    side*side*4 bytes (4 TiB by default) and GLib aborts the process on the
    failed allocation: a real decoder crash, no fault injection.
    """
    tags = [
        (256, 4, side),
        (257, 4, side),
        (258, 3, None),
        (259, 3, 1),
        (262, 3, 2),
        (277, 3, 3),
        (284, 3, 1),
        (322, 4, side),
        (323, 4, side),
        (324, 4, None),
        (325, 4, 64),
    ]
    ifd_end = 8 + 2 + 12 * len(tags) + 4
    bps_at, data_at = ifd_end, ifd_end + 8
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)))
    for tag, typ, val in tags:
        count = 3 if tag == 258 else 1
        val = {258: bps_at, 324: data_at}.get(tag, val)
        out += (
            struct.pack("<HHIHH", tag, typ, count, val, 0)
            if typ == 3 and count == 1
            else struct.pack("<HHII", tag, typ, count, val)
        )
    out += struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + b"\0\0" + b"\x80" * 64
    with open(path, "wb") as fh:
        fh.write(out)


def truncated_copy(src: str, dst: str, keep: float = 0.5) -> None:
    with open(src, "rb") as fh:
        data = fh.read()
    with open(dst, "wb") as fh:
        fh.write(data[: int(len(data) * keep)])


def jpeg_named(path: str) -> None:
    Image.fromarray(np.full((64, 64, 3), (200, 120, 160), np.uint8)).save(path, format="JPEG")


def fake_isyntax(path: str) -> None:
    # iSyntax files start with an XML header; OpenSlide has no reader for them.
    with open(path, "wb") as fh:
        fh.write(b'<?xml version="1.0" encoding="UTF-8" ?>\r\n<DataObject ObjectType="DPUfsImport">\r\n' + b"\0" * 4096)


def dicom_wsi(directory: str, levels: list[np.ndarray], mpp: float, tile: int = 256, jpeg: bool = False) -> list[str]:
    """A DICOM WSI series (VL Whole Slide Microscopy, TILED_FULL, one instance
    per pyramid level) as a scanner's PACS export holds it: uncompressed
    frames, or JPEG baseline ones (YCbCr 4:2:2, what most scanners write).
    Returns the file paths, level 0 first."""
    import io
    import os

    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    wsi = "1.2.840.10008.5.1.4.1.1.77.1.6"
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i, rgb in enumerate(levels):
        h, w = rgb.shape[:2]
        rows, cols = -(-h // tile), -(-w // tile)
        padded = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
        padded[:h, :w] = rgb
        frames = padded.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = wsi
        ds.file_meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = wsi, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.Modality = "SM"
        ds.ImageType = (
            ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if i == 0 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        )
        ds.PatientName, ds.PatientID = "ANON", "ANON"
        ds.InstanceNumber = i + 1
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.NumberOfOpticalPaths = 1
        ds.Rows = ds.Columns = tile
        ds.NumberOfFrames = rows * cols
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.PhotometricInterpretation = "YBR_FULL_422" if jpeg else "RGB"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        level_mpp = mpp * levels[0].shape[1] / w
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w * level_mpp / 1000, h * level_mpp / 1000
        measures = Dataset()
        measures.PixelSpacing = [level_mpp / 1000, level_mpp / 1000]  # millimetres
        measures.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
        if jpeg:
            encoded = []
            for frame in frames.reshape(-1, tile, tile, 3):
                buf = io.BytesIO()
                Image.fromarray(frame).save(buf, format="JPEG", quality=95, subsampling="4:2:2")
                encoded.append(buf.getvalue())
            ds.PixelData = encapsulate(encoded)
            ds["PixelData"].VR = "OB"
            ds.LossyImageCompression = "01"
        else:
            ds.PixelData = frames.tobytes()
        path = os.path.join(directory, f"level-{i}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
