"""A hospital's own export (``ingest.layout: csv``): images/ of DICOM, JPEG or PNG files and labels.csv."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fracture.config import ConfigError, load_params, parse_params
from fracture.ingest import IngestError, find_dataset_root, ingest
from fracture.manifest import ManifestError, body_part, build_manifest, read_csv_layout
from fracture.suite import FRACATLAS_ONLY, RULES, skipped_rules
from fracture.validation import validate
from tests.conftest import REPO, pick_ids
from tests.dicom_files import dicom_from_jpeg, hospital_export
from tests.synthetic import make_dataset, write_image


@pytest.fixture()
def params():
    return load_params(REPO)


def export(root: Path, labels: str, files: dict[str, int]) -> Path:
    """images/<path> for each file (seeded noise; .dcm ones as 8-bit DICOM) and labels.csv's text."""
    for rel, seed in files.items():
        target = root / "images" / rel
        if rel.endswith(".dcm"):
            write_image(root / "tmp.png", seed)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(dicom_from_jpeg(root / "tmp.png", "8-bit"))
            (root / "tmp.png").unlink()
        else:
            write_image(target, seed)
    (root / "labels.csv").write_text(labels)
    return root


def test_paths_labels_body_parts_and_views_are_read(tmp_path):
    root = export(
        tmp_path / "export",
        "path,label,body_part,view\n"
        "images/p1/a.dcm,1,Hand,AP\n"
        "images/p1/b.png,0,leg,frontal+LL\n"
        "images/p2/c.jpg,0,,\n"
        "images/p2/gone.dcm,1,hip,oblique\n",
        {"p1/a.dcm": 1, "p1/b.png": 2, "p2/c.jpg": 3, "p2/extra.jpg": 4, ".hidden.jpg": 5},
    )
    (root / "images" / "DICOMDIR").write_bytes(b"not an image")
    frame = read_csv_layout(root).set_index("image_id")

    # A file with no row is listed under its path; a row with no file keeps its id, without a path.
    assert sorted(frame.index) == [
        "images/p1/a.dcm", "images/p1/b.png", "images/p2/c.jpg", "images/p2/extra.jpg", "images/p2/gone.dcm"
    ]
    assert not frame.at["images/p2/extra.jpg", "in_csv"] and frame.at["images/p2/extra.jpg", "has_file"]
    assert not frame.at["images/p2/gone.dcm", "has_file"] and frame.at["images/p2/gone.dcm", "path"] == ""
    assert frame["csv_label"].astype("Int64").fillna(-1).to_dict() == {
        "images/p1/a.dcm": 1, "images/p1/b.png": 0, "images/p2/c.jpg": 0, "images/p2/gone.dcm": 1,
        "images/p2/extra.jpg": -1,
    }
    assert frame.loc["images/p1/a.dcm", ["csv_label", "hand", "leg", "frontal", "lateral"]].tolist() == [1, 1, 0, 1, 0]
    assert frame.loc["images/p1/b.png", ["leg", "frontal", "lateral", "oblique"]].tolist() == [1, 1, 1, 0]
    parts = body_part(frame)
    assert parts.to_dict() == {
        "images/p1/a.dcm": "hand", "images/p1/b.png": "leg", "images/p2/c.jpg": "unknown",
        "images/p2/gone.dcm": "hip", "images/p2/extra.jpg": "unknown",
    }
    assert frame["folder_label"].isna().all()


def test_image_ids_alone_are_matched_to_file_names(tmp_path):
    root = export(tmp_path / "export", "image_id,label\nA100,1\nB200.png,0\n", {"x/A100.dcm": 1, "y/B200.png": 2})
    frame = read_csv_layout(root).set_index("image_id")
    assert frame["path"].to_dict() == {"A100": "images/x/A100.dcm", "B200.png": "images/y/B200.png"}
    assert frame["in_csv"].all() and frame["has_file"].all()

    (root / "images" / "z").mkdir()
    shutil.copy(root / "images" / "x" / "A100.dcm", root / "images" / "z" / "A100.dcm")
    with pytest.raises(ManifestError, match=r"A100: \['images/x/A100.dcm', 'images/z/A100.dcm'\].*add a path column"):
        read_csv_layout(root)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("path,body_part\nimages/a.png,hand\n", r"needs label .* and path"),
        ("path,label\nimages/a.png,yes\nimages/b.png,\n", r"line 2 \('yes'\), line 3 \(''\) are not whole numbers"),
        ("path,label\nimages/a.png,1\n\nimages/b.png,inf\n", r"line 4 \('inf'\) are not whole numbers"),
        ("path,label\n../secret.png,1\n", r"no '\.\.'.*line 2 \('\.\./secret\.png'\)"),
        # A file outside images/ was excluded as "the csv lists it, but no image file exists", though it exists.
        ("path,label\nimages/a.png,1\nother/b.png,0\n", r"names files outside images/, where the export's images are "
                                                         r"read from .*line 3 \('other/b\.png'\) are not under it"),
        ("path,label,body_part\nimages/a.png,1,knee\n", r"body_part allows hand, hip, leg, mixed, shoulder.*line 2 \('knee'\)"),
        ("path,label,view\nimages/a.png,1,axial\n", r"view allows .*line 2 \('axial'\)"),
        # Headers are matched in any case (_labels_column), so these two name one column.
        ("path,Label,label\nimages/a.png,1,0\n", r"names column\(s\) label twice \('Label', 'label'\)"),
    ],
)
def test_unreadable_labels_csv_names_the_lines_and_what_to_do(tmp_path, labels, message):
    root = export(tmp_path / "export", labels, {"a.png": 1, "b.png": 2})
    with pytest.raises(ManifestError, match=message):
        read_csv_layout(root)


def test_an_image_id_that_is_a_files_path_names_that_file(tmp_path):
    """Each such id matched no file, so each file took its path as its id: the same ids failed
    unique_image_id, file_for_every_csv_row and csv_row_for_every_file at once, all excluded."""
    root = export(tmp_path / "export", "image_id,label\nimages/p000/a.png,1\nimages/p001/a.png,0\n",
                  {"p000/a.png": 1, "p001/a.png": 2})
    frame = read_csv_layout(root)
    assert sorted(frame["image_id"]) == ["images/p000/a.png", "images/p001/a.png"]
    assert frame["has_file"].all() and frame["in_csv"].all()
    assert frame.set_index("image_id")["path"].to_dict() == {"images/p000/a.png": "images/p000/a.png",
                                                             "images/p001/a.png": "images/p001/a.png"}


def test_an_empty_image_id_beside_a_path_is_refused_naming_its_lines(tmp_path):
    """With both columns, an id "" would pass every rule, then read back from manifest.csv as no
    id and be dropped by the split; two of them were one unnamed unique_image_id failure."""
    root = export(
        tmp_path / "export",
        "path,image_id,label\nimages/a.png, ,1\nimages/b.png,B,0\nimages/c.png,,0\n",
        {"a.png": 1, "b.png": 2, "c.png": 3},
    )
    with pytest.raises(ManifestError, match=r"labels.csv: column image_id is empty on line 2, line 4; give each row "
                       r"its id, or remove the column \(each row's id is then its path\)"):
        read_csv_layout(root)
    # Without the column each row's id is its path, as the message says.
    (root / "labels.csv").write_text("path,label\nimages/a.png,1\nimages/b.png,0\nimages/c.png,0\n")
    assert read_csv_layout(root)["image_id"].tolist() == ["images/a.png", "images/b.png", "images/c.png"]


def _run_command_given(message: str, folder: Path) -> None:
    """Runs, in a shell in ``folder`` (the export's), the conversion command a message about labels.csv gives."""
    command = message.split("python -c ", 1)[1].split(", then run ingest again")[0]
    subprocess.run(f"{shlex.quote(sys.executable)} -c {command}", shell=True, cwd=folder, check=True)


# A body part's file, and a note, written with a letter outside ASCII: the bytes that tell the encodings apart.
ACCENTED_ROWS = [
    ["path", "label", "body_part", "note"],
    ["images/péroné.png", "1", "leg", "fracture du péroné"],
    ["images/b.png", "0", "", "épaule"],
]

# How the message names the first of those bytes, the 'é' of péroné, in cp1252.
CP1252_E = (r"byte offset 35 \(line 2\) is 0xe9; it reads as 'é' in cp1252, the code page Windows saves text in "
            r"for Western European languages")


@pytest.mark.parametrize(
    ("sep", "encoding", "how"),
    [
        (";", "cp1252", CP1252_E),
        ("\t", "cp1252", CP1252_E),
        ("\t", "utf-16", r"it begins with UTF-16's byte order mark, as Excel saves \"Unicode Text\""),
    ],
    ids=["semicolon-cp1252", "tab-cp1252", "unicode-text"],
)
def test_a_labels_csv_in_a_windows_encoding_converts_with_the_command_given(tmp_path, params, sep, encoding, how):
    """Excel on Windows saves "CSV (semicolon delimited)" and "Text (tab delimited)" in the ANSI code
    page (cp1252 in Western Europe), and "Unicode Text" in UTF-16: the conversion command the
    message gave read them as UTF-8 and failed with UnicodeDecodeError (a UTF-16 file was not even
    seen to be tab-separated)."""
    root = export(tmp_path / "export", "", {"péroné.png": 1, "b.png": 2})
    labels = root / "labels.csv"
    labels.write_bytes("".join(sep.join(row) + "\r\n" for row in ACCENTED_ROWS).encode(encoding))
    with pytest.raises(ManifestError) as caught:
        read_csv_layout(root)
    message = str(caught.value)
    name = "semicolon" if sep == ";" else "tab"
    assert message.startswith(f"{labels} looks {name}-separated: its header line is "
                              f"{f'path{sep}label{sep}body_part{sep}note'!r}")
    assert re.search(rf"labels.csv must be comma-separated and UTF-8, and its bytes are not UTF-8 either: {how}\. "
                     r"Save it comma-separated as UTF-8 in the export \(.+, character set Unicode \(UTF-8\)\), or"
                     + (", if it was saved in cp1252," if encoding == "cp1252" else "") + " convert it", message)
    assert f"pd.read_csv('labels.csv', sep={sep!r}, encoding={encoding!r}, dtype=str" in message
    _run_command_given(message, root)
    assert "fracture du péroné" in labels.read_text(encoding="utf-8")
    # The converted export ingests, and its rows are read with their files.
    dest = ingest(dataclasses.replace(params.ingest, layout="csv"), tmp_path / "data" / "hospital", str(root)).dest
    frame = read_csv_layout(dest).set_index("image_id")
    assert frame["csv_label"].to_dict() == {"images/b.png": 0, "images/péroné.png": 1}
    assert frame["has_file"].all() and frame.at["images/péroné.png", "leg"] == 1


def test_a_comma_separated_labels_csv_not_in_utf8_is_refused_naming_the_byte_its_line_and_the_fix(tmp_path, params):
    """A labels.csv saved as "CSV (Comma delimited)" by Excel on Windows is in cp1252: it was refused
    as "not a readable csv file ('utf-8' codec can't decode byte 0xe9 in position 13 ...)", a
    position within a field that names no line, and no way to convert it."""
    root = export(tmp_path / "export", "", {"péroné.png": 1, "b.png": 2})
    labels = root / "labels.csv"
    labels.write_bytes("".join(",".join(row) + "\r\n" for row in ACCENTED_ROWS).encode("cp1252"))
    with pytest.raises(ManifestError) as caught:
        read_csv_layout(root)
    message = str(caught.value)
    convert = ("python -c \"import pandas as pd; pd.read_csv('labels.csv', encoding='cp1252', dtype=str, "
               "keep_default_na=False).to_csv('labels.csv', index=False)\"")
    assert message == (
        f"{labels} is not UTF-8: byte offset 35 (line 2) is 0xe9; it reads as 'é' in cp1252, the code page "
        "Windows saves text in for Western European languages. labels.csv must be UTF-8: save it so in the "
        "export (Excel: Save As, \"CSV UTF-8 (Comma delimited)\"; LibreOffice Calc: File > Save As, Text CSV, "
        "Edit filter settings, character set Unicode (UTF-8)), or, if it was saved in cp1252, convert it in the "
        f"export's folder with {convert}, then run ingest again"
    )
    assert labels.read_bytes().index(b"\xe9") == 35  # the byte the message names
    _run_command_given(message, root)
    frame = read_csv_layout(root).set_index("image_id")
    assert frame["csv_label"].to_dict() == {"images/b.png": 0, "images/péroné.png": 1}
    assert frame["has_file"].all()
    # Excel for Mac's "CSV (Macintosh)": Mac Roman, each line ended by a carriage return alone. The
    # line is counted by those ends, and the conversion reads Mac Roman ('ü' is 0x9f there, 'Ÿ' in cp1252).
    labels.write_bytes("".join(",".join(row) + "\r" for row in [*ACCENTED_ROWS, ["images/c.png", "0", "", "Gelenk für"]])
                       .encode("mac_roman"))
    (root / "images" / "c.png").write_bytes((root / "images" / "b.png").read_bytes())
    with pytest.raises(ManifestError) as caught:
        read_csv_layout(root)
    message = str(caught.value)
    assert message.startswith(
        f"{labels} is not UTF-8: byte offset 34 (line 2) is 0x8e; it reads as 'é' in mac_roman, the encoding Excel "
        "for Mac saves \"CSV (Macintosh)\" in, whose lines end with a carriage return alone, as this file's do."
    ) and ", or, if it was saved in mac_roman, convert it" in message and "encoding='mac_roman'" in message
    _run_command_given(message, root)
    assert "Gelenk für" in labels.read_text(encoding="utf-8") and "fracture du péroné" in labels.read_text(encoding="utf-8")
    assert read_csv_layout(root).set_index("image_id")["csv_label"].to_dict()["images/c.png"] == 0
    labels.write_bytes(b"path,label,note\rimages/b.png,0,\rimages/c.png,0,\x9f\r")
    with pytest.raises(ManifestError, match=r"byte offset 47 \(line 3\) is 0x9f; it reads as 'ü' in mac_roman"):
        read_csv_layout(root)
    # Bytes that are neither UTF-8 nor cp1252 (0x81 is unassigned in it): no conversion is offered.
    labels.write_bytes(b"path,label,note\r\nimages/b.png,0,\x81\r\n")
    with pytest.raises(ManifestError, match=r"is not UTF-8: byte offset 32 \(line 2\) is 0x81\. labels.csv must "
                       r"be UTF-8: save it so in the export \(.+\), then run ingest again$") as unknown:
        read_csv_layout(root)
    assert "python -c" not in str(unknown.value)


@pytest.mark.parametrize(
    "header",
    ["path,label,Body_Part,View,Patient_ID,Accession-No", " Path ,LABEL,Body Part,view,patient-id,Accession No"],
    ids=["optional columns capitalised", "every column in another spelling"],
)
def test_headers_are_read_in_any_case_with_spaces_or_hyphens(tmp_path, caplog, header):
    """RIS/PACS exports write Patient_ID or Body Part: read as written, such a column was left out
    with a log line only, and a patient's images spread over the splits."""
    from fracture.split import group_key

    root = export(
        tmp_path / "export",
        f"{header}\nimages/a.png,1,hand,AP,P1,A1\nimages/b.png,0,hand,LL,P1,A2\nimages/c.png,0,leg,,P2,A3\n",
        {"a.png": 1, "b.png": 2, "c.png": 3},
    )
    with caplog.at_level("WARNING", logger="fracture.manifest"):
        frame = read_csv_layout(root).set_index("image_id")
    assert "patient_id" in frame, "the patient column was left out"
    assert frame["patient_id"].to_dict() == {"images/a.png": "P1", "images/b.png": "P1", "images/c.png": "P2"}
    assert frame["csv_label"].tolist() == [1, 0, 0] and frame["has_file"].all()
    assert body_part(frame).tolist() == ["hand", "hand", "leg"]
    assert frame[["frontal", "lateral"]].fillna(-1).values.tolist() == [[1, 0], [0, 1], [-1, -1]]
    # The one column not read is named as it is matched, and only it.
    assert [r.getMessage() for r in caplog.records] == [
        f"{root / 'labels.csv'}: column(s) accession_no are not read "
        "(labels.csv's columns: path, image_id, label, body_part, view, patient_id)"
    ]
    groups = frame.reset_index().assign(group=group_key(frame.reset_index())).groupby("group")["image_id"].apply(sorted)
    assert sorted(groups.tolist()) == [["images/a.png", "images/b.png"], ["images/c.png"]]


@pytest.mark.parametrize(("on_disk", "in_csv"), [("NFD", "NFC"), ("NFC", "NFD")])
def test_file_names_match_in_any_unicode_normalisation(tmp_path, params, on_disk, in_csv):
    """macOS writes "ö" decomposed (NFD), an export's labels.csv mostly composed (NFC): one name
    both ways failed twice, a file without its row and a row without its file, under ids that
    print alike."""
    import unicodedata

    def spelt(form: str, text: str) -> str:
        return unicodedata.normalize(form, text)

    disk_names = {spelt(on_disk, "Röntgen_1.png"): 1, spelt(on_disk, "Röntgen_2.png"): 2, "b.png": 3}
    root = export(
        tmp_path / "export",
        f"path,label\n{spelt(in_csv, 'images/Röntgen_1.png')},1\nimages/b.png,0\n"
        f"{spelt(in_csv, 'images/Röntgen_2.png')},0\n",
        disk_names,
    )
    manifest = build_manifest(root, workers=1, layout="csv")
    assert manifest["has_file"].all() and manifest["in_csv"].all() and manifest["decodable"].all()
    # Ids in NFC whichever way either side spelt them; the path as on disk, to read the file by.
    assert manifest["image_id"].tolist() == [spelt("NFC", "images/Röntgen_1.png"), spelt("NFC", "images/Röntgen_2.png"),
                                             "images/b.png"]
    assert set(manifest["path"]) == {f"images/{name}" for name in disk_names}
    vp = dataclasses.replace(params.validate, fractured_share=[0.0, 1.0])
    assert validate(manifest, vp, None, skipped_rules("csv"))[1].success

    # An image_id alone matches the file's name the same way.
    (root / "labels.csv").write_text(f"image_id,label\n{spelt(in_csv, 'Röntgen_1')},1\nb,0\n"
                                     f"{spelt(in_csv, 'Röntgen_2.png')},0\n")
    frame = read_csv_layout(root)
    assert frame["has_file"].all() and frame["in_csv"].all()
    assert set(frame["path"]) == {f"images/{name}" for name in disk_names}

    # Two files whose names differ only so: no row could say which it means.
    write_image(root / "images" / spelt(in_csv, "Röntgen_1.png"), 4)
    with pytest.raises(ManifestError, match=r"have one name written two ways \(Unicode NFC and NFD"):
        read_csv_layout(root)


def test_the_suite_runs_with_fracatlas_only_rules_skipped_and_reported(tmp_path, params):
    root = export(
        tmp_path / "export",
        "path,label,body_part\nimages/a.dcm,1,hand\nimages/b.png,0,leg\nimages/c.jpg,2,hip\nimages/d.dcm,0,shoulder\n",
        {"a.dcm": 1, "b.png": 2, "c.jpg": 3, "d.dcm": 4},
    )
    manifest = build_manifest(root, workers=1, layout="csv")
    assert manifest.set_index("image_id").loc["images/a.dcm", ["decodable", "mode", "width"]].tolist() == [True, "L", 80]
    vp = dataclasses.replace(params.validate, fractured_share=[0.05, 0.5])
    resolved, report = validate(manifest, vp, tmp_path / "gx", skipped_rules("csv"))

    by_rule = {f.rule: f for f in report.findings}
    assert [f.rule for f in report.findings] == list(RULES)
    for rule, why in FRACATLAS_ONLY.items():
        assert by_rule[rule].skipped == why and by_rule[rule].success
    assert all(not f.skipped for f in report.findings if f.rule not in FRACATLAS_ONLY)
    # The other rules ran: the label 2 fails csv_label_binary (hard), and that image is excluded.
    assert by_rule["csv_label_binary"].unexpected_ids == ["images/c.jpg"] and not report.success
    assert report.excluded["images/c.jpg"].rule == "csv_label_binary"
    assert resolved.set_index("image_id")["label_source"].loc["images/a.dcm"] == "csv"
    # The share of fractured images is read from labels.csv's labels (1, 0, 2, 0), not from class folders.
    assert by_rule["fractured_share_in_range"].observed == pytest.approx(0.75)
    # GX never ran the skipped rules, and each saved suite's notes say which of its rules were left out and why.
    for severity in ("hard", "soft"):
        suite = json.loads((tmp_path / "gx" / f"expectation_suite.{severity}.json").read_text())
        assert not {e["meta"]["rule"] for e in suite["expectations"]} & set(FRACATLAS_ONLY)
        notes = " ".join(suite["meta"]["notes"]["content"])
        left_out = [r for r in FRACATLAS_ONLY if params.validate.severity[r] == severity]
        assert left_out and all(f"`{r}`: {FRACATLAS_ONLY[r]}" in notes for r in left_out)


def test_a_file_without_a_label_is_excluded_and_listed_even_when_its_missing_row_is_a_soft_rule(tmp_path, params):
    """GX's value-set rules pass empty values: a file labels.csv does not list is excluded by the
    policies with its reason, never trained on as label <NA>."""
    root = export(
        tmp_path / "export",
        "path,label\nimages/a.png,1\nimages/b.png,0\nimages/c.png,0\nimages/d.png,0\n",
        {"a.png": 1, "b.png": 2, "c.png": 3, "d.png": 4, "extra.png": 5},
    )
    manifest = build_manifest(root, workers=1, layout="csv")
    severity = {**params.validate.severity, "csv_row_for_every_file": "soft"}
    vp = dataclasses.replace(params.validate, severity=severity, fractured_share=[0.0, 1.0])
    resolved, report = validate(manifest, vp, None, skipped_rules("csv"))
    assert report.success
    assert report.excluded["images/extra.png"].rule == "csv_row_for_every_file"
    assert "no csv row lists it" in report.excluded["images/extra.png"].reason
    assert list(report.excluded) == ["images/extra.png"]
    used = resolved[resolved["included"]]
    assert sorted(used["image_id"]) == ["images/a.png", "images/b.png", "images/c.png", "images/d.png"]
    assert used["label"].notna().all()


def test_ingest_finds_the_csv_layout_and_says_which_layout_a_folder_is_in(tmp_path, params):
    root = export(tmp_path / "export", "path,label\nimages/a.png,1\n", {"a.png": 1})
    csv_params = dataclasses.replace(params.ingest, layout="csv")
    result = ingest(csv_params, tmp_path / "data" / "hospital", str(root))
    assert (result.dest / "labels.csv").is_file() and (result.dest / "images" / "a.png").is_file()

    fracatlas = tmp_path / "FracAtlas"
    make_dataset(fracatlas, 2, 2)
    with pytest.raises(IngestError, match="not in the csv layout.*It looks like the FracAtlas layout: set ingest.layout: fracatlas"):
        find_dataset_root(fracatlas, layout="csv")
    with pytest.raises(IngestError, match="It looks like the csv layout .*set ingest.layout: csv"):
        find_dataset_root(root, layout="fracatlas")
    with pytest.raises(IngestError, match="only FracAtlas can be downloaded"):
        ingest(csv_params, tmp_path / "data" / "x", None)


def test_published_split_needs_the_fracatlas_layout():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["ingest"]["layout"] = "csv"
    raw["split"]["strategy"] = "published"
    with pytest.raises(ConfigError, match="split.strategy 'published' reads FracAtlas's own split lists"):
        parse_params(raw)
    raw["ingest"]["layout"] = "dicom"
    with pytest.raises(ConfigError, match="ingest.layout"):
        parse_params(raw)


def test_export_of_real_xrays_as_dicom_reads_back_with_their_labels(tmp_path, fracatlas):
    ids = pick_ids(fracatlas, 2, 2)
    root = tmp_path / "export"
    labels = hospital_export(fracatlas, root, ids)
    # The first X-ray exported a second time, as the JPEG it came from: one radiograph, two files.
    shutil.copyfile(fracatlas / "images" / "Fractured" / ids[0], root / "images" / "copy.jpg")
    with (root / "labels.csv").open("a") as f:
        f.write("images/copy.jpg,1,,\n")

    manifest = build_manifest(root, workers=1, near_duplicate_threshold=0.97, layout="csv").set_index("image_id")
    assert manifest.loc[labels["path"], "csv_label"].tolist() == labels["label"].tolist()
    assert manifest["decodable"].all() and (manifest.loc[labels["path"], "mode"] == "L").all()
    source = pd.read_csv(fracatlas / "dataset.csv").set_index("image_id").loc[ids]
    assert body_part(manifest.loc[labels["path"]]).tolist() == body_part(source).tolist()
    # Near-duplicates are found across formats: the DICOM file and its JPEG are one group, alone.
    group = manifest.at[labels["path"][0], "near_duplicate_group"]
    assert manifest.index[manifest["near_duplicate_group"] == group].tolist() == sorted([labels["path"][0], "images/copy.jpg"])


def test_a_patient_id_column_keeps_each_patients_images_in_one_split_and_fold(tmp_path, caplog):
    from fracture.crossval import draw_folds
    from fracture.split import SPLITS, split_manifest
    from tests.test_split import PARAMS, manifest_from

    root = export(
        tmp_path / "export",
        "path,label,patient_id,accession\n"
        "images/p1/a.png,1, P-0001 ,A1\n"
        "images/p1/b.png,0,P-0001,A2\n"
        "images/p2/c.png,0,,A3\n",
        {"p1/a.png": 1, "p1/b.png": 2, "p2/c.png": 3},
    )
    with caplog.at_level("WARNING", logger="fracture.manifest"):
        frame = read_csv_layout(root).set_index("image_id")
    assert frame["patient_id"].fillna("(empty)").tolist() == ["P-0001", "P-0001", "(empty)"]
    # A column the manifest does not read is named, not dropped without a word.
    assert "column(s) accession are not read" in caplog.text

    # 40 patients with 3 X-rays each (distinct films), some patients' without an id.
    manifest = manifest_from([(int(g % 4 == 0), 1) for g in range(120)])
    manifest["patient_id"] = [f"P{n // 3:03d}" if n // 3 % 10 else pd.NA for n in range(120)]
    splits = split_manifest(manifest, PARAMS)
    where = {i: name for name in SPLITS for i in splits[name]["image_id"]}
    patients = manifest.dropna(subset=["patient_id"]).assign(split=lambda f: f["image_id"].map(where))
    assert (patients.groupby("patient_id")["split"].nunique() == 1).all()
    pooled = pd.concat([splits["train"], splits["val"]]).sort_values("image_id").reset_index(drop=True)
    folds = pooled.assign(fold=draw_folds(pooled, 3, 0)).dropna(subset=["patient_id"])
    assert (folds.groupby("patient_id")["fold"].nunique() == 1).all()
    # Without the column the same draw puts some patient's X-rays in two splits.
    alone = split_manifest(manifest.drop(columns="patient_id"), PARAMS)
    where = {i: name for name in SPLITS for i in alone[name]["image_id"]}
    assert (patients.assign(split=patients["image_id"].map(where)).groupby("patient_id")["split"].nunique() > 1).any()


def _set_patient(path: Path, patient: str, issuer: str | None = None, preamble: bool = True) -> None:
    import io

    from pydicom import dcmread

    from tests.dicom_files import to_bytes, without_preamble

    ds = dcmread(path)
    ds.PatientID = patient
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    data = to_bytes(ds)
    path.write_bytes(data if preamble else without_preamble(data))
    assert dcmread(io.BytesIO(path.read_bytes()), force=True).PatientID.strip() == patient.strip()


def test_without_a_patient_id_column_the_dicom_patient_id_links_a_patients_images(tmp_path):
    from fracture.split import group_key

    files = {"a.dcm": 1, "b.dcm": 2, "c.dcm": 3, "d.dcm": 4, "e.dcm": 5, "f.png": 6}
    root = export(tmp_path / "export", "path,label\n" + "".join(f"images/{f},0\n" for f in files), files)
    _set_patient(root / "images/a.dcm", "MRN-7731", "HOSP-A")
    _set_patient(root / "images/b.dcm", " MRN-7731 ", "HOSP-A", preamble=False)  # padded, and no preamble
    _set_patient(root / "images/c.dcm", "MRN-7731", "HOSP-B")  # another hospital's patient 7731
    _set_patient(root / "images/d.dcm", "")  # no Patient ID: links nothing
    frame = read_csv_layout(root).set_index("image_id")
    key = frame["patient_id"]
    assert key["images/a.dcm"] == key["images/b.dcm"]
    assert len({key["images/a.dcm"], key["images/c.dcm"], key["images/e.dcm"]}) == 3
    assert pd.isna(key["images/d.dcm"]) and pd.isna(key["images/f.png"])
    # The identifier itself is not copied into the manifest, only a key of it.
    assert not key.dropna().str.contains("7731").any() and key.dropna().str.startswith("dicom-").all()
    # The split's groups join a and b, and nothing else.
    joined = frame.reset_index().assign(group=group_key(frame.reset_index())).groupby("group")["image_id"].apply(sorted)
    assert sorted(joined.tolist()) == sorted(
        [["images/a.dcm", "images/b.dcm"], ["images/c.dcm"], ["images/d.dcm"], ["images/e.dcm"], ["images/f.png"]]
    )


def test_a_patient_id_column_is_used_instead_of_the_dicom_headers(tmp_path):
    root = export(tmp_path / "export", "path,label,patient_id\nimages/a.dcm,0,P1\nimages/b.dcm,0,\n", {"a.dcm": 1, "b.dcm": 2})
    _set_patient(root / "images/a.dcm", "MRN-1")
    _set_patient(root / "images/b.dcm", "MRN-1")
    frame = read_csv_layout(root).set_index("image_id")
    assert frame["patient_id"].fillna("(empty)").to_dict() == {"images/a.dcm": "P1", "images/b.dcm": "(empty)"}


def test_one_placeholder_patient_id_on_many_images_is_refused_under_any_issuer(tmp_path):
    files = {f"{n:02d}.dcm": n for n in range(24)}
    root = export(tmp_path / "export", "path,label\n" + "".join(f"images/{f},0\n" for f in files), files)
    names = list(files)
    # Two sites' anonymiser wrote one placeholder: 7 of 24 images, more than a quarter.
    for name, issuer in zip(names[:7], ["SITE-A"] * 4 + ["SITE-B"] * 3, strict=True):
        _set_patient(root / "images" / name, "ANONYMOUS", issuer)
    with pytest.raises(ManifestError) as err:
        read_csv_layout(root)
    message = str(err.value)
    assert "7 of the 24 images" in message and "labels.csv a patient_id column" in message
    assert "ANONYMOUS" not in message
    # Six of 24 is a quarter, not more: one real patient's three images at each of two sites.
    _set_patient(root / "images" / names[0], "MRN-0")
    frame = read_csv_layout(root)
    assert sorted(frame["patient_id"].value_counts().tolist())[-2:] == [3, 3]


def test_a_damaged_patient_id_links_nothing_and_fails_nothing(tmp_path):
    root = export(tmp_path / "export", "path,label\nimages/a.dcm,0\nimages/b.dcm,1\n", {"a.dcm": 1, "b.dcm": 2})
    data = (root / "images/a.dcm").read_bytes()
    element = b"\x10\x00\x20\x00LO"  # (0010,0020) Patient ID, explicit VR little endian
    assert data.count(element) == 1
    (root / "images/a.dcm").write_bytes(data.replace(element, b"\x10\x00\x20\x00LR"))
    frame = read_csv_layout(root).set_index("image_id")
    assert pd.isna(frame.at["images/a.dcm", "patient_id"])
    assert frame.at["images/b.dcm", "patient_id"].startswith("dicom-")


def test_a_patient_id_without_its_issuer_beside_one_issuers_is_that_issuers_patient(tmp_path):
    """Devices of one export write Issuer of Patient ID or leave it out: keyed as written, one
    patient's AP (under HOSP-A) and lateral (no issuer) were two patients, free to sit in train and test."""
    from fracture.split import group_key

    files = {"ap.dcm": 1, "lat.dcm": 2, "other_site.dcm": 3, "other.dcm": 4}
    root = export(tmp_path / "export", "path,label\n" + "".join(f"images/{f},0\n" for f in files), files)
    _set_patient(root / "images/ap.dcm", "7731", "HOSP-A")
    _set_patient(root / "images/lat.dcm", "7731")  # the same patient, from a device that writes no issuer
    _set_patient(root / "images/other_site.dcm", "8842", "HOSP-B")
    frame = read_csv_layout(root).set_index("image_id")
    key = frame["patient_id"]
    assert key["images/ap.dcm"] == key["images/lat.dcm"] != key["images/other_site.dcm"]
    joined = frame.reset_index().assign(group=group_key(frame.reset_index())).groupby("group")["image_id"].apply(sorted)
    assert ["images/ap.dcm", "images/lat.dcm"] in joined.tolist()

    # Two hospitals' patient 7731 stay apart; a file of 7731 without an issuer is then either's.
    _set_patient(root / "images/other_site.dcm", "7731", "HOSP-B")
    with pytest.raises(ManifestError) as err:
        read_csv_layout(root)
    message = str(err.value)
    assert (
        "images/lat.dcm without an issuer, beside images/ap.dcm under 'HOSP-A', images/other_site.dcm under 'HOSP-B'"
        in message
    )
    assert "labels.csv a patient_id column" in message and "7731" not in message
    # Without the file lacking an issuer, the two hospitals' patients are two keys.
    _set_patient(root / "images/lat.dcm", "7731", "HOSP-A")
    key = read_csv_layout(root).set_index("image_id")["patient_id"]
    assert key["images/ap.dcm"] == key["images/lat.dcm"] != key["images/other_site.dcm"]


def test_headers_in_camel_case_or_dicoms_names_are_read(tmp_path, caplog):
    """A RIS export writes PatientID, BodyPart, ViewPosition: read as patientid and the like, they
    were left out with a log line only, and a JPEG export lost all its patient grouping."""
    root = export(
        tmp_path / "export",
        "Path,Label,PatientID,BodyPartExamined,ViewPosition,AccessionNumber\n"
        "images/a.png,1,P1,HAND,AP,A1\nimages/b.png,0,P1,hand,LL,A2\nimages/c.png,0,P2,leg,,A3\n",
        {"a.png": 1, "b.png": 2, "c.png": 3},
    )
    with caplog.at_level("WARNING", logger="fracture.manifest"):
        frame = read_csv_layout(root).set_index("image_id")
    assert frame["patient_id"].to_dict() == {"images/a.png": "P1", "images/b.png": "P1", "images/c.png": "P2"}
    assert body_part(frame).tolist() == ["hand", "hand", "leg"]
    assert frame[["frontal", "lateral"]].fillna(-1).values.tolist() == [[1, 0], [0, 1], [-1, -1]]
    assert "column(s) accession_number are not read" in caplog.text
    (root / "labels.csv").write_text("ImageID,Label,BodyPart\na,1,hand\nb.png,0,leg\n")
    frame = read_csv_layout(root).set_index("image_id")
    assert frame.loc[["a", "b.png"], "path"].tolist() == ["images/a.png", "images/b.png"]
    assert body_part(frame.loc[["a", "b.png"]]).tolist() == ["hand", "leg"]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("path,label,PATIENTID", r"patientid \(read as patient_id\) spell a column without the breaks"),
        ("path,label,bodypart,viewposition", r"bodypart \(read as body_part\), viewposition \(read as view\)"),
        ("path,label,view,ViewPosition", r"names column\(s\) view twice \('view', 'ViewPosition'\)"),
    ],
)
def test_a_header_that_spells_a_known_column_unread_is_refused(tmp_path, header, message):
    """Left out with a warning only, such a column was lost without the stage failing."""
    fields = header.count(",") - 1
    root = export(tmp_path / "export", f"{header}\nimages/a.png,1{',x' * fields}\n", {"a.png": 1})
    with pytest.raises(ManifestError, match=message):
        read_csv_layout(root)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        # A report joined into the export twice: two ids, one path.
        ("image_id,path,label\nX1,images/p0/0.png,1\nX2,images/p1/1.png,0\nX3,images/p0/0.png,1\n",
         r"line 2, line 4 name the same file images/p0/0.png; keep one row per file"),
        # Ids alone: "0" and "0.png" both match 0.png; "./" and "\" spell one path too.
        ("image_id,label\n0,1\n1,0\n0.png,1\n", r"line 2, line 4 name the same file images/p0/0.png"),
        ("path,label\nimages/p1/1.png,1\n./images/p1\\1.png,1\n", r"line 2, line 3 name the same file images/p1/1.png"),
    ],
)
def test_two_rows_naming_one_file_are_refused_naming_the_lines(tmp_path, labels, message):
    """Both rows were kept, and the file trained on twice, with only a soft unique_content finding."""
    root = export(tmp_path / "export", labels, {"p0/0.png": 1, "p1/1.png": 2})
    with pytest.raises(ManifestError, match=message):
        read_csv_layout(root)


def test_a_trailing_delimiter_is_read_and_fields_past_the_header_are_refused(tmp_path):
    """Every line ending in ',' made pandas read the path column as the index and shift every
    column left, and naming the offending lines then crashed with a TypeError."""
    from fracture.manifest import read_dataset_csv

    root = export(
        tmp_path / "export",
        "path,label,body_part\nimages/p1/a.png,1,hand,\nimages/p1/b.png,0,leg,\n\nimages/c.png,0,,\n",
        {"p1/a.png": 1, "p1/b.png": 2, "c.png": 3},
    )
    frame = read_csv_layout(root).set_index("image_id")
    assert frame["csv_label"].tolist() == [1, 0, 0] and frame["has_file"].all() and frame["in_csv"].all()
    assert body_part(frame).to_dict() == {"images/p1/a.png": "hand", "images/p1/b.png": "leg", "images/c.png": "unknown"}
    # A bad cell is named at its line, past the blank one too.
    (root / "labels.csv").write_text("path,label\nimages/p1/a.png,1,\n\nimages/p1/b.png,x,\n")
    with pytest.raises(ManifestError, match=r"line 4 \('x'\) are not whole numbers"):
        read_csv_layout(root)
    # A field past the header's that holds something has no column to be read as: its lines are named.
    (root / "labels.csv").write_text("path,label\nimages/p1/a.png,1,hand\nimages/p1/b.png,0,\nimages/c.png,0,,AP\n")
    with pytest.raises(ManifestError, match=r"line 2 \('hand'\), line 4 \(',AP'\) hold fields past the header's 2"):
        read_csv_layout(root)
    # FracAtlas's dataset.csv is read by the same reader.
    (root / "dataset.csv").write_text("image_id,fractured,hand\nIMG1.jpg,1,1,\nIMG2.jpg,0,0,\n")
    assert read_dataset_csv(root / "dataset.csv")[["image_id", "fractured", "hand"]].values.tolist() == [
        ["IMG1.jpg", 1, 1], ["IMG2.jpg", 0, 0]
    ]


def test_one_patient_id_on_every_row_of_a_sizeable_export_is_refused_naming_it(tmp_path):
    """An anonymiser that writes ANON for everyone linked every image into one group, and the
    split failed with scikit-learn's message and advice that could not help."""
    files = {f"{n:02d}.png": n for n in range(20)}
    rows = "".join(f"images/{f},{n % 2},ANON\n" for n, f in enumerate(files))
    root = export(tmp_path / "export", "path,label,patient_id\n" + rows, files)
    with pytest.raises(ManifestError, match=r"column patient_id holds 'ANON' on all its 20 rows.*leave the cells empty"):
        read_csv_layout(root)
    # One row with another patient (or an empty cell) is not one placeholder: the split's report judges it.
    (root / "labels.csv").write_text("path,label,patient_id\n" + rows.replace(",ANON\n", ",\n", 1))
    assert read_csv_layout(root)["patient_id"].notna().sum() == 19
