"""Near-duplicate X-rays: the same radiograph stored twice (re-encoded, re-exported, re-exposed).

FracAtlas holds such copies that are not byte-identical, so a content hash misses them. Each
image becomes a small greyscale thumbnail, normalised to zero mean and unit variance; two images
whose thumbnails correlate above a threshold (Pearson's r, ``validate.near_duplicate_threshold``)
are near-duplicates, and the connected components of those pairs are the groups the split keeps
together. Byte-identical files correlate at 1 and always fall in one group.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFile
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fracture.decoding import decode
from fracture.dicom import is_dicom

#: Side of the square thumbnail each image is compared by (32 x 32 = 1024 values).
THUMBNAIL_SIDE = 32


def _allow_truncated() -> None:
    # Each worker process decodes thumbnails only; a file that ends early still has a top part
    # worth comparing (the validate stage reports the truncation itself).
    ImageFile.LOAD_TRUNCATED_IMAGES = True


def thumbnail(path: str | Path, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """The image as a ``side * side`` greyscale vector with zero mean and unit variance.

    JPEGs are decoded at a reduced scale (Pillow's ``draft``), which is what makes a pass over
    thousands of full-size X-rays take seconds. A DICOM file is read as a reader sees it
    (:func:`fracture.decoding.decode`), so a copy exported as DICOM and as JPEG still matches.
    A constant image gives a vector of zeros, which correlates with nothing.
    """
    data = Path(path).read_bytes()
    if is_dicom(data):
        img = decode(data)
    else:
        img = Image.open(io.BytesIO(data))  # reads from memory: no file handle to close
        img.draft("L", (side * 4, side * 4))
    small = img.convert("L").resize((side, side), Image.Resampling.BOX)
    v = np.asarray(small, dtype=np.float64).ravel()
    std = v.std()
    return ((v - v.mean()) / std if std > 0 else np.zeros_like(v)).astype(np.float32)


def thumbnails(paths: Sequence[str | Path], side: int = THUMBNAIL_SIDE, workers: int | None = None) -> np.ndarray:
    """Thumbnails of every path, one row each, decoded in parallel processes."""
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count(), initializer=_allow_truncated) as pool:
        rows = list(pool.map(partial(thumbnail, side=side), [str(p) for p in paths], chunksize=32))
    return np.stack(rows) if rows else np.zeros((0, side * side), dtype=np.float32)


def near_duplicate_pairs(vectors: np.ndarray, ids: Sequence[str], threshold: float) -> pd.DataFrame:
    """Every pair of images whose thumbnails correlate above ``threshold``.

    Args:
        vectors: normalised thumbnails, one row per image (:func:`thumbnails`).
        ids: the image id of each row.
        threshold: Pearson's r above which two images count as the same radiograph.

    Returns:
        ``image_id_a``, ``image_id_b`` (a before b in ``ids`` order) and ``correlation``, most
        similar first.
    """
    if len(ids) < 2:
        return pd.DataFrame({"image_id_a": [], "image_id_b": [], "correlation": []})
    # Rows have zero mean and unit variance, so their dot product over the length is Pearson's r.
    corr = (vectors @ vectors.T) / vectors.shape[1]
    a, b = np.nonzero(np.triu(corr > threshold, k=1))
    ids = np.asarray(ids)
    pairs = pd.DataFrame({"image_id_a": ids[a], "image_id_b": ids[b], "correlation": corr[a, b].astype(float)})
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
    manifest: pd.DataFrame, dataset_dir: Path, threshold: float, workers: int | None = None
) -> pd.DataFrame:
    """The manifest with each image's near-duplicate group and whether the group's labels disagree.

    Only files that decode are compared; any other row is its own group.

    Args:
        manifest: rows with ``image_id``, ``path``, ``has_file``, ``decodable`` and
            ``folder_label`` / ``csv_label``.
        dataset_dir: the folder the paths are relative to.
        threshold: Pearson's r of the thumbnails above which two images are one radiograph.
        workers: decoding processes (default: all cores).

    Returns:
        A copy with ``near_duplicate_group`` (the group's first image id; the image's own id when
        it has no near-duplicate) and ``near_duplicate_conflict`` (the group's members carry
        different labels: the class folder's, else dataset.csv's).
    """
    out = manifest.copy()
    usable = out[out["has_file"].fillna(False).astype(bool) & out["decodable"].fillna(False).astype(bool)]
    ids = usable["image_id"].tolist()
    vectors = thumbnails([dataset_dir / p for p in usable["path"]], workers=workers)
    groups = group_ids(ids, near_duplicate_pairs(vectors, ids, threshold))
    out["near_duplicate_group"] = out["image_id"].map(groups).fillna(out["image_id"])
    label = out["folder_label"].astype("Int64").fillna(out["csv_label"].astype("Int64"))
    labels_per_group = label.groupby(out["near_duplicate_group"]).transform("nunique")
    size = out.groupby("near_duplicate_group")["image_id"].transform("size")
    out["near_duplicate_conflict"] = (size > 1) & (labels_per_group > 1)
    return out
