"""Real DICOM radiographs built from FracAtlas X-rays, as a PACS would send them.

Each encoding is chosen so that the standard display pipeline (modality LUT, VOI transform,
MONOCHROME1 inversion, 0-255) gives back the JPEG's own pixels: a reader opening the DICOM
file sees what the JPEG shows, so the model must score both the same.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from fracture.manifest import body_part

#: The encodings :func:`dicom_from_jpeg` writes.
ENCODINGS = ("8-bit", "12-bit rescaled", "16-bit", "MONOCHROME1 VOI LUT", "MONOCHROME1 8-bit VOI LUT", "JPEG baseline")


def _dataset(modality: str = "DX", sop_class: str = DigitalXRayImageStorageForPresentation) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    # Each file its own patient unless a test says otherwise: an export without a patient_id
    # column links files by this (fracture.dicom.patient_key).
    ds.PatientID = f"TEST-{uuid.uuid4().hex[:12]}"
    ds.PatientName = "Test^Phantom"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.AccessionNumber = "A0001"
    ds.Modality = modality
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def grey_pixels(jpeg: Path) -> np.ndarray:
    """The JPEG's pixels as a reader sees them, in greyscale (uint8, H x W)."""
    return np.asarray(Image.open(jpeg).convert("L"))


def dicom_from_jpeg(jpeg: Path, encoding: str, modality: str = "DX") -> bytes:
    """A DICOM file whose displayed pixels are ``jpeg``'s greyscale pixels.

    Encodings:
        ``8-bit``: MONOCHROME2, 8 bits stored, a window of centre 128 and width 256 (identity).
        ``12-bit rescaled``: MONOCHROME2, 12 bits stored (value x 16), Rescale Intercept -1024
            and a window over the rescaled range that maps it back onto 0-255.
        ``16-bit``: MONOCHROME2, 16 bits stored (value x 257), window centre 32768, width 65536.
        ``MONOCHROME1 VOI LUT``: MONOCHROME1 (white is low), 12 bits stored as 16 x (255 - value),
            with a VOI LUT Sequence of 4096 16-bit entries; the display inverts it back.
        ``MONOCHROME1 8-bit VOI LUT``: the same with 8-bit LUT entries.
        ``JPEG baseline``: the JPEG file itself, encapsulated (transfer syntax 1.2.840.10008.1.2.4.50),
            as a PACS stores lossy radiographs; it must be a greyscale JPEG.
    """
    x = grey_pixels(jpeg)
    ds = _dataset(modality)
    if encoding == "8-bit":
        ds.set_pixel_data(x, "MONOCHROME2", 8)
        ds.WindowCenter, ds.WindowWidth = 128, 256
    elif encoding == "12-bit rescaled":
        ds.set_pixel_data(x.astype(np.uint16) * 16, "MONOCHROME2", 12)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "US"
        ds.WindowCenter, ds.WindowWidth = 1016.5, 4081
    elif encoding == "16-bit":
        ds.set_pixel_data(x.astype(np.uint16) * 257, "MONOCHROME2", 16)
        ds.WindowCenter, ds.WindowWidth = 32768, 65536
    elif encoding in ("MONOCHROME1 VOI LUT", "MONOCHROME1 8-bit VOI LUT"):
        ds.set_pixel_data((255 - x.astype(np.uint16)) * 16, "MONOCHROME1", 12)
        item = Dataset()
        if encoding == "MONOCHROME1 VOI LUT":
            item.LUTDescriptor = [4096, 0, 16]
            item.LUTData = [(v // 16) * 257 for v in range(4096)]
        else:
            item.LUTDescriptor = [4096, 0, 8]
            item.LUTData = [v // 16 for v in range(4096)]
        item["LUTData"].VR = "US"
        item.LUTExplanation = "inverse of the stored scale"
        ds.VOILUTSequence = Sequence([item])
    elif encoding == "JPEG baseline":
        with Image.open(jpeg) as img:
            if img.mode != "L":
                raise ValueError(f"{jpeg.name} is {img.mode}; JPEG baseline here needs a greyscale JPEG")
            width, height = img.size
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.Rows, ds.Columns = height, width
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.LossyImageCompression = "01"
        ds.PixelData = encapsulate([jpeg.read_bytes()])
        ds["PixelData"].VR = "OB"
    else:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {ENCODINGS}")
    return to_bytes(ds)


def cut_short(jpeg: Path, keep: float = 1 / 3, trailer: bytes = b"") -> bytes:
    """``jpeg`` encapsulated as JPEG baseline (see :func:`dicom_from_jpeg`), its stream cut to ``keep`` of its bytes.

    As an interrupted transfer leaves it: the fragment ends without the JPEG's End of Image
    marker. ``keep=1`` keeps the whole stream, followed by ``trailer`` (fill bytes some encoders
    write after the marker).
    """
    ds = dcmread(io.BytesIO(dicom_from_jpeg(jpeg, "JPEG baseline")))
    stream = jpeg.read_bytes()
    ds.PixelData = encapsulate([stream[: int(len(stream) * keep)] + trailer])
    return to_bytes(ds)


def without_preamble(data: bytes, file_meta: bool = True) -> bytes:
    """The same dataset written without the Part 10 preamble, as some PACS exports hold it.

    ``file_meta=False`` drops the file meta information too and writes implicit VR little
    endian, as a file from before Part 10 would be.
    """
    ds = dcmread(io.BytesIO(data))
    ds.preamble = None
    buf = io.BytesIO()
    if file_meta:
        ds.save_as(buf, enforce_file_format=False)
    else:
        del ds.file_meta
        ds.save_as(buf, implicit_vr=True, little_endian=True)
    return buf.getvalue()


def codestream(pixels: np.ndarray, kind: str) -> bytes:
    """``pixels`` (uint8, H x W) encoded as one frame of ``kind``: ``JPEG`` (baseline, Pillow),
    ``JPEG 2000`` (lossless, Pillow's OpenJPEG, a bare codestream) or ``JPEG-LS`` (CharLS)."""
    if kind == "JPEG-LS":
        import jpeg_ls  # noqa: PLC0415 - pyjpegls, pydicom's JPEG-LS plugin

        return jpeg_ls.encode(pixels).tobytes()
    buf = io.BytesIO()
    if kind == "JPEG":
        Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    else:
        Image.fromarray(pixels).save(buf, "JPEG2000", no_jp2=True, irreversible=False)
    return buf.getvalue()


#: The transfer syntax each :func:`codestream` kind is sent in.
CODESTREAM_SYNTAX = {
    "JPEG": "1.2.840.10008.1.2.4.50",
    "JPEG 2000": "1.2.840.10008.1.2.4.90",
    "JPEG-LS": "1.2.840.10008.1.2.4.80",
}


def encapsulated(frame: bytes, kind: str, rows: int, columns: int) -> bytes:
    """An 8-bit MONOCHROME2 DX whose one frame is ``frame`` (a :func:`codestream` of ``kind``)
    and whose header declares ``rows`` x ``columns``, which an exporter may get wrong. The
    window (centre 128, width 256) shows the stored values as they are."""
    ds = _dataset()
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.file_meta.TransferSyntaxUID = CODESTREAM_SYNTAX[kind]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def multiframe(jpeg: Path) -> bytes:
    x = grey_pixels(jpeg)
    ds = _dataset()
    ds.set_pixel_data(np.stack([x, x]), "MONOCHROME2", 8)
    return to_bytes(ds)


def encapsulated_pdf() -> bytes:
    ds = _dataset("DOC", EncapsulatedPDFStorage)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    return to_bytes(ds)


def dicomdir() -> bytes:
    """A DICOM medium's index (Media Storage Directory Storage), with no records: no pixels, no SOP Class UID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "EXPORT"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = Sequence([])
    return to_bytes(ds)


def without_sop_pixels(sop_class: str, modality: str) -> bytes:
    """A non-image object of ``sop_class`` (a report, say): the common header and no pixel data."""
    return to_bytes(_dataset(modality, sop_class))


#: The encodings a hospital export built by :func:`hospital_export` cycles through (FracAtlas's
#: JPEGs are RGB, so the encapsulated JPEG, which needs a greyscale one, is left out).
EXPORT_ENCODINGS = ("8-bit", "16-bit", "MONOCHROME1 VOI LUT", "12-bit rescaled")


def hospital_export(fracatlas: Path, dest: Path, ids: list[str]) -> pd.DataFrame:
    """A hospital's export (``ingest.layout: csv``) of FracAtlas X-rays as DICOM files.

    Writes ``dest/images/patient<k>/<n>.dcm`` (one file per id, the encodings cycling through
    :data:`EXPORT_ENCODINGS`) and ``dest/labels.csv`` with ``path``, ``label`` (the class
    folder's), ``body_part`` (from dataset.csv's flags) and ``view`` (DICOM's AP or LL, from
    its frontal and lateral flags).

    Returns:
        labels.csv's rows, with the FracAtlas id each file was made from (``source_id``).
    """
    csv = pd.read_csv(fracatlas / "dataset.csv").set_index("image_id")
    rows = []
    for n, image_id in enumerate(ids):
        folder = next(f for f in ("Fractured", "Non_fractured") if (fracatlas / "images" / f / image_id).is_file())
        path = f"images/patient{n % 7}/{n:04d}.dcm"
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).write_bytes(
            dicom_from_jpeg(fracatlas / "images" / folder / image_id, EXPORT_ENCODINGS[n % len(EXPORT_ENCODINGS)])
        )
        flags = csv.loc[[image_id]]
        view = "+".join(v for v, flag in (("AP", "frontal"), ("LL", "lateral")) if flags[flag].iloc[0] == 1)
        rows.append(
            {
                "path": path,
                "label": int(folder == "Fractured"),
                "body_part": body_part(flags).iloc[0].replace("unknown", ""),
                "view": view,
                "source_id": image_id,
            }
        )
    labels = pd.DataFrame(rows)
    labels.drop(columns="source_id").to_csv(dest / "labels.csv", index=False)
    return labels
