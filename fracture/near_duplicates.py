"""Near-duplicate X-rays: the same radiograph stored twice (re-encoded, re-exported, re-exposed).

FracAtlas holds such copies that are not byte-identical, so a content hash misses them. Each
image becomes a small greyscale thumbnail, normalised to zero mean and unit variance; two images
whose thumbnails correlate above a threshold (Pearson's r, ``validate.near_duplicate_threshold``)
are near-duplicates, and the connected components of those pairs are the groups the split keeps
together. Byte-identical files correlate at 1 and always fall in one group.

A truncated JPEG decodes with its missing bottom rows filled flat grey, which would keep a
truncated re-encoded copy from matching its original (FracAtlas's truncated files are such
copies), and could make two unrelated truncated images match by their grey bands. So a pair with
a truncated image is compared on the top thumbnail rows both decoded, each image standardised
over those rows.

A copy can also be corrupt without ending early: its lower part decodes as blocks of grey and
noise, yet the file ends as a JPEG should, so nothing marks it truncated (FracAtlas holds such
re-saved copies). Its whole thumbnail then correlates too little with its original's, but its
top half still matches it. So every pair is also compared on the top half of the thumbnails, each
standardised over it, at a stricter threshold (``validate.near_duplicate_top_threshold``).
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fracture.decoding import decode, decode_truncated, decoded_height
from fracture.dicom import is_dicom

#: Side of the square thumbnail each image is compared by (32 x 32 = 1024 values).
THUMBNAIL_SIDE = 32

#: Fewest thumbnail rows a truncated image must have decoded to be compared at all (a quarter).
MIN_ROWS = THUMBNAIL_SIDE // 4

log = logging.getLogger(__name__)


def _allow_truncated() -> None:
    # Each worker process decodes thumbnails only; a file that ends early still has a top part
    # worth comparing (the validate stage reports the truncation itself).
    ImageFile.LOAD_TRUNCATED_IMAGES = True


def _standardise(v: np.ndarray) -> np.ndarray:
    """Rows of ``v`` with zero mean and unit variance; a constant row becomes zeros."""
    v = np.atleast_2d(np.asarray(v, dtype=np.float64))
    std = v.std(axis=1, keepdims=True)
    return np.divide(v - v.mean(axis=1, keepdims=True), std, out=np.zeros_like(v), where=std > 0)


def thumbnail_rows(path: str | Path, side: int = THUMBNAIL_SIDE, truncated: bool = False) -> tuple[np.ndarray, int]:
    """The image as a ``side * side`` greyscale vector with zero mean and unit variance, and how
    many of its ``side`` rows hold decoded pixels.

    JPEGs are decoded at a reduced scale (Pillow's ``draft``), which is what makes a pass over
    thousands of full-size X-rays take seconds. A DICOM file is read as a reader sees it
    (:func:`fracture.decoding.decode`), so a copy exported as DICOM and as JPEG still matches;
    a picture is turned upright by its EXIF orientation, as the model sees it, so a copy whose
    turn was written into its pixels still matches one that only states it. A truncated picture
    is compared as stored (its decoded rows are counted from the stored top). A constant image
    gives a vector of zeros, which correlates with nothing.

    Args:
        path: the image file.
        side: the thumbnail's side.
        truncated: the file ends early (the manifest's ``truncated``): its rows are counted down
            to the flat band its missing part decodes to. Otherwise every row counts.

    Returns:
        The vector (row by row), and the thumbnail rows lying wholly in the decoded part.
    """
    data = Path(path).read_bytes()
    if is_dicom(data):
        img = decode(data)
    elif truncated:
        # As stored, not turned upright: the rows that decoded are counted from the stored top.
        img = decode_truncated(data, (side * 4, side * 4), upright=False)
    else:
        img = Image.open(io.BytesIO(data))  # reads from memory: no file handle to close
        img.draft("L", (side * 4, side * 4))
        img = ImageOps.exif_transpose(img)  # upright, as the model sees it (fracture.decoding.decode)
    grey = img.convert("L")
    rows = side
    if truncated:
        full = np.asarray(grey)
        rows = decoded_height(full) * side // len(full)
    small = grey.resize((side, side), Image.Resampling.BOX)
    return _standardise(np.asarray(small).ravel())[0].astype(np.float32), rows


def thumbnail(path: str | Path, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """The image as a ``side * side`` greyscale vector with zero mean and unit variance
    (:func:`thumbnail_rows`, every row counted)."""
    return thumbnail_rows(path, side)[0]


def _thumbnail_rows(item: tuple[str, bool], side: int) -> tuple[np.ndarray, int]:
    return thumbnail_rows(item[0], side, item[1])


def thumbnails(
    paths: Sequence[str | Path],
    side: int = THUMBNAIL_SIDE,
    workers: int | None = None,
    truncated: Sequence[bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnails of every path, one row each, and each one's decoded rows (:func:`thumbnail_rows`),
    decoded in parallel processes."""
    flags = [bool(t) for t in truncated] if truncated is not None else [False] * len(paths)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count(), initializer=_allow_truncated) as pool:
        out = list(pool.map(partial(_thumbnail_rows, side=side), [(str(p), t) for p, t in zip(paths, flags)], chunksize=32))
    if not out:
        return np.zeros((0, side * side), dtype=np.float32), np.zeros(0, dtype=int)
    return np.stack([v for v, _ in out]), np.array([r for _, r in out], dtype=int)


def near_duplicate_pairs(
    vectors: np.ndarray,
    ids: Sequence[str],
    threshold: float,
    rows: np.ndarray | None = None,
    block: int = 2048,
    top_threshold: float | None = None,
) -> pd.DataFrame:
    """Every pair of images whose thumbnails correlate above ``threshold``, or whose top halves
    correlate above ``top_threshold``.

    Args:
        vectors: normalised thumbnails, one row per image (:func:`thumbnails`).
        ids: the image id of each row.
        threshold: Pearson's r above which two images count as the same radiograph.
        rows: each thumbnail's decoded rows (:func:`thumbnails`; ``None``: all of them). A pair
            in which one has fewer than all is compared on the top rows both decoded, each
            standardised over them; an image with fewer than :data:`MIN_ROWS` is compared with none.
        block: images whose correlations with the others are computed at once. Memory grows
            with ``block`` times the number of images, never with its square: for 30,000
            thumbnails, 0.5 GB beyond the thumbnails themselves, where the whole matrix took 6.8 GB.
        top_threshold: Pearson's r of the top halves (each standardised over its half) above which
            two images that both decoded them are one radiograph whatever their lower parts hold;
            ``None``: not compared so.

    Returns:
        ``image_id_a``, ``image_id_b`` (a before b in ``ids`` order), ``correlation`` and
        ``compared_on``: ``whole``, ``top rows`` (a truncated image, on the rows both decoded) or
        ``top half`` (matched only there); most similar first, each pair once, as first found in
        that order.
    """
    n = len(ids)
    side = math.isqrt(vectors.shape[1])
    rows = np.full(n, side) if rows is None else np.asarray(rows, dtype=int)
    found_a, found_b, found_r, found_on = [], [], [], []

    def keep(a: np.ndarray, b: np.ndarray, r: np.ndarray, on: str, cut: float = threshold) -> None:
        hit = r > cut
        found_a.append(a[hit])
        found_b.append(b[hit])
        found_r.append(r[hit].astype(float))
        found_on.append(np.full(int(hit.sum()), on, dtype=object))

    def every_pair(members: np.ndarray, standardised: np.ndarray, on: str, cut: float) -> None:
        # Rows have zero mean and unit variance, so their dot product over the length is
        # Pearson's r. Each block is compared with the images after it.
        for start in range(0, len(members), block):
            size = min(block, len(members) - start)
            corr = standardised[start : start + size] @ standardised[start:].T
            corr /= standardised.shape[1]
            hit = corr > cut
            hit[:, :size] &= np.triu(np.ones((size, size), dtype=bool), k=1)  # each pair once, never an image with itself
            i, j = np.nonzero(hit)
            keep(members[start + i], members[start + j], corr[i, j], on, cut)

    whole = np.flatnonzero(rows >= side)
    every_pair(whole, vectors[whole], "whole", threshold)
    # A truncated image against every image that decoded at least as many rows (the others
    # compare with it on their own turn), on its rows, each thumbnail standardised over them.
    top, top_rows = None, None  # every thumbnail's top rows, standardised, for one row count at a time
    for i in sorted(np.flatnonzero((rows < side) & (rows >= MIN_ROWS)), key=lambda i: -rows[i]):
        if rows[i] != top_rows:
            top, top_rows = _standardise(vectors[:, : rows[i] * side]), rows[i]
        others = np.flatnonzero(rows >= rows[i])
        # Equal row counts meet on both turns: the pair is kept once, on the turn of its later image.
        others = others[(others != i) & ((rows[others] > rows[i]) | (others < i))]
        r = top[others] @ top[i] / top.shape[1]
        keep(np.minimum(others, i), np.maximum(others, i), r, "top rows")
    if top_threshold is not None:
        # Every image that decoded its top half, on that half: a copy whose lower part is corrupt.
        half = side // 2
        tall = np.flatnonzero(rows >= half)
        every_pair(tall, _standardise(vectors[tall, : half * side]).astype(np.float32), "top half", top_threshold)
    a, b = (np.concatenate(x) if x else np.zeros(0, dtype=np.int64) for x in (found_a, found_b))
    r = np.concatenate(found_r) if found_r else np.zeros(0)
    on = np.concatenate(found_on) if found_on else np.zeros(0, dtype=object)
    ids = np.asarray(ids)
    pairs = pd.DataFrame({"image_id_a": ids[a], "image_id_b": ids[b], "correlation": r, "compared_on": on})
    pairs = pairs.drop_duplicates(["image_id_a", "image_id_b"])  # kept as first found: whole, top rows, top half
    return pairs.sort_values(["correlation", "image_id_a"], ascending=[False, True]).reset_index(drop=True)


def group_ids(ids: Sequence[str], pairs: pd.DataFrame) -> pd.Series:
    """Each image's near-duplicate group: the first id of its connected component (itself when alone).

    Args:
        ids: every image id.
        pairs: :func:`near_duplicate_pairs` over those ids.

    Returns:
        The group id per image, indexed by image id.
    """
    index = {i: n for n, i in enumerate(ids)}
    rows = pairs["image_id_a"].map(index).to_numpy(dtype=np.int64)
    cols = pairs["image_id_b"].map(index).to_numpy(dtype=np.int64)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ids), len(ids)))
    _, component = connected_components(graph, directed=False)
    first = pd.Series(list(ids)).groupby(component).transform("min")
    return pd.Series(first.to_numpy(), index=list(ids), name="near_duplicate_group")


def add_near_duplicates(
    manifest: pd.DataFrame,
    dataset_dir: Path,
    threshold: float,
    workers: int | None = None,
    top_threshold: float | None = None,
) -> pd.DataFrame:
    """The manifest with each image's near-duplicate group and whether the group's labels disagree.

    Only files that decode are compared; any other row is its own group. A truncated file (the
    manifest's ``truncated``) is compared on the rows it decoded (:func:`near_duplicate_pairs`).
    An id on more than one row (rule ``unique_image_id``) is not compared either: groups are
    named and joined by id, and which file such an id stands for cannot be told. Its rows keep
    the id as their group, and the validate stage excludes them whatever the rule's severity
    (:func:`fracture.policies.apply_policy`); every other row is still compared.

    Args:
        manifest: rows with ``image_id``, ``path``, ``has_file``, ``decodable``, ``truncated`` and
            ``folder_label`` / ``csv_label``.
        dataset_dir: the folder the paths are relative to.
        threshold: Pearson's r of the thumbnails above which two images are one radiograph.
        workers: decoding processes (default: all cores).
        top_threshold: Pearson's r of the thumbnails' top halves above which two images are one
            radiograph whatever their lower parts hold (:func:`near_duplicate_pairs`); ``None``: not
            compared so.

    Returns:
        A copy with ``near_duplicate_group`` (the group's first image id; the image's own id when
        it has no near-duplicate), ``near_duplicate_conflict`` (the group's members carry
        different labels: the class folder's, else dataset.csv's) and ``near_duplicate_compared``
        (the image was compared with the others: False for a file that does not decode, or a
        truncated one that decodes less than :data:`MIN_ROWS` thumbnail rows) and
        ``near_duplicate_top_half`` (the image matched another only on the top half: one of
        them is likely corrupt in its lower part).
    """
    out = manifest.copy()
    # Groups are named and joined by id: an id on two rows (the same file name in both class
    # folders, a repeated csv row) cannot say which file it stands for. Its rows are left out of
    # the search, each keeping the id as its group, and are excluded by the policy whatever
    # unique_image_id's severity; the search still runs over every other row, so that their
    # near-duplicates stay together in the split.
    repeated = out["image_id"].duplicated(keep=False)
    if repeated.any():
        names = sorted(set(out.loc[repeated, "image_id"].astype(str)))
        log.warning(
            "%d image id(s) on more than one row, not compared for near-duplicates and excluded by validate "
            "(rule unique_image_id): %s%s", len(names), ", ".join(names[:10]), " ..." if len(names) > 10 else "",
        )
    usable = out[
        out["has_file"].fillna(False).astype(bool) & out["decodable"].fillna(False).astype(bool) & ~repeated
    ]
    ids = usable["image_id"].tolist()
    truncated = usable["truncated"].fillna(False).astype(bool) if "truncated" in usable else None
    vectors, rows = thumbnails([dataset_dir / p for p in usable["path"]], workers=workers, truncated=truncated)
    short = [i for i, r in zip(ids, rows) if r < MIN_ROWS]
    if short:
        log.warning(
            "%d truncated image(s) decode less than a quarter of their height, too little to find their near-duplicates "
            "by; each is its own group: %s", len(short), ", ".join(short),
        )
    pairs = near_duplicate_pairs(vectors, ids, threshold, rows, top_threshold=top_threshold)
    top_half = pairs[pairs["compared_on"] == "top half"]
    if not top_half.empty:
        log.info(
            "%d pair(s) of X-rays match on the top half only, their lower parts differing (one of each is likely "
            "corrupt there): %s", len(top_half),
            ", ".join(f"{a} / {b} ({r:.4f})" for a, b, r in top_half[["image_id_a", "image_id_b", "correlation"]].itertuples(index=False)),
        )
    groups = group_ids(ids, pairs)
    out["near_duplicate_group"] = out["image_id"].map(groups).fillna(out["image_id"])
    out["near_duplicate_top_half"] = out["image_id"].isin(set(top_half["image_id_a"]) | set(top_half["image_id_b"]))
    # Which images were looked at: the report lists the decodable ones that were not (too short).
    compared = {i for i, r in zip(ids, rows) if r >= MIN_ROWS}
    out["near_duplicate_compared"] = out["image_id"].isin(compared)
    out["near_duplicate_conflict"] = label_conflicts(out)
    return out


def label_conflicts(manifest: pd.DataFrame, columns: tuple[str, str] = ("folder_label", "csv_label")) -> pd.Series:
    """Whether each image's near-duplicate group holds both labels.

    Args:
        manifest: rows with ``near_duplicate_group`` and the two label columns.
        columns: the label column an image's label comes from where both exist, then the one
            that fills in (:func:`fracture.policies.label_columns`).

    Returns:
        One flag per row: its group holds two or more images (distinct ids) and they carry
        different labels. Two rows of one repeated id are not near-duplicates of each other
        (rule ``unique_image_id`` excludes them).
    """
    first, second = columns
    label = manifest[first].astype("Int64").fillna(manifest[second].astype("Int64"))
    group = manifest["near_duplicate_group"]
    images = manifest["image_id"].groupby(group).transform("nunique")
    return (images > 1) & (label.groupby(group).transform("nunique") > 1)
