"""DICOM radiographs read as a reader sees them (fracture.dicom), built from real FracAtlas X-rays."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
)

from fracture.decoding import ImageLoadError, open_xray, shown_size
from fracture.dicom import (
    DicomRejected,
    _display_values,
    dicom_to_image,
    is_dicom,
    max_inflated,
    patient_ids,
    read_header,
    to_display,
)
from fracture.intake import InputPolicy, InputRejected, read_xray
from fracture.manifest import inspect_image
from fracture.predict import collect
from tests.conftest import require_fracatlas
from tests.dicom_files import (
    ENCODINGS,
    _dataset,
    codestream,
    cut_short,
    dicom_from_jpeg,
    dicomdir,
    encapsulated,
    encapsulated_pdf,
    grey_pixels,
    multiframe,
    to_bytes,
    without_preamble,
    without_sop_pixels,
)


@pytest.fixture(scope="module")
def xrays():
    root = require_fracatlas() / "images"
    # A greyscale JPEG (the one JPEG baseline encapsulates) and an RGB one.
    return [root / "Fractured" / "IMG0000019.jpg", root / "Non_fractured" / "IMG0000000.jpg"]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_displays_the_jpeg_pixels(xrays, encoding):
    for jpeg in xrays:
        if encoding == "JPEG baseline" and jpeg.name == "IMG0000000.jpg":
            continue  # an RGB JPEG is not a greyscale DICOM's payload
        shown = np.asarray(dicom_to_image(dicom_from_jpeg(jpeg, encoding))).astype(int)
        diff = np.abs(shown - grey_pixels(jpeg))
        # Lossless encodings give the pixels back exactly; the encapsulated JPEG is decoded by
        # another JPEG decoder (libjpeg through pylibjpeg, not Pillow's libjpeg-turbo).
        assert diff.max() <= (1 if encoding == "JPEG baseline" else 0), (jpeg.name, encoding, diff.max())


def test_monochrome1_is_inverted_after_the_voi_transform(xrays):
    data = dicom_from_jpeg(xrays[0], "MONOCHROME1 VOI LUT")
    stored = dcmread(__import__("io").BytesIO(data)).pixel_array
    shown = np.asarray(dicom_to_image(data))
    expected = grey_pixels(xrays[0])
    # Stored values are high where the X-ray is dark; what is shown is bone-bright again.
    assert np.corrcoef(stored.ravel(), expected.ravel())[0, 1] < -0.99
    np.testing.assert_array_equal(shown, expected)


def test_training_reads_a_dicom_file_as_the_served_model_does(xrays, tmp_path):
    path = tmp_path / "study.dcm"
    path.write_bytes(dicom_from_jpeg(xrays[0], "12-bit rescaled"))
    trained = np.asarray(open_xray(path, rgb=False))
    served = np.asarray(read_xray(path.read_bytes(), InputPolicy()).image)
    np.testing.assert_array_equal(trained, served)
    np.testing.assert_array_equal(trained, grey_pixels(xrays[0]))


def test_the_manifest_inspects_a_dicom_file_as_the_image_a_reader_sees(xrays, tmp_path):
    from fracture.manifest import inspect_image

    path = tmp_path / "IM0001"
    path.write_bytes(dicom_from_jpeg(xrays[0], "MONOCHROME1 VOI LUT"))
    facts = inspect_image(str(path))
    height, width = grey_pixels(xrays[0]).shape
    assert (facts.width, facts.height, facts.mode, facts.decodable, facts.truncated) == (width, height, "L", True, False)


def test_the_first_window_is_used_when_there_are_several(xrays):
    import io

    ds = dcmread(io.BytesIO(dicom_from_jpeg(xrays[0], "16-bit")))
    ds.WindowCenter, ds.WindowWidth = [32768, 10000], [65536, 2000]
    ds.WindowCenterWidthExplanation = ["FULL", "NARROW"]
    np.testing.assert_array_equal(np.asarray(dicom_to_image(to_bytes(ds))), grey_pixels(xrays[0]))


def without(data: bytes, keyword: str) -> bytes:
    """The DICOM file with one attribute removed, as a broken exporter writes it."""
    import io

    ds = dcmread(io.BytesIO(data))
    delattr(ds, keyword)
    return to_bytes(ds)


def float_pixels(data: bytes) -> bytes:
    """The DICOM file with its pixels as Float Pixel Data (32-bit), as a parametric map holds them."""
    import io

    ds = dcmread(io.BytesIO(data))
    ds.FloatPixelData = ds.pixel_array.astype(np.float32).tobytes()
    del ds.PixelData
    ds.BitsAllocated = 32
    return to_bytes(ds)


def edited(data: bytes, **values: object) -> bytes:
    """The DICOM file with attributes set, as an exporter might write them."""
    import io

    ds = dcmread(io.BytesIO(data))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return to_bytes(ds)


def test_an_inverse_presentation_lut_is_shown_inverted_once(xrays):
    """MONOCHROME2 with Presentation LUT Shape INVERSE is shown inverted; MONOCHROME1 carries INVERSE
    in DX by rule and is inverted once, not twice."""
    expected = grey_pixels(xrays[0])
    inverse = dicom_to_image(edited(dicom_from_jpeg(xrays[0], "16-bit"), PresentationLUTShape="INVERSE"))
    np.testing.assert_array_equal(np.asarray(inverse), 255 - expected)
    mono1 = dicom_to_image(edited(dicom_from_jpeg(xrays[0], "MONOCHROME1 VOI LUT"), PresentationLUTShape="INVERSE"))
    np.testing.assert_array_equal(np.asarray(mono1), expected)


def test_a_negative_rescale_slope_with_a_window_is_shown_as_the_same_values_stored_the_other_way(xrays):
    """Stored as 65535 - v with slope -1 and intercept 65535, the modality values are v again: the
    window shows the JPEG's pixels (it came out black, refused as blank, before)."""
    import io

    ds = dcmread(io.BytesIO(dicom_from_jpeg(xrays[0], "16-bit")))
    stored = ds.pixel_array.astype(np.int64)
    ds.PixelData = (65535 - stored).astype(np.uint16).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = -1, 65535
    ds.WindowCenter, ds.WindowWidth = 32768, 65536
    np.testing.assert_array_equal(np.asarray(dicom_to_image(to_bytes(ds))), grey_pixels(xrays[0]))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda jpeg: multiframe(jpeg), "is DICOM but holds 2 frames; the model reads single-frame radiographs"),
        (lambda jpeg: encapsulated_pdf(), "is DICOM but is an encapsulated PDF, not an image"),
        (lambda jpeg: dicom_from_jpeg(jpeg, "8-bit", modality="CT"), "is DICOM but has modality CT; the model reads CR, DX, RG"),
        # Angiography and C-arm frames, which the model never saw: refused unless a site lists XA.
        (lambda jpeg: dicom_from_jpeg(jpeg, "8-bit", modality="XA"), "is DICOM but has modality XA; the model reads CR, DX, RG"),
        (lambda jpeg: b"\0" * 128 + b"DICM" + b"\xff" * 64, "is DICOM but is a DICOM object without pixel data"),
        (lambda jpeg: dicom_from_jpeg(jpeg, "16-bit")[:400], r"is DICOM but is a Digital X-Ray Image Storage - For "
         r"Presentation object that ends before its pixel data: the file is cut short or damaged \(an interrupted "
         r"transfer or export\); send the complete file"),
        (lambda jpeg: without(edited(dicom_from_jpeg(jpeg, "16-bit"), SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1.99"),
                              "PixelData"), "is DICOM but is an image that ends before its pixel data"),
        (lambda jpeg: float_pixels(dicom_from_jpeg(jpeg, "16-bit")), "is DICOM but holds floating-point pixel data, "
         "which no radiograph is stored as"),
        (lambda jpeg: dicom_from_jpeg(jpeg, "16-bit")[:-5000], "is DICOM but has pixel data that cannot be decoded"),
        (lambda jpeg: without(dicom_from_jpeg(jpeg, "16-bit"), "Rows"), "is DICOM but lacks Rows, which describe its pixels"),
        (lambda jpeg: without(dicom_from_jpeg(jpeg, "16-bit"), "BitsStored"), "is DICOM but lacks BitsStored"),
        (lambda jpeg: without(dicom_from_jpeg(jpeg, "16-bit"), "PhotometricInterpretation"),
         "is DICOM but lacks PhotometricInterpretation"),
        (lambda jpeg: edited(dicom_from_jpeg(jpeg, "16-bit"), PresentationIntentType="FOR PROCESSING"),
         "is DICOM but is an image FOR PROCESSING .*: raw detector data that no viewer displays"),
        (lambda jpeg: edited(dicom_from_jpeg(jpeg, "16-bit"), SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1.1"),
         r"is DICOM but is an image FOR PROCESSING \(Digital X-Ray Image Storage - For Processing\)"),
        (lambda jpeg: edited(dicom_from_jpeg(jpeg, "16-bit"), WindowCenter=32768, WindowWidth=0),
         r"is DICOM but has WindowWidth 0; the standard requires at least 1"),
        (lambda jpeg: dicomdir(), r"is DICOM but is a DICOMDIR \(the index of the files on a DICOM medium\), not an image"),
        (lambda jpeg: without_sop_pixels("1.2.840.10008.5.1.4.1.1.88.34", "SR"), "is DICOM but is a structured report, not an image"),
        (lambda jpeg: without_sop_pixels("1.2.840.10008.5.1.4.1.1.88.67", "SR"), "is DICOM but is a structured report, not an image"),
        (lambda jpeg: without_sop_pixels("1.2.840.10008.5.1.4.1.1.88.59", "KO"), "is DICOM but is a key object selection, not an image"),
        (lambda jpeg: wide_pixels(), r"is DICOM but has 32 bits allocated and 32 stored per pixel; radiographs hold at most 16"),
        (lambda jpeg: private_syntax(jpeg), r"is DICOM but has its pixel data in transfer syntax 1\.3\.46\.670589\.33\.1\.4\.1, "
         r"a vendor's private one, which this reader cannot decode; send the image uncompressed \(Explicit VR Little "
         r"Endian\) or as JPEG"),
        (lambda jpeg: undecodable_htj2k(jpeg), r"is DICOM but has pixel data that cannot be decoded \(transfer syntax "
         r"[\s\S]*\. Send the image uncompressed \(Explicit VR Little Endian\) or as JPEG, JPEG-LS, JPEG 2000 or RLE$"),
    ],
)
def test_objects_that_are_not_a_single_radiograph_are_refused(xrays, make, message):
    with pytest.raises(InputRejected, match="^" + message):
        read_xray(make(xrays[0]), InputPolicy())


def wide_pixels() -> bytes:
    """32 bits a pixel, values spanning 2**26: the per-level table would need gigabytes (refused from the header)."""
    ds = _dataset()
    pixels = np.zeros((64, 64), dtype="<u4")
    pixels[0, 0] = 2**26
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 64, 64, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return to_bytes(ds)


def private_syntax(jpeg) -> bytes:
    """A radiograph whose transfer syntax is a vendor's private one (Philips'): pydicom raised "UID is not a
    transfer syntax" on it, and the refusal asked for the file as the PACS wrote it, which it was."""
    from pydicom.uid import UID

    ds = dcmread(__import__("io").BytesIO(dicom_from_jpeg(jpeg, "16-bit")))
    ds.file_meta.TransferSyntaxUID = UID("1.3.46.670589.33.1.4.1")
    buffer = __import__("io").BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buffer.getvalue()


def undecodable_htj2k(jpeg) -> bytes:
    """A radiograph whose transfer syntax says High-Throughput JPEG 2000, which this server has no decoder for."""
    from pydicom.uid import HTJ2KLossless

    ds = dcmread(__import__("io").BytesIO(dicom_from_jpeg(jpeg, "JPEG baseline")))
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    return to_bytes(ds)


def test_modalities_come_from_the_policy(xrays):
    ct = dicom_from_jpeg(xrays[0], "8-bit", modality="CT")
    assert read_xray(ct, InputPolicy(modalities=("CR", "DX", "CT"))).format == "DICOM"
    with pytest.raises(DicomRejected, match="modality CT"):
        dicom_to_image(ct)


def _of_body_part(jpeg, value: str | None) -> bytes:
    ds = dcmread(io.BytesIO(dicom_from_jpeg(jpeg, "8-bit")))
    if value is not None:
        ds.BodyPartExamined = value
    return to_bytes(ds)


def test_a_radiograph_of_a_body_part_the_model_never_saw_is_refused_naming_it(xrays):
    """A chest X-ray got "not fractured" in its structured report, a finding on a region the model
    never learned (rib fractures): its header's Body Part Examined says what it shows."""
    with pytest.raises(InputRejected, match=r"^is DICOM but is an X-ray of CHEST \(its Body Part Examined\); the model "
                                           r"was trained on X-rays of the hand, leg, hip and shoulder, .*serve\.body_parts"):
        read_xray(_of_body_part(xrays[0], "CHEST"), InputPolicy())
    for value in ("HAND", "wrist", "LOWER LIMB", "", None):  # a limb, in any case or spacing; or not said
        assert read_xray(_of_body_part(xrays[0], value), InputPolicy()).format == "DICOM", value
    assert read_xray(_of_body_part(xrays[0], "CHEST"), InputPolicy(body_parts=None)).format == "DICOM"
    assert read_xray(_of_body_part(xrays[0], "CSPINE"), InputPolicy(body_parts=("CSPINE",))).format == "DICOM"
    # stored with the model, and read back
    for policy in (InputPolicy(), InputPolicy(body_parts=None)):
        assert InputPolicy.from_dict(policy.to_dict()) == policy
    assert InputPolicy.from_dict({}).body_parts == InputPolicy().body_parts


def test_dicom_dimensions_are_checked_from_the_header(xrays):
    with pytest.raises(InputRejected, match="is 1152 x 1440 px; the model accepts images whose sides are between 64 and 1000"):
        read_xray(dicom_from_jpeg(xrays[0], "16-bit"), InputPolicy(max_side=1000))
    with pytest.raises(InputRejected, match=r"declares 1152 x 1440 px \(2 megapixels\)"):
        read_xray(dicom_from_jpeg(xrays[0], "16-bit"), InputPolicy(max_pixels=1_000_000))


@pytest.mark.parametrize("truncated", ["score", "refuse"])
def test_a_compressed_dicom_cut_short_is_refused_whatever_the_truncation_policy(xrays, tmp_path, truncated):
    data = cut_short(xrays[0])
    # pydicom's JPEG decoder returns a whole image for it: the rows past the cut are not the X-ray.
    assert dcmread(__import__("io").BytesIO(data)).pixel_array.shape == grey_pixels(xrays[0]).shape
    with pytest.raises(InputRejected, match="ends early.*send the complete file"):
        read_xray(data, InputPolicy(truncated=truncated))
    # Training lists it as undecodable, with the reason, rather than learning from those rows.
    path = tmp_path / "cut.dcm"
    path.write_bytes(data)
    facts = inspect_image(str(path))
    assert not facts.decodable
    assert "ends early" in facts.error
    # The complete stream is read, with fill bytes or a vendor's few bytes after its end marker too.
    for trailer in (b"", b"\xff", b"\xff\xff\xff\x00", b"VENDOR\x00"):
        whole = cut_short(xrays[0], keep=1, trailer=trailer)
        assert np.asarray(read_xray(whole, InputPolicy()).image).shape == grey_pixels(xrays[0]).shape, trailer


@pytest.mark.parametrize("file_meta", [True, False], ids=["file meta", "no file meta"])
def test_a_dicom_file_without_the_preamble_is_read_and_found_in_a_folder(xrays, tmp_path, file_meta):
    data = without_preamble(dicom_from_jpeg(xrays[0], "12-bit rescaled"), file_meta)
    assert data[128:132] != b"DICM"
    served = np.asarray(read_xray(data, InputPolicy()).image)
    np.testing.assert_array_equal(served, grey_pixels(xrays[0]))
    (tmp_path / "S1").mkdir()
    (tmp_path / "S1" / "IM0001").write_bytes(data)  # no ending, as PACS exports name files
    (tmp_path / "S1" / "notes.txt").write_text("not an image\n")
    (tmp_path / ".hidden").write_bytes(data)
    # Every file of the folder is a row (the text file's says why it was not scored); hidden ones are not.
    assert collect([tmp_path]) == [tmp_path / "S1" / "IM0001", tmp_path / "S1" / "notes.txt"]
    np.testing.assert_array_equal(np.asarray(open_xray(tmp_path / "S1" / "IM0001", rgb=False)), served)


def _nine_bit_voi_lut(ds):
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 9]
    item.LUTData = list(range(4096))
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])


def _empty_voi_lut_and_window_width_0(ds):
    ds.VOILUTSequence = Sequence([])
    ds.WindowWidth = 0


def _rescale_slope_0(ds):
    ds.RescaleSlope = 0


def _empty_rescale(ds):
    ds.RescaleSlope = None
    ds.RescaleIntercept = None


def _voi_lut_descriptor_of_two_values(ds):
    item = Dataset()
    item.LUTDescriptor = [4096, 0]
    item.LUTData = list(range(4096))
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])


def _shifted_high_bit(ds):
    # 12 bits stored in the top of each 16-bit word, as ACR-NEMA layouts did: pydicom would read
    # the low 12 bits and show a sawtooth.
    ds.PixelData = (ds.pixel_array.astype(np.uint16) << 4).tobytes()
    ds.HighBit = 15


def _sigmoid_width_0(ds):
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2048, 0, "SIGMOID"


HEADERS_REFUSED = [
    (_nine_bit_voi_lut, r"pixel data cannot be read \(NotImplementedError: '9' bits per LUT entry"),
    (_voi_lut_descriptor_of_two_values, r"pixel data cannot be read \(IndexError"),
    (_empty_voi_lut_and_window_width_0, "has WindowWidth 0; the standard requires at least 1"),
    (_sigmoid_width_0, "has WindowWidth 0 with VOI LUT Function SIGMOID; the standard requires more than 0"),
    (_rescale_slope_0, "has RescaleSlope 0, which maps every pixel to one value"),
    (_empty_rescale, "has an empty RescaleSlope, which the modality transform needs"),
    (_shifted_high_bit, r"has High Bit 15 with 12 bits stored; the standard requires High Bit to be one less"),
]


@pytest.mark.parametrize(("corrupt", "message"), HEADERS_REFUSED)
def test_a_header_the_display_pipeline_cannot_use_is_refused_naming_what_is_wrong(xrays, corrupt, message):
    ds = dcmread(__import__("io").BytesIO(dicom_from_jpeg(xrays[0], "12-bit rescaled")))
    corrupt(ds)
    with pytest.raises(InputRejected, match=f"^is DICOM but .*{message}"):
        read_xray(to_bytes(ds), InputPolicy())


@pytest.mark.parametrize(("corrupt", "message"), HEADERS_REFUSED)
def test_training_lists_such_a_file_as_undecodable_with_the_reason(xrays, tmp_path, corrupt, message):
    """The validate stage decodes every file of a hospital's export: one malformed header is that
    row's finding, named in the report, not an error that stops the stage."""
    ds = dcmread(__import__("io").BytesIO(dicom_from_jpeg(xrays[0], "12-bit rescaled")))
    corrupt(ds)
    path = tmp_path / "IM0001.dcm"
    path.write_bytes(to_bytes(ds))
    facts = inspect_image(str(path))
    assert not facts.decodable and not facts.truncated
    assert __import__("re").search(message, facts.error), facts.error
    with pytest.raises(DicomRejected, match=message):
        dicom_to_image(path.read_bytes())


def test_signed_8_bit_levels_go_through_a_voi_lut_without_wrapping_round():
    ds = _dataset("CR")
    ds.set_pixel_data(np.tile(np.arange(-100, 101, dtype=np.int8), (8, 1)), "MONOCHROME2", 8)
    item = Dataset()
    item.LUTDescriptor = [201, -100, 16]
    item["LUTDescriptor"].VR = "SS"
    item.LUTData = [round(i * 65535 / 200) for i in range(201)]
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    shown = np.asarray(dicom_to_image(to_bytes(ds)))[0]
    # The LUT is a straight ramp from the first stored value (-100) to the last (+100).
    np.testing.assert_array_equal(shown, np.rint(np.arange(201) * 255 / 200).astype(np.uint8))


def test_a_window_narrower_than_1_is_read_under_linear_exact():
    """LINEAR_EXACT (PS3.3 C.11.2.1.3.2) allows any width above 0, unlike LINEAR."""
    ds = _dataset()
    ds.set_pixel_data(np.tile(np.arange(2040, 2057, dtype=np.uint16), (4, 1)), "MONOCHROME2", 12)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2048, 0.5, "LINEAR_EXACT"
    shown = np.asarray(dicom_to_image(to_bytes(ds)))[0]
    np.testing.assert_array_equal(shown[:8], 0)
    np.testing.assert_array_equal(shown[9:], 255)


def test_files_that_only_start_like_a_dataset_are_not_taken_for_dicom():
    rng = np.random.default_rng(0)
    # Raw 16-bit dumps and other binaries that happen to start with 08 00 or 02 00: only when
    # the next bytes spell one of the standard's 34 VRs (about 1 in 2,000) do they pass.
    taken = sum(
        is_dicom(start + rng.integers(0, 256, 130, dtype=np.uint8).tobytes())
        for start in (b"\x08\x00", b"\x02\x00")
        for _ in range(500)
    )
    assert taken <= 3


@pytest.mark.parametrize(
    "kind", ["window and rescale", "signed with a negative slope", "MONOCHROME1 VOI LUT", "no window"]
)
def test_the_per_level_table_gives_the_per_pixel_pipelines_values(kind):
    rng = np.random.default_rng(1)
    ds = _dataset()
    if kind == "window and rescale":
        ds.set_pixel_data(rng.integers(0, 4096, (60, 50), dtype=np.uint16), "MONOCHROME2", 12)
        ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, -1024, 900, 3000
    elif kind == "signed with a negative slope":
        ds.set_pixel_data(rng.integers(-20000, 20000, (60, 50), dtype=np.int16), "MONOCHROME2", 16)
        ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = -0.5, 100, 0, 15000
    elif kind == "MONOCHROME1 VOI LUT":
        ds.set_pixel_data(rng.integers(0, 4096, (60, 50), dtype=np.uint16), "MONOCHROME1", 12)
        item = Dataset()
        item.LUTDescriptor, item.LUTData = [4096, 0, 16], [v * 16 for v in range(4096)]
        item["LUTData"].VR = "US"
        ds.VOILUTSequence = Sequence([item])
    else:
        ds.set_pixel_data(rng.integers(300, 3000, (60, 50), dtype=np.uint16), "MONOCHROME2", 12)
    ds = dcmread(__import__("io").BytesIO(to_bytes(ds)))
    pixels = ds.pixel_array
    np.testing.assert_array_equal(to_display(ds), _display_values(pixels, ds, pixels))


def _ramp(ds: Dataset, low: int, high: int) -> np.ndarray:
    """A 12-bit horizontal ramp from ``low`` to ``high`` as the dataset's pixels."""
    ramp = np.tile(np.linspace(low, high, 64).round().astype(np.uint16), (64, 1))
    ds.set_pixel_data(ramp, "MONOCHROME2", 12)
    return ramp


def test_a_voi_lut_of_8_bit_entries_maps_values_past_its_end_to_its_last_entry():
    """pydicom looks an 8-bit LUT up with 8-bit indices, so values more than 255 past its first
    mapped value wrapped round to dark grey; the standard maps them to the last entry (PS3.3 C.11.2.1.1)."""
    ds = _dataset()
    ramp = _ramp(ds, 0, 4095)
    item = Dataset()
    item.LUTDescriptor = [256, 1000, 8]
    item.LUTData = list(range(256))
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    shown = np.asarray(dicom_to_image(to_bytes(ds)))[0].astype(int)
    expected = np.clip(ramp[0].astype(int) - 1000, 0, 255)  # the LUT is the identity over its 256 entries
    np.testing.assert_array_equal(shown, expected)
    assert (shown[ramp[0] > 1255] == 255).all() and (ramp[0] > 1255).sum() > 30


def _voi_lut_over_12_bits(bits: int, photometric: str = "MONOCHROME2", scale: int = 1) -> bytes:
    """A 12-bit CR ramp through a VOI LUT of 4096 entries 0..4095 x ``scale`` (written as OW), its
    descriptor saying ``bits`` per entry."""
    ds = _dataset(modality="CR", sop_class=ComputedRadiographyImageStorage)
    ramp = np.tile(np.linspace(0, 4095, 64).round().astype(np.uint16), (64, 1))
    ds.set_pixel_data(ramp, photometric, 12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, bits]
    item.add_new(0x00283006, "OW", (np.arange(4096, dtype="<u2") * scale).tobytes())
    ds.VOILUTSequence = Sequence([item])
    return to_bytes(ds)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_a_voi_lut_whose_descriptor_claims_more_bits_than_its_entries_use_spans_the_grey_range(photometric):
    """Some CRs (Agfa's) write LUT Descriptor 4096\\0\\16 over entries that reach 4095: read at its
    declared 16 bits the image came out within grey 0..16 (239..255 for MONOCHROME1), near-blank,
    and was scored. Horos and Cornerstone take the range from the largest entry."""
    shown = np.asarray(dicom_to_image(_voi_lut_over_12_bits(16, photometric)))
    assert (shown.min(), shown.max()) == (0, 255)
    np.testing.assert_array_equal(shown, np.asarray(dicom_to_image(_voi_lut_over_12_bits(12, photometric))))
    # A LUT whose entries reach into its top bit keeps its declared range (the same picture, but
    # for rounding). One of 16-bit entries that stops short of its range (32760) is read at its word:
    # only 12-bit entries under a wider descriptor are the modalities' error, not a LUT that keeps
    # its brightest values unused.
    scaled = np.asarray(dicom_to_image(_voi_lut_over_12_bits(16, photometric, scale=16))).astype(int)
    assert np.abs(scaled - shown).max() <= 1
    half = np.asarray(dicom_to_image(_voi_lut_over_12_bits(16, photometric, scale=8))).astype(int)
    assert half.max() - half.min() in range(126, 130)  # 0..32760 of 0..65535: half the grey range


def test_pixel_padding_does_not_set_the_range_and_is_shown_black():
    """Padding (PS3.3 C.7.5.1.1.2) is declared so that it does not set the displayed range: an image
    padded with 0 shows the same grey levels as without the padding, and the padding black."""
    plain = _dataset()
    ramp = _ramp(plain, 1000, 3000)
    within = ramp.copy()
    within[:, :8] = ramp[:, 8:9]  # the first 8 columns hold no value outside the rest's range
    plain.set_pixel_data(within, "MONOCHROME2", 12)
    reference = np.asarray(dicom_to_image(to_bytes(plain)))
    assert (reference.min(), reference.max()) == (0, 255)
    for value, limit in ((0, None), (0, 999), (4000, None)):
        padded = _dataset()
        pixels = ramp.copy()
        pixels[:, :8] = value if limit is None else np.linspace(value, limit, 8).round().astype(np.uint16)
        padded.set_pixel_data(pixels, "MONOCHROME2", 12)
        padded.PixelPaddingValue = value
        if limit is not None:
            padded.PixelPaddingRangeLimit = limit
        shown = np.asarray(dicom_to_image(to_bytes(padded)))
        np.testing.assert_array_equal(shown[:, 8:], reference[:, 8:])
        assert (shown[:, :8] == 0).all()


def test_a_colour_dicom_in_ycbcr_is_read_as_rgb():
    """Lossy JPEG colour is stored as YBR_FULL_422 or YBR_FULL (PS3.5 8.2.1); pydicom hands it over as RGB."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    if path is None:
        pytest.skip("pydicom's test file SC_rgb_jpeg_dcmtk.dcm is not installed")
    ds = dcmread(path)
    assert ds.PhotometricInterpretation == "YBR_FULL"
    ds.Modality = "DX"
    image = read_xray(to_bytes(ds), InputPolicy(min_side=32)).image
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), dcmread(path).pixel_array)


@pytest.mark.parametrize(("photometric", "irreversible"), [("YBR_RCT", False), ("YBR_ICT", True)])
def test_a_colour_jpeg_2000_dicom_is_read_as_rgb(photometric, irreversible):
    """JPEG 2000 colour is stored as YBR_RCT (lossless) or YBR_ICT (lossy), its codestream's own
    colour transforms (PS3.5 8.2.4); pydicom's decoder gives RGB. Such files were refused for
    their photometric interpretation, while the same pixels labelled RGB were read. The label
    without JPEG 2000 pixel data is a corrupt header, refused so."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000, UID, JPEG2000Lossless

    rgb = np.zeros((96, 96, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[30:60, 30:60] = np.arange(96)[None, :] * 2, 90, (200, 180, 40)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG2000", no_jp2=True, irreversible=irreversible, mct=1)
    ds = _dataset()
    ds.file_meta.TransferSyntaxUID = JPEG2000 if irreversible else JPEG2000Lossless
    ds.Rows = ds.Columns = 96
    ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PixelRepresentation = 3, 0, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = photometric
    image = read_xray(to_bytes(ds), InputPolicy(min_side=32)).image
    assert image.mode == "RGB"
    if irreversible:
        assert np.abs(np.asarray(image).astype(int) - rgb).max() <= 8
    else:
        np.testing.assert_array_equal(np.asarray(image), rgb)
    ds.PhotometricInterpretation = "RGB"  # the same pixels labelled RGB: read alike
    np.testing.assert_array_equal(np.asarray(read_xray(to_bytes(ds), InputPolicy(min_side=32)).image), np.asarray(image))

    native = _dataset()
    native.set_pixel_data(rgb, "RGB", 8)
    native.PhotometricInterpretation = photometric
    native.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    with pytest.raises(InputRejected, match=f"has photometric interpretation {photometric}, which only JPEG 2000 pixel "
                                            "data holds .* the header is corrupt"):
        read_xray(to_bytes(native), InputPolicy(min_side=32))


def _banded() -> np.ndarray:
    """100 rows x 200 columns: the left half bright, a dark band across rows 40-59."""
    pixels = np.zeros((100, 200), np.uint8)
    pixels[:, :100] = 200
    pixels[40:60, :] = 90
    return pixels


@pytest.mark.parametrize("kind", ["JPEG", "JPEG 2000", "JPEG-LS"])
def test_a_compressed_frame_whose_size_disagrees_with_rows_and_columns_is_refused(kind):
    """PS3.5 8.2: the codestream's size is the header's. pydicom reshaped a 200 x 100 frame into a
    header's 100 x 200 and the scrambled pixels were scored."""
    frame = codestream(_banded(), kind)
    shown = np.asarray(read_xray(encapsulated(frame, kind, 100, 200), InputPolicy(min_side=32)).image).astype(int)
    assert np.abs(shown - _banded()).max() <= 3  # the header agrees: read as before
    with pytest.raises(
        InputRejected,
        match=r"^is DICOM but has compressed pixel data \(.*\) whose image is 200 x 100 px \(width x height\) while "
        r"its header declares Columns 100 and Rows 200; the two must agree \(PS3.5 8.2\).*re-export the image",
    ):
        read_xray(encapsulated(frame, kind, 200, 100), InputPolicy(min_side=32))


def test_a_codestream_larger_than_its_header_is_refused_before_it_is_decoded(monkeypatch):
    """A 2000 x 1000 codestream behind a 200 x 100 header passed the header's size check and was
    decoded in full (2 megapixels under a 0.1 megapixel limit) before pydicom failed on it."""
    data = encapsulated(codestream(np.tile(_banded(), (10, 10)), "JPEG"), "JPEG", 100, 200)
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda ds: pytest.fail("the frame was decoded")))
    with pytest.raises(InputRejected, match=r"whose image is 2000 x 1000 px .* Columns 200 and Rows 100"):
        read_xray(data, InputPolicy(min_side=32, max_pixels=100_000))


def _lut_ramp(ds: Dataset) -> None:
    """A 12-bit ramp through a Modality LUT Sequence x 16, windowed over the LUT's whole output."""
    _ramp(ds, 0, 4095)
    item = Dataset()
    item.LUTDescriptor, item.LUTData = [4096, 0, 16], list(range(0, 4096 * 16, 16))
    item["LUTData"].VR = "US"
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    ds.WindowCenter, ds.WindowWidth = 32768, 65536


def test_a_modality_lut_sequence_outranks_a_rescale_in_the_window_too():
    """PS3.3 C.11.1: with a Modality LUT Sequence, Rescale Slope and Intercept are not used. The
    modality LUT step ignored them, but pydicom's window still rescaled its range with them, which
    squeezed the image into 0..63."""
    plain = _dataset()
    _lut_ramp(plain)
    expected = np.asarray(dicom_to_image(to_bytes(plain)))
    assert (expected.min(), expected.max()) == (0, 255)
    both = dcmread(io.BytesIO(to_bytes(plain)))
    both.RescaleSlope, both.RescaleIntercept = 0.25, 0
    np.testing.assert_array_equal(to_display(both), expected)
    assert (both.RescaleSlope, both.RescaleIntercept) == (0.25, 0)  # the caller's dataset is left as it was


def _inverting_modality_lut(bits: int) -> bytes:
    """A 12-bit ramp through a Modality LUT of 4096 entries 4095..0 (written as OW), its descriptor
    saying ``bits`` per entry, windowed over 0..4095."""
    ds = _dataset()
    _ramp(ds, 0, 4095)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, bits]
    item.ModalityLUTType = "US"
    item.add_new(0x00283006, "OW", (4095 - np.arange(4096)).astype("<u2").tobytes())
    ds.ModalityLUTSequence = Sequence([item])
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    return to_bytes(ds)


def test_a_modality_lut_of_12_bit_entries_is_read_as_16_bit_words():
    """The standard says 8 or 16 bits per Modality LUT entry, but files with 12 exist (pydicom issue
    #2317): pydicom failed on them ("data type 'uint12' not understood") and the file was refused
    with its internal error. Its entries are 16-bit words, as pydicom reads a VOI LUT's 10 to 16."""
    plain = dcmread(io.BytesIO(_inverting_modality_lut(16)))
    del plain.ModalityLUTSequence
    expected = 255 - np.asarray(dicom_to_image(to_bytes(plain))).astype(int)
    shown = np.asarray(dicom_to_image(_inverting_modality_lut(12))).astype(int)
    assert (shown.min(), shown.max()) == (0, 255)
    assert np.abs(shown - expected).max() <= 1  # the inverse of the image without the LUT, but for rounding
    with pytest.raises(DicomRejected, match=r"Modality LUT Descriptor of 20 bits per entry \(4096\\0\\20\)"):
        dicom_to_image(_inverting_modality_lut(20))


def _signed_padded(vr: str) -> bytes:
    """A signed 16-bit ramp (-1000..3000) padded with -32768 in its first 8 columns, the padding value written as ``vr``."""
    pixels = np.tile(np.linspace(-1000, 3000, 64).round().astype(np.int16), (64, 1))
    pixels[:, :8] = -32768
    ds = _dataset()
    ds.set_pixel_data(pixels, "MONOCHROME2", 16)
    ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = (-32768, -32000) if vr == "SS" else (32768, 33536)
    ds["PixelPaddingValue"].VR = ds["PixelPaddingRangeLimit"].VR = vr
    return to_bytes(ds)


def test_a_signed_images_padding_written_as_us_is_read_as_the_signed_value():
    """Pixel Padding Value may be US or SS; a signed image's 32768 is -32768. Read as 32768 the
    padding went unrecognised and set the range, and the image came out near white."""
    expected = np.asarray(dicom_to_image(_signed_padded("SS")))
    assert (expected[:, :8] == 0).all() and (expected[:, 8:].min(), expected[:, 8:].max()) == (0, 255)
    np.testing.assert_array_equal(np.asarray(dicom_to_image(_signed_padded("US"))), expected)


def _signed_ramp_lut(first: int, vr: str, data_vr: str = "US") -> tuple[Dataset, Dataset]:
    """A signed 12-bit ramp (-2048..2047), and a LUT item x 16 from ``first``, its descriptor written
    as ``vr``, its LUT Data as ``data_vr`` (US: numbers; OW: bytes, which pydicom unpacks by the
    file's transfer syntax)."""
    ds = _dataset()
    ds.set_pixel_data(np.tile(np.linspace(-2048, 2047, 64).round().astype(np.int16), (64, 1)), "MONOCHROME2", 12)
    item = Dataset()
    item.LUTDescriptor = [4096, first, 16]
    item["LUTDescriptor"].VR = vr
    data = [v * 16 for v in range(4096)]
    item.LUTData = np.asarray(data, dtype="<u2").tobytes() if data_vr == "OW" else data
    item["LUTData"].VR = data_vr
    return ds, item


def _signed_voi_lut(first: int, vr: str, data_vr: str = "US") -> bytes:
    ds, item = _signed_ramp_lut(first, vr, data_vr)
    ds.VOILUTSequence = Sequence([item])
    return to_bytes(ds)


@pytest.mark.parametrize("data_vr", ["US", "OW"])
def test_a_signed_images_voi_lut_first_value_written_as_us_is_read_as_the_signed_value(data_vr):
    """A VOI LUT Descriptor's first mapped value may be US or SS; a signed image's 63488 is -2048.
    pydicom overflowed on it and the file was refused as unreadable. With LUT Data written as OW
    (as most writers write it) the file was refused all the same: the dataset with the value
    read as signed had lost the transfer syntax pydicom unpacks OW by."""
    expected = np.asarray(dicom_to_image(_signed_voi_lut(-2048, "SS", data_vr)))
    assert (expected.min(), expected.max()) == (0, 255)
    np.testing.assert_array_equal(np.asarray(dicom_to_image(_signed_voi_lut(-2048, "SS"))), expected)
    ds = dcmread(io.BytesIO(_signed_voi_lut(63488, "US", data_vr)))
    np.testing.assert_array_equal(to_display(ds), expected)
    assert list(ds.VOILUTSequence[0].LUTDescriptor) == [4096, 63488, 16]  # the caller's dataset is left as it was


@pytest.mark.parametrize("pixel_representation", [1, 0], ids=["signed, shifted up", "unsigned, shifted down"])
def test_a_voi_lut_first_value_follows_the_sign_of_the_rescales_output_not_of_the_stored_values(pixel_representation):
    """PS3.3 C.11.2.1.1: a VOI LUT's first mapped value is SS when its input, the rescale's output,
    can be negative, and US when it cannot. Signed values shifted up by 32768 (0..65535) had 40000
    read as -25536, so values below the LUT showed white; unsigned ones shifted down by 32768
    (-32768..32767) had 57768 (-7768) read as 57768, every value below it, so the image black."""
    signed = pixel_representation == 1
    stored = np.tile(np.linspace(-32768 if signed else 0, 32767 if signed else 65535, 256).round()
                     .astype(np.int16 if signed else np.uint16), (64, 1))
    ds = _dataset()
    ds.set_pixel_data(stored, "MONOCHROME2", 16)
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 32768 if signed else -32768, "US"
    first = 40000 if signed else 57768  # written as US: 57768 is -7768 as SS
    item = Dataset()
    item.LUTDescriptor = [16384, first, 16]
    item["LUTDescriptor"].VR = "US"
    item.LUTData = np.linspace(0, 65535, 16384).round().astype(int).tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = Sequence([item])
    shown = np.asarray(dicom_to_image(to_bytes(ds))).astype(int)[0]
    modality = stored[0].astype(np.int64) + (32768 if signed else -32768)
    mapped = first if signed else first - 2**16
    expected = np.rint(np.clip(modality - mapped, 0, 16383) / 16383 * 255).astype(int)
    assert np.abs(shown - expected).max() <= 1, (shown[::32], expected[::32])
    assert shown[0] == 0 and shown[-1] == 255


def _signed_modality_lut(first: int, vr: str, window: bool, data_vr: str = "US") -> bytes:
    """A signed 12-bit ramp (-2048..2047) through a Modality LUT Sequence x 16 from ``first``, written as ``vr``."""
    ds, item = _signed_ramp_lut(first, vr, data_vr)
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    if window:
        ds.WindowCenter, ds.WindowWidth = 32768, 65536
    return to_bytes(ds)


@pytest.mark.parametrize("data_vr", ["US", "OW"])
@pytest.mark.parametrize("window", [True, False], ids=["window", "own range"])
def test_a_signed_images_modality_lut_first_value_written_as_us_is_read_as_the_signed_value(window, data_vr):
    """A Modality LUT Descriptor's first mapped value is SS for a signed image (PS3.3 C.11.1.1), but
    some exporters write it as US: 63488 is -2048. pydicom subtracted 63488 from the 16-bit signed
    image, overflowed, and the file was refused as unreadable. LUT Data written as OW: as for the
    VOI LUT above."""
    expected = np.asarray(dicom_to_image(_signed_modality_lut(-2048, "SS", window, data_vr)))
    assert (expected.min(), expected.max()) == (0, 255) and len(np.unique(expected)) == 64
    np.testing.assert_array_equal(np.asarray(dicom_to_image(_signed_modality_lut(-2048, "SS", window))), expected)
    ds = dcmread(io.BytesIO(_signed_modality_lut(63488, "US", window, data_vr)))
    np.testing.assert_array_equal(to_display(ds), expected)
    assert list(ds.ModalityLUTSequence[0].LUTDescriptor) == [4096, 63488, 16]  # the caller's dataset is left as it was


def test_a_signed_16_bit_image_through_a_modality_lut_from_its_lowest_value_does_not_wrap_round():
    """pydicom subtracts the LUT's first mapped value in the image's own type: with -32768, every
    value from 0 up wrapped round below the LUT and showed black. Shown as its unsigned twin is."""
    ramp = np.tile(np.linspace(-30000, 30000, 64).round().astype(np.int16), (64, 1))
    twin = _dataset()
    twin.set_pixel_data((ramp.astype(np.int32) + 32768).astype(np.uint16), "MONOCHROME2", 16)
    expected = np.asarray(dicom_to_image(to_bytes(twin)))
    assert (expected.min(), expected.max()) == (0, 255) and len(np.unique(expected)) == 64
    ds = _dataset()
    ds.set_pixel_data(ramp, "MONOCHROME2", 16)
    item = Dataset()
    item.LUTDescriptor = [0, -32768, 16]  # 0 is 65,536 entries: stored value + 32768
    item["LUTDescriptor"].VR = "SS"
    item.LUTData = np.arange(2**16, dtype="<u2").tobytes()
    item["LUTData"].VR = "OW"  # past 64 KiB, US cannot be written in explicit VR
    ds.ModalityLUTSequence = Sequence([item])
    np.testing.assert_array_equal(np.asarray(dicom_to_image(to_bytes(ds))), expected)


def test_a_voi_lut_after_a_signed_images_modality_lut_reads_its_first_value_as_unsigned():
    """A Modality LUT's output is unsigned (PS3.3 C.11.1.1.1), so a VOI LUT after it maps from a US
    value (C.11.2.1.1) even in a signed image: 32768 is 32768, not -32768 (pydicom overflowed on it).
    Shown as an unsigned image holding the Modality LUT's output is."""
    ramp = np.tile(np.linspace(-2048, 2047, 64).round().astype(np.int16), (64, 1))

    def with_voi_lut(ds: Dataset) -> bytes:
        item = Dataset()
        item.LUTDescriptor = [4096, 32768, 16]
        item["LUTDescriptor"].VR = "US"
        item.LUTData = [v * 16 for v in range(4096)]
        item["LUTData"].VR = "US"
        ds.VOILUTSequence = Sequence([item])
        return to_bytes(ds)

    twin = _dataset()
    twin.set_pixel_data(((ramp.astype(np.int32) + 2048) * 16).astype(np.uint16), "MONOCHROME2", 16)
    expected = np.asarray(dicom_to_image(with_voi_lut(twin)))
    assert (expected.min(), expected.max()) == (0, 255) and len(np.unique(expected)) > 2
    signed = dcmread(io.BytesIO(_signed_modality_lut(-2048, "SS", window=False)))
    np.testing.assert_array_equal(np.asarray(dicom_to_image(with_voi_lut(signed))), expected)


def _rle_cut_short() -> bytes:
    from pydicom.encaps import encapsulate, generate_frames

    ds = _dataset()
    ds.set_pixel_data(np.random.default_rng(0).integers(0, 4096, (64, 64)).astype(np.uint16), "MONOCHROME2", 12)
    ds.compress(RLELossless)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) * 9 // 10 // 2 * 2]])
    return to_bytes(ds)


def _colour_without_planar(syntax) -> bytes:
    """An RGB image whose Planar Configuration (type 1C for colour) is missing, as stored or compressed:
    pydicom's decoders need it either way."""
    ds = _dataset()
    ds.set_pixel_data(np.random.default_rng(0).integers(0, 255, (32, 32, 3)).astype(np.uint8), "RGB", 8)
    if syntax is not None:
        ds.compress(syntax)
    del ds.PlanarConfiguration
    return to_bytes(ds)


def _twelve_bit(edit) -> bytes:
    ds = _dataset()
    _ramp(ds, 0, 4095)
    edit(ds)
    return to_bytes(ds)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _twelve_bit(lambda ds: delattr(ds, "SamplesPerPixel")),
         r"lacks SamplesPerPixel, which describe its pixels; the file is incomplete$"),
        (lambda: _twelve_bit(lambda ds: setattr(ds, "PixelData", ds.PixelData[:-2])),
         r"has pixel data that cannot be decoded: it is cut short, 8,190 bytes where Rows x Columns x samples stored a "
         r"pixel x Bits Allocated \(64 x 64 x 1 x 16 bits\) need 8,192 .*; send the complete file$"),
        (lambda: _twelve_bit(lambda ds: setattr(ds, "SamplesPerPixel", 3)),
         r"has Samples per Pixel 3 with photometric interpretation MONOCHROME2, which has 1"),
        (_rle_cut_short, r"has compressed pixel data \(RLE Lossless\) that cannot be decoded: .*The data is damaged "
         r"or cut short .*; send the complete file as the modality or PACS wrote it$"),
        (lambda: _colour_without_planar(None), r"lacks PlanarConfiguration, which says how its colour samples"),
        (lambda: _colour_without_planar(RLELossless), r"lacks PlanarConfiguration, which says how its colour samples"),
    ],
    ids=["no Samples per Pixel", "native cut short", "3 samples of MONOCHROME2", "RLE cut short",
         "RGB without Planar Configuration", "RLE RGB without Planar Configuration"],
)
def test_a_broken_header_or_cut_short_pixel_data_is_told_what_is_wrong(make, message):
    """Only a transfer syntax no decoder reads is told to send another one; these were all told
    their transfer syntax (Explicit VR Little Endian, or RLE) could not be decoded."""
    with pytest.raises(InputRejected, match="^is DICOM but " + message) as info:
        read_xray(make(), InputPolicy())
    assert "Send the image uncompressed" not in str(info.value)


def _spaced(tag: str, value: list[float]) -> tuple[bytes, np.ndarray]:
    """100 rows x 200 columns holding a disc 50 px tall and 100 px wide: round when a row is
    twice as far apart as a column, as ``value`` (vertical first) may say."""
    yy, xx = np.mgrid[0:100, 0:200]
    pixels = np.where(((yy - 50) / 25) ** 2 + ((xx - 100) / 50) ** 2 <= 1, 220, 30).astype(np.uint8)
    ds = _dataset()
    ds.set_pixel_data(pixels, "MONOCHROME2", 8)
    if tag:
        setattr(ds, tag, value)
    return to_bytes(ds), pixels


def test_the_size_of_a_dicom_without_rows_or_columns_is_refused_naming_what_it_lacks(tmp_path):
    """The detector's box check and evaluate read sizes with shown_size: a header without Columns
    escaped as AttributeError, not the ImageLoadError naming the file its callers report."""
    ds = _dataset()
    ds.Rows = 10
    (tmp_path / "x.dcm").write_bytes(to_bytes(ds))
    with pytest.raises(ImageLoadError, match=r"x\.dcm: its size cannot be read \(its DICOM header has no Columns\)"):
        shown_size(tmp_path / "x.dcm")


@pytest.mark.parametrize(
    ("tag", "value", "size"),
    [
        ("PixelSpacing", [0.2, 0.1], (200, 200)),
        ("ImagerPixelSpacing", [0.2, 0.1], (200, 200)),
        ("PixelAspectRatio", [2, 1], (200, 200)),
        ("PixelSpacing", [0.1, 0.15], (300, 100)),
    ],
)
def test_pixels_that_are_not_square_are_resampled_to_square_ones(tag, value, size, tmp_path):
    """A physical square must stay square for ``aspect: pad`` and the detector: the coarser axis is
    upsampled (bilinear), keeping the finer resolution, as MONAI's Spacing does."""
    data, _ = _spaced(tag, value)
    # The size boxes are checked against, from the header alone (the evaluate stage opened a DICOM
    # file with Pillow there, and failed after training).
    (tmp_path / "x.dcm").write_bytes(data)
    assert shown_size(tmp_path / "x.dcm") == size
    xray = read_xray(data, InputPolicy())
    image = xray.image
    assert image.size == size
    # The consumer is told, in the row's notes, what was done to the pixels it sent.
    assert xray.warnings == (f"its pixels are not square (its header's spacing): resampled from 200 x 100 to "
                             f"{size[0]} x {size[1]} px before scoring",)
    stored = dicom_to_image(_spaced("", [])[0])  # the same pixels, square
    np.testing.assert_array_equal(np.asarray(image), np.asarray(stored.resize(size, Image.Resampling.BILINEAR)))
    if size == (200, 200):  # the disc is round again: as tall as it is wide
        shown = np.asarray(image) > 125
        assert abs(shown.any(axis=1).sum() - shown.any(axis=0).sum()) <= 2


def test_pixels_square_within_1_percent_are_read_as_they_are():
    data, _ = _spaced("PixelSpacing", [0.1005, 0.1])
    np.testing.assert_array_equal(np.asarray(dicom_to_image(data)), np.asarray(dicom_to_image(_spaced("", [])[0])))
    assert read_xray(data, InputPolicy()).warnings == ()


def test_pixels_far_from_square_are_refused_as_a_corrupt_header():
    data, _ = _spaced("PixelSpacing", [1.0, 0.1])
    with pytest.raises(InputRejected, match=r"^is DICOM but has PixelSpacing 1\\0.1: pixels 10 times as tall as wide"):
        read_xray(data, InputPolicy())


def test_uncompressed_ybr_full_422_holds_two_samples_a_pixel_and_is_read():
    """Each pair of pixels shares its Cb and Cr (PS3.3 C.7.6.3.1.2): Rows x Columns x 2 bytes, which
    the check for cut-short data once took for two thirds of a file."""
    rows, cols = 64, 64
    y = np.random.default_rng(0).integers(16, 235, (rows, cols), dtype=np.uint8)
    pairs = np.empty((rows, cols // 2, 4), np.uint8)
    pairs[..., 0], pairs[..., 1] = y[:, 0::2], y[:, 1::2]
    pairs[..., 2] = pairs[..., 3] = 128  # no colour
    ds = _dataset()
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pairs.tobytes()
    shown = np.asarray(dicom_to_image(to_bytes(ds)).convert("L")).astype(int)
    assert np.abs(shown - y).max() == 0
    ds.PixelData = pairs.tobytes()[:-64]
    with pytest.raises(InputRejected, match=r"it is cut short, 8,128 bytes where .* \(64 x 64 x 2 x 8 bits\) need 8,192"):
        read_xray(to_bytes(ds), InputPolicy())


def test_training_counts_the_pixels_of_a_dicom_as_the_served_model_decodes_them(tmp_path):
    """Pixels twice as tall as wide are resampled to twice the rows before the served model's pixel
    limit is applied; training lists the file by the same count, not by the header's."""
    data, _ = _spaced("PixelSpacing", [0.2, 0.1])  # 200 x 100 stored, 200 x 200 shown
    path = tmp_path / "tall.dcm"
    path.write_bytes(data)
    with pytest.raises(InputRejected, match=r"declares 200 x 200 px"):
        read_xray(data, InputPolicy(max_pixels=30_000))
    facts = inspect_image(str(path), max_pixels=30_000)
    assert not facts.decodable and "declares 200 x 200 px (0.0 megapixels)" in facts.error
    assert inspect_image(str(path), max_pixels=40_000).decodable


def _deflated(data: bytes) -> bytes:
    """The same dataset in Deflated Explicit VR Little Endian (PS3.5 A.5), as pydicom writes it."""
    ds = dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return to_bytes(ds)


def test_a_deflated_dicom_reads_as_its_uncompressed_twin(xrays, tmp_path):
    plain = dicom_from_jpeg(xrays[0], "16-bit")
    deflated = _deflated(plain)
    assert len(deflated) < len(plain) / 2  # deflated indeed
    shown = np.asarray(dicom_to_image(plain))
    assert np.array_equal(np.asarray(dicom_to_image(deflated)), shown)
    assert np.array_equal(np.asarray(read_xray(deflated, InputPolicy()).image), shown)
    path = tmp_path / "deflated.dcm"
    path.write_bytes(deflated)
    assert patient_ids(path) == ("", str(dcmread(io.BytesIO(plain)).PatientID))
    with pytest.raises(DicomRejected, match=r"is deflated .* but its deflate data ends early \(a damaged or cut-off file\)"):
        dicom_to_image(deflated[: len(deflated) // 2])


def test_a_deflated_dicom_ending_in_a_long_run_of_zeros_is_read_whole():
    """Fed in slices, the inflate loop took its input's end for the stream's: zlib still held the
    output of a piece stopped at 1 MiB inside the zeros that end the dataset (a black band, its
    trailing padding), and 4 of these 6 files, which pydicom reads whole, were refused as cut short."""
    rows, cols = 3199, 2048
    pixels = np.random.default_rng(0).integers(0, 256, (rows, cols), dtype=np.uint8)
    pixels[200:] = 0  # a collimated band below the content
    for padding in (1700, 1776, 1820, 1850, 1900, 2000):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"
        ds.Modality, ds.PatientID, ds.ImageComments = "DX", "P1", ""
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = pixels.tobytes()
        ds.DataSetTrailingPadding = bytes(padding)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        data = to_bytes(ds)
        read = read_header(data)
        assert read.PixelData == pixels.tobytes() and len(read.DataSetTrailingPadding) == padding, padding
        with pytest.raises(DicomRejected, match="ends early"):
            read_header(data[: len(data) - 40])


def test_a_deflated_dataset_is_read_as_explicit_vr_little_endian_not_searched_for_a_preamble(xrays):
    """The inflated dataset was read as a file whose preamble may be missing: a value reading DICM
    at its byte 128 was taken for a Part 10 preamble, and the elements before it were lost."""
    ds = dcmread(io.BytesIO(dicom_from_jpeg(xrays[0], "8-bit")))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

    def inflated(ds) -> bytes:
        body = DicomBytesIO()
        body.is_little_endian, body.is_implicit_VR = True, False
        write_dataset(body, ds)
        return body.getvalue()

    for n in range(1, 129):  # a value of n letters before DICM, until DICM lands at byte 128
        ds.ImageType = ["ORIGINAL", "PRIMARY", *(["A" * 16] * (n // 17)), "A" * (n % 17), "DICM"]
        if inflated(ds)[128:132] == b"DICM":
            break
    assert inflated(ds)[128:132] == b"DICM"
    data = to_bytes(ds)
    ours, pydicoms = read_header(data), dcmread(io.BytesIO(data))
    assert [e.tag for e in ours] == [e.tag for e in pydicoms]
    assert list(ours.ImageType) == list(ds.ImageType) and ours.preamble is None
    assert np.array_equal(np.asarray(dicom_to_image(data)), np.asarray(dicom_to_image(dicom_from_jpeg(xrays[0], "8-bit"))))


def test_a_deflated_dicom_inflating_past_any_radiograph_is_refused_holding_no_more_than_its_bound(tmp_path, monkeypatch):
    """A file of a few kilobytes whose deflated dataset carries 48 MiB of zeros: pydicom inflated all
    of it before any size or pixel check ran (about 2,000 times the file's size in memory, through
    the page, the scoring server, `fracture predict` and validate's patient links alike)."""
    ds = _dataset()
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * 16
    ds.private_block(0x0009, "ACME", create=True).add_new(0x00, "OB", bytes(48 * 2**20))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bomb = to_bytes(ds)
    del ds
    assert len(bomb) < 2**20
    path = tmp_path / "bomb.dcm"
    path.write_bytes(bomb)
    # One bound everywhere (training, validate, every consumer, whatever serve.max_megapixels says),
    # so a file is accepted or refused alike: 50 megapixels at 24 bits (167 MB), made 1 here so
    # that a small bomb exceeds it.
    monkeypatch.setattr("fracture.dicom.MAX_PIXELS", 1_000_000)
    limit = max_inflated(1_000_000)
    assert limit < 24 * 2**20
    policy = InputPolicy(max_pixels=100_000_000)  # a policy raised past it changes nothing
    refusal = (r"is deflated \(transfer syntax 1\.2\.840\.10008\.1\.2\.1\.99\) and inflates to more than 20 MB, more "
               r"than a radiograph of 1 megapixels holds: a decompression bomb")
    tracemalloc.start()
    try:
        with pytest.raises(InputRejected, match="is DICOM but " + refusal):
            read_xray(bomb, policy)
        with pytest.raises(DicomRejected, match=refusal):
            dicom_to_image(bomb)
        assert patient_ids(path) is None  # validate's decode says why
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * limit, peak
