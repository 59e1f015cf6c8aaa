"""Command-line arguments several benchmarks share (imports nothing heavy: some drive other processes' timings)."""

from __future__ import annotations

import argparse
from pathlib import Path


def fracatlas_folder(value: str) -> Path:
    """``--data``: an extracted FracAtlas folder (its ``dataset.csv`` and ``images/``), or argparse's error naming it."""
    path = Path(value)
    if not ((path / "dataset.csv").is_file() and (path / "images").is_dir()):
        raise argparse.ArgumentTypeError(
            f"no FracAtlas folder at {value} (dataset.csv and images/): the benchmarks read an extracted copy; "
            "give its folder (make bench FRACATLAS_SOURCE=/path/to/FracAtlas), not a zip"
        )
    return path
