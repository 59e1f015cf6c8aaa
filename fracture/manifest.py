"""The manifest: one row per image id found in the folders or in ``dataset.csv``."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from fracture.imaging import decode, decode_truncated

FOLDERS = {"Fractured": 1, "Non_fractured": 0}
FLAG_COLUMNS = ("hand", "leg", "hip", "shoulder", "mixed", "hardware", "multiscan", "frontal", "lateral", "oblique")
BODY_PARTS = ("hand", "leg", "hip", "shoulder", "mixed")


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


def build_manifest(dataset_dir: Path, workers: int | None = None) -> pd.DataFrame:
    """Lists every image id from the class folders and ``dataset.csv`` with its facts.

    Args:
        dataset_dir: a folder in the FracAtlas layout.
        workers: decoding processes (default: all cores).

    Returns:
        One row per id, sorted by id: ``path`` (relative to ``dataset_dir``, empty when only the
        csv names it), ``folder_label`` and ``csv_label`` (NA where unknown), ``has_file``,
        ``in_csv``, the csv's flags and ``fracture_count``, and the decoded ``width``,
        ``height``, ``mode``, ``sha256``, ``decodable``, ``truncated`` and ``error``.
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
    return frame.sort_values("image_id").reset_index(drop=True)
