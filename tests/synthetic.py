"""Tiny synthetic FracAtlas-layout datasets for fast unit tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

FLAGS = ["hand", "leg", "hip", "shoulder", "mixed", "hardware", "multiscan", "frontal", "lateral", "oblique"]


def write_image(path: Path, seed: int, size: tuple[int, int] = (80, 96), mode: str = "L") -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path, quality=90)


def make_dataset(root: Path, n_fractured: int = 6, n_non: int = 14) -> pd.DataFrame:
    """Writes ``n_fractured + n_non`` distinct images and a consistent dataset.csv."""
    rows = []
    for i in range(n_fractured + n_non):
        fractured = int(i < n_fractured)
        image_id = f"IMG{i:07d}.jpg"
        folder = "Fractured" if fractured else "Non_fractured"
        write_image(root / "images" / folder / image_id, seed=i, mode="RGB" if i % 3 == 0 else "L")
        row = {"image_id": image_id, **{f: 0 for f in FLAGS}, "fractured": fractured, "fracture_count": fractured}
        row[["hand", "leg", "hip", "shoulder"][i % 4]] = 1
        row["frontal"] = 1
        rows.append(row)
    (root / "images" / "Fractured").mkdir(parents=True, exist_ok=True)
    csv = pd.DataFrame(rows, columns=["image_id", "hand", "leg", "hip", "shoulder", "mixed", "hardware",
                                      "multiscan", "fractured", "fracture_count", "frontal", "lateral", "oblique"])
    csv.to_csv(root / "dataset.csv", index=False)
    return csv


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def training_frame(root: Path) -> pd.DataFrame:
    """The dataset.csv of :func:`make_dataset` as a split frame (``path``, ``label``)."""
    frame = pd.read_csv(root / "dataset.csv").rename(columns={"fractured": "label"})
    frame["path"] = [
        f"images/{'Fractured' if label else 'Non_fractured'}/{i}" for i, label in zip(frame["image_id"], frame["label"])
    ]
    return frame


def ihdr_png(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG whose header declares ``width`` x ``height``, with one row of real pixel data.

    How a decompression bomb or a corrupt export looks: a small file with absurd dimensions.
    """
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")
