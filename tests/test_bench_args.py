"""The benchmarks' shared arguments: `make bench` on a machine without an extracted FracAtlas folder."""

from __future__ import annotations

import argparse
import re

import pytest

from bench.args import fracatlas_folder
from tests.conftest import REPO


def test_a_data_folder_that_is_no_fracatlas_copy_is_named_before_any_benchmark_runs(tmp_path):
    with pytest.raises(argparse.ArgumentTypeError, match=rf"no FracAtlas folder at {tmp_path} \(dataset.csv and images/\)"):
        fracatlas_folder(str(tmp_path))
    archive = tmp_path / "FracAtlas.zip"
    archive.write_bytes(b"PK")
    with pytest.raises(argparse.ArgumentTypeError, match="the benchmarks read an extracted copy"):
        fracatlas_folder(str(archive))
    (tmp_path / "images").mkdir()
    (tmp_path / "dataset.csv").write_text("image_id,fractured\n")
    assert fracatlas_folder(str(tmp_path)) == tmp_path


def test_every_benchmark_reading_fracatlas_checks_its_folder():
    readers = [path for path in sorted((REPO / "bench").glob("*.py")) if '"--data"' in path.read_text()]
    assert len(readers) >= 6
    for path in readers:
        assert re.search(r'add_argument\("--data", type=fracatlas_folder\b', path.read_text()), path.name
