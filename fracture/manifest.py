"""The manifest: one row per image id found in the folders or in ``dataset.csv``.

It also owns the manifest's schema: the class folders, ``dataset.csv``'s flag columns, and the
one rule (:func:`body_part`) that gives each image a single body part, so that the split's
strata, the validation summary and the evaluation's per-part metrics all count alike.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fracture.imaging import decode, decode_truncated
from fracture.near_duplicates import add_near_duplicates

FOLDERS = {"Fractured": 1, "Non_fractured": 0}
# dataset.csv's body-part flags: four regions, and `mixed` for a film showing two or three of
# them (in FracAtlas `mixed` is never a fifth region on its own).
REGIONS = ("hand", "leg", "hip", "shoulder")
BODY_PARTS = (*REGIONS, "mixed")
# The views are not exclusive: one film can be set as two of them.
VIEWS = ("frontal", "lateral", "oblique")
FLAG_COLUMNS = (*BODY_PARTS, "hardware", "multiscan", *VIEWS)
UNKNOWN_PART = "unknown"


class ManifestError(ValueError):
    """A frame lacks the manifest columns an operation needs."""


@dataclass(frozen=True)
class ImageFacts:
    width: int | None
    height: int | None
    mode: str | None
    sha256: str
    decodable: bool
    truncated: bool
    error: str | None


def inspect_image(path: str) -> ImageFacts:
    """Hashes and fully decodes one file, telling a truncated JPEG from an unreadable one."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        img = decode(data)
        return ImageFacts(img.width, img.height, img.mode, digest, True, False, None)
    except OSError as exc:
        if "truncated" not in str(exc):
            return ImageFacts(None, None, None, digest, False, False, str(exc))
    except (SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return ImageFacts(None, None, None, digest, False, False, str(exc))
    try:
        img = decode_truncated(data)
        return ImageFacts(img.width, img.height, img.mode, digest, True, True, "image file is truncated")
    except (OSError, SyntaxError, ValueError) as exc:
        return ImageFacts(None, None, None, digest, False, True, str(exc))


def build_manifest(
    dataset_dir: Path, workers: int | None = None, near_duplicate_threshold: float | None = None
) -> pd.DataFrame:
    """Lists every image id from the class folders and ``dataset.csv`` with its facts.

    Args:
        dataset_dir: a folder in the FracAtlas layout.
        workers: decoding processes (default: all cores).
        near_duplicate_threshold: find near-duplicate X-rays at this thumbnail correlation
            (:mod:`fracture.near_duplicates`); ``None`` makes every image its own group.

    Returns:
        One row per id, sorted by id: ``path`` (relative to ``dataset_dir``, empty when only the
        csv names it), ``folder_label`` and ``csv_label`` (NA where unknown), ``has_file``,
        ``in_csv``, the csv's flags and ``fracture_count``, and the decoded ``width``,
        ``height``, ``mode``, ``sha256``, ``decodable``, ``truncated`` and ``error``; then
        ``near_duplicate_group`` and ``near_duplicate_conflict``.
    """
    rows = []
    for folder, label in FOLDERS.items():
        for p in sorted((dataset_dir / "images" / folder).iterdir()):
            if p.is_file():
                rows.append({"image_id": p.name, "path": p.relative_to(dataset_dir).as_posix(), "folder_label": label})
    files = pd.DataFrame(rows, columns=["image_id", "path", "folder_label"])
    csv = pd.read_csv(dataset_dir / "dataset.csv").rename(columns={"fractured": "csv_label"})
    frame = files.merge(csv, on="image_id", how="outer", indicator=True)
    frame["has_file"] = frame["_merge"] != "right_only"
    frame["in_csv"] = frame["_merge"] != "left_only"
    frame = frame.drop(columns="_merge")
    frame["path"] = frame["path"].fillna("")
    for col in ("folder_label", "csv_label", "fracture_count", *FLAG_COLUMNS):
        if col in frame:
            frame[col] = frame[col].astype("Int64")

    paths = [str(dataset_dir / p) for p in frame.loc[frame["has_file"], "path"]]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        facts = list(pool.map(inspect_image, paths, chunksize=32))
    facts_frame = pd.DataFrame([asdict(f) for f in facts], index=frame.index[frame["has_file"]])
    frame = frame.join(facts_frame)
    # Rows without a file stay NA here: the missing file is its own finding, not a decode error.
    frame["decodable"] = frame["decodable"].astype("boolean")
    frame["truncated"] = frame["truncated"].astype("boolean")
    frame["width"] = frame["width"].astype("Int64")
    frame["height"] = frame["height"].astype("Int64")
    frame = frame.sort_values("image_id").reset_index(drop=True)
    if near_duplicate_threshold is None:
        return frame.assign(near_duplicate_group=frame["image_id"], near_duplicate_conflict=False)
    return add_near_duplicates(frame, dataset_dir, near_duplicate_threshold, workers)


def body_part(frame: pd.DataFrame) -> pd.Series:
    """Each row's one body part, from dataset.csv's flags; the single rule every stage uses.

    * the region (hand, leg, hip or shoulder) when exactly that one flag is set;
    * ``mixed`` when ``mixed`` is set or several regions are (in FracAtlas ``mixed`` is set
      exactly when two or three regions are);
    * ``unknown`` when no flag is set or the id has no ``dataset.csv`` row (flags NA).

    A flag counts as set when it is above 0; a value that is not a number counts as unset.

    Args:
        frame: rows with the :data:`BODY_PARTS` columns (0/1, NA allowed).

    Returns:
        ``hand``, ``leg``, ``hip``, ``shoulder``, ``mixed`` or ``unknown`` per row, on the
        frame's index, named ``body_part``.

    Raises:
        ManifestError: a flag column is missing.
    """
    missing = [c for c in BODY_PARTS if c not in frame]
    if missing:
        raise ManifestError(
            f"manifest lacks the body-part flag columns {missing} (from dataset.csv); rebuild it "
            "with `fracture validate` from a dataset.csv that has them"
        )
    # NA (an id without a dataset.csv row) counts as not set: no flag known means unknown part.
    flags = frame[list(BODY_PARTS)].apply(pd.to_numeric, errors="coerce").fillna(0).gt(0)
    regions = flags[list(REGIONS)]
    n_set = regions.sum(axis=1)
    part = np.select(
        [flags["mixed"] | (n_set > 1), n_set == 1],
        ["mixed", regions.idxmax(axis=1)],
        default=UNKNOWN_PART,
    )
    return pd.Series(part, index=frame.index, name="body_part")
