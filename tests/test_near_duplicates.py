"""Near-duplicate X-rays: found by thumbnail correlation, reported, and kept in one split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from PIL import Image

from fracture.config import SplitParams, load_params
from fracture.manifest import build_manifest
from fracture.near_duplicates import (
    MIN_ROWS,
    group_ids,
    near_duplicate_pairs,
    thumbnail,
    thumbnail_rows,
)
from fracture.split import SPLITS, split_manifest
from fracture.validation import validate
from tests.conftest import REPO
from tests.synthetic import make_dataset
from tests.test_split import manifest_from, split_of


def smooth_xray(path, seed: int, size: tuple[int, int] = (240, 288), brightest: int = 255) -> None:
    """A picture with structure at every scale (noise upsampled), as an X-ray has; plain noise has
    none. Grey levels up to ``brightest``: a low one makes it dark, as most of an X-ray is."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, brightest, (9, 8), dtype=np.uint8), mode="L")
    coarse.resize(size, Image.Resampling.BICUBIC).save(path, quality=95)


def reencode(src, dest, quality: int = 40, scale: float = 0.75) -> None:
    """Another encoding of the same picture: smaller, at a lower JPEG quality."""
    with Image.open(src) as img:
        small = img.convert("L").resize((round(img.width * scale), round(img.height * scale)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    small.save(dest, quality=quality)


def add_copy(root, src_id: str, src_folder: str, new_id: str, new_folder: str) -> None:
    reencode(root / "images" / src_folder / src_id, root / "images" / new_folder / new_id)
    csv = pd.read_csv(root / "dataset.csv")
    row = csv[csv["image_id"] == src_id].iloc[0].copy()
    row["image_id"] = new_id
    row["fractured"] = row["fracture_count"] = int(new_folder == "Fractured")
    pd.concat([csv, row.to_frame().T]).to_csv(root / "dataset.csv", index=False)


def _standardised(v: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / v.std()


def test_pairs_found_block_by_block_are_every_pair_a_whole_matrix_finds():
    """The correlations are computed a block of images at a time, so memory never grows with the
    square of the dataset. Any block size finds exactly the pairs, and the correlations, of
    comparing every pair at once, truncated images (compared on the rows both decoded) included."""
    rng = np.random.default_rng(3)
    side, n = 32, 40
    bases = rng.normal(size=(5, side * side))
    vectors = np.stack([_standardised(bases[k % 5] + rng.uniform(0.2, 1.5) * rng.normal(size=side * side))
                        for k in range(n)]).astype(np.float32)
    rows = np.full(n, side)
    rows[[3, 8, 13, 17, 30]] = [20, 12, 12, 4, 31]  # two with equal counts, one under MIN_ROWS
    ids = [f"IMG{k:07d}" for k in range(n)]
    expected = {}
    for a in range(n):
        for b in range(a + 1, n):
            m = min(rows[a], rows[b])
            if m < MIN_ROWS:
                continue
            u, v = (_standardised(vectors[k, : m * side].astype(float)) for k in (a, b))
            r = float(u @ v) / u.size
            if r > 0.4:
                expected[ids[a], ids[b]] = r
    assert len(expected) > 50 and ("IMG0000008", "IMG0000013") in expected
    # The top-half comparison (here at a lower threshold, so that it finds pairs of its own): pairs
    # both of whose images decoded their top 16 rows, on those rows; each pair kept once, as found
    # first: the whole thumbnails' (or the decoded rows') finding stands.
    top_expected = {}
    for a in range(n):
        for b in range(a + 1, n):
            if min(rows[a], rows[b]) < side // 2 or (ids[a], ids[b]) in expected:
                continue
            u, v = (_standardised(vectors[k, : side // 2 * side].astype(float)) for k in (a, b))
            r = float(u @ v) / u.size
            if r > 0.3:
                top_expected[ids[a], ids[b]] = r
    assert len(top_expected) >= 3
    for block in (1, 7, 2048):
        pairs = near_duplicate_pairs(vectors, ids, 0.4, rows, block=block)
        found = {(a, b): r for a, b, r, _ in pairs.itertuples(index=False)}
        assert found.keys() == expected.keys(), block
        assert max(abs(found[p] - expected[p]) for p in expected) < 1e-4
        assert pairs["correlation"].is_monotonic_decreasing
        with_top = near_duplicate_pairs(vectors, ids, 0.4, rows, block=block, top_threshold=0.3)
        on = {(a, b): (r, how) for a, b, r, how in with_top.itertuples(index=False)}
        assert on.keys() == expected.keys() | top_expected.keys(), block
        assert all(on[p][1] != "top half" and abs(on[p][0] - expected[p]) < 1e-4 for p in expected)
        assert all(on[p][1] == "top half" and abs(on[p][0] - top_expected[p]) < 1e-4 for p in top_expected)


def test_a_reencoded_copy_correlates_and_a_different_image_does_not(tmp_path):
    make_dataset(tmp_path, 2, 2)
    src, different = tmp_path / "images/Fractured/IMG0000000.jpg", tmp_path / "images/Fractured/IMG0000001.jpg"
    smooth_xray(src, 0)
    smooth_xray(different, 1)
    reencode(src, tmp_path / "copy.jpg")
    a, b, other = (thumbnail(p) for p in (src, tmp_path / "copy.jpg", different))
    assert a.shape == (1024,) and abs(float(a.mean())) < 1e-5 and abs(float(a.std()) - 1) < 1e-3
    assert float(a @ b) / a.size > 0.97 > float(a @ other) / a.size
    pairs = near_duplicate_pairs(np.stack([a, b, other]), ["x", "y", "z"], 0.97)
    assert pairs[["image_id_a", "image_id_b"]].values.tolist() == [["x", "y"]]
    assert group_ids(["x", "y", "z"], pairs).to_dict() == {"x": "x", "y": "x", "z": "z"}


def test_near_duplicates_are_grouped_and_conflicting_labels_excluded(tmp_path):
    make_dataset(tmp_path, 6, 14)
    for i, folder in enumerate(["Fractured"] * 6 + ["Non_fractured"] * 14):
        smooth_xray(tmp_path / "images" / folder / f"IMG{i:07d}.jpg", i)
    add_copy(tmp_path, "IMG0000010.jpg", "Non_fractured", "IMG0000030.jpg", "Non_fractured")  # same label
    add_copy(tmp_path, "IMG0000002.jpg", "Fractured", "IMG0000031.jpg", "Non_fractured")  # opposite label
    params = load_params(REPO).validate
    manifest = build_manifest(tmp_path, workers=1, near_duplicate_threshold=params.near_duplicate_threshold)
    group = manifest.set_index("image_id")["near_duplicate_group"]
    assert group["IMG0000030.jpg"] == group["IMG0000010.jpg"] == "IMG0000010.jpg"
    assert group["IMG0000031.jpg"] == group["IMG0000002.jpg"]
    assert (manifest["near_duplicate_group"] == manifest["image_id"]).sum() == len(manifest) - 2

    resolved, report = validate(manifest, params)
    assert report.finding("near_duplicate_labels_agree").unexpected_ids == ["IMG0000002.jpg", "IMG0000031.jpg"]
    assert report.near_duplicate_groups == [["IMG0000002.jpg", "IMG0000031.jpg"], ["IMG0000010.jpg", "IMG0000030.jpg"]]
    assert report.counts["near_duplicates"] == {
        "groups": 2, "images_in_groups": 4, "label_conflict_groups": 1, "not_compared": [], "matched_on_top_half": [],
    }
    assert sorted(report.excluded) == ["IMG0000002.jpg", "IMG0000031.jpg"]
    assert "near-duplicate" in report.excluded["IMG0000031.jpg"].reason


def truncated_copy(src, dest, keep: float) -> None:
    """The same JPEG cut short (no end-of-image marker): decoded, its missing part is flat grey,
    as FracAtlas's truncated files are."""
    data = src.read_bytes()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_copy_is_compared_on_the_rows_it_decoded(tmp_path):
    make_dataset(tmp_path, 4, 6)
    for i, folder in enumerate(["Fractured"] * 4 + ["Non_fractured"] * 6):
        smooth_xray(tmp_path / "images" / folder / f"IMG{i:07d}.jpg", i, size=(240, 480))
    # A fractured X-ray stored again, cut short, in the other class folder (as IMG0004278 holds
    # the top of IMG0003001); and another X-ray cut short, with no copy.
    truncated_copy(tmp_path / "images/Fractured/IMG0000001.jpg", tmp_path / "images/Non_fractured/IMG0000020.jpg", 0.6)
    truncated_copy(tmp_path / "images/Non_fractured/IMG0000008.jpg", tmp_path / "images/Non_fractured/IMG0000008.jpg", 0.6)
    # A copy cut so short that too little of it decodes to compare it with anything.
    truncated_copy(tmp_path / "images/Fractured/IMG0000002.jpg", tmp_path / "images/Non_fractured/IMG0000021.jpg", 0.08)
    csv = pd.read_csv(tmp_path / "dataset.csv")
    rows = [csv[csv["image_id"] == "IMG0000005.jpg"].iloc[0].copy() for _ in range(2)]
    rows[0]["image_id"], rows[1]["image_id"] = "IMG0000020.jpg", "IMG0000021.jpg"
    pd.concat([csv, pd.DataFrame(rows)]).to_csv(tmp_path / "dataset.csv", index=False)

    copy, rows = thumbnail_rows(tmp_path / "images/Non_fractured/IMG0000020.jpg", truncated=True)
    original = thumbnail(tmp_path / "images/Fractured/IMG0000001.jpg")
    assert 8 <= rows < 32
    assert float(copy @ original) / copy.size < 0.9  # whole thumbnails: the grey band hides the copy
    params = load_params(REPO).validate
    manifest = build_manifest(tmp_path, workers=1, near_duplicate_threshold=params.near_duplicate_threshold)
    by_id = manifest.set_index("image_id")
    assert by_id.loc[["IMG0000020.jpg", "IMG0000008.jpg"], "truncated"].all()
    group = by_id["near_duplicate_group"]
    assert group["IMG0000020.jpg"] == group["IMG0000001.jpg"] == "IMG0000001.jpg"
    assert by_id.loc[["IMG0000001.jpg", "IMG0000020.jpg"], "near_duplicate_conflict"].all()
    assert (group == group.index).sum() == len(group) - 1  # the cut-short X-ray without a copy stays alone
    assert thumbnail_rows(tmp_path / "images/Non_fractured/IMG0000021.jpg", truncated=True)[1] < MIN_ROWS
    assert bool(by_id.loc["IMG0000021.jpg", "decodable"]) and group["IMG0000021.jpg"] == "IMG0000021.jpg"
    assert not by_id.loc["IMG0000021.jpg", "near_duplicate_compared"]
    assert by_id.drop(index="IMG0000021.jpg")["near_duplicate_compared"].all()
    _, report = validate(manifest, params)
    assert sorted(report.finding("near_duplicate_labels_agree").unexpected_ids) == ["IMG0000001.jpg", "IMG0000020.jpg"]
    # The copy that could not be compared is trained on under on_truncated: keep, and the report names it.
    assert report.counts["near_duplicates"]["not_compared"] == ["IMG0000021.jpg"]


def corrupt_below(src, dest, keep: float, seed: int = 0) -> None:
    """The same picture re-saved with its lower part replaced by 8 x 8 blocks of grey levels, as
    FracAtlas's corrupt copies decode (IMG0004187 below IMG0002834's top): a whole JPEG, so
    nothing marks it truncated."""
    with Image.open(src) as img:
        pixels = np.asarray(img.convert("L")).copy()
    top = int(len(pixels) * keep)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(90, 170, ((len(pixels) - top + 7) // 8, (pixels.shape[1] + 7) // 8), dtype=np.uint8)
    pixels[top:] = np.kron(blocks, np.ones((8, 8), dtype=np.uint8))[: len(pixels) - top, : pixels.shape[1]]
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(dest, quality=90)


def test_a_copy_corrupt_below_matches_its_original_on_the_top_half(tmp_path):
    make_dataset(tmp_path, 4, 6)
    for i, folder in enumerate(["Fractured"] * 4 + ["Non_fractured"] * 6):
        smooth_xray(tmp_path / "images" / folder / f"IMG{i:07d}.jpg", i, size=(240, 480))
    corrupt_below(tmp_path / "images/Fractured/IMG0000001.jpg", tmp_path / "images/Fractured/IMG0000020.jpg", 0.6)
    csv = pd.read_csv(tmp_path / "dataset.csv")
    row = csv[csv["image_id"] == "IMG0000001.jpg"].iloc[0].copy()
    row["image_id"] = "IMG0000020.jpg"
    pd.concat([csv, row.to_frame().T]).to_csv(tmp_path / "dataset.csv", index=False)
    copy, original = (thumbnail(tmp_path / f"images/Fractured/IMG00000{n}.jpg") for n in ("20", "01"))
    params = load_params(REPO).validate
    assert params.near_duplicate_top_threshold is not None
    assert float(copy @ original) / copy.size < params.near_duplicate_threshold  # the whole thumbnails miss it

    found = near_duplicate_pairs(np.stack([original, copy]), ["a", "b"], params.near_duplicate_threshold,
                                 top_threshold=params.near_duplicate_top_threshold)
    assert found[["image_id_a", "image_id_b", "compared_on"]].values.tolist() == [["a", "b", "top half"]]
    assert found["correlation"].iloc[0] > params.near_duplicate_top_threshold

    manifest = build_manifest(tmp_path, workers=1, near_duplicate_threshold=params.near_duplicate_threshold,
                              near_duplicate_top_threshold=params.near_duplicate_top_threshold)
    by_id = manifest.set_index("image_id")
    assert not by_id.loc["IMG0000020.jpg", "truncated"]
    assert by_id.loc["IMG0000020.jpg", "near_duplicate_group"] == "IMG0000001.jpg"
    assert sorted(by_id.index[by_id["near_duplicate_top_half"]]) == ["IMG0000001.jpg", "IMG0000020.jpg"]
    _, report = validate(manifest, params)
    assert report.near_duplicate_groups == [["IMG0000001.jpg", "IMG0000020.jpg"]]
    assert report.counts["near_duplicates"]["matched_on_top_half"] == ["IMG0000001.jpg", "IMG0000020.jpg"]
    # Without the top-half comparison the copy is a group of its own, and could land in another split.
    alone = build_manifest(tmp_path, workers=1, near_duplicate_threshold=params.near_duplicate_threshold)
    assert (alone["near_duplicate_group"] == alone["image_id"]).all()


def test_two_truncated_x_rays_do_not_match_by_their_grey_bands(tmp_path):
    """Two different dark X-rays cut short are mostly dark above and flat grey below: whole
    thumbnails would call them one radiograph. Compared on what they decoded, they are not."""
    for i in (0, 1):
        smooth_xray(tmp_path / f"full{i}.jpg", i, size=(240, 480), brightest=40)
        truncated_copy(tmp_path / f"full{i}.jpg", tmp_path / f"cut{i}.jpg", 0.5)
    (a, rows_a), (b, rows_b) = (thumbnail_rows(tmp_path / f"cut{i}.jpg", truncated=True) for i in (0, 1))
    assert float(a @ b) / a.size > 0.97
    assert near_duplicate_pairs(np.stack([a, b]), ["a", "b"], 0.97).shape[0] == 1
    assert near_duplicate_pairs(np.stack([a, b]), ["a", "b"], 0.97, np.array([rows_a, rows_b])).empty


def test_a_groups_labels_are_compared_as_the_label_policy_resolves_them(tmp_path):
    """Both copies in the Fractured folder, dataset.csv saying 1 and 0: under on_label_conflict:
    csv they would train as 1 and 0, so the group conflicts and is excluded; under folder, not."""
    make_dataset(tmp_path, 6, 14)
    for i, folder in enumerate(["Fractured"] * 6 + ["Non_fractured"] * 14):
        smooth_xray(tmp_path / "images" / folder / f"IMG{i:07d}.jpg", i)
    add_copy(tmp_path, "IMG0000002.jpg", "Fractured", "IMG0000031.jpg", "Fractured")
    csv = pd.read_csv(tmp_path / "dataset.csv")
    csv.loc[csv["image_id"] == "IMG0000031.jpg", ["fractured", "fracture_count"]] = 0
    csv.to_csv(tmp_path / "dataset.csv", index=False)
    params = load_params(REPO).validate
    manifest = build_manifest(tmp_path, workers=1, near_duplicate_threshold=params.near_duplicate_threshold)
    pair = ["IMG0000002.jpg", "IMG0000031.jpg"]
    by_csv, report = validate(manifest, dataclasses.replace(params, on_label_conflict="csv"))
    assert report.finding("near_duplicate_labels_agree").unexpected_ids == pair
    assert not by_csv.set_index("image_id").loc[pair, "included"].any()
    by_folder, report = validate(manifest, dataclasses.replace(params, on_label_conflict="folder"))
    assert report.finding("near_duplicate_labels_agree").unexpected_ids == []
    assert by_folder.set_index("image_id").loc[pair, "label"].tolist() == [1, 1]


def test_without_a_threshold_every_image_is_its_own_group(tmp_path):
    make_dataset(tmp_path, 2, 2)
    for i, folder in enumerate(["Fractured"] * 2 + ["Non_fractured"] * 2):
        smooth_xray(tmp_path / "images" / folder / f"IMG{i:07d}.jpg", i)
    add_copy(tmp_path, "IMG0000000.jpg", "Fractured", "IMG0000010.jpg", "Non_fractured")  # opposite label
    threshold = load_params(REPO).validate.near_duplicate_threshold
    searched = build_manifest(tmp_path, workers=1, near_duplicate_threshold=threshold).set_index("image_id")
    assert searched.loc["IMG0000010.jpg", "near_duplicate_group"] == "IMG0000000.jpg"  # the copy is there to find
    manifest = build_manifest(tmp_path, workers=1)
    assert (manifest["near_duplicate_group"] == manifest["image_id"]).all()
    assert not manifest["near_duplicate_conflict"].any()


def test_the_split_keeps_near_duplicate_groups_and_identical_files_together():
    manifest = manifest_from([(0, 1)] * 60 + [(1, 1)] * 20 + [(0, 2)] * 5)  # five byte-identical pairs
    manifest["near_duplicate_group"] = manifest["image_id"]
    # Chains of near-duplicates with different hashes, one reaching into an identical pair.
    chains = [["IMG00000_0.jpg", "IMG00001_0.jpg", "IMG00002_0.jpg"], ["IMG00060_0.jpg", "IMG00061_0.jpg"],
              ["IMG00003_0.jpg", "IMG00080_1.jpg"]]
    for chain in chains:
        manifest.loc[manifest["image_id"].isin(chain), "near_duplicate_group"] = chain[0]
    for seed in range(5):
        where = split_of(split_manifest(manifest, SplitParams(seed=seed, val_size=0.15, test_size=0.15)))
        for chain in chains:
            assert len({where[i] for i in chain}) == 1, (seed, chain)
        assert where["IMG00080_0.jpg"] == where["IMG00003_0.jpg"]  # its identical copy joined the chain
        assert set(where.values()) == set(SPLITS)


def test_a_repeated_id_leaves_the_other_near_duplicates_grouped_and_split_together(tmp_path):
    """One file name in both class folders, with unique_image_id soft: the search was skipped for
    every image, so a re-encoded pair elsewhere was two groups and could land in train and test."""
    make_dataset(tmp_path, 6, 14)
    for i, folder in enumerate(["Fractured"] * 6 + ["Non_fractured"] * 14):
        smooth_xray(tmp_path / "images" / folder / f"IMG{i:07d}.jpg", i)
    add_copy(tmp_path, "IMG0000010.jpg", "Non_fractured", "IMG0000030.jpg", "Non_fractured")
    smooth_xray(tmp_path / "images/Non_fractured/IMG0000001.jpg", 99)  # IMG0000001.jpg is in Fractured too
    params = load_params(REPO).validate
    params = dataclasses.replace(params, severity={**params.severity, "unique_image_id": "soft"})
    manifest = build_manifest(tmp_path, workers=1, near_duplicate_threshold=params.near_duplicate_threshold)
    group = manifest.set_index("image_id")["near_duplicate_group"]
    assert group["IMG0000030.jpg"] == group["IMG0000010.jpg"] == "IMG0000010.jpg"

    resolved, report = validate(manifest, params)
    assert report.success
    # The pair is the one group: the repeated id's two rows are one id, not a group of two.
    assert report.near_duplicate_groups == [["IMG0000010.jpg", "IMG0000030.jpg"]]
    assert {i: e.rule for i, e in report.excluded.items()} == {"IMG0000001.jpg": "unique_image_id"}
    assert "images/Fractured/IMG0000001.jpg; images/Non_fractured/IMG0000001.jpg" in report.excluded["IMG0000001.jpg"].reason
    # Nothing dropped silently: every row is included, or excluded with its rule and reason.
    left_out = resolved[~resolved["included"]]
    assert left_out["image_id"].tolist() == ["IMG0000001.jpg"] * 2 and (left_out["exclude_rule"] == "unique_image_id").all()
    for seed in range(4):
        where = split_of(split_manifest(resolved, SplitParams(seed=seed, val_size=0.15, test_size=0.15)))
        assert sorted(where) == sorted(resolved.loc[resolved["included"], "image_id"])
        assert where["IMG0000010.jpg"] == where["IMG0000030.jpg"], seed
