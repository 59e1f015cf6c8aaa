"""The split: stratified, seeded, and duplicate groups never cross splits."""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fracture.config import SplitParams
from fracture.manifest import BODY_PARTS
from fracture.split import (
    PUBLISHED_FILES,
    SPLITS,
    SplitError,
    keep_assignments,
    published_dir_of,
    read_assignments,
    split_manifest,
)
from fracture.workspace import ASSIGNMENTS_FILE

PARAMS = SplitParams(seed=7, val_size=0.15, test_size=0.15)
SHARES = {"train": 0.7, "val": 0.15, "test": 0.15}
# Body parts drawn roughly as often as in FracAtlas (leg and hand common, shoulder and hip rare),
# plus films without flags (ids missing from dataset.csv).
PARTS = ["leg", "leg", "leg", "hand", "hand", "mixed", "hip", "shoulder", "unknown"]


def flags_of(part: str) -> dict[str, object]:
    """dataset.csv's flags for a body part; ``mixed`` films set two regions too, as in FracAtlas."""
    if part == "unknown":
        return dict.fromkeys(BODY_PARTS, pd.NA)
    flags = dict.fromkeys(BODY_PARTS, 0)
    if part == "mixed":
        flags.update(mixed=1, hand=1, shoulder=1)
    else:
        flags[part] = 1
    return flags


def manifest_from(groups: list[tuple]) -> pd.DataFrame:
    """One row per image: ``groups`` holds (label, copies[, body part]) per distinct content."""
    rows = []
    for g, (label, copies, *part) in enumerate(groups):
        flags = flags_of(part[0] if part else "leg")
        for c in range(copies):
            rows.append(
                {"image_id": f"IMG{g:05d}_{c}.jpg", "sha256": f"h{g}", "label": label, "included": True, **flags}
            )
    frame = pd.DataFrame(rows)
    return frame.astype({c: "Int64" for c in BODY_PARTS})


def split_of(splits: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Image id -> split name."""
    return {i: name for name in SPLITS for i in splits[name]["image_id"]}


def assert_partition(manifest: pd.DataFrame, splits: dict[str, pd.DataFrame]) -> None:
    """Every included id in exactly one split, and no content hash in two."""
    ids = pd.concat([splits[s]["image_id"] for s in SPLITS])
    assert sorted(ids) == sorted(manifest.loc[manifest["included"], "image_id"])
    hashes = [set(splits[s]["sha256"]) for s in SPLITS]
    assert not (hashes[0] & hashes[1]) and not (hashes[0] & hashes[2]) and not (hashes[1] & hashes[2])


group_lists = st.lists(
    st.tuples(st.sampled_from([0, 0, 0, 0, 1]), st.integers(1, 3), st.sampled_from(PARTS)), min_size=60, max_size=200
).filter(lambda gs: sum(1 for g in gs if g[0] == 1) >= 8 and sum(1 for g in gs if g[0] == 0) >= 8)
by_part = pytest.mark.parametrize("by_part", [False, True], ids=["label", "label+body_part"])


@by_part
@settings(max_examples=40, deadline=None)
@given(groups=group_lists, seed=st.integers(0, 10_000))
def test_every_id_in_exactly_one_split_and_no_hash_crosses(by_part, groups, seed):
    manifest = manifest_from(groups)
    splits = split_manifest(manifest, SplitParams(seed=seed, val_size=0.15, test_size=0.15, stratify_body_part=by_part))
    assert_partition(manifest, splits)
    for name in SPLITS:
        assert splits[name]["image_id"].is_monotonic_increasing


@by_part
@settings(max_examples=40, deadline=None)
@given(groups=group_lists, seed=st.integers(0, 10_000))
def test_class_ratio_of_distinct_images_within_one_of_target(by_part, groups, seed):
    manifest = manifest_from(groups)
    splits = split_manifest(manifest, SplitParams(seed=seed, val_size=0.15, test_size=0.15, stratify_body_part=by_part))
    distinct = manifest.drop_duplicates("sha256")
    share = distinct["label"].mean()
    for name in SPLITS:
        d = splits[name].drop_duplicates("sha256")
        # Stratification: the count of fractured groups is within one of the target share.
        assert abs(d["label"].sum() - share * len(d)) <= 1 + 1e-9


@settings(max_examples=40, deadline=None)
@given(groups=group_lists, seed=st.integers(0, 10_000))
def test_each_body_part_stratum_within_two_groups_of_its_share(groups, seed):
    manifest = manifest_from(groups)
    splits = split_manifest(manifest, SplitParams(seed=seed, val_size=0.15, test_size=0.15, stratify_body_part=True))
    table = splits.report.strata
    # The table counts what really went where.
    for name in SPLITS:
        assert table[name].sum() == splits[name]["sha256"].nunique()
        fractured = splits[name].drop_duplicates("sha256")["label"].sum()
        assert table.loc[table["label"] == 1, name].sum() == fractured
    # Why two groups: test and val are each one draw in which scikit-learn gives a stratum its
    # share of its label's (whole-number) count to within one group; train keeps what both
    # draws left, so its error is at most the two draws' errors together. (Measured over 2,000
    # random manifests with shares 0.1-0.25: at most 1.6.)
    for row in table.itertuples():
        for name in SPLITS:
            assert abs(getattr(row, name) - SHARES[name] * row.groups) <= 2 + 1e-9, (row, name)


@by_part
def test_same_seed_same_split_and_excluded_rows_left_out(by_part):
    manifest = manifest_from([(int(i % 5 == 0), 1 + i % 2, PARTS[i % len(PARTS)]) for i in range(100)])
    manifest.loc[3, "included"] = False
    params = SplitParams(seed=7, val_size=0.15, test_size=0.15, stratify_body_part=by_part)
    a = split_manifest(manifest, params)
    b = split_manifest(manifest, params)
    for name in SPLITS:
        pd.testing.assert_frame_equal(a[name], b[name])
    assert manifest.loc[3, "image_id"] not in split_of(a)


def test_identical_files_with_different_labels_are_refused():
    manifest = manifest_from([(0, 1)] * 40 + [(1, 1)] * 10)
    manifest.loc[len(manifest)] = {"image_id": "IMGdup.jpg", "sha256": "h0", "label": 1, "included": True}
    with pytest.raises(SplitError, match="IMGdup.jpg"):
        split_manifest(manifest, PARAMS)


def test_rare_body_parts_pool_into_other_and_tiny_strata_still_split():
    # 7 groups is the least that can expect one group in a 15 % split; hip (3) and shoulder (1)
    # fractured groups pool, and the single unknown non-fractured group must not break sklearn.
    groups = (
        [(0, 1, "leg")] * 120 + [(0, 1, "hand")] * 60 + [(0, 1, "unknown")]
        + [(1, 1, "leg")] * 20 + [(1, 1, "hand")] * 7 + [(1, 1, "hip")] * 3 + [(1, 1, "shoulder")]
    )
    manifest = manifest_from(groups)
    splits = split_manifest(manifest, SplitParams(seed=3, val_size=0.15, test_size=0.15, stratify_body_part=True))
    assert_partition(manifest, splits)
    table = splits.report.strata.set_index("stratum")
    assert table.loc["other parts, fractured", "parts"] == "hip, shoulder"
    assert table.loc["other parts, fractured", "groups"] == 4
    assert table.loc["hand, fractured", "groups"] == 7
    assert table.loc["other parts, not fractured", "parts"] == "unknown"
    assert sorted(table.index) == sorted(
        ["leg, not fractured", "hand, not fractured", "other parts, not fractured",
         "leg, fractured", "hand, fractured", "other parts, fractured"]
    )


def test_body_part_stratification_needs_the_flag_columns():
    manifest = manifest_from([(0, 1)] * 40 + [(1, 1)] * 10).drop(columns=["hip", "mixed"])
    with pytest.raises(SplitError, match=r"\['hip', 'mixed'\].*split.stratify_body_part: false"):
        split_manifest(manifest, SplitParams(seed=1, val_size=0.15, test_size=0.15, stratify_body_part=True))
    split_manifest(manifest, PARAMS)  # label-only stratification does not read them


@by_part
@pytest.mark.parametrize(
    ("fractured", "intact", "empty", "images"),
    [(2, 38, "val", 6), (3, 57, "test", 9)],
    ids=["val", "test"],
)
def test_val_or_test_without_a_fractured_image_is_refused_naming_the_split_and_what_to_do(
    by_part, fractured, intact, empty, images
):
    # Too few fractured groups: each draw's share of them rounds to none (2 x 0.15 = 0.3, and
    # 3 x 0.15 = 0.45 for test). Training would fail at ROC AUC on val only after an epoch.
    manifest = manifest_from([(1, 1)] * fractured + [(0, 1)] * intact)
    params = SplitParams(seed=7, val_size=0.15, test_size=0.15, stratify_body_part=by_part)
    with pytest.raises(
        SplitError,
        match=rf"the {empty} split holds 0 fractured and {images} not fractured images: the fractured class is too "
        rf"small to stratify \({fractured} fractured and {intact} not fractured images included.*add fractured "
        rf"images, or raise split\.{empty}_size \(now 0\.15\)$",
    ):
        split_manifest(manifest, params)


@by_part
def test_a_single_fractured_group_is_refused_in_both_modes(by_part):
    # Label-only stratification has always refused it (scikit-learn needs two per class); with
    # body parts the draw put it in train and left val and test without one.
    manifest = manifest_from([(1, 1)] + [(0, 1)] * 40)
    params = SplitParams(seed=7, val_size=0.15, test_size=0.15, stratify_body_part=by_part)
    with pytest.raises(SplitError, match=r"add (images of the smaller class|fractured images), or raise split\.val_size"):
        split_manifest(manifest, params)


# --- published lists ---------------------------------------------------------------------------

PUBLISHED = SplitParams(seed=7, val_size=0.15, test_size=0.15, strategy="published")


def write_lists(folder: Path, lists: dict[str, list[str]]) -> Path:
    """A published-lists folder in FracAtlas's format: header ``image_id``, one id per row."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, file in PUBLISHED_FILES.items():
        pd.DataFrame({"image_id": lists.get(name, [])}).to_csv(folder / file, index=False)
    return folder


def test_published_without_the_folder_or_a_file_says_which_and_the_alternative(tmp_path):
    manifest = manifest_from([(0, 1)] * 40 + [(1, 1)] * 10)
    missing = tmp_path / "Utilities" / "Fracture Split"
    with pytest.raises(SplitError, match=rf"{re.escape(str(missing))} not found.*split.strategy: stratified"):
        split_manifest(manifest, PUBLISHED, missing)
    with pytest.raises(SplitError, match="split.strategy: stratified"):
        split_manifest(manifest, PUBLISHED, None)
    write_lists(missing, {"train": ["IMG00040_0.jpg"]})
    (missing / "valid.csv").unlink()
    with pytest.raises(SplitError, match=r"valid\.csv not found.*val list.*split.strategy: stratified"):
        split_manifest(manifest, PUBLISHED, missing)
    # The stratified strategy never looks at the folder.
    split_manifest(manifest, PARAMS, tmp_path / "nowhere")


def test_published_list_without_image_id_column_or_with_an_id_twice_is_refused(tmp_path):
    manifest = manifest_from([(0, 1)] * 40 + [(1, 1)] * 10)
    folder = write_lists(tmp_path / "lists", {"train": ["IMG00040_0.jpg"], "test": ["IMG00040_0.jpg"]})
    with pytest.raises(SplitError, match=r"IMG00040_0\.jpg \(test\), IMG00040_0\.jpg \(train\)"):
        split_manifest(manifest, PUBLISHED, folder)
    pd.DataFrame({"id": ["IMG00041_0.jpg"]}).to_csv(folder / "test.csv", index=False)
    with pytest.raises(SplitError, match=r"test\.csv: no 'image_id' column"):
        split_manifest(manifest, PUBLISHED, folder)


def test_published_group_follows_its_first_listed_member_and_reports_the_rest(tmp_path):
    # Content h40: IMG00040_0 listed val, IMG00040_1 listed test, IMG00040_2 in no list.
    manifest = manifest_from([(0, 1)] * 40 + [(1, 3)] + [(1, 1)] * 20)
    manifest.loc[manifest["image_id"] == "IMG00045_0.jpg", "included"] = False
    lists = {
        "train": [f"IMG{g:05d}_0.jpg" for g in range(41, 51)] + ["IMG09999_0.jpg"],
        "val": ["IMG00040_0.jpg", "IMG00051_0.jpg"],
        "test": ["IMG00040_1.jpg", "IMG00052_0.jpg", "IMG00000_0.jpg"],
    }
    splits = split_manifest(manifest, PUBLISHED, write_lists(tmp_path / "lists", lists))
    assert_partition(manifest, splits)
    where = split_of(splits)
    assert {where[f"IMG00040_{c}.jpg"] for c in range(3)} == {"val"}
    report = splits.report
    assert report.moved.to_dict(orient="records") == [
        {"image_id": "IMG00040_1.jpg", "listed": "test", "assigned": "val"},
        {"image_id": "IMG00040_2.jpg", "listed": "", "assigned": "val"},
    ]
    # Excluded or unknown ids named in a list are left out; a listed non-fractured id follows it.
    assert report.listed_left_out == ("IMG00045_0.jpg", "IMG09999_0.jpg")
    assert "IMG00045_0.jpg" not in where
    assert report.listed_not_fractured == ("IMG00000_0.jpg",) and where["IMG00000_0.jpg"] == "test"
    assert all(where[f"IMG{g:05d}_0.jpg"] == "train" for g in (41, 42, 43, 44, 46, 47, 48, 49, 50))
    assert where["IMG00051_0.jpg"] == "val" and where["IMG00052_0.jpg"] == "test"
    # Fractured ids in no list (IMG00053..IMG00060 and the group's unlisted copy) are reported.
    assert report.unlisted_fractured == ("IMG00040_2.jpg", *(f"IMG{g:05d}_0.jpg" for g in range(53, 61)))
    assert report.published == {"train": 9, "val": 4, "test": 2}
    assert any("IMG00040_1.jpg (listed in test) -> val" in line for line in report.summary())
    assert json.loads(json.dumps(report.to_dict()))["moved"][0]["image_id"] == "IMG00040_1.jpg"


def test_published_lists_that_place_everything_leave_nothing_to_draw(tmp_path):
    # IMG00007..IMG00009 are non-fractured ids the lists name (they follow the list), so that
    # val and test hold both classes.
    manifest = manifest_from([(1, 1)] * 6 + [(1, 2)] + [(0, 1)] * 3)
    lists = {
        "train": [f"IMG{g:05d}_0.jpg" for g in (0, 1, 2, 3, 7)],
        "val": ["IMG00004_0.jpg", "IMG00008_0.jpg"],
        "test": ["IMG00005_0.jpg", "IMG00006_1.jpg", "IMG00009_0.jpg"],
    }
    splits = split_manifest(manifest, PUBLISHED, write_lists(tmp_path / "lists", lists))
    assert {name: len(splits[name]) for name in SPLITS} == {"train": 5, "val": 2, "test": 4}
    assert splits.report.strata.empty and splits.report.moved["image_id"].tolist() == ["IMG00006_0.jpg"]
    written = json.loads(json.dumps(splits.report.to_dict()))  # as the split stage writes report.json
    assert written["strata"] == [] and written["published"] == {"train": 5, "val": 2, "test": 4}
    assert written["moved"] == [{"image_id": "IMG00006_0.jpg", "listed": "", "assigned": "test"}]
    assert splits.report.summary()[:3] == [
        "published lists placed 11 images (train 5, val 2, test 4)",
        "seeded draw: none, the published lists placed every image",
        "moved to keep its group together: IMG00006_0.jpg (in no list) -> test",
    ]


def test_published_lists_that_leave_test_without_a_fractured_image_are_refused_naming_the_list(tmp_path):
    manifest = manifest_from([(0, 1)] * 40 + [(1, 1)] * 10)
    lists = {"train": [f"IMG{g:05d}_0.jpg" for g in range(40, 48)], "val": ["IMG00048_0.jpg", "IMG00049_0.jpg"]}
    with pytest.raises(
        SplitError,
        match=r"the test split holds 0 fractured and 6 not fractured images.*raise split\.test_size \(now 0\.15\), "
        r"or name fractured images in the published test\.csv$",
    ):
        split_manifest(manifest, PUBLISHED, write_lists(tmp_path / "lists", lists))


@by_part
@settings(max_examples=30, deadline=None)
@given(groups=group_lists, seed=st.integers(0, 10_000), picks=st.lists(st.sampled_from(["train", "val", "test", None])))
def test_published_places_listed_groups_and_draws_the_rest(by_part, groups, seed, picks):
    manifest = manifest_from(groups)
    # Lists that leave val or test without a fractured image are refused, so each names one
    # group's first id (a group follows its first listed member); the picks place the rest.
    firsts = manifest.loc[manifest["label"] == 1].drop_duplicates("sha256")["image_id"].tolist()
    lists: dict[str, list[str]] = {"train": [], "val": [firsts[0]], "test": [firsts[1]]}
    reserved = manifest["sha256"].isin(manifest.loc[manifest["image_id"].isin(firsts[:2]), "sha256"])
    fractured = manifest.loc[(manifest["label"] == 1) & ~reserved, "image_id"].tolist()
    for image_id, pick in zip(fractured, picks, strict=False):
        if pick:
            lists[pick].append(image_id)
    params = SplitParams(seed=seed, val_size=0.15, test_size=0.15, strategy="published", stratify_body_part=by_part)
    with tempfile.TemporaryDirectory() as tmp:
        splits = split_manifest(manifest, params, write_lists(Path(tmp), lists))
    assert_partition(manifest, splits)
    where = split_of(splits)
    moved = set(splits.report.moved["image_id"])
    for name, ids in lists.items():
        assert all(where[i] == name or i in moved for i in ids)
    # The non-fractured images are drawn with the params' shares. Test and val are each within
    # two groups: their sizes round up (scikit-learn's rule) and each label's count rounds to
    # the nearest whole group. Train is what both leave, so it carries both roundings: three.
    non = manifest[manifest["label"] == 0].drop_duplicates("sha256")
    for name in SPLITS:
        drawn = splits[name].drop_duplicates("sha256")
        tolerance = 3 if name == "train" else 2
        assert abs((drawn["label"] == 0).sum() - SHARES[name] * len(non)) <= tolerance + 1e-9


# --- the real copy -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_manifest(fracatlas: Path) -> pd.DataFrame:
    from fracture.manifest import build_manifest

    return build_manifest(fracatlas).assign(label=lambda f: f["folder_label"], included=True)


def assert_groups_whole(manifest: pd.DataFrame, splits: dict[str, pd.DataFrame]) -> None:
    used = manifest[manifest["included"]]
    per_group = used["image_id"].map(split_of(splits)).groupby(used["sha256"]).nunique()
    assert (per_group == 1).all(), per_group[per_group > 1]


@by_part
def test_real_duplicate_groups_stay_together(real_manifest, by_part):
    params = SplitParams(seed=7, val_size=0.15, test_size=0.15, stratify_body_part=by_part)
    splits = split_manifest(real_manifest, params)
    assert_partition(real_manifest, splits)
    assert_groups_whole(real_manifest, splits)


def test_real_published_lists_place_every_listed_included_id(real_manifest, fracatlas):
    folder = published_dir_of(fracatlas)
    lists = {name: pd.read_csv(folder / file)["image_id"].tolist() for name, file in PUBLISHED_FILES.items()}
    # IMG0003298 (published test) is excluded, as validate.on_label_conflict: exclude would do.
    manifest = real_manifest.assign(included=real_manifest["image_id"] != "IMG0003298.jpg")
    splits = split_manifest(manifest, PUBLISHED, folder)
    assert_partition(manifest, splits)
    assert_groups_whole(manifest, splits)
    where = split_of(splits)
    for name, ids in lists.items():
        assert all(where[i] == name for i in ids if i != "IMG0003298.jpg"), name
    report = splits.report
    assert report.listed_left_out == ("IMG0003298.jpg",)
    assert report.moved.empty and report.unlisted_fractured == ()
    assert report.published == {name: len(ids) - (name == "test") for name, ids in lists.items()}


def test_the_report_names_the_largest_group_and_warns_when_a_split_cannot_hold_it(caplog):
    small = split_manifest(manifest_from([(int(g % 4 == 0), 1) for g in range(97)] + [(0, 3)]), PARAMS)
    assert small.report.largest_group == {"first_id": "IMG00097_0.jpg", "images": 3, "of": 100, "above_share": False}
    assert not any(line.startswith("WARNING") for line in small.report.summary())
    # One patient_id (an anonymiser's placeholder) on 20 of 100 images: more than val's or test's 15.
    manifest = manifest_from([(int(g % 4 == 0), 1) for g in range(100)])
    manifest["patient_id"] = pd.array(["ANON" if n < 20 else pd.NA for n in range(100)], dtype="string")
    with caplog.at_level("WARNING", logger="fracture.split"):
        big = split_manifest(manifest, PARAMS)
    assert big.report.largest_group == {"first_id": "IMG00000_0.jpg", "images": 20, "of": 100, "above_share": True}
    assert "WARNING: the largest group of linked images" in "\n".join(big.report.summary())
    assert "patient_id" in caplog.text and "20 of 100 images" in caplog.text
    assert json.loads(json.dumps(big.report.to_dict()))["largest_group"]["images"] == 20
    # Kept whole in one split all the same.
    assert sum(split_of(big)[f"IMG{g:05d}_0.jpg"] == split_of(big)["IMG00000_0.jpg"] for g in range(20)) == 20


@pytest.mark.parametrize("by_part", [False, True])
def test_a_split_that_fails_for_a_group_too_large_names_the_group_and_its_links(by_part):
    """One patient_id (an anonymiser's placeholder) on every image, or on most of them: the split
    failed with scikit-learn's message, or 'add images or raise split sizes', which cannot help."""
    params = SplitParams(seed=7, val_size=0.15, test_size=0.15, stratify_body_part=by_part)
    manifest = manifest_from([(int(g % 4 == 0), 1) for g in range(40)])
    for linked in (40, 30):
        manifest["patient_id"] = pd.array(["ANON"] * linked + [pd.NA] * (40 - linked), dtype="string")
        with pytest.raises(SplitError) as err:
            split_manifest(manifest, params)
        message = str(err.value)
        assert f"{linked} of the 40 included images are linked into one group (first id IMG00000_0.jpg)" in message
        assert "patient_id" in message and "near_duplicate_threshold" in message
        assert "add images" not in message and "raise split.val_size" not in message


# --- split.keep: a grown export keeps each recorded image where it was -------------------------


def recorded(tmp_path: Path, splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The splits as the split stage records them after drawing, read back for the next draw."""
    path = tmp_path / ASSIGNMENTS_FILE
    keep_assignments(path, splits)
    return read_assignments(path)


def test_a_grown_export_keeps_every_recorded_image_and_draws_the_new_ones(tmp_path):
    grown = manifest_from([(1 if g % 5 == 0 else 0, 1 + (g % 7 == 0) if g < 200 else 1) for g in range(280)])
    is_new = grown["image_id"].str[3:8].astype(int) >= 200
    first, new = grown[~is_new], grown[is_new]
    before = split_of(split_manifest(first, PARAMS))

    # Drawn afresh, growth moves earlier images between splits: a later model trains on images an
    # earlier one was tested on.
    afresh = split_of(split_manifest(grown, PARAMS))
    assert any(afresh[i] != where for i, where in before.items())

    splits = split_manifest(grown, PARAMS, None, recorded(tmp_path, split_manifest(first, PARAMS)))
    after = split_of(splits)
    assert_partition(grown, splits)
    assert {i: after[i] for i in before} == before
    # The 80 new images fill val and test up to their shares of all 280 groups, in each class.
    distinct = grown.drop_duplicates("sha256")
    for label in (0, 1):
        ids = distinct.loc[distinct["label"] == label, "image_id"]
        counts = pd.Series([after[i] for i in ids]).value_counts()
        assert abs(counts["test"] - 0.15 * len(ids)) <= 1.5 and abs(counts["val"] - 0.15 * len(ids)) <= 1.5
    assert pd.Series([after[i] for i in new["image_id"]]).value_counts()["train"] >= 50
    assert splits.report.kept == {name: int((pd.Series(before) == name).sum()) for name in SPLITS}
    assert splits.report.kept_absent == 0 and splits.report.kept_moved.empty
    assert splits.report.to_dict()["kept"] == splits.report.kept
    assert any(line.startswith(f"kept where {ASSIGNMENTS_FILE} records them: {len(before)} images")
               for line in splits.report.summary())


def test_an_empty_record_draws_as_before(tmp_path):
    manifest = manifest_from([(1 if g % 5 == 0 else 0, 1) for g in range(120)])
    empty = read_assignments(tmp_path / ASSIGNMENTS_FILE)  # no file: nothing recorded
    assert empty.empty
    assert split_of(split_manifest(manifest, PARAMS, None, empty)) == split_of(split_manifest(manifest, PARAMS))


@pytest.mark.parametrize("first_sorted", ["train", "test"])
def test_a_new_link_between_recorded_splits_sends_the_group_to_test_and_says_so(tmp_path, first_sorted):
    """No later model may train on an image an earlier one was tested on, whichever id sorts first."""
    first = manifest_from([(1 if g % 5 == 0 else 0, 1) for g in range(100)])
    where = split_of(split_manifest(first, PARAMS))
    ids = {name: sorted(i for i, s in where.items() if s == name) for name in ("train", "test")}
    # The train image's id sorts before the test image's, or after it.
    in_train, in_test = (ids["train"][0], ids["test"][-1]) if first_sorted == "train" else (ids["train"][-1], ids["test"][0])
    assert (in_train < in_test) == (first_sorted == "train")
    # The new export names one patient on the two: they must now share a split.
    grown = first.assign(patient_id=pd.array(
        ["P1" if i in (in_test, in_train) else pd.NA for i in first["image_id"]], dtype="string"))
    splits = split_manifest(grown, PARAMS, None, recorded(tmp_path, split_manifest(first, PARAMS)))
    after = split_of(splits)
    assert after[in_test] == after[in_train] == "test"
    assert splits.report.kept_moved.to_dict(orient="records") == [
        {"image_id": in_train, "recorded": "train", "assigned": "test"}
    ]
    assert f"moved to keep its group together: {in_train} ({ASSIGNMENTS_FILE}: train) -> test" in "\n".join(
        splits.report.summary())


def test_images_added_a_few_at_a_time_take_the_shares_and_mostly_go_to_train(tmp_path):
    """Each ingest's few new images go where the shares are short, not one to val and test each."""
    every = manifest_from([(1 if g % 5 == 0 else 0, 1) for g in range(400)])
    path = tmp_path / ASSIGNMENTS_FILE
    keep_assignments(path, split_manifest(every.iloc[:200], PARAMS))
    for end in range(202, 401, 2):  # 100 ingests of two images each
        keep_assignments(path, split_manifest(every.iloc[:end], PARAMS, None, read_assignments(path)))
    where = read_assignments(path).set_index("image_id")["split"]
    added = where.loc[every["image_id"].iloc[200:]]
    labels = every.set_index("image_id")["label"].loc[added.index]
    # Of the 200 added (40 fractured), val and test take 15% of each class, as the first 200's split did.
    for label, total in ((1, 40), (0, 160)):
        counts = added[labels == label].value_counts()
        assert abs(counts.get("test", 0) - 0.15 * total) <= 1 and abs(counts.get("val", 0) - 0.15 * total) <= 1
    # and one new image goes to train when train is short of its share.
    (tmp_path / "one").mkdir()
    one = split_manifest(every.iloc[:201], PARAMS, None, recorded(tmp_path / "one", split_manifest(every.iloc[:200], PARAMS)))
    assert split_of(one)[every["image_id"].iloc[200]] == "train"


def test_a_recorded_image_under_a_new_name_keeps_its_split_and_a_removed_one_is_counted(tmp_path):
    first = manifest_from([(1 if g % 5 == 0 else 0, 1) for g in range(100)])
    where = split_of(split_manifest(first, PARAMS))
    tested = sorted(i for i, s in where.items() if s == "test")
    renamed = first.copy()
    renamed.loc[renamed["image_id"] == tested[0], "image_id"] = "ZZZ_renamed.jpg"  # same content, new id
    renamed = renamed[renamed["image_id"] != tested[1]]  # gone from the export
    splits = split_manifest(renamed, PARAMS, None, recorded(tmp_path, split_manifest(first, PARAMS)))
    assert split_of(splits)["ZZZ_renamed.jpg"] == "test"
    assert splits.report.kept_absent == 2  # the old name and the removed image
    assert f"{ASSIGNMENTS_FILE} names 2 ids that are not among the included images" in splits.report.summary()


def test_a_content_recorded_in_two_splits_is_placed_by_its_row_nearest_test(tmp_path):
    """A trained-on film renamed, and linked by a patient id to a test image, moves to test; the
    file then holds its content twice (the old name in train, the new one in test). Exported once
    more under a third name, without the link, it went back to train: the content was looked up in
    its first row by id. A film a model was tested on never trains a later one."""
    path = tmp_path / ASSIGNMENTS_FILE
    first = manifest_from([(1 if g % 5 == 0 else 0, 1) for g in range(100)])
    drawn = split_manifest(first, PARAMS)
    keep_assignments(path, drawn)
    where = split_of(drawn)
    trained = min(i for i, s in where.items() if s == "train")
    tested = min(i for i, s in where.items() if s == "test")
    film = first.loc[first["image_id"] == trained, "sha256"].item()

    second = first.copy()
    second.loc[second["image_id"] == trained, "image_id"] = "NEWNAME.jpg"
    second["patient_id"] = pd.array(
        ["P1" if i in ("NEWNAME.jpg", tested) else pd.NA for i in second["image_id"]], dtype="string")
    drawn = split_manifest(second, PARAMS, None, read_assignments(path))
    assert split_of(drawn)["NEWNAME.jpg"] == "test"
    keep_assignments(path, drawn, read_assignments(path))
    rows = read_assignments(path).set_index("image_id")
    assert rows.loc[rows["sha256"] == film, "split"].to_dict() == {trained: "train", "NEWNAME.jpg": "test"}

    third = first.copy()
    third.loc[third["image_id"] == trained, "image_id"] = "ZZ_third_name.jpg"
    assert split_of(split_manifest(third, PARAMS, None, read_assignments(path)))["ZZ_third_name.jpg"] == "test"


def test_a_test_image_exported_again_with_other_bytes_is_found_by_them_when_renamed(tmp_path):
    """The record kept an image's first sha256 when its file was exported again with other bytes
    under the same id, so once renamed the file was not found by content and drawn afresh (into
    train in 16 of 20 draws): a film a model was tested on trained a later one."""
    path = tmp_path / ASSIGNMENTS_FILE
    first = manifest_from([(1 if g % 5 == 0 else 0, 1) for g in range(100)])
    drawn = split_manifest(first, PARAMS)
    keep_assignments(path, drawn)
    tested = min(i for i, s in split_of(drawn).items() if s == "test")
    second = first.copy()
    second.loc[second["image_id"] == tested, "sha256"] = "h-exported-again"
    drawn = split_manifest(second, PARAMS, None, read_assignments(path))
    assert split_of(drawn)[tested] == "test"
    keep_assignments(path, drawn, read_assignments(path))
    rows = read_assignments(path).set_index("image_id")
    assert rows.loc[tested, ["sha256", "split"]].tolist() == ["h-exported-again", "test"]
    more = manifest_from([(1 if g % 5 == 0 else 0, 1) for g in range(200)]).iloc[100:]  # 100 new films join
    third = pd.concat([second, more], ignore_index=True)
    third.loc[third["image_id"] == tested, "image_id"] = "RENAMED.jpg"
    for seed in range(10):
        params = dataclasses.replace(PARAMS, seed=seed)
        assert split_of(split_manifest(third, params, None, read_assignments(path)))["RENAMED.jpg"] == "test", seed


def test_recording_adds_new_images_moves_changed_ones_and_keeps_the_absent(tmp_path):
    path = tmp_path / ASSIGNMENTS_FILE
    table = lambda *ids: pd.DataFrame({"image_id": list(ids), "sha256": [f"h{i}" for i in ids], "label": 0},  # noqa: E731
                                      dtype=object)
    assert keep_assignments(path, {"train": table("a", "b"), "val": table("c"), "test": table("d")}) == (4, 0, 4)
    # The next split put "a" in test (a new link to a test image), added "e", and left "c" out.
    assert keep_assignments(path, {"train": table("b", "e"), "val": table(), "test": table("a", "d")}) == (1, 1, 5)
    assert path.read_text() == "image_id,sha256,split\na,ha,test\nb,hb,train\nc,hc,val\nd,hd,test\ne,he,train\n"
    assert keep_assignments(path, {"train": table("b", "e"), "val": table("c"), "test": table("a", "d")}) == (0, 0, 5)


def test_a_test_image_moved_by_a_new_link_never_returns_to_train_when_the_link_goes(tmp_path):
    first = manifest_from([(1 if g % 5 == 0 else 0, 1) for g in range(100)])
    path = tmp_path / ASSIGNMENTS_FILE
    keep_assignments(path, split_manifest(first, PARAMS))
    where = split_of(split_manifest(first, PARAMS))
    in_train, in_test = min(i for i, s in where.items() if s == "train"), min(i for i, s in where.items() if s == "test")
    linked = first.assign(patient_id=pd.array(
        ["P1" if i in (in_test, in_train) else pd.NA for i in first["image_id"]], dtype="string"))
    second = split_manifest(linked, PARAMS, None, read_assignments(path))
    assert split_of(second)[in_train] == "test"
    assert keep_assignments(path, second) == (0, 1, 100)  # as the split stage records it
    third = split_manifest(first, PARAMS, None, read_assignments(path))  # the patient id corrected
    assert split_of(third)[in_train] == "test"


def test_published_lists_and_kept_images_give_new_images_the_shares_of_a_first_split(tmp_path):
    """The groups the lists name are not counted in the shares new images fill, as in a first split."""
    groups = [(1, 1)] * 60 + [(0, 1)] * 200 + [(1, 1)] * 20 + [(0, 1)] * 20
    every = manifest_from(groups)
    first = every.iloc[:260]
    fractured = first.loc[first["label"] == 1, "image_id"].tolist()
    # Most fractured images listed in train, few in test, as FracAtlas's lists do.
    lists = write_lists(tmp_path / "lists", {"train": fractured[:50], "val": fractured[50:55], "test": fractured[55:60]})
    params = SplitParams(seed=7, val_size=0.15, test_size=0.15, strategy="published")
    record = recorded(tmp_path, split_manifest(first, params, lists))
    after = split_of(split_manifest(every, params, lists, record))
    added = pd.Series([after[i] for i in every["image_id"].iloc[260:280]]).value_counts()  # 20 new fractured
    assert added.get("train", 0) >= 12 and added.get("test", 0) <= 5


def test_a_record_with_trailing_commas_or_no_bytes_is_read_as_written(tmp_path):
    path = tmp_path / ASSIGNMENTS_FILE
    path.write_text("image_id,sha256,split\na,ha,train,\nb,hb,test,\n")  # a spreadsheet's trailing commas
    assert read_assignments(path).to_dict(orient="records") == [
        {"image_id": "a", "sha256": "ha", "split": "train"}, {"image_id": "b", "sha256": "hb", "split": "test"}
    ]
    path.write_text("")  # a first write that never finished
    assert read_assignments(path).empty
    path.write_text("image_id,sha256,split\n\na,ha,train\n\nb,hb,holdout\n")  # blank lines
    with pytest.raises(SplitError, match=r"line 5 \('b': 'holdout'\)"):
        read_assignments(path)


def test_a_class_missing_from_test_says_how_to_draw_afresh_when_images_are_kept(tmp_path):
    first = manifest_from([(1 if g % 5 == 0 else 0, 1) for g in range(60)])
    where = split_of(split_manifest(first, PARAMS))
    # The fractured test images are relabelled: test keeps them, and holds no fractured image.
    relabelled = first.assign(label=[0 if where[i] == "test" else label for i, label in zip(first["image_id"], first["label"])])
    with pytest.raises(SplitError, match=r"the test split holds 0 fractured") as caught:
        split_manifest(relabelled, PARAMS, None, recorded(tmp_path, split_manifest(first, PARAMS)))
    assert f"{ASSIGNMENTS_FILE} records keep their split" in str(caught.value)
    assert "empty it to its header line (or set split.keep: false)" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image_id,sha256,split\na,ha,train\nb,hb,holdout\n", r"line 3 \('b': 'holdout'\)"),
        ("image_id,sha256\na,ha\n", r"no 'split' column"),
        ("image_id,sha256,split\na,ha,train\na,hb,test\n", r"ids named twice: a"),
    ],
    ids=["unknown split", "no split column", "id twice"],
)
def test_a_damaged_record_is_refused_naming_the_file_and_the_fix(tmp_path, text, message):
    path = tmp_path / ASSIGNMENTS_FILE
    path.write_text(text)
    with pytest.raises(SplitError, match=message) as caught:
        read_assignments(path)
    assert str(path) in str(caught.value) and "split.keep: false" in str(caught.value)


def test_the_split_stage_records_its_draw_and_draws_the_same_tables_from_that_record(tmp_path):
    """DVC hashes the record after the stage's command ran: run again on it, the stage must write
    the same tables and leave the record as it is, or dvc.lock would not describe the split."""
    import dataclasses

    from fracture.config import load_params
    from fracture.stages.split import run_split
    from fracture.workspace import Workspace
    from tests.conftest import REPO

    params, workspace = load_params(REPO), Workspace(tmp_path)
    manifest = manifest_from([(1 if g % 5 == 0 else 0, 1 + (g % 9 == 0)) for g in range(80)])
    workspace.manifest.parent.mkdir(parents=True)
    manifest.to_csv(workspace.manifest, index=False)
    workspace.split_assignments.write_text("image_id,sha256,split\n")  # as a new project ships it
    _, first = run_split(params, workspace)
    assert first.recorded == (len(manifest), 0, len(manifest))
    record = workspace.split_assignments.read_bytes()
    tables = {name: workspace.split_table(name).read_bytes() for name in SPLITS}
    _, again = run_split(params, workspace)
    assert again.recorded == (0, 0, len(manifest)) and workspace.split_assignments.read_bytes() == record
    assert {name: workspace.split_table(name).read_bytes() for name in SPLITS} == tables
    assert split_of(again) == split_of(first) == split_of(split_manifest(manifest, params.split))
    assert "seeded draw: none, split_assignments.csv placed every image" in again.report.summary()
    assert first.report.summary()[0].startswith("seeded draw over 80 distinct images")  # the 80 groups
    # split.keep: false neither reads nor writes the record.
    off = dataclasses.replace(params, split=dataclasses.replace(params.split, keep=False, seed=params.split.seed + 1))
    _, fresh = run_split(off, workspace)
    assert fresh.recorded is None and workspace.split_assignments.read_bytes() == record
    assert split_of(fresh) != split_of(first)
