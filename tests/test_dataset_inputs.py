"""Bad input in either layout's files: a csv with its header row only, a csv saved with semicolons,
and entries under the image folders that are no regular file (a broken link, a FIFO)."""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fracture.config import load_params
from fracture.manifest import (
    ManifestError,
    build_manifest,
    inspect_image,
    read_csv_layout,
    read_dataset_csv,
)
from fracture.suite import skipped_rules
from fracture.validation import validate
from tests.conftest import REPO
from tests.synthetic import make_dataset, write_image


@pytest.fixture()
def fracatlas(tmp_path) -> Path:
    root = tmp_path / "FracAtlas"
    make_dataset(root, 2, 2)
    return root


def hospital(root: Path, labels: str, names: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    """A csv-layout export: images/<name> for each name, and labels.csv's text."""
    for seed, name in enumerate(names):
        write_image(root / "images" / name, seed)
    (root / "labels.csv").write_text(labels)
    return root


@contextmanager
def fifo_never_read(path: Path) -> Iterator[list[str]]:
    """Makes a FIFO at ``path`` and watches it while the block runs: a reader that opened it (and
    would wait for a writer for ever) is let go with an empty read, and named in the list."""
    os.mkfifo(path)
    opened: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            try:  # succeeds only while someone holds the FIFO open for reading
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno in (errno.ENXIO, errno.ENOENT):
                    continue
                raise
            opened.append(str(path))
            os.close(fd)  # the reader sees the end of the file and goes on

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield opened
    finally:
        done.set()
        watcher.join()


ONLY_HEADER = {"newline": "{header}\n", "no-newline": "{header}", "blank-lines": "{header}\n\n\n"}


@pytest.mark.parametrize("text", ONLY_HEADER.values(), ids=ONLY_HEADER.keys())
def test_a_dataset_csv_with_its_header_row_only_is_refused_naming_the_file(fracatlas, text):
    """It raised AttributeError: 'DataFrame' object has no attribute 'str' (followed by blank
    lines it was read as no rows, and every image as one dataset.csv does not list)."""
    csv = fracatlas / "dataset.csv"
    csv.write_text(text.format(header=csv.read_text().splitlines()[0]))
    message = rf"^{csv} holds its header row but no rows of images.*copy it again from the FracAtlas release$"
    with pytest.raises(ManifestError, match=message):
        read_dataset_csv(csv)
    with pytest.raises(ManifestError, match=message):
        build_manifest(fracatlas, workers=1)


@pytest.mark.parametrize("text", ONLY_HEADER.values(), ids=ONLY_HEADER.keys())
def test_a_labels_csv_with_its_header_row_only_is_refused_naming_the_file(tmp_path, text):
    root = hospital(tmp_path / "export", text.format(header="path,label"))
    with pytest.raises(ManifestError, match=rf"^{root / 'labels.csv'} holds its header row \(path, label\) but no rows "
                       r"of images; export it again with one row per image"):
        read_csv_layout(root)


@pytest.mark.parametrize(("sep", "name"), [(";", "semicolon"), ("\t", "tab")])
def test_a_labels_csv_saved_with_semicolons_is_refused_naming_the_separator_and_the_fix(tmp_path, sep, name):
    """Excel writes ';' where the decimal mark is a comma; the message said only that the file
    "has columns ['path;label']", so the user looked for a missing column."""
    rows = ["path", "label", "body_part"], ["images/a.png", "1", "hand"], ["images/b.png", "0", ""]
    root = hospital(tmp_path / "export", "".join(sep.join(row) + "\n" for row in rows))
    with pytest.raises(ManifestError) as caught:
        read_csv_layout(root)
    message = str(caught.value)
    assert message.startswith(f"{root / 'labels.csv'} looks {name}-separated: its header line is "
                              f"{f'path{sep}label{sep}body_part'!r}")
    assert "labels.csv must be comma-separated" in message and "field delimiter ','" in message
    origin = "decimal mark is a comma" if sep == ";" else "Text (tab delimited)"
    assert origin in message
    # The conversion the message gives, run in the export's folder, makes a file that is read.
    command = message.split("python -c ", 1)[1].split(", then run ingest again")[0]
    code = command.strip('"')
    cwd = os.getcwd()
    os.chdir(root)
    try:
        exec(code, {})  # noqa: S102 - the command the message tells the user to run
    finally:
        os.chdir(cwd)
    frame = read_csv_layout(root).set_index("image_id")
    assert frame["csv_label"].to_dict() == {"images/a.png": 1, "images/b.png": 0}
    assert frame.at["images/a.png", "hand"] == 1


def test_a_dataset_csv_saved_with_semicolons_is_refused_naming_the_separator(fracatlas):
    csv = fracatlas / "dataset.csv"
    csv.write_text(csv.read_text().replace(",", ";"))
    with pytest.raises(ManifestError, match=rf"^{csv} looks semicolon-separated: its header line is 'image_id;hand;.*"
                       r"FracAtlas's dataset.csv is comma-separated; copy it again from the FracAtlas release$"):
        read_dataset_csv(csv)


def test_broken_links_and_fifos_in_the_class_folders_are_excluded_with_their_reason(fracatlas, tmp_path):
    """They were left out of the manifest unseen: no row, no count, no reason."""
    (fracatlas / "images/Fractured/IMG0000098.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (fracatlas / "images/Non_fractured/IMG0000097.jpg").symlink_to("IMG0000097.jpg")  # a loop of links
    with fifo_never_read(fracatlas / "images/Fractured/IMG0000099.jpg") as opened:
        manifest = build_manifest(fracatlas, workers=1).set_index("image_id")
    assert opened == []
    odd = ["IMG0000097.jpg", "IMG0000098.jpg", "IMG0000099.jpg"]
    assert manifest.loc[odd, "has_file"].tolist() == [True] * 3
    assert manifest.loc[odd, "decodable"].tolist() == [False] * 3
    assert manifest.loc[odd, "sha256"].isna().all()
    target = tmp_path / "nowhere.jpg"
    broken = manifest.at["IMG0000098.jpg", "error"]
    assert broken.startswith(f"the file is a link whose target does not exist ({target}); restore its target")
    assert "a loop of links" in manifest.at["IMG0000097.jpg", "error"]
    assert manifest.at["IMG0000099.jpg", "error"].startswith("the file is a FIFO (named pipe), not a regular file")

    vp = dataclasses.replace(load_params(REPO).validate, fractured_share=[0.0, 1.0])
    _, report = validate(manifest.reset_index(), vp, None)
    # Each is listed as excluded with its reason; the decode rule is hard, so the stage fails naming them.
    assert {i: report.excluded[i].rule for i in odd} == dict.fromkeys(odd, "decodable")
    assert "FIFO" in report.excluded["IMG0000099.jpg"].reason
    assert not report.success


def test_broken_links_and_fifos_under_images_are_excluded_with_their_reason(tmp_path):
    """Under a hospital export's images/ a FIFO was left out unseen, and a row naming a broken link
    read as if the file were missing. A FIFO is never opened: not decoded, nor read for its DICOM
    Patient ID (labels.csv has no patient_id column here)."""
    root = hospital(tmp_path / "export", "path,label\nimages/a.png,1\nimages/b.png,0\nimages/gone.png,1\n")
    (root / "images/gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "images/series").mkdir()
    (root / "images/series/again").symlink_to("..")  # a linked folder walked already: no row
    with fifo_never_read(root / "images/series/pipe.png") as opened:
        manifest = build_manifest(root, workers=1, layout="csv").set_index("image_id")
    assert opened == []
    assert sorted(manifest.index) == ["images/a.png", "images/b.png", "images/gone.png", "images/series/pipe.png"]
    odd = ["images/gone.png", "images/series/pipe.png"]
    assert manifest.loc[odd, "has_file"].tolist() == [True, True]
    assert manifest.loc[odd, "in_csv"].tolist() == [True, False]
    assert manifest.loc[odd, "decodable"].tolist() == [False, False]
    assert "link whose target does not exist" in manifest.at["images/gone.png", "error"]
    assert "FIFO" in manifest.at["images/series/pipe.png", "error"]

    params = load_params(REPO)
    vp = dataclasses.replace(params.validate, fractured_share=[0.0, 1.0],
                             severity={**params.validate.severity, "csv_row_for_every_file": "soft"})
    _, report = validate(manifest.reset_index(), vp, None, skipped_rules("csv"))
    assert report.excluded["images/gone.png"].rule == "decodable"
    assert "restore its target or remove the link" in report.excluded["images/gone.png"].reason
    # Undecodable before unlabelled: its reason says what it is, not only that no csv row lists it.
    assert report.excluded["images/series/pipe.png"].rule == "decodable"
    assert "FIFO" in report.excluded["images/series/pipe.png"].reason
    assert not report.success


def test_a_folder_under_images_that_cannot_be_listed_is_a_row_excluded_with_its_reason(tmp_path, monkeypatch):
    """Its images would be left out unseen. (Refused by os.scandir as a folder without read
    permission is, whatever user runs the test: root lists every folder.)"""
    root = hospital(tmp_path / "export", "path,label\nimages/a.png,1\n", ("a.png", "locked/b.png"))
    locked = root / "images" / "locked"
    scandir = os.scandir

    def refusing(path="."):
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    frame = read_csv_layout(root).set_index("image_id")
    assert sorted(frame.index) == ["images/a.png", "images/locked"] and frame.at["images/locked", "has_file"]
    facts = inspect_image(str(locked))
    assert not facts.decodable and facts.sha256 is None
    assert facts.error.startswith("the folder cannot be listed (Permission denied), so its images are not read")
