"""The split: stratified, seeded, and duplicate groups never cross splits."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fracture.config import SplitParams
from fracture.split import SPLITS, SplitError, split_manifest

PARAMS = SplitParams(seed=7, val_size=0.15, test_size=0.15)


def manifest_from(groups: list[tuple[int, int]]) -> pd.DataFrame:
    """One row per image: ``groups`` holds (label, copies) per distinct content."""
    rows = []
    for g, (label, copies) in enumerate(groups):
        for c in range(copies):
            rows.append({"image_id": f"IMG{g:05d}_{c}.jpg", "sha256": f"h{g}", "label": label, "included": True})
    return pd.DataFrame(rows)


group_lists = st.lists(
    st.tuples(st.sampled_from([0, 0, 0, 0, 1]), st.integers(1, 3)), min_size=60, max_size=200
).filter(lambda gs: sum(1 for label, _ in gs if label == 1) >= 8 and sum(1 for label, _ in gs if label == 0) >= 8)


@settings(max_examples=40, deadline=None)
@given(groups=group_lists, seed=st.integers(0, 10_000))
def test_every_id_in_exactly_one_split_and_no_hash_crosses(groups, seed):
    manifest = manifest_from(groups)
    splits = split_manifest(manifest, SplitParams(seed=seed, val_size=0.15, test_size=0.15))
    ids = pd.concat([splits[s]["image_id"] for s in SPLITS])
    assert sorted(ids) == sorted(manifest["image_id"])
    hashes = [set(splits[s]["sha256"]) for s in SPLITS]
    assert not (hashes[0] & hashes[1]) and not (hashes[0] & hashes[2]) and not (hashes[1] & hashes[2])


@settings(max_examples=40, deadline=None)
@given(groups=group_lists, seed=st.integers(0, 10_000))
def test_class_ratio_of_distinct_images_within_one_of_target(groups, seed):
    manifest = manifest_from(groups)
    splits = split_manifest(manifest, SplitParams(seed=seed, val_size=0.15, test_size=0.15))
    distinct = manifest.drop_duplicates("sha256")
    share = distinct["label"].mean()
    for name in SPLITS:
        d = splits[name].drop_duplicates("sha256")
        # Stratification: the count of fractured groups is within one of the target share.
        assert abs(d["label"].sum() - share * len(d)) <= 1 + 1e-9


def test_same_seed_same_split_and_excluded_rows_left_out():
    manifest = manifest_from([(i % 5 == 0, 1 + i % 2) for i in range(100)])
    manifest.loc[3, "included"] = False
    a = split_manifest(manifest, PARAMS)
    b = split_manifest(manifest, PARAMS)
    for name in SPLITS:
        pd.testing.assert_frame_equal(a[name], b[name])
    assert manifest.loc[3, "image_id"] not in set(pd.concat([a[s]["image_id"] for s in SPLITS]))


def test_identical_files_with_different_labels_are_refused():
    manifest = manifest_from([(0, 1)] * 40 + [(1, 1)] * 10)
    manifest.loc[len(manifest)] = {"image_id": "IMGdup.jpg", "sha256": "h0", "label": 1, "included": True}
    with pytest.raises(SplitError, match="IMGdup.jpg"):
        split_manifest(manifest, PARAMS)


def test_real_duplicate_groups_stay_together(fracatlas):
    from fracture.manifest import build_manifest

    manifest = build_manifest(fracatlas).assign(label=lambda f: f["folder_label"], included=True)
    splits = split_manifest(manifest, PARAMS)
    where = {h: name for name in SPLITS for h in splits[name]["sha256"]}
    for h, group in manifest.groupby("sha256"):
        assert group["sha256"].map(where).nunique() == 1
