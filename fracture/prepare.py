"""The prepared cache: every included image decoded once, resized to the model's input size.

Training and evaluation read uint8 pixels from one ``.npy`` array instead of decoding
JPEGs each time. The pixels are exactly what the served model's transform computes before
normalising (:class:`fracture.imaging.Preprocessor`), so cached and served predictions agree.
The cache records what it was built for (input size, interpolation, aspect handling,
enhancement, how JPEGs are decoded, truncated loading); a reader that needs anything else gets an error telling it to rebuild.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, TensorDataset

from fracture.data_config import DataConfig
from fracture.imaging import Preprocessor, nchw
from fracture.workspace import read_table

log = logging.getLogger(__name__)

IMAGES = "images.npy"
INDEX = "index.csv"
META = "meta.json"
#: The data-config keys whose change makes a different cache (mean and std act later).
KEY_FIELDS = ("input_size", "interpolation", "aspect", "enhance", "decode")


class StaleCacheError(RuntimeError):
    """The prepared cache was built for a different input size, aspect, decoding or image set."""


class CachedImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A split's images and labels, read from the memory-mapped cache when a batch asks for them.

    Indexing with a sequence of positions reads the whole batch in one gather (use it with a
    ``BatchSampler`` and ``batch_size=None``); nothing of the split is copied up front, so an
    epoch costs the batches it reads, not a copy of the split.

    Attributes:
        labels: each image's label, in the split's order.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: torch.Tensor) -> None:
        self.images, self.rows, self.labels = images, rows, labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int | Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if np.ndim(index) == 0:
            return nchw(np.array(self.images[self.rows[index]])[None])[0], self.labels[index]
        positions = np.asarray(index, dtype=np.int64)
        return nchw(np.asarray(self.images[self.rows[positions]])), self.labels[torch.from_numpy(positions)]


@dataclass(frozen=True)
class PreparedImages:
    """A read-only view of the cache: pixels (memory-mapped) and the row of each image id."""

    images: np.ndarray
    rows: dict[str, int]
    meta: dict[str, Any]
    digests: dict[str, str] = field(default_factory=dict)  # each image's file sha256 when it was decoded

    def _rows(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [i for i in frame["image_id"] if i not in self.rows]
        if missing:
            raise StaleCacheError(
                f"{len(missing)} images are not in the prepared cache (e.g. {missing[:5]}); "
                "it was built from another manifest: run `dvc repro prepare`"
            )
        if "sha256" in frame.columns:
            # The same id is not the same image: a new export may hold other bytes under it.
            if not self.digests:
                raise StaleCacheError(
                    "the prepared cache records no checksum of the files it decoded (built by an older "
                    "version): run `dvc repro prepare`"
                )
            changed = [i for i, d in zip(frame["image_id"], frame["sha256"], strict=True) if self.digests.get(i) != str(d)]
            if changed:
                raise StaleCacheError(
                    f"{len(changed)} images changed since the prepared cache was built (e.g. {changed[:5]}): their "
                    "files hold other bytes than the ones decoded into it; run `dvc repro prepare`"
                )
        return np.array([self.rows[i] for i in frame["image_id"]], dtype=np.int64)

    def reader(self, frame: pd.DataFrame) -> CachedImages:
        """The frame's images and labels, read a batch at a time (for training epochs).

        Raises:
            StaleCacheError: an image id of the frame is not in the cache.
        """
        return CachedImages(self.images, self._rows(frame), torch.tensor(frame["label"].astype(int).to_numpy()))

    def dataset(self, frame: pd.DataFrame) -> TensorDataset:
        """The frame's images (uint8 NCHW) and labels, in the frame's order, read into memory.

        Raises:
            StaleCacheError: an image id of the frame is not in the cache.
        """
        rows = self._rows(frame)
        # Sorted reads are sequential on disk; the order is restored afterwards.
        order = np.argsort(rows, kind="stable")
        pixels = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        pixels[order] = self.images[rows[order]]
        images = nchw(pixels)  # channels-last in memory, as the network runs
        labels = torch.tensor(frame["label"].astype(int).to_numpy())
        return TensorDataset(images, labels)


def cache_key(data_config: DataConfig, allow_truncated: bool) -> dict[str, Any]:
    """What a cache must have been built with to serve a model with ``data_config``."""
    config = data_config.to_dict()
    return {k: config[k] for k in KEY_FIELDS} | {"allow_truncated": allow_truncated}


def prepare_images(
    frame: pd.DataFrame,
    dataset_dir: Path,
    pre: Preprocessor,
    allow_truncated: bool,
    out_dir: Path,
    workers: int,
) -> dict[str, Any]:
    """Decodes and resizes each image once and writes the cache.

    Args:
        frame: the images to prepare (``image_id``, ``path`` relative to ``dataset_dir``).
        dataset_dir: root of the FracAtlas copy.
        pre: the model's preprocessing: each image is decoded (``pre.open``) and resized
            (``pre.resize``) as the served model does it. The cache records its config's
            :func:`cache_key`, so the key always says how the pixels were made.
        allow_truncated: decode files that end early (``validate.on_truncated: keep``).
        out_dir: where ``images.npy``, ``index.csv`` and ``meta.json`` are written.
        workers: decoding threads (Pillow releases the GIL while decoding and resizing).

    Returns:
        The metadata written to ``meta.json`` plus ``decode_seconds`` and ``images_per_s``
        (kept out of the file, so that a rebuild with identical pixels writes an identical
        ``meta.json``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # meta.json is what makes a cache valid: it goes first and comes back last, so a build that
    # fails halfway (an undecodable file, Ctrl-C) leaves no cache a reader would accept.
    (out_dir / META).unlink(missing_ok=True)
    key = cache_key(pre.config, allow_truncated)
    _, height, width = pre.config.input_size
    ids = frame["image_id"].astype(str).tolist()
    paths = [dataset_dir / p for p in frame["path"]]
    started = time.perf_counter()
    partial = out_dir / f"{IMAGES}.partial"
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(ids), height, width, 3))

    def one(i: int) -> None:
        img = pre.resize(pre.open(paths[i], allow_truncated))
        array[i] = np.asarray(img)

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(one, range(len(ids))))
        array.flush()
        del array
        partial.replace(out_dir / IMAGES)
    finally:
        # A build that failed (an undecodable file, Ctrl-C) leaves no half-written array beside the
        # cache: at FracAtlas's size, gigabytes.
        partial.unlink(missing_ok=True)
    seconds = max(time.perf_counter() - started, 1e-6)
    index = {"image_id": ids, "row": range(len(ids))}
    if "sha256" in frame.columns:  # which bytes each row was decoded from, checked when read
        index["sha256"] = frame["sha256"].astype(str).tolist()
    pd.DataFrame(index).to_csv(out_dir / INDEX, index=False)
    meta = key | {"images": len(ids)}
    (out_dir / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    rate = len(ids) / seconds
    log.info("prepared %d images at %s in %.1fs (%.1f images/s)", len(ids), key["input_size"], seconds, rate)
    return meta | {"decode_seconds": round(seconds, 2), "images_per_s": round(rate, 1)}


def open_prepared(out_dir: Path, key: dict[str, Any]) -> PreparedImages:
    """Opens the cache after checking it was built for ``key``.

    Args:
        out_dir: the cache directory.
        key: :func:`cache_key` of the model about to use it.

    Raises:
        FileNotFoundError: there is no cache.
        StaleCacheError: it was built for another size, interpolation, aspect or truncation policy.
    """
    meta_path = out_dir / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: run `dvc repro prepare` first")
    meta = json.loads(meta_path.read_text())
    built = {k: meta.get(k) for k in key}
    if built != key:
        raise StaleCacheError(
            f"the prepared cache in {out_dir} was built for {built}, but this model needs {key}: "
            "run `dvc repro prepare` to rebuild it (then `dvc repro` for the pipeline, or `dvc repro "
            "crossval/dvc.yaml` for cross-validation)"
        )
    index = read_table(out_dir / INDEX)
    images = np.load(out_dir / IMAGES, mmap_mode="r")
    digests = dict(zip(index["image_id"], index["sha256"], strict=True)) if "sha256" in index else {}
    return PreparedImages(
        images=images, rows=dict(zip(index["image_id"], index["row"], strict=True)), meta=meta, digests=digests
    )
