"""The manifest, the Great Expectations suite and the policies, on synthetic data and on the real copy."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from fracture.config import ConfigError, ValidateParams, load_params
from fracture.manifest import BODY_PARTS, ManifestError, body_part, build_manifest
from fracture.policies import Exclusion, apply_policy, duplicate_groups
from fracture.suite import RULES, SUITE_NAMES, Finding, build_suites, rule_severities
from fracture.validation import failure_message, validate
from tests.conftest import REPO
from tests.synthetic import make_dataset, truncate


@pytest.fixture(scope="module")
def vparams() -> ValidateParams:
    return load_params(REPO).validate


def with_severity(params: ValidateParams, **changes: str) -> ValidateParams:
    return dataclasses.replace(params, severity={**params.severity, **changes})


@pytest.fixture(scope="module")
def clean_manifest(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The manifest of a consistent synthetic dataset: 20 distinct images, 6 fractured."""
    root = tmp_path_factory.mktemp("clean")
    make_dataset(root)
    return build_manifest(root, workers=1)


def mutate(manifest: pd.DataFrame, image_id: str, **values: object) -> pd.DataFrame:
    out = manifest.copy()
    for col, value in values.items():
        out.loc[out["image_id"] == image_id, col] = value
    return out


def resolve(
    manifest: pd.DataFrame, params: ValidateParams, findings: list[Finding]
) -> tuple[pd.DataFrame, dict[str, Exclusion]]:
    """:func:`apply_policy` with the duplicate groups that :func:`validate` passes it."""
    unique = next(f for f in findings if f.rule == "unique_content")
    return apply_policy(manifest, params, findings, duplicate_groups(manifest, unique))


# ---- the body-part rule -----------------------------------------------------------------------


def test_body_part_is_the_one_region_else_mixed_else_unknown():
    rows = pd.DataFrame(
        [
            {"hand": 1, "leg": 0, "hip": 0, "shoulder": 0, "mixed": 0},
            {"hand": 0, "leg": 0, "hip": 1, "shoulder": 0, "mixed": 0},
            {"hand": 1, "leg": 0, "hip": 0, "shoulder": 1, "mixed": 1},
            {"hand": 0, "leg": 1, "hip": 1, "shoulder": 0, "mixed": 0},  # several regions, mixed unset
            {"hand": 0, "leg": 0, "hip": 0, "shoulder": 0, "mixed": 0},
            dict.fromkeys(BODY_PARTS, pd.NA),  # no dataset.csv row
        ]
    ).astype("Int64")
    assert body_part(rows).tolist() == ["hand", "hip", "mixed", "mixed", "unknown", "unknown"]


def test_body_part_names_the_missing_flag_columns():
    rows = pd.DataFrame([{"hand": 1, "leg": 0, "shoulder": 0}])
    with pytest.raises(ManifestError, match=r"\['hip', 'mixed'\]"):
        body_part(rows)


def test_report_counts_body_parts_by_the_manifests_rule(vparams, clean_manifest):
    # Two regions without `mixed` (a body_part_flags_valid finding) and an id without flags.
    manifest = mutate(clean_manifest, "IMG0000002.jpg", hand=1, leg=1)
    manifest = mutate(manifest, "IMG0000005.jpg", **dict.fromkeys(BODY_PARTS, pd.NA))
    resolved, report = validate(manifest, vparams)
    parts = body_part(resolved).set_axis(resolved["image_id"])
    assert parts["IMG0000002.jpg"] == "mixed" and parts["IMG0000005.jpg"] == "unknown"
    counted = report.counts["all_ids"]["body_part"]
    assert counted == {p: int((parts == p).sum()) for p in counted}
    assert sum(counted.values()) == len(resolved)


# ---- the rule set and its severities ---------------------------------------------------------


def test_params_name_exactly_the_suites_rules(vparams):
    assert set(vparams.severity) == set(RULES)
    suites = build_suites(vparams)
    assert {k: s.name for k, s in suites.items()} == SUITE_NAMES
    expectations = [e for suite in suites.values() for e in suite.expectations]
    assert {e.meta["rule"] for e in expectations} == set(RULES)
    severity = {e.meta["rule"]: e.severity.value for e in expectations}
    assert severity["unique_image_id"] == "critical" and severity["not_truncated"] == "warning"
    # Each suite holds the rules of its severity only.
    for kind, suite in suites.items():
        assert {vparams.severity[e.meta["rule"]] for e in suite.expectations} == {kind}
    all_hard = dataclasses.replace(vparams, severity=dict.fromkeys(RULES, "hard"))
    assert list(build_suites(all_hard)) == ["hard"]


def test_missing_rule_in_severity_is_named_with_the_known_rules(vparams):
    severity = {k: v for k, v in vparams.severity.items() if k != "decodable"}
    with pytest.raises(ConfigError, match="lacks \\['decodable'\\]") as err:
        rule_severities(dataclasses.replace(vparams, severity=severity))
    assert all(rule in str(err.value) for rule in RULES)


def test_unknown_rule_in_severity_is_named_with_the_known_rules(vparams, clean_manifest):
    params = with_severity(vparams, no_blurry_images="soft")
    with pytest.raises(ConfigError, match="no_blurry_images") as err:
        validate(clean_manifest, params)
    assert "unique_content" in str(err.value)


def test_bad_severity_value_is_named(vparams):
    with pytest.raises(ConfigError, match="decodable"):
        rule_severities(with_severity(vparams, decodable="fatal"))


def test_rule_switched_to_soft_no_longer_fails_the_stage(vparams, clean_manifest):
    manifest = mutate(clean_manifest, "IMG0000004.jpg", width=10)
    _, hard = validate(manifest, vparams)
    assert not hard.success
    assert [f.rule for f in hard.failures()] == ["width_in_bounds"]

    resolved, soft = validate(manifest, with_severity(vparams, width_in_bounds="soft"))
    assert soft.success and not soft.failures()
    finding = soft.finding("width_in_bounds")
    assert not finding.success and finding.severity == "soft"
    assert finding.unexpected_ids == ["IMG0000004.jpg"]
    # A soft finding with no policy of its own is reported; the image stays in.
    assert resolved["included"].all()


def test_soft_rule_switched_to_hard_fails_the_stage(vparams, clean_manifest):
    manifest = mutate(clean_manifest, "IMG0000012.jpg", truncated=True)
    _, report = validate(manifest, with_severity(vparams, not_truncated="hard"))
    assert not report.success
    assert "not_truncated" in failure_message(report) and "IMG0000012.jpg" in failure_message(report)


# ---- each rule on tiny synthetic data ---------------------------------------------------------


def test_clean_dataset_passes_every_rule(vparams, clean_manifest):
    resolved, report = validate(clean_manifest, vparams)
    assert report.success
    assert [f.rule for f in report.findings] == list(RULES)
    assert all(f.success for f in report.findings), [f.rule for f in report.findings if not f.success]
    assert resolved["included"].all()
    assert report.counts["fractured_included"] == 6
    assert report.excluded == {} and report.duplicate_groups == []


def _duplicate_row(m: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([m, m[m["image_id"] == "IMG0000003.jpg"]], ignore_index=True)


def _same_hash(m: pd.DataFrame) -> pd.DataFrame:
    sha = m.loc[m["image_id"] == "IMG0000011.jpg", "sha256"].iloc[0]
    return mutate(m, "IMG0000013.jpg", sha256=sha)


RULE_CASES: list[tuple[str, Callable[[pd.DataFrame], pd.DataFrame], list[str]]] = [
    ("unique_image_id", _duplicate_row, ["IMG0000003.jpg"]),
    ("file_for_every_csv_row", lambda m: mutate(m, "IMG0000007.jpg", has_file=False), ["IMG0000007.jpg"]),
    ("csv_row_for_every_file", lambda m: mutate(m, "IMG0000008.jpg", in_csv=False), ["IMG0000008.jpg"]),
    ("folder_label_binary", lambda m: mutate(m, "IMG0000009.jpg", folder_label=2), ["IMG0000009.jpg"]),
    ("csv_label_binary", lambda m: mutate(m, "IMG0000009.jpg", csv_label=3), ["IMG0000009.jpg"]),
    ("decodable", lambda m: mutate(m, "IMG0000010.jpg", decodable=False), ["IMG0000010.jpg"]),
    ("servable", lambda m: mutate(m, "IMG0000011.jpg", decodable=False, refused=True), ["IMG0000011.jpg"]),
    ("width_in_bounds", lambda m: mutate(m, "IMG0000004.jpg", width=9000), ["IMG0000004.jpg"]),
    ("width_in_bounds", lambda m: mutate(m, "IMG0000004.jpg", width=20), ["IMG0000004.jpg"]),
    ("height_in_bounds", lambda m: mutate(m, "IMG0000005.jpg", height=20), ["IMG0000005.jpg"]),
    ("height_in_bounds", lambda m: mutate(m, "IMG0000005.jpg", height=9000), ["IMG0000005.jpg"]),
    ("colour_mode_allowed", lambda m: mutate(m, "IMG0000006.jpg", mode="CMYK"), ["IMG0000006.jpg"]),
    ("body_part_flags_valid", lambda m: mutate(m, "IMG0000001.jpg", hip=2), ["IMG0000001.jpg"]),
    # Two parts without `mixed`, and `mixed` with a single part.
    ("body_part_flags_valid", lambda m: mutate(m, "IMG0000002.jpg", hand=1), ["IMG0000002.jpg"]),
    ("body_part_flags_valid", lambda m: mutate(m, "IMG0000003.jpg", mixed=1), ["IMG0000003.jpg"]),
    ("fractured_share_in_range", lambda m: m.assign(folder_label=m["folder_label"] * 0), []),
    # Every image fractured, consistently so (folders, csv and fracture counts agree).
    ("fractured_share_in_range", lambda m: m.assign(folder_label=1, csv_label=1, fracture_count=m["fracture_count"].clip(1)),
     []),
    ("folder_label_matches_csv", lambda m: mutate(m, "IMG0000002.jpg", csv_label=0, fracture_count=0), ["IMG0000002.jpg"]),
    # fracture_count must agree with dataset.csv's fractured both ways.
    ("fracture_count_matches_label", lambda m: mutate(m, "IMG0000000.jpg", fracture_count=0), ["IMG0000000.jpg"]),
    ("fracture_count_matches_label", lambda m: mutate(m, "IMG0000015.jpg", fracture_count=2), ["IMG0000015.jpg"]),
    ("not_truncated", lambda m: mutate(m, "IMG0000012.jpg", truncated=True), ["IMG0000012.jpg"]),
    ("unique_content", _same_hash, ["IMG0000011.jpg", "IMG0000013.jpg"]),
    # A non-fractured image in one near-duplicate group with a fractured one.
    ("near_duplicate_labels_agree", lambda m: mutate(m, "IMG0000014.jpg", near_duplicate_group="IMG0000003.jpg"),
     ["IMG0000003.jpg", "IMG0000014.jpg"]),
]


@pytest.mark.parametrize(("rule", "break_it", "ids"), RULE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RULE_CASES)])
def test_each_rule_fails_on_the_rows_that_break_it(vparams, clean_manifest, rule, break_it, ids):
    _, report = validate(break_it(clean_manifest), vparams)
    finding = report.finding(rule)
    assert not finding.success
    assert finding.unexpected_ids == ids
    assert finding.unexpected_count == len(ids)
    assert report.success == (vparams.severity[rule] == "soft")
    if rule == "fractured_share_in_range":
        assert finding.observed == break_it(clean_manifest)["folder_label"].mean() in (0.0, 1.0)


@pytest.mark.parametrize(("source", "changes", "label"), [
    ("folder", {"folder_label": 2}, 2),
    ("csv", {"folder_label": pd.NA, "csv_label": 3}, 3),  # no class folder: the csv's label is the one trained on
])
def test_an_image_whose_label_is_not_0_or_1_is_excluded_naming_it_whatever_the_severity(
    vparams, clean_manifest, source, changes, label
):
    rule = f"{source}_label_binary"
    for severity in ("soft", "hard"):
        resolved, report = validate(mutate(clean_manifest, "IMG0000009.jpg", **changes),
                                    with_severity(vparams, **{rule: severity}))
        assert report.finding(rule).unexpected_ids == ["IMG0000009.jpg"]
        assert {i: (e.rule, e.reason) for i, e in report.excluded.items()} == {
            "IMG0000009.jpg": (rule, f"its label {label} is not 0 or 1")
        }
        row = resolved.set_index("image_id").loc["IMG0000009.jpg"]
        assert row["label_source"] == source and not row["included"] and row["exclude_rule"] == rule


def test_rule_cases_cover_every_rule():
    assert {c[0] for c in RULE_CASES} == set(RULES)


def test_missing_column_fails_its_rule_with_gx_message(vparams, clean_manifest):
    _, report = validate(clean_manifest.drop(columns=["mixed"]), vparams)
    finding = report.finding("body_part_flags_valid")
    assert not finding.success and not report.success
    assert "mixed" in str(finding.observed) and "does not exist" in str(finding.observed)
    assert "mixed" in failure_message(report)


def test_failure_message_quotes_each_id_so_an_empty_one_shows(vparams, clean_manifest):
    """Two rows with the id "" failed unique_image_id as "observed None", naming nothing."""
    manifest = mutate(clean_manifest, "IMG0000010.jpg", decodable=False)
    manifest.loc[manifest["image_id"].isin(["IMG0000003.jpg", "IMG0000004.jpg"]), "image_id"] = ""
    _, report = validate(manifest, vparams)
    assert report.finding("unique_image_id").unexpected_ids == [""]
    message = failure_message(report)
    assert "rule 'unique_image_id' failed for 1 images: ''\n" in message
    assert "rule 'decodable' failed for 1 images: 'IMG0000010.jpg'\n" in message


def test_a_fractured_share_outside_its_range_says_what_it_allows_and_where_that_is_set(vparams, clean_manifest):
    """It said "observed 0.6", then "fix the data": a hospital cannot fix its case mix."""
    manifest = clean_manifest.copy()
    manifest["folder_label"] = manifest["csv_label"] = 1
    _, report = validate(manifest, vparams)
    low, high = vparams.fractured_share
    message = failure_message(report, {"fractured_share_in_range": f"allowed {low} to {high} (validate.fractured_share)"})
    assert f"rule 'fractured_share_in_range' failed: observed 1.0, allowed {low} to {high} (validate.fractured_share)\n" in message


@pytest.mark.parametrize("flag", ["hardware", "multiscan", "frontal", "lateral", "oblique"])
def test_every_flag_column_is_0_or_1_not_only_the_body_parts(vparams, clean_manifest, flag):
    _, report = validate(mutate(clean_manifest, "IMG0000004.jpg", **{flag: 2}), vparams)
    finding = report.finding("body_part_flags_valid")
    assert not finding.success and finding.unexpected_ids == ["IMG0000004.jpg"]
    assert not report.success  # a hard rule in params.yaml


# ---- the same rules on real files ---------------------------------------------------------------


def test_an_empty_fracture_count_on_a_fractured_image_and_a_flag_of_7_are_found(tmp_path, vparams):
    """GX's value checks pass empty cells: fractured 1 with no fracture_count passed, though the
    count is >= 1 exactly when fractured; and a hardware flag of 7 passed, only body parts being checked."""
    csv = make_dataset(tmp_path).astype(object)
    csv.loc[csv["image_id"] == "IMG0000000.jpg", "fracture_count"] = ""  # fractured
    csv.loc[csv["image_id"] == "IMG0000014.jpg", "fracture_count"] = ""  # not fractured: no count says otherwise
    csv.loc[csv["image_id"] == "IMG0000007.jpg", "hardware"] = 7
    csv.to_csv(tmp_path / "dataset.csv", index=False)

    manifest = build_manifest(tmp_path, workers=1)
    assert manifest.set_index("image_id")["fracture_count"].isna().sum() == 2
    _, report = validate(manifest, vparams)
    assert report.finding("fracture_count_matches_label").unexpected_ids == ["IMG0000000.jpg"]
    assert report.finding("body_part_flags_valid").unexpected_ids == ["IMG0000007.jpg"]
    assert {f.rule for f in report.findings if not f.success} == {"fracture_count_matches_label", "body_part_flags_valid"}


def test_hidden_files_in_the_class_folders_are_not_images(tmp_path, vparams):
    """A Finder .DS_Store (or a copy's ._ file) was listed as an image, failing two hard rules."""
    make_dataset(tmp_path)
    (tmp_path / "images/Fractured/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    (tmp_path / "images/Non_fractured/._IMG0000010.jpg").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)
    manifest = build_manifest(tmp_path, workers=1)
    assert len(manifest) == 20 and not manifest["image_id"].str.startswith(".").any()
    _, report = validate(manifest, vparams)
    assert report.success and all(f.success for f in report.findings), [f.rule for f in report.findings if not f.success]


@pytest.mark.parametrize("stray", ["images/NEW0000002.jpg", "images/Unsure/NEW0000003.jpg",
                                   "images/Fractured/batch2/NEW0000001.jpg"])
def test_an_image_outside_the_class_folders_stops_the_stage_naming_it(tmp_path, stray):
    """FracAtlas's layout reads images/Fractured and images/Non_fractured, each flat: an image
    anywhere else under images/ was left out without a word (and, listed in dataset.csv, said
    to have no file)."""
    make_dataset(tmp_path)
    (tmp_path / stray).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "images/Fractured/IMG0000001.jpg", tmp_path / stray)
    named = stray if stray.count("/") == 1 else stray.rsplit("/", 1)[0] + "/"
    with pytest.raises(ManifestError, match=rf"holds what FracAtlas's layout does not, whose images no one would read: "
                                            rf"{re.escape(named)}\. Each image lies directly in images/Fractured"):
        build_manifest(tmp_path, workers=1)


@pytest.mark.parametrize("layout", ["fracatlas", "csv"])
def test_a_missing_class_folder_or_labels_file_is_named_with_what_to_do(tmp_path, layout):
    """These stopped the stage with a bare "[Errno 2] No such file or directory"."""
    if layout == "fracatlas":
        make_dataset(tmp_path)
        shutil.rmtree(tmp_path / "images/Fractured")
        told = r"images lacks Fractured/: FracAtlas's layout \(ingest.layout: fracatlas\) keeps each image"
    else:
        (tmp_path / "images").mkdir()
        told = r"labels\.csv is missing: a hospital's export \(ingest.layout: csv\) holds its labels"
    with pytest.raises(ManifestError, match=told):
        build_manifest(tmp_path, workers=1, layout=layout)


def test_an_unreadable_or_empty_file_is_excluded_with_a_reason_that_is_the_same_on_every_run(tmp_path, vparams,
                                                                                           monkeypatch):
    """Pillow's "cannot identify image file <_io.BytesIO object at 0x7f63...>" went into the manifest,
    whose bytes then changed from run to run; a file this user may not read stopped the stage as a
    failure to write."""
    make_dataset(tmp_path)
    (tmp_path / "images/Non_fractured/IMG0000008.jpg").write_bytes(b"")
    (tmp_path / "images/Non_fractured/IMG0000009.jpg").write_text("a report, not an image\n")
    header_only = tmp_path / "images/Non_fractured/IMG0000010.jpg"  # a transfer that stopped after 300 bytes
    header_only.write_bytes(header_only.read_bytes()[:300])
    locked = tmp_path / "images/Non_fractured/IMG0000012.jpg"
    read_bytes = Path.read_bytes

    def as_another_user(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", as_another_user)
    manifests = [build_manifest(tmp_path, workers=1) for _ in range(2)]
    assert manifests[0].to_csv() == manifests[1].to_csv()
    errors = manifests[0].set_index("image_id")["error"]
    assert errors["IMG0000008.jpg"] == "the file is empty (it holds no bytes): export it again"
    assert errors["IMG0000009.jpg"] == "it is not an image file that can be read (JPEG, PNG or DICOM)"
    # Pillow's bare "Truncated File Read", which said neither why nor what to do.
    assert errors["IMG0000010.jpg"] == ("none of its image data decodes: it stops early, or holds something else after "
                                        "a JPEG's start (an interrupted transfer or a damaged export); export it again")
    assert errors["IMG0000012.jpg"] == ("it cannot be read (Permission denied): make it readable by the user the "
                                        "pipeline runs as")
    _, report = validate(manifests[0], with_severity(vparams, decodable="soft"))
    assert {i for i, e in report.excluded.items() if e.rule == "decodable"} == {
        "IMG0000008.jpg", "IMG0000009.jpg", "IMG0000010.jpg", "IMG0000012.jpg"}


def test_soft_quirks_in_files_are_detected_and_reported_by_id(tmp_path, vparams):
    csv = make_dataset(tmp_path)
    truncate(tmp_path / "images/Non_fractured/IMG0000010.jpg")
    shutil.copyfile(tmp_path / "images/Non_fractured/IMG0000011.jpg", tmp_path / "images/Non_fractured/IMG0000012.jpg")
    csv.loc[csv["image_id"] == "IMG0000001.jpg", "fractured"] = 0
    csv.to_csv(tmp_path / "dataset.csv", index=False)

    manifest = build_manifest(tmp_path, workers=1)
    resolved, report = validate(manifest, vparams)
    assert report.success  # soft rules do not fail the stage
    assert report.finding("not_truncated").unexpected_ids == ["IMG0000010.jpg"]
    assert report.finding("folder_label_matches_csv").unexpected_ids == ["IMG0000001.jpg"]
    assert report.finding("fracture_count_matches_label").unexpected_ids == ["IMG0000001.jpg"]
    assert report.finding("unique_content").unexpected_ids == ["IMG0000011.jpg", "IMG0000012.jpg"]
    assert report.duplicate_groups == [["IMG0000011.jpg", "IMG0000012.jpg"]]
    row = manifest.set_index("image_id").loc["IMG0000010.jpg"]
    assert bool(row["decodable"]) and bool(row["truncated"])
    # Default policy: the folder label wins, truncated images and all copies are kept.
    assert resolved.set_index("image_id").loc["IMG0000001.jpg", "label"] == 1
    assert resolved["included"].all()


def test_hard_rules_in_files_fail_naming_rule_and_ids(tmp_path, vparams):
    csv = make_dataset(tmp_path)
    (tmp_path / "images/Non_fractured/IMG0000015.jpg").unlink()
    (tmp_path / "images/Non_fractured/IMG0000016.jpg").write_bytes(b"not an image at all")
    csv[csv["image_id"] != "IMG0000017.jpg"].to_csv(tmp_path / "dataset.csv", index=False)

    resolved, report = validate(build_manifest(tmp_path, workers=1), vparams)
    assert not report.success
    failed = {f.rule: f.unexpected_ids for f in report.failures()}
    assert failed == {
        "file_for_every_csv_row": ["IMG0000015.jpg"],
        "csv_row_for_every_file": ["IMG0000017.jpg"],
        "decodable": ["IMG0000016.jpg"],
    }
    message = failure_message(report)
    assert "file_for_every_csv_row" in message and "IMG0000015.jpg" in message
    assert "validate.severity" in message  # says what to do
    # Images that cannot be used are excluded whatever the severity, with their rule.
    assert {i: e.rule for i, e in report.excluded.items()} == {
        "IMG0000015.jpg": "file_for_every_csv_row",
        "IMG0000016.jpg": "decodable",
    }
    # A file without a csv row keeps its folder label.
    assert resolved.set_index("image_id").loc["IMG0000017.jpg", "included"]


@pytest.mark.parametrize("where", ["both class folders", "a repeated dataset.csv row"])
def test_an_id_on_two_rows_fails_its_rule_with_near_duplicates_on(tmp_path, vparams, where):
    """The rule unique_image_id names the id; the near-duplicate search before it does not crash on it."""
    csv = make_dataset(tmp_path)
    if where == "both class folders":
        shutil.copy(tmp_path / "images/Fractured/IMG0000001.jpg", tmp_path / "images/Non_fractured/IMG0000001.jpg")
    else:
        pd.concat([csv, csv[csv["image_id"] == "IMG0000001.jpg"]]).to_csv(tmp_path / "dataset.csv", index=False)
    assert vparams.near_duplicate_threshold is not None
    manifest = build_manifest(tmp_path, workers=1, near_duplicate_threshold=vparams.near_duplicate_threshold)
    _, report = validate(manifest, vparams)
    failed = {f.rule: f.unexpected_ids for f in report.failures()}
    assert failed["unique_image_id"] == ["IMG0000001.jpg"]
    assert "rule 'unique_image_id' failed" in failure_message(report)
    # Its rows were not compared, and are not said to be too short to compare; the others were.
    assert report.counts["near_duplicates"].get("not_compared", []) == []
    compared = manifest.set_index("image_id")["near_duplicate_compared"]
    assert not compared["IMG0000001.jpg"].any() and compared.drop("IMG0000001.jpg").all()
    # Both rows are excluded, under the rule, with the files (or the repeated row) named.
    assert {i: e.rule for i, e in report.excluded.items()} == {"IMG0000001.jpg": "unique_image_id"}
    reason = report.excluded["IMG0000001.jpg"].reason
    if where == "both class folders":
        assert "images/Fractured/IMG0000001.jpg; images/Non_fractured/IMG0000001.jpg" in reason
        assert "rename one of the files" in reason
    else:
        assert "images/Fractured/IMG0000001.jpg (on 2 rows)" in reason and "remove the repeated row" in reason
    # Distinct ids and files: the repeated id is one id, excluded whole, and one file is no byte-identical
    # group (the counts read 21 ids, 21 files, 19 included and 1 excluded, and "1 groups of byte-identical files").
    counts = report.counts
    files = 21 if where == "both class folders" else 20
    assert (counts["ids"], counts["files"], counts["included"], counts["excluded"]) == (20, files, 19, 1)
    assert report.duplicate_groups == []


def test_every_row_of_a_repeated_id_is_excluded_under_its_rule_whatever_the_severity(vparams, clean_manifest):
    """The same file name in both class folders, with unique_image_id soft: validate passed and
    both rows, in one "group" by id with two labels, were excluded as a near-duplicate conflict."""
    copy = clean_manifest[clean_manifest["image_id"] == "IMG0000003.jpg"].assign(
        path="images/Non_fractured/IMG0000003.jpg", folder_label=0, sha256="other"
    )
    manifest = pd.concat([clean_manifest, copy], ignore_index=True)
    for severity in ("soft", "hard"):
        resolved, report = validate(manifest, with_severity(vparams, unique_image_id=severity))
        assert report.success == (severity == "soft")
        assert report.finding("unique_image_id").unexpected_ids == ["IMG0000003.jpg"]
        assert report.finding("near_duplicate_labels_agree").unexpected_ids == []
        assert list(report.excluded) == ["IMG0000003.jpg"]
        assert report.excluded["IMG0000003.jpg"].rule == "unique_image_id"
        rows = resolved[resolved["image_id"] == "IMG0000003.jpg"]
        assert len(rows) == 2 and not rows["included"].any() and (rows["exclude_rule"] == "unique_image_id").all()
        assert report.counts["included"] == len(clean_manifest) - 1
    assert "rule 'unique_image_id' failed for 1 images: 'IMG0000003.jpg'" in failure_message(report)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.drop(columns="fractured"), r"lacks the column\(s\) fractured \(it has \['image_id', 'hand'"),
        (lambda c: c.astype({"hip": object}).assign(hip=["yes"] + [0] * (len(c) - 1)),
         r"column hip holds whole numbers .*; line 2 \('yes'\) do not"),
        (lambda c: c.astype({"fractured": object}).assign(fractured=[1, 1, "1.5"] + [0] * (len(c) - 3)),
         r"column fractured holds whole numbers .*; line 4 \('1.5'\) do not"),
        (lambda c: c.assign(image_id=["IMG0000000.jpg", ""] + list(c["image_id"][2:])), r"image_id is empty on line 3"),
        (lambda c: c.astype({"fracture_count": object}).assign(fracture_count=["inf"] + [0] * (len(c) - 1)),
         r"column fracture_count holds whole numbers .*; line 2 \('inf'\) do not"),
        (lambda c: c.astype({"leg": object}).assign(leg=[0, "99999999999999999999"] + [0] * (len(c) - 2)),
         r"column leg holds whole numbers .*; line 3 \('99999999999999999999'\) do not"),
        (lambda c: c.assign(**{" fractured": c["fractured"]}), r"names column\(s\) fractured twice"),
        (lambda c: c.set_axis([*c.columns[:-1], "fractured"], axis=1), r"names column\(s\) fractured twice"),
    ],
    ids=["no fractured column", "a flag that is a word", "a label that is a fraction", "a row without an id",
         "infinity", "a number too large", "a column named twice", "a column named twice exactly"],
)
def test_a_malformed_dataset_csv_is_refused_naming_the_file_column_and_line(tmp_path, change, message):
    csv = make_dataset(tmp_path)
    change(csv).to_csv(tmp_path / "dataset.csv", index=False)
    with pytest.raises(ManifestError, match=f"dataset.csv.*{message}"):
        build_manifest(tmp_path, workers=1)


def test_a_dataset_csv_line_is_named_as_an_editor_numbers_it_blank_lines_counted(tmp_path):
    make_dataset(tmp_path)
    lines = (tmp_path / "dataset.csv").read_text().splitlines()
    bad = lines[3].split(",")
    bad[3] = "yes"  # hip
    lines[3] = ",".join(bad)
    lines.insert(2, "")  # a blank line 3: the bad row is now line 5
    (tmp_path / "dataset.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"column hip .*; line 5 \('yes'\) do not"):
        build_manifest(tmp_path, workers=1)


# ---- the policies ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quirky(vparams, clean_manifest):
    """A manifest with one truncated file, one label conflict and a group of three copies."""
    sha = clean_manifest.loc[clean_manifest["image_id"] == "IMG0000013.jpg", "sha256"].iloc[0]
    m = mutate(clean_manifest, "IMG0000010.jpg", truncated=True)
    m = mutate(m, "IMG0000001.jpg", csv_label=0, fracture_count=0)
    for image_id in ("IMG0000011.jpg", "IMG0000019.jpg"):
        m = mutate(m, image_id, sha256=sha)
    _, report = validate(m, vparams)
    return m, report.findings


def policy(vparams, **changes):
    return dataclasses.replace(vparams, **changes)


def test_default_policy_keeps_everything_and_lets_the_folder_win(vparams, quirky):
    manifest, findings = quirky
    resolved, excluded = resolve(manifest, vparams, findings)
    assert excluded == {}
    assert resolved["included"].all()
    row = resolved.set_index("image_id").loc["IMG0000001.jpg"]
    assert row["label"] == 1 and row["label_source"] == "folder"


def test_label_conflict_csv_takes_the_csv_label(vparams, quirky):
    manifest, findings = quirky
    resolved, excluded = resolve(manifest, policy(vparams, on_label_conflict="csv"), findings)
    assert excluded == {}
    row = resolved.set_index("image_id").loc["IMG0000001.jpg"]
    assert row["label"] == 0 and row["label_source"] == "csv"


def test_label_conflict_and_truncated_exclude(vparams, quirky):
    manifest, findings = quirky
    strict = policy(vparams, on_truncated="exclude", on_label_conflict="exclude")
    resolved, excluded = resolve(manifest, strict, findings)
    assert {i: e.rule for i, e in excluded.items()} == {
        "IMG0000001.jpg": "folder_label_matches_csv",
        "IMG0000010.jpg": "not_truncated",
    }
    assert "on_label_conflict" in excluded["IMG0000001.jpg"].reason
    rows = resolved.set_index("image_id")
    assert not rows.loc[list(excluded), "included"].any()
    assert rows.loc["IMG0000010.jpg", "exclude_rule"] == "not_truncated"
    assert rows["included"].sum() == len(rows) - 2


def test_duplicates_grouped_keeps_every_copy(vparams, quirky):
    manifest, findings = quirky
    _, excluded = resolve(manifest, policy(vparams, on_duplicate="grouped"), findings)
    assert excluded == {}


def test_duplicates_keep_one_keeps_the_first_id_of_each_group(vparams, quirky):
    manifest, findings = quirky
    resolved, excluded = resolve(manifest, policy(vparams, on_duplicate="keep_one"), findings)
    assert set(excluded) == {"IMG0000013.jpg", "IMG0000019.jpg"}
    for exclusion in excluded.values():
        assert exclusion.rule == "unique_content"
        assert "IMG0000011.jpg" in exclusion.reason  # names the kept id
    assert resolved.set_index("image_id").loc["IMG0000011.jpg", "included"]


def test_keep_one_keeps_the_first_copy_no_other_policy_excluded(vparams, quirky):
    manifest, findings = quirky
    # The group's first id is truncated: excluded as such, so the next copy is the one kept.
    manifest = mutate(manifest, "IMG0000011.jpg", truncated=True)
    _, report = validate(manifest, vparams)
    both = policy(vparams, on_duplicate="keep_one", on_truncated="exclude")
    _, excluded = resolve(manifest, both, report.findings)
    assert excluded["IMG0000011.jpg"].rule == "not_truncated"
    assert excluded["IMG0000019.jpg"].rule == "unique_content"
    assert "IMG0000013.jpg" in excluded["IMG0000019.jpg"].reason
    assert "IMG0000013.jpg" not in excluded


def test_report_lists_every_exclusion_and_counts_both_ways(vparams, quirky):
    manifest, _ = quirky
    strict = policy(vparams, on_truncated="exclude", on_label_conflict="exclude", on_duplicate="keep_one")
    resolved, report = validate(manifest, strict)
    assert set(report.excluded) == set(resolved.loc[~resolved["included"], "image_id"])
    assert len(report.excluded) == 4
    assert all(e.rule in RULES and e.reason for e in report.excluded.values())
    counts = report.counts
    assert counts["ids"] == 20 and counts["included"] == 16 and counts["excluded"] == 4
    every, used = counts["all_ids"], counts["included_images"]
    assert every["class"] == {"fractured": 6, "not_fractured": 14}
    # Excluded: IMG1 (fractured, leg), IMG10 (hip), IMG13 (leg), IMG19 (shoulder).
    assert used["class"] == {"fractured": 5, "not_fractured": 11}
    assert every["body_part"] == {"hand": 5, "leg": 5, "hip": 5, "shoulder": 5, "mixed": 0}
    assert used["body_part"] == {"hand": 5, "leg": 3, "hip": 4, "shoulder": 4, "mixed": 0}
    assert every["view"] == {"frontal": 20, "lateral": 0, "oblique": 0}
    assert used["view"]["frontal"] == 16
    json.dumps(dataclasses.asdict(report))  # the CLI writes it as JSON


# ---- GX's own result and Data Docs ------------------------------------------------------------------


def test_gx_result_and_data_docs_are_written_from_the_same_run(tmp_path, vparams, quirky):
    manifest, _ = quirky
    gx_dir = tmp_path / "gx"
    stale = gx_dir / "data_docs" / "old.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier run")
    _, report = validate(manifest, vparams, gx_dir)
    assert report.gx_outputs == {
        "result_hard": str(gx_dir / "validation_result.hard.json"),
        "suite_hard": str(gx_dir / "expectation_suite.hard.json"),
        "result_soft": str(gx_dir / "validation_result.soft.json"),
        "suite_soft": str(gx_dir / "expectation_suite.soft.json"),
        "data_docs": str(gx_dir / "data_docs" / "index.html"),
    }
    assert not stale.exists()

    results = {k: json.loads((gx_dir / f"validation_result.{k}.json").read_text()) for k in ("hard", "soft")}
    rules_in_results = set()
    for kind, result in results.items():
        assert result["suite_name"] == SUITE_NAMES[kind]
        rules = {r["expectation_config"]["meta"]["rule"] for r in result["results"]}
        assert {vparams.severity[r] for r in rules} == {kind}
        rules_in_results |= rules
        suite = json.loads((gx_dir / f"expectation_suite.{kind}.json").read_text())
        assert len(suite["expectations"]) == len(result["results"])
    assert rules_in_results == set(RULES)
    types = {r["expectation_config"]["type"] for result in results.values() for r in result["results"]}
    assert {"expect_column_values_to_be_unique", "expect_column_mean_to_be_between"} <= types
    # The saved results say what the report says; the hard suite fails exactly when the stage does.
    failed = {r["expectation_config"]["meta"]["rule"] for result in results.values() for r in result["results"]
              if not r["success"]}
    assert failed == {f.rule for f in report.findings if not f.success}
    assert results["hard"]["success"] == report.success

    index = (gx_dir / "data_docs" / "index.html").read_text()
    assert SUITE_NAMES["hard"] in index and SUITE_NAMES["soft"] in index
    pages = list((gx_dir / "data_docs" / "validations").rglob("*.html"))
    assert len(pages) == 2
    text = "".join(p.read_text() for p in pages)
    assert all(rule in text for rule in RULES)
    assert "IMG0000010.jpg" in text  # the offending ids are shown
    soft_notes = json.loads((gx_dir / "expectation_suite.soft.json").read_text())["meta"]["notes"]["content"][0]
    assert "do not fail the validate stage" in soft_notes
    for kind in ("hard", "soft"):
        page = (gx_dir / "data_docs" / "expectations" / f"{SUITE_NAMES[kind]}.html").read_text()
        assert all(rule in page for rule in RULES if vparams.severity[rule] == kind)


def test_data_docs_load_nothing_from_the_internet(tmp_path, vparams, quirky):
    manifest, _ = quirky
    gx_dir = tmp_path / "gx"
    validate(manifest, vparams, gx_dir)
    docs = gx_dir / "data_docs"
    pages = list(docs.rglob("*.html"))
    assert len(pages) == 5  # the index, two suites, two validation results
    for page in pages:
        text = page.read_text()
        remote = re.findall(r'<(?:script|link|img)[^>]*(?:src|href)="(https?://[^"]*)"', text)
        assert remote == [], (page.name, remote)
        vendored = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"#]*static/vendor/[^"]+)"', text)
        assert len(vendored) >= 10, (page.name, vendored)  # jQuery, Bootstrap, bootstrap-table, Vega, ...
        for ref in vendored:
            assert (page.parent / ref).resolve().is_file(), (page.name, ref)
    assert (docs / "static/vendor/@fortawesome__fontawesome-free@6.6.0/webfonts/fa-solid-900.woff2").is_file()
# ---- the real copy --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(fracatlas, vparams, tmp_path_factory):
    """The real copy's manifest and its validation under the default params (built once), with the
    served model's limits as the validate stage applies them (none of its X-rays is over or under them)."""
    serve = load_params(REPO).serve
    manifest = build_manifest(fracatlas, near_duplicate_threshold=vparams.near_duplicate_threshold,
                              near_duplicate_top_threshold=vparams.near_duplicate_top_threshold,
                              max_pixels=serve.max_megapixels * 1_000_000, min_grey_std=serve.min_grey_std)
    resolved, report = validate(manifest, vparams, tmp_path_factory.mktemp("real_gx"))
    return manifest, resolved, report


@pytest.mark.integration
def test_real_copy_passes_every_hard_rule(real):
    _, _, report = real
    assert report.success, failure_message(report)
    soft_failed = {f.rule: f.unexpected_count for f in report.findings if not f.success}
    assert soft_failed == {
        "folder_label_matches_csv": 1,
        "fracture_count_matches_label": 1,
        "not_truncated": 49,
        "unique_content": 21,
        # 9 X-rays stored twice under opposite class folders; 5 of them as a truncated copy.
        "near_duplicate_labels_agree": 18,
    }
    assert 0.05 <= report.finding("fractured_share_in_range").observed <= 0.5


@pytest.mark.integration
def test_real_copy_label_conflict_is_img0003298(real):
    manifest, resolved, report = real
    assert report.finding("folder_label_matches_csv").unexpected_ids == ["IMG0003298.jpg"]
    # Its fracture_count (1) sides with the folder against dataset.csv's fractured (0).
    assert report.finding("fracture_count_matches_label").unexpected_ids == ["IMG0003298.jpg"]
    assert resolved.set_index("image_id").loc["IMG0003298.jpg", "label"] == 1


@pytest.mark.integration
def test_real_copy_truncated_jpegs(real):
    manifest, _, report = real
    truncated = report.finding("not_truncated").unexpected_ids
    assert len(truncated) == 49
    assert all("IMG0004028.jpg" <= i <= "IMG0004347.jpg" for i in truncated)
    labels = manifest.set_index("image_id")["folder_label"]
    assert (labels[truncated] == 0).all()


@pytest.mark.integration
def test_real_copy_duplicate_groups(real):
    manifest, _, report = real
    groups = report.duplicate_groups
    assert len(groups) == 9 and sum(map(len, groups)) == 21
    assert ["IMG0000003.jpg", "IMG0000005.jpg", "IMG0002291.jpg", "IMG0002293.jpg"] in groups
    labels = manifest.set_index("image_id")["folder_label"]
    assert all(labels[g].nunique() == 1 for g in groups)  # each group stays within one class


@pytest.mark.integration
def test_real_copy_body_parts_and_counts(real):
    manifest, _, report = real
    assert report.finding("body_part_flags_valid").success
    every = report.counts["all_ids"]
    assert sum(every["body_part"].values()) == len(manifest)
    assert every["body_part"]["mixed"] == int(manifest["mixed"].sum())
    assert every["class"]["fractured"] == int(manifest["folder_label"].sum())
    # By default only the near-duplicates whose labels disagree are left out.
    conflicting = report.finding("near_duplicate_labels_agree").unexpected_ids
    assert sorted(report.excluded) == conflicting
    assert sum(report.counts["included_images"]["body_part"].values()) == len(manifest) - len(conflicting)


@pytest.mark.integration
def test_real_copy_strict_policies(real, vparams):
    manifest, _, report = real
    strict = policy(vparams, on_truncated="exclude", on_label_conflict="exclude", on_duplicate="keep_one")
    _, excluded = resolve(manifest, strict, report.findings)
    rules = pd.Series({i: e.rule for i, e in excluded.items()}).value_counts().to_dict()
    # 49 truncated (a truncated pair among them), IMG0003298, 11 extra copies of the other 8
    # groups (21 ids in 9 groups, less the truncated pair), and the 18 members of the 9 groups
    # whose labels disagree, less the 5 truncated copies already excluded.
    assert rules == {
        "not_truncated": 49, "folder_label_matches_csv": 1, "unique_content": 11, "near_duplicate_labels_agree": 13
    }
    _, keep_one = resolve(manifest, policy(vparams, on_duplicate="keep_one"), report.findings)
    assert sum(e.rule == "unique_content" for e in keep_one.values()) == 21 - 9
    _, kept = resolve(manifest, policy(vparams, on_near_duplicate_conflict="keep"), report.findings)
    assert kept == {}


@pytest.mark.integration
def test_real_copy_gx_outputs(real):
    _, _, report = real
    assert Path(report.gx_outputs["data_docs"]).is_file()
    hard = json.loads(Path(report.gx_outputs["result_hard"]).read_text())
    soft = json.loads(Path(report.gx_outputs["result_soft"]).read_text())
    # The stage passes on the real copy, and the pages say so: the hard suite succeeds, the soft
    # suite fails where its rules flagged images (severity warning), handled by the policies.
    assert hard["success"] is True and report.success
    assert soft["success"] is False
    assert all(r["expectation_config"]["severity"] == "warning" for r in soft["results"])



@pytest.mark.integration
def test_real_copy_near_duplicates_are_grouped_and_conflicting_labels_flagged(real):
    manifest, resolved, report = real
    group = manifest.set_index("image_id")["near_duplicate_group"]
    # One X-ray in two encodings, and three X-rays stored twice under opposite class folders.
    assert group["IMG0002653.jpg"] == group["IMG0004068.jpg"]
    conflicting = set(report.finding("near_duplicate_labels_agree").unexpected_ids)
    for a, b in [("IMG0002886.jpg", "IMG0004243.jpg"), ("IMG0002998.jpg", "IMG0004280.jpg"),
                 ("IMG0004262.jpg", "IMG0002952.jpg")]:
        assert group[a] == group[b] and {a, b} <= conflicting
    # Truncated copies, compared on the rows they decoded: two under the other class folder, and
    # one whose whole thumbnail (a quarter of it flat grey) correlates at 0.55 with its original.
    for a, b in [("IMG0004278.jpg", "IMG0003001.jpg"), ("IMG0004279.jpg", "IMG0003000.jpg")]:
        assert group[a] == group[b] and {a, b} <= conflicting
    assert group["IMG0004297.jpg"] == group["IMG0003061.jpg"]
    # Re-saved copies whose lower part decodes as grey blocks though each file ends as a JPEG
    # should (so none is truncated): found on the top half of the thumbnails only. Before, the
    # first lay in test with its copy in train, the second in val with its copy in train.
    corrupt_below = [("IMG0002904.jpg", "IMG0004232.jpg"), ("IMG0002746.jpg", "IMG0004117.jpg"),
                     ("IMG0002834.jpg", "IMG0004187.jpg"), ("IMG0002791.jpg", "IMG0004150.jpg")]
    truncated = manifest.set_index("image_id")["truncated"]
    for a, b in corrupt_below:
        assert group[a] == group[b] and not truncated[a] and not truncated[b]
    assert report.counts["near_duplicates"]["matched_on_top_half"] == sorted(i for pair in corrupt_below for i in pair)
    assert report.counts["near_duplicates"]["not_compared"] == []
    labels = manifest.set_index("image_id")["folder_label"]
    assert all(labels[g].nunique() == 2 for g in manifest[manifest["near_duplicate_conflict"]].groupby("near_duplicate_group")["image_id"].apply(list))
    # Every byte-identical group lies inside one near-duplicate group.
    assert all(group[g].nunique() == 1 for g in report.duplicate_groups)
    counts = report.counts["near_duplicates"]
    assert counts["groups"] == len(report.near_duplicate_groups) >= len(report.duplicate_groups)
    assert counts["images_in_groups"] == sum(map(len, report.near_duplicate_groups))
    assert counts["label_conflict_groups"] == manifest.loc[manifest["near_duplicate_conflict"], "near_duplicate_group"].nunique()
    assert not resolved.set_index("image_id").loc[sorted(conflicting), "included"].any()


def test_a_file_the_served_model_refuses_for_its_mode_is_counted_once_under_servable(tmp_path, vparams):
    """A 16-bit greyscale PNG in a hospital's export: `servable` lists it (the served model refuses it)
    and leaves it out; `colour_mode_allowed` counted it again and failed the stage for a file already
    left out. A file that decodes in a mode not allowed still fails it."""
    import numpy as np
    from PIL import Image

    make_dataset(tmp_path)
    sixteen = tmp_path / "images/Non_fractured/IMG0000008.jpg"
    Image.fromarray((np.arange(96 * 80).reshape(96, 80) * 7).astype(np.uint16)).save(sixteen, format="PNG")
    manifest = build_manifest(tmp_path, workers=1)
    assert manifest.set_index("image_id").loc["IMG0000008.jpg", "mode"] == "I;16"
    ok, report = validate(manifest, vparams)
    failed = {f.rule for f in report.findings if not f.success}
    assert "colour_mode_allowed" not in failed and report.excluded["IMG0000008.jpg"].rule == "servable", failed
    palette = tmp_path / "images/Non_fractured/IMG0000009.jpg"
    Image.open(palette).convert("P").save(palette, format="PNG")
    _, report = validate(build_manifest(tmp_path, workers=1), vparams)
    (colour,) = [f for f in report.findings if f.rule == "colour_mode_allowed"]
    assert not colour.success and colour.unexpected_ids == ["IMG0000009.jpg"]
    # The message says how to take it: the served model converts a palette image and scores it.
    assert ("rule 'colour_mode_allowed' failed for 1 images: 'IMG0000009.jpg'\n    (a mode the model converts, such as "
            "P, LA or RGBA, is taken once listed in validate.colour_modes)") in failure_message(report)
    listed = dataclasses.replace(vparams, colour_modes=["L", "RGB", "P"])
    _, report = validate(build_manifest(tmp_path, workers=1), listed)
    assert [f.success for f in report.findings if f.rule == "colour_mode_allowed"] == [True]


def test_an_empty_fractured_cell_in_dataset_csv_fails_the_csv_label_rule(tmp_path, vparams):
    """GX's value checks pass empty cells: a dataset.csv row whose fractured is empty passed
    csv_label_binary, though the data card says every image is labelled 0 or 1."""
    csv = make_dataset(tmp_path).astype(object)
    csv.loc[csv["image_id"] == "IMG0000003.jpg", "fractured"] = ""
    csv.to_csv(tmp_path / "dataset.csv", index=False)

    manifest = build_manifest(tmp_path, workers=1)
    assert manifest.set_index("image_id")["csv_label"].isna().sum() == 1
    _, report = validate(manifest, vparams)
    assert report.finding("csv_label_binary").unexpected_ids == ["IMG0000003.jpg"]
