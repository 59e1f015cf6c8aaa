"""The body part a DICOM radiograph's header names, as the served model and training read it
(fracture.dicom.check_body_part), on tiny synthetic files."""

from __future__ import annotations

import re

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fracture.dicom import DicomRejected, check_body_part
from fracture.intake import InputPolicy, InputRejected, read_xray
from fracture.manifest import inspect_image
from fracture.vocabulary import LIMB_CODES, LIMBS
from tests.dicom_files import _dataset, to_bytes


def radiograph(body_part: str | list[str] | None = None, region: tuple[str, str, str] | None = None) -> bytes:
    """A 64 x 64 12-bit DX ramp whose Body Part Examined is ``body_part`` and whose Anatomic Region
    Sequence holds ``region`` (code value, coding scheme, meaning); either left out when ``None``."""
    ds = _dataset()
    ds.set_pixel_data(np.tile(np.linspace(0, 4095, 64).round().astype(np.uint16), (64, 1)), "MONOCHROME2", 12)
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if region is not None:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = region
        ds.AnatomicRegionSequence = Sequence([item])
    return to_bytes(ds)


def both_intakes(data: bytes, tmp_path, body_parts=LIMBS) -> tuple[str | None, str | None]:
    """The served model's refusal and the training manifest's, ``None`` where the file is read."""
    try:
        read_xray(data, InputPolicy(body_parts=body_parts))
        served = None
    except InputRejected as exc:
        served = str(exc).removeprefix("is DICOM but ")
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    return served, inspect_image(str(path), body_parts=body_parts).error


# As modalities and technologists write them: laterality in the value, plurals, separators, several values.
WRITTEN = ["HAND LT", "L WRIST", "KNEE RIGHT", "SHOULDER L", "FINGERS", "HANDS", "FEET", "ANKLE/FOOT", "LOWER_LIMB",
           "Lower Limb", "RT UPPER ARM", "BILAT HIPS", ["HAND", "WRIST"], "HAND\\WRIST", "UPPER ARMS", "LOWER_LIMBS",
           "EXTREMITIES", "CALVES"]


@pytest.mark.parametrize("value", WRITTEN, ids=str)
def test_a_limb_written_with_laterality_plurals_or_several_values_is_read_in_serving_and_training(value, tmp_path):
    """These were refused as "an X-ray of HAND LT", the multi-valued one as "['HAND', 'WRIST']"."""
    assert both_intakes(radiograph(value), tmp_path) == (None, None)


# As modalities write the view after the part, and Latin plurals (PS3.16 Annex L has no PHALANX:
# a phalanx is a finger's or a toe's, both of them limbs).
WITH_VIEW_OR_LATIN = ["KNEE AP", "HAND OBL", "FOOT LAT", "WRIST PA", "FINGER LAT", "PHALANGES", "L KNEE AP/LAT",
                      "ANKLE MORTISE", "HIP_LATERAL", "AP PELVIS", "Hand Oblique", "RADII", "ULNAE", "TIBIAE LT",
                      "HUMERI", "FEMORA", "CALCANEI", "PATELLAE", "SCAPULAE", ["KNEE AP", "PATELLA SUNRISE"]]


@pytest.mark.parametrize("value", WITH_VIEW_OR_LATIN, ids=str)
def test_a_limb_written_with_its_view_or_a_latin_plural_is_read_in_serving_and_training(value, tmp_path):
    """These were refused as "an X-ray of KNEE AP", "an X-ray of PHALANGES"."""
    assert both_intakes(radiograph(value), tmp_path) == (None, None)


@pytest.mark.parametrize("value", ["CHEST PA", "PA CHEST", "SKULL LAT", "C SPINE AP", "AP", "LAT", "L LAT", "CHEST AX"])
def test_a_view_word_makes_no_region_a_limb(value, tmp_path):
    served, trained = both_intakes(radiograph(value), tmp_path)
    assert served == trained
    assert served.startswith(f"is an X-ray of {value} (its Body Part Examined); the model was trained on X-rays")
    assert "with laterality (L, RIGHT), the view (AP, LAT) or a plural in the value allowed" in served


def test_phalanges_are_read_only_where_every_part_they_may_be_of_is_listed():
    """PHALANGES names a finger's bones or a toe's: a site that reads the hand alone is not sent a toe's."""
    ds = Dataset()
    ds.BodyPartExamined = "PHALANGES"
    check_body_part(ds, ("FINGER", "TOE"))
    with pytest.raises(DicomRejected, match=r"^is an X-ray of PHALANGES \(its Body Part Examined\)"):
        check_body_part(ds, ("HAND", "FINGER", "THUMB"))
    check_body_part(ds, ("PHALANX",))  # a site's own term, and its Latin plural
    ds.BodyPartExamined = "PHALANX LAT"
    check_body_part(ds, ("FINGER", "TOE"))


@pytest.mark.parametrize("value", ["CHEST", "chest", "SKULL", "THORAX", "CHEST PA", "WHOLEBODY", "L SPINE", "LEFT",
                                   "RIBS", "HANDGELENK", "HAND AND CHEST"])
def test_a_region_the_model_never_saw_is_still_refused_in_serving_and_training(value, tmp_path):
    served, trained = both_intakes(radiograph(value), tmp_path)
    assert served == trained
    assert served.startswith(f"is an X-ray of {value} (its Body Part Examined); the model was trained on X-rays of the "
                             "hand, leg, hip and shoulder")


def test_a_refusal_names_several_values_as_dicom_writes_them_and_says_what_to_do_with_a_local_term():
    ds = Dataset()
    ds.BodyPartExamined = ["CHEST", "HAND"]
    with pytest.raises(DicomRejected, match=r"^is an X-ray of CHEST\\HAND \(its Body Part Examined\)"):
        check_body_part(ds)
    ds.BodyPartExamined = "HANDGELENK"
    with pytest.raises(DicomRejected, match=r"a local term such as HANDGELENK\), add it to serve\.body_parts$"):
        check_body_part(ds)
    check_body_part(ds, ("HANDGELENK", *LIMBS))  # added, it is read
    ds.BodyPartExamined = "L SPINE"  # a site's own term with a side word in it is read as it lists it
    for written in ("L SPINE", "L-SPINE", "LSPINE"):
        ds.BodyPartExamined = written
        check_body_part(ds, ("L SPINE", *LIMBS))
    with pytest.raises(DicomRejected):
        check_body_part(ds, LIMBS)
    ds.BodyPartExamined = "HANDGELENK LINKS"  # a local laterality word is not known either
    with pytest.raises(DicomRejected):
        check_body_part(ds, ("HANDGELENK", *LIMBS))


def test_with_its_own_body_parts_a_site_is_told_its_list_not_the_regions_fracatlas_shows():
    ds = Dataset()
    ds.BodyPartExamined = "KNEE"
    with pytest.raises(DicomRejected) as refused:
        check_body_part(ds, ("HAND", "WRIST"))
    message = str(refused.value)
    assert "hand, leg, hip and shoulder" not in message
    assert "serve.body_parts lists only (HAND, WRIST)" in message
    ds.BodyPartExamined = "WRISTS LT"
    check_body_part(ds, ("HAND", "WRIST"))


THORAX = ("51185008", "SCT", "Thorax")  # SNOMED CT's earlier code for the chest, as modalities still write it


@pytest.mark.parametrize(("body_part", "region", "message"), [
    (None, THORAX, r"^is an X-ray of Thorax, SCT 51185008 \(its Anatomic Region Sequence\); the model was trained"),
    (None, ("89546000", "SCT", "Skull"), r"^is an X-ray of Skull, SCT 89546000 \(its Anatomic Region Sequence\)"),
    (None, ("816094009", "SCT", "Chest"), r"^is an X-ray of Chest, SCT 816094009 \("),
    (None, ("T-11100", "SRT", "Skull"), r"^is an X-ray of Skull, SRT T-11100 \("),  # SNOMED-RT
    ("HAND", THORAX, r"^names two regions that disagree, HAND \(its Body Part Examined\) and Thorax, SCT 51185008 "
                     r"\(its Anatomic Region Sequence\), and the second is none the model reads: correct the header"),
    ("CHEST", ("85562004", "SCT", "Hand"), r"^names two regions that disagree, CHEST \(its Body Part Examined\) and "
                                           r"Hand, SCT 85562004 \(its Anatomic Region Sequence\), and the first"),
    ("CHEST", THORAX, r"^is an X-ray of CHEST \(its Body Part Examined\) and Thorax, SCT 51185008 \(its Anatomic"),
])
def test_a_region_coded_in_the_anatomic_region_sequence_is_checked_too(body_part, region, message, tmp_path):
    """Anatomic Region Sequence is the DX IOD's Type 2 anatomy (Body Part Examined is Type 3): a
    chest or skull coded only there was scored and trained on, and a HAND whose code said thorax
    was read as a hand."""
    served, trained = both_intakes(radiograph(body_part, region), tmp_path)
    assert served == trained
    assert re.search(message, served), served


@pytest.mark.parametrize(("body_part", "region"), [
    (None, ("85562004", "SCT", "Hand")),
    (None, ("T-15460", "SRT", "Wrist joint")),  # SNOMED-RT, as older files code it: matched by its code
    (None, ("70258002", "SCT", "Ankle joint")),  # matched by its code, whatever the meaning says
    (None, ("12921003", "SCT", "Pelvis")),  # a retired code: matched by its meaning
    (None, ("99999999", "99LOCAL", "Left wrist")),
    ("HAND", ("74670003", "SCT", "Wrist joint")),  # two limbs: no disagreement the model minds
    ("L WRIST", ("74670003", "SCT", "Wrist joint")),
])
def test_a_limb_coded_in_the_anatomic_region_sequence_is_read(body_part, region, tmp_path):
    assert both_intakes(radiograph(body_part, region), tmp_path) == (None, None)


def test_a_site_reading_another_region_lists_the_codes_meaning(tmp_path):
    data = radiograph(None, ("122494005", "SCT", "Cervical spine"))
    assert both_intakes(data, tmp_path, body_parts=("CERVICAL SPINE", "CSPINE")) == (None, None)
    served, _ = both_intakes(data, tmp_path, body_parts=("CSPINE",))
    assert served.startswith("is an X-ray of Cervical spine, SCT 122494005 (its Anatomic Region Sequence); the model "
                             "reads the body parts params' serve.body_parts lists only (CSPINE)")
    assert both_intakes(data, tmp_path, body_parts=None) == (None, None)


def test_the_limb_codes_are_dicoms_as_highdicom_holds_them():
    """PS3.16 Annex L's mapping of Body Part Examined to Anatomic Region Sequence codes, in highdicom
    (which the served model does not carry)."""
    from highdicom._standard_utils import get_anatomic_region_map

    annex_l = get_anatomic_region_map()
    expected = {annex_l[term][0].value: term for term in LIMBS if term in annex_l}
    assert all(annex_l[term][0].scheme_designator == "SCT" for term in expected.values())
    assert expected == LIMB_CODES
    assert set(LIMBS) - set(LIMB_CODES.values()) == {"LEG", "ARM"}
