"""The model's answer for a DICOM radiograph, as a DICOM Structured Report a PACS stores beside it.

One Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33) per scored image, built with highdicom as a
TID 1500 Measurement Report holding one TID 1501 measurement group. Not Comprehensive 3D SR: the
report holds no 3D coordinates (SCOORD3D), and many PACS and viewers store or show Comprehensive
SR but not its 3D sibling; highdicom refuses 3D content in it, so a report that one day holds such
coordinates must be written as Comprehensive 3D SR. It holds:

- the source image, referenced by its SOP Class and Instance UIDs (and, as evidence, its study
  and series), with the patient and study copied from it so the PACS files the report there
  (a value not valid for its VR left empty or out, but for the Patient ID and Accession Number);
- the finding "Fracture of bone" (SNOMED CT 125605004): Present or Absent, the model's label,
  tracked by a UID derived from the image (its UIDs, patient and pixels) and the model's name, so
  the report a rerun (or a newer version) writes on the image tracks the same finding as the one it
  replaces, and two images under an anonymiser's one constant UID track two;
- the fracture probability and the decision threshold (DCM "Probability" and "Threshold
  value", no units);
- the algorithm's name and version (TID 4019): the registered model's name and registry version,
  and as its parameter the MLflow run that trained the weights (``mlflow_run_id=<id>``), which
  tells apart two models that share a name and version (every fresh registry's first champion is
  version 1); the observing device's UID is derived from all three, so a PACS or an audit finds
  which weights produced a stored result, and Software Versions names this product's release.

Every UID it makes (its SOP Instance UID, its series' where the caller names none, the finding's
Tracking UID and the device's) is made under the organisation's registered UID root where one is
set (``fracture predict --sr-uid-root``), those derived from their inputs derived alike under it; else under
highdicom's root (the report's own) and pydicom's (the derived ones).

It is a machine's unverified result (Completion Flag PARTIAL, Verification Flag UNVERIFIED)
and says so: the series description reads "NOT FOR CLINICAL USE".

Its dates and times say their zone (Timezone Offset From UTC, PS3.3 C.12.1.1.8), which covers
every date and time in the report, those it copies from the source included: the source's offset
when it names a valid one, the report's own times (series, content, instance creation) given in
that zone; else this machine's, the source's study times taken to be local to it as well.

Its text is in DICOM's default repertoire when all of it is ASCII, else in the source's character
set where that holds it, else in UTF-8 (:func:`character_set`), as older PACS read best.
"""

from __future__ import annotations

import datetime
import hashlib
import re

import highdicom as hd
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid
from pydicom.valuerep import DA, TM, PersonName, validate_value

from fracture import __version__

FRACTURE = hd.sr.CodedConcept("125605004", "SCT", "Fracture of bone")
#: Patient and study attributes of type 2 (present, possibly empty) the SR copies from its source.
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "AccessionNumber", "StudyID")
#: The patient and study attributes the SR copies from its source (highdicom copies the root
#: attributes of the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial
#: Study modules, PS3.3 C.7.1.1, C.7.1.3, C.7.2.1, C.7.2.2, C.7.2.3, alike for CR, DX and RG), but
#: for their sequences and UIDs, which are kept as they are: each value is checked
#: (:func:`invalid_values`).
COPIED = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar",
    "PatientSex", "QualityControlSubject", "StrainDescription", "StrainNomenclature", "StrainAdditionalInformation",
    "OtherPatientNames", "PatientSpeciesDescription", "PatientBreedDescription", "ResponsiblePerson",
    "ResponsiblePersonRole", "ResponsibleOrganization", "PatientComments", "PatientIdentityRemoved",
    "DeidentificationMethod",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID", "ClinicalTrialSiteID", "ClinicalTrialSiteName", "IssuerOfClinicalTrialSiteID",
    "ClinicalTrialSubjectID", "IssuerOfClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialSubjectReadingID", "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "ConsultingPhysicianName",
    "StudyDescription", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "StudyID", "RequestingService",
    "AdmittingDiagnosesDescription", "PatientAge", "PatientSize", "PatientBodyMassIndex", "MeasuredAPDimension",
    "MeasuredLateralDimension", "PatientWeight", "MedicalAlerts", "Allergies", "Occupation", "SmokingStatus",
    "AdditionalPatientHistory", "PregnancyStatus", "LastMenstrualDate", "PatientSexNeutered", "ReasonForVisit",
    "AdmissionID", "ServiceEpisodeID", "ServiceEpisodeDescription", "PatientState",
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription", "LongitudinalTemporalOffsetFromEvent",
    "LongitudinalTemporalEventType", "IssuerOfClinicalTrialTimePointID",
})
#: The values a PACS files a report by, which the SR keeps as the source has them even when they
#: are not valid DICOM values (the row's note names them): left out, the report would be filed
#: under no patient or order.
IDENTITY = ("PatientID", "AccessionNumber")
#: Date and time VRs whose value must also be a real date or time, not only of DICOM's form.
REAL = {"DA": DA, "TM": TM}
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
#: The most characters a Long String (LO) value holds (PS3.5 6.2).
LO_MAX = 64
MANUFACTURER = "fracture (open-source research software)"
#: How the report's Algorithm Parameters (TID 4019) name the MLflow run that trained the weights.
RUN_PARAMETER = "mlflow_run_id="
#: The value representations whose text the Specific Character Set encodes (PS3.5 6.1.2.3); the
#: others hold the default repertoire only.
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "PN", "UC", "UT"})
#: The Specific Character Sets a report keeps from its source (:func:`character_set`): one set without
#: code extensions (PS3.3 C.12.1.1.2), whose values encode with its Python codec alone (ISO_IR 13, JIS X 0201,
#: does not: pydicom's codec for it is Shift JIS, which writes kanji it does not hold).
SINGLE_SETS = frozenset({
    "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126", "ISO_IR 127", "ISO_IR 138", "ISO_IR 144",
    "ISO_IR 148", "ISO_IR 166", "ISO_IR 192", "GB18030", "GBK",
})
#: The elements that hold an image's pixels (PS3.3 C.7.6.3): integer, float and double float.
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: A Timezone Offset From UTC: ``&ZZXX``, ``-1200`` to ``+1400`` (PS3.3 C.12.1.1.8).
UTC_OFFSET = re.compile(r"([+-])(\d\d)(\d\d)")
#: The longest organisation UID root (``--sr-uid-root``): a DICOM UID holds 64 characters, and each one
#: made under the root keeps at least 24 digits of its own (about 80 bits, random or hashed), so two never meet.
UID_ROOT_MAX = 40
#: What names the root: ``fracture predict --sr-uid-root``, or this environment variable.
UID_ROOT_ENV = "FRACTURE_SR_UID_ROOT"


def structured_report(
    source: Dataset, probability: float, threshold: float, fractured: bool, model_name: str, model_version: str,
    *, series_uid: str | None = None, instance_number: int = 1, replaces: Dataset | None = None, run_id: str = "",
    series_datetime: datetime.datetime | None = None, uid_root: str | None = None, pixels: str | None = None,
) -> hd.sr.ComprehensiveSR:
    """The SR holding the model's answer for ``source``.

    Args:
        source: the scored radiograph's dataset, with its pixel data, whose digest tells apart
            two images under one SOP Instance UID (:func:`tracking_uid`); the report copies its
            header only.
        probability: the fracture probability the model gave.
        threshold: the decision threshold it was compared with.
        fractured: the label (``probability >= threshold``).
        model_name: the registered model's name.
        model_version: its registry version.
        series_uid: the SR series it belongs to (one per patient's study and scoring run, so a
            study's reports from one run sit in one series); ``None``: a series of its own.
        instance_number: its number within that series.
        replaces: an earlier report of this run's for the same image, which this one
            supersedes: it is listed in the Predecessor Documents Sequence.
        run_id: the MLflow run that trained the version's weights (``""``: not known, and then
            the report names the model by its name and version only).
        series_datetime: when its series was made (the scoring run's start), its Series Date and
            Time, which tell a rerun's series from the one it replaces; ``None``: now. One
            without a zone is this machine's local time; given in the report's zone
            (:func:`report_zone`).
        uid_root: the organisation's registered UID root (``--sr-uid-root``, :func:`check_uid_root`: digits
            and dots, ending with a dot), under which every UID the report makes is made (:func:`new_uid`,
            :func:`tracking_uid`, :func:`device_uid`); ``None``: highdicom's and pydicom's roots.
            A ``series_uid`` the caller gives is its own to make under the root (:func:`new_uid`).
        pixels: the source's :func:`pixel_digest`, where the caller has it; ``None``: made here.
    """
    zone = report_zone(source)
    declared = source.get("SpecificCharacterSet")
    now = datetime.datetime.now(zone)
    began = (series_datetime or now).astimezone(zone)
    tracking = tracking_uid(source, model_name, uid_root, pixels)  # from the pixels, which the header copy leaves out
    source = _with_type2_attributes(source)
    algorithm = hd.sr.AlgorithmIdentification(
        name=model_name, version=model_version, parameters=[f"{RUN_PARAMETER}{run_id}"] if run_id else None,
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model_name, model_version, run_id, uid_root),
            name=f"{model_name} v{model_version}",
            manufacturer_name=MANUFACTURER,
            model_name=model_name,
        ),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking, identifier="fracture classification"),
        finding_type=FRACTURE,
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=FRACTURE, value=codes.SCT.Present if fractured else codes.SCT.Absent)
        ],
        measurements=[
            hd.sr.Measurement(name=codes.DCM.Probability, value=float(probability), unit=codes.UCUM.NoUnits,
                              algorithm_id=algorithm),
            hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=float(threshold), unit=codes.UCUM.NoUnits,
                              algorithm_id=algorithm),
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.XRUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        # Built in UTF-8, which holds any text; the report is written in the set it needs (character_set).
        specific_character_set="ISO_IR 192",
        content=report[0],
        series_instance_uid=series_uid or new_uid(uid_root),
        series_number=9901,
        series_date=began.date(),
        series_time=began.time(),
        content_date=now.date(),
        content_time=now.time(),
        sop_instance_uid=new_uid(uid_root),
        instance_number=instance_number,
        previous_versions=[replaces] if replaces is not None else None,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name,
        software_versions=f"fracture {__version__}",
        is_complete=False,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = series_description(model_name, model_version)
    # highdicom dates the instance's creation in this machine's local time, without its zone.
    sr.InstanceCreationDate, sr.InstanceCreationTime = DA(now.date()), TM(now.time())
    sr.TimezoneOffsetFromUTC = utc_offset(zone)
    charset = character_set(declared, texts(sr))
    if charset is None:
        del sr.SpecificCharacterSet
    else:
        sr.SpecificCharacterSet = charset
    return sr


def character_set(declared: object, values: list[str]) -> str | None:
    """The Specific Character Set a report holding ``values`` is written in: none (DICOM's default
    repertoire, ASCII) when every value is ASCII; else the source's (``declared``) where it is one
    set without code extensions (:data:`SINGLE_SETS`: Latin-1, ``ISO_IR 100``, for most of Europe;
    UTF-8; GB18030) and every value is in it; else UTF-8 (``ISO_IR 192``), which holds any text.

    What a PACS and its viewers read best: many older ones show the default repertoire and
    ``ISO_IR 100`` but not UTF-8, which a report would otherwise declare for a name in plain ASCII.
    Not the source's ISO 2022 sets (a Japanese or Korean PACS's ``['', 'ISO 2022 IR 87']``),
    whose escapes pydicom has decoded: UTF-8 holds those names, code extensions not needed.
    """
    if all(value.isascii() for value in values):
        return None
    term = str(declared).strip() if isinstance(declared, str) else ""
    if term in SINGLE_SETS:
        try:
            for value in values:
                value.encode(python_encoding[term])
        except UnicodeEncodeError:
            return "ISO_IR 192"
        return term
    return "ISO_IR 192"


def texts(dataset: Dataset) -> list[str]:
    """Every value of ``dataset`` whose encoding the Specific Character Set governs (:data:`TEXT_VRS`),
    its sequences' included (pydicom's :meth:`~pydicom.dataset.Dataset.iterall`)."""
    found: list[str] = []
    for elem in dataset.iterall():
        if elem.VR in TEXT_VRS and elem.value not in (None, ""):
            found += [str(value) for value in (elem.value if isinstance(elem.value, MultiValue) else [elem.value])]
    return found


def source_zone(source: Dataset) -> datetime.timezone | None:
    """The source's Timezone Offset From UTC, or ``None`` when it names none or one that is not
    an offset (:data:`UTC_OFFSET`: ``+0100``, ``-0500``; at most 14 hours, minutes under 60)."""
    text = str(source.get("TimezoneOffsetFromUTC") or "").strip()
    match = UTC_OFFSET.fullmatch(text)
    if match is None or int(match[3]) >= 60 or text == "-0000":  # UTC is +0000; -0000 says no offset is known
        return None
    minutes = (60 * int(match[2]) + int(match[3])) * (-1 if match[1] == "-" else 1)
    return datetime.timezone(datetime.timedelta(minutes=minutes)) if -12 * 60 <= minutes <= 14 * 60 else None


def report_zone(source: Dataset) -> datetime.timezone:
    """The zone of the report's dates and times: the source's (:func:`source_zone`), so the study's
    dates and times it copies keep theirs, or else this machine's local offset at the study's
    date and time (a summer study scored in winter keeps its summer offset), or now where the
    source gives no study date that reads."""
    zone = source_zone(source)
    if zone is not None:
        return zone
    when = datetime.datetime.now()
    try:
        day = datetime.datetime.strptime(str(source.get("StudyDate") or "").strip(), "%Y%m%d")
        clock = re.match(r"(\d\d)(\d\d)?(\d\d)?", str(source.get("StudyTime") or "").strip())
        when = day.replace(hour=int(clock[1]), minute=int(clock[2] or 0), second=int(clock[3] or 0)) if clock else day
    except (ValueError, OverflowError):  # no study date, or one that does not read: the offset now
        pass
    local = when.astimezone()
    return datetime.timezone(local.utcoffset() or datetime.timedelta())


def utc_offset(zone: datetime.tzinfo) -> str:
    """A zone's Timezone Offset From UTC as DICOM writes it: ``+0100``, ``-0500``, ``+0000``."""
    minutes = round((zone.utcoffset(None) or datetime.timedelta()).total_seconds() / 60)
    return f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"



def check_uid_root(root: str) -> str:
    """``root`` if it is a UID root every report's UIDs can be made under (:func:`new_uid`): an OID
    (first arc 0, 1 or 2; components of digits without a leading zero, PS3.5 9.1) ending with the dot
    :func:`~pydicom.uid.generate_uid` appends to, at most :data:`UID_ROOT_MAX` characters.

    Not ``2.25.`` or under it: that arc holds UIDs made of one UUID's 128-bit integer (PS3.5 B.2),
    which digits added under a root are not; with no root, the reports' UIDs are made so.

    Raises:
        ValueError: it is not one; the message names the value and what to give.
    """
    if root.startswith("2.25."):
        raise ValueError(
            f"--sr-uid-root ({UID_ROOT_ENV}) {root!r} is under 2.25, which holds UIDs made from a UUID alone, not an "
            "organisation's root: give your organisation's registered root, or none (the reports' UIDs are then "
            "made under pydicom's and highdicom's roots)"
        )
    if len(root) <= UID_ROOT_MAX and re.fullmatch(r"[012]\.(?:(?:0|[1-9]\d*)\.)+", root):
        return root
    raise ValueError(
        f"--sr-uid-root ({UID_ROOT_ENV}) must be your organisation's registered DICOM UID root: digits and dots "
        "ending with a dot, starting 0., 1. or 2., no component with a leading zero (such as "
        f"1.3.6.1.4.1.<your IANA enterprise number>.), at most {UID_ROOT_MAX} characters so the UIDs made under "
        f"it keep room for their own digits; got {root!r}"
    )

def new_uid(uid_root: str | None = None) -> str:
    """A new UID (a report's, a series'): under the organisation's root where one is set (random digits
    to 64 characters, pydicom's :func:`~pydicom.uid.generate_uid`), else under highdicom's, as before
    a root could be set."""
    return generate_uid(prefix=uid_root) if uid_root else hd.UID()


def pixel_digest(source: Dataset) -> str:
    """The sha256 of the source's decoded pixel values (with their shape and type), or ``""`` for a
    dataset read without its pixel data (``stop_before_pixels``; :data:`PIXEL_KEYWORDS`).

    The pixels, not the file's bytes: a PACS that sends the image again with its header edited
    (demographics corrected, a private tag added) sends the same image. Decoded, not as stored: a
    PACS that keeps an image in JPEG 2000 or JPEG-LS lossless sends it uncompressed, RLE or as
    stored, as each transfer negotiates, and those are the same pixels. Pixel data this machine's
    pydicom cannot decode is taken as stored."""
    for keyword in PIXEL_KEYWORDS:
        value = source.get(keyword)
        if not value:
            continue
        try:
            pixels = source.pixel_array
        except Exception:  # noqa: BLE001 - no decoder here for its transfer syntax: its bytes as stored
            return hashlib.sha256(bytes(value)).hexdigest()
        digest = hashlib.sha256(f"{pixels.shape} {pixels.dtype.str}".encode())
        digest.update(pixels.tobytes())
        return digest.hexdigest()
    return ""


def tracking_uid(source: Dataset, model_name: str, uid_root: str | None = None, pixels: str | None = None) -> str:
    """The Tracking Unique Identifier of the model's finding on ``source``: derived from the image
    (its SOP Instance UID, study, patient and pixels, :func:`pixel_digest`) and the model's name, so
    every report the model writes on that image, a rerun's and a newer version's included, tracks
    the same finding, and a PACS reads the replacing report as the same finding, not a new one. The
    study and patient keep two patients' images under an anonymiser's constant SOP Instance UID
    apart, and the pixels two images of one patient's study under it (an anonymiser that writes
    one UID on every image, study and patient). A source read without its pixels is tracked by
    its UIDs and patient alone, as before the pixels counted. Derived under
    ``uid_root`` where one is set (:func:`structured_report`), else pydicom's root: the same
    image and model give the same UID under either. ``pixels``: the source's :func:`pixel_digest`
    where the caller has it (``""``: the UID of a release before the pixels counted)."""
    keys = ("SOPInstanceUID", "StudyInstanceUID", "PatientID", "IssuerOfPatientID")
    pixels = pixel_digest(source) if pixels is None else pixels
    return generate_uid(prefix=uid_root or PYDICOM_ROOT_UID, entropy_srcs=[
        "fracture finding", model_name, *(str(source.get(k, "")) for k in keys), *([f"pixels={pixels}"] if pixels else []),
    ])


#: The codes of the report's Tracking Unique Identifier and Algorithm Name content items (DCM).
TRACKING_UID_CODE, ALGORITHM_NAME_CODE = "112040", "111001"


def finding_tracked(report: Dataset) -> tuple[str, str] | None:
    """The Tracking UID of the finding a report of this module holds, and the name of the algorithm
    (the model) it names; ``None`` where it holds no Tracking UID (another writer's report)."""
    found: dict[str, str] = {}

    def walk(items: object) -> None:
        for item in items or []:  # type: ignore[attr-defined]
            names = item.get("ConceptNameCodeSequence") or []
            code = str(names[0].get("CodeValue", "")) if names else ""
            if code == TRACKING_UID_CODE and "UID" in item:
                found.setdefault("uid", str(item.UID))
            elif code == ALGORITHM_NAME_CODE and "TextValue" in item:
                found.setdefault("algorithm", str(item.TextValue))
            walk(item.get("ContentSequence"))

    walk(report.get("ContentSequence"))
    return (found["uid"], found.get("algorithm", "")) if "uid" in found else None


def device_uid(model_name: str, model_version: str, run_id: str, uid_root: str | None = None) -> str:
    """The Device Observer UID of a registered version: the same version always observes as the
    same device, and two models that share a name and version (a staging and a production
    registry, a registry rebuilt after its store was lost) as two, told apart by the run that
    trained their weights. Without a run id, the name and version alone, as before it was recorded.
    Derived under ``uid_root`` where one is set, else pydicom's root."""
    return generate_uid(prefix=uid_root or PYDICOM_ROOT_UID,
                        entropy_srcs=[model_name, model_version, *([run_id] if run_id else [])])


def series_description(model_name: str, model_version: str) -> str:
    """The SR series' description: not for clinical use, and the model's name and version, within
    Series Description's 64 characters (VR LO, PS3.5 6.2); a longer model name is cut short there
    (the report's content names the model in full)."""
    head, tail = f"{NOT_FOR_CLINICAL_USE}: ", f" v{model_version}"
    room = LO_MAX - len(head) - len(tail)
    name = model_name if len(model_name) <= room else model_name[: max(room - 3, 0)] + "..."
    return (head + name + tail)[:LO_MAX]


def invalid_values(source: Dataset) -> dict[str, str]:
    """The source's patient and study values (:data:`COPIED`) the SR should not carry as they
    are, by keyword, in the source's order: a value pydicom's validation refuses for its VR
    (``pydicom.valuerep.validate_value``: a Patient's Age ``56`` without its unit, a Short String
    or Long String over 16 or 64 characters, a date or time not in DICOM's form, such as an
    ACR-NEMA ``10:10:10`` or ``2026.12.07``, which pydicom reads but DICOM 3.0 does not allow), a
    date or time that is none (an unknown birth date written ``19800000``), a Patient's Sex other
    than M, F or O, or text that is not in the source's declared character set (Latin-1 bytes
    under ``ISO_IR 192``, which pydicom decodes with replacement characters). The SR leaves them
    empty or out rather than being refused whole, but for the identity keys (:data:`IDENTITY`),
    which it keeps (:func:`structured_report`, :func:`invalid_value_notes`)."""
    invalid: dict[str, str] = {}
    for elem in source:
        if elem.keyword not in COPIED or elem.VR in ("SQ", "UI") or elem.value in (None, ""):
            continue
        values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
        try:
            for value in values:
                # 2: raise. As text where pydicom holds another type: it passes any PersonName unchecked.
                validate_value(elem.VR, str(value) if elem.VR in ("DA", "DS", "IS", "PN", "TM") else value, 2)
                if elem.VR in REAL:
                    REAL[elem.VR](str(value))  # a real date or time
                if isinstance(value, (str, PersonName)) and "\ufffd" in str(value):
                    raise ValueError("not text in the declared character set")
        except (ValueError, TypeError, OverflowError):
            invalid[elem.keyword] = str(elem.value)
            continue
        if elem.keyword == "PatientSex" and str(elem.value) not in ("M", "F", "O"):
            invalid[elem.keyword] = str(elem.value)
    return invalid


def invalid_value_notes(source: Dataset) -> list[str]:
    """What a row's note says of the source's values the SR does not carry as they are
    (:func:`invalid_values`): those left empty (type 2), those left out, and the identity keys
    kept all the same, and a Timezone Offset From UTC the report cannot take as its zone
    (:func:`report_zone`); none when every value is valid."""
    invalid = invalid_values(source)
    zone = [] if source_zone(source) is not None or not source.get("TimezoneOffsetFromUTC") else [
        f"TimezoneOffsetFromUTC {str(source.TimezoneOffsetFromUTC)!r} is not a valid offset: the structured "
        f"report's dates and times are in this machine's zone ({utc_offset(report_zone(source))})"
    ]
    groups = (
        ("left empty in the structured report, not valid DICOM values",
         [k for k in invalid if k in TYPE2 and k not in IDENTITY]),
        ("left out of the structured report, not valid DICOM values",
         [k for k in invalid if k not in TYPE2 and k not in IDENTITY]),
        ("kept in the structured report though not valid DICOM values, as the PACS files it by them",
         [k for k in invalid if k in IDENTITY]),
    )
    return [f"{head}: " + ", ".join(f"{k} {invalid[k]!r}" for k in keys) for head, keys in groups if keys] + zone


def _with_type2_attributes(source: Dataset) -> Dataset:
    """A copy of the source's header with every type 2 patient and study attribute present.

    Some modalities leave them out; the SR must carry them, empty if the source has no value or
    one the SR cannot carry (:func:`invalid_values`). Another invalid patient or study value is
    left out, but for the identity keys (:data:`IDENTITY`), kept as they are.
    """
    header = Dataset()
    header.update({elem.tag: elem for elem in source if elem.keyword != "PixelData"})
    for keyword in invalid_values(header):
        if keyword not in IDENTITY:
            delattr(header, keyword)  # the element is the source's: a new, empty one replaces a type 2 one here
    for keyword in TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header
