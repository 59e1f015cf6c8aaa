"""Ingest from a folder, a zip or the figshare API (a stand-in served on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from fracture.config import IngestParams, load_params
from fracture.ingest import (
    EX_TEMPFAIL,
    ZIP_RECENT_S,
    DownloadError,
    IngestError,
    _recover_staging,
    download_figshare,
    ingest,
    safe_extract,
    source_listing,
)
from tests.conftest import FRACATLAS, REPO, make_subset, pick_ids
from tests.synthetic import make_dataset


@pytest.fixture()
def iparams():
    return load_params(REPO).ingest


@pytest.fixture()
def dataset(tmp_path) -> Path:
    root = tmp_path / "FracAtlas"
    make_dataset(root, 3, 5)
    return root


def zip_dir(root: Path, archive: Path, extra: dict[str, str] | None = None) -> Path:
    """Zips ``root`` under its own name, as figshare's FracAtlas.zip does, plus ``extra`` members."""
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(root.rglob("*")):
            zf.write(p, Path(root.name) / p.relative_to(root))
        for name, text in (extra or {}).items():
            zf.writestr(name, text)
    return archive


def test_ingest_from_folder_mirrors_the_source(dataset, tmp_path, iparams):
    dest = tmp_path / "project/data/fracatlas"
    result = ingest(iparams, dest, str(dataset))
    assert result.files == 9  # 8 images + dataset.csv
    assert (dest / "dataset.csv").read_bytes() == (dataset / "dataset.csv").read_bytes()
    # A second ingest from a smaller source replaces the copy: no stale files survive.
    (dataset / "images/Fractured/IMG0000000.jpg").unlink()
    ingest(iparams, dest, str(dataset))
    assert not (dest / "images/Fractured/IMG0000000.jpg").exists()


def test_a_copy_killed_midway_is_never_versioned_and_the_next_ingest_clears_it(dataset, tmp_path, iparams):
    dest = tmp_path / "project/data/fracatlas"
    ingest(iparams, dest, str(dataset))
    # What an ingest killed while copying leaves (SIGKILL runs no clean-up): half a copy beside dest.
    stale = dest.parent / ".fracatlas.ingest-k1ll3d"
    (stale / "copy/images").mkdir(parents=True)
    (stale / "copy/images/IMG0000000.jpg").write_bytes(b"half")
    # DVC leaves it out of `dvc add data`, by the project's .dvcignore, so no data version holds it.
    checked = subprocess.run(
        [sys.executable, "-m", "dvc", "check-ignore", "data/.fracatlas.ingest-k1ll3d/copy/images/IMG0000000.jpg"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    ingest(iparams, dest, str(dataset))
    assert sorted(p.name for p in dest.parent.iterdir()) == ["fracatlas"]
    # Killed between its two renames: dest is gone and the previous copy sits in the staging folder.
    (dest.parent / ".fracatlas.ingest-r3nam3").mkdir()
    dest.replace(dest.parent / ".fracatlas.ingest-r3nam3/old")
    _recover_staging(dest)
    assert (dest / "dataset.csv").read_bytes() == (dataset / "dataset.csv").read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["fracatlas"]


def test_the_listing_sees_a_file_added_in_a_linked_folder_as_the_copy_does(dataset, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (dataset / "images/Fractured").rename(elsewhere)
    (dataset / "images/Fractured").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(elsewhere, target_is_directory=True)  # listed once, not forever
    before = source_listing(dataset)
    (elsewhere / "IMG0000099.jpg").write_bytes((elsewhere / "IMG0000000.jpg").read_bytes())
    after = source_listing(dataset)
    assert after["files"] == before["files"] + 1 and after["digest"] != before["digest"]


def test_a_link_back_to_a_folder_above_it_is_copied_once_through_that_folder(dataset, tmp_path, iparams, caplog):
    """The listing left such a loop out, but the copy followed it into itself until the path grew
    too long, and failed naming a path of a thousand characters as a broken link."""
    before = source_listing(dataset)
    (dataset / "images/Fractured/up").symlink_to("../..", target_is_directory=True)
    assert source_listing(dataset)["files"] == before["files"]
    dest = tmp_path / "project/data/fracatlas"
    with caplog.at_level("WARNING", logger="fracture.ingest"):
        copied = ingest(iparams, dest, str(dataset))
    assert copied.files == before["files"] and not (dest / "images/Fractured/up").exists()
    assert f"not copying {dataset / 'images/Fractured/up'}: a link back to {dataset.resolve()}" in caplog.text


def test_the_listing_counts_a_folder_linked_twice_as_the_copy_does(dataset, tmp_path, iparams):
    """Only a link back to an ancestor is a loop: a second link to a folder is copied again, so a
    second link added to the source is a change the unchanged-source shortcut must see."""
    shared = tmp_path / "pacs_2023"
    (dataset / "images/Fractured").rename(shared)
    (dataset / "images/Fractured").symlink_to(shared, target_is_directory=True)
    before = source_listing(dataset)
    (dataset / "images/Fractured_again").symlink_to(shared, target_is_directory=True)
    after = source_listing(dataset)
    copied = ingest(iparams, tmp_path / "data/fracatlas", str(dataset))
    assert after["files"] == copied.files == before["files"] + 3
    assert after["digest"] != before["digest"]



def test_a_link_out_of_the_export_is_copied_and_named(dataset, tmp_path, iparams, caplog):
    """A link in an export to a file it was never meant to hold (a key, another patient's file) was
    copied into the dataset without a word, ready for dvc add and dvc push. Links are followed, as a
    folder linked from the hospital's archive is meant to be, and each one out of the export is named."""
    secret = tmp_path / "outside" / "notes.txt"
    secret.parent.mkdir()
    secret.write_text("not part of the export\n")
    link = dataset / "images/Fractured/IMG0000099.jpg"
    link.symlink_to(secret)
    dest = tmp_path / "project/data/fracatlas"
    with caplog.at_level("WARNING", logger="fracture.ingest"):
        ingest(iparams, dest, str(dataset))
    assert (dest / "images/Fractured/IMG0000099.jpg").read_text() == "not part of the export\n"
    assert (f"copying {link}, a link out of the export, from {secret.resolve()}: what it names joins the dataset "
            "(and a DVC remote after dvc push)") in caplog.text
    assert caplog.text.count("a link out of the export") == 1  # links inside the export are not named


@pytest.mark.parametrize("target", ["/nonexistent/IMG0000099.jpg", "IMG0000099.jpg"], ids=["dangling", "self"])
def test_a_broken_link_in_the_source_is_named(dataset, tmp_path, iparams, target):
    """A link to nothing (or to itself) stops both the copy and the listing with its own name and
    target, not a traceback of shutil's, and leaves no copy behind."""
    link = dataset / "images/Fractured/IMG0000099.jpg"
    link.symlink_to(target)
    dest = tmp_path / "project/data/fracatlas"
    with pytest.raises(IngestError, match="broken link") as copying:
        ingest(iparams, dest, str(dataset))
    with pytest.raises(IngestError, match="broken link") as listing:
        source_listing(dataset)
    for err in (copying, listing):
        message = str(err.value)
        assert str(link) in message and repr(target) in message and "Fix the link or remove it" in message
    assert not dest.exists() and not any(dest.parent.iterdir())  # no staging folder either


def test_ingest_from_zip_finds_the_layout_one_level_down(dataset, tmp_path, iparams):
    archive = zip_dir(dataset, tmp_path / "FracAtlas.zip")
    dest = tmp_path / "data/fracatlas"
    ingest(iparams, dest, str(archive))
    assert (dest / "images/Non_fractured").is_dir()


def csv_export(root: Path, image: bytes) -> Path:
    """A hospital's export (``ingest.layout: csv``) holding one image."""
    (root / "images").mkdir(parents=True)
    (root / "images/a.png").write_bytes(image)
    (root / "labels.csv").write_text("path,label\nimages/a.png,1\n")
    return root


def test_a_folder_of_several_exports_is_refused_naming_them(tmp_path, iparams):
    """A scheduled job pointed at a folder of monthly exports must not take the first by name
    order on every run (2026-11 forever, "Data changed: no", while 2026-12 sits beside it): ingest
    names them all and asks for the one to use."""
    csv = dataclasses.replace(iparams, layout="csv")
    exports = tmp_path / "exports"
    csv_export(exports / "2026-11", b"november")
    csv_export(exports / "2026-12", b"december")
    (exports / "notes").mkdir()  # a folder in neither layout is no candidate
    dest = tmp_path / "data/hospital"
    with pytest.raises(IngestError, match=(
        rf"^{re.escape(str(exports))} holds 2 datasets in the csv layout .*: 2026-11/, 2026-12/\. Ingest brings in "
        rf"one and does not guess which: .* FRACATLAS_SOURCE={re.escape(str(exports / '2026-12'))}\.$"
    )):
        ingest(csv, dest, str(exports))
    archive = shutil.make_archive(str(tmp_path / "exports"), "zip", exports)
    with pytest.raises(IngestError, match=r"exports\.zip holds 2 datasets .*: 2026-11/, 2026-12/\. .*extract the one to ingest"):
        ingest(csv, dest, archive)
    assert not dest.exists()
    ingest(csv, dest, str(exports / "2026-12"))  # named, it is the one taken
    assert (dest / "images/a.png").read_bytes() == b"december"
    shutil.rmtree(exports / "2026-12")  # the only one left is found without naming it
    ingest(csv, dest, str(exports))
    assert (dest / "images/a.png").read_bytes() == b"november"


def test_checksums_are_verified_when_the_copy_ships_them(dataset, tmp_path, iparams):
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(dataset)}" for p in sorted(dataset.rglob("*.jpg"))]
    (dataset / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    assert ingest(iparams, tmp_path / "ok", str(dataset)).checksums_verified == 8
    victim = next(dataset.rglob("*.jpg"))
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(IngestError, match=victim.name):
        ingest(iparams, tmp_path / "bad", str(dataset))
    assert not (tmp_path / "bad").exists()


def test_a_file_changed_while_it_is_copied_is_caught_by_the_checksums(dataset, tmp_path, iparams, monkeypatch):
    """The copy that is swapped into the project is what SHA256SUMS is checked against: a file the
    export rewrites while it is copied fails the ingest and leaves the previous dataset in place,
    instead of being versioned unchecked, even when the rewrite keeps its size and puts its old
    modification time back (`rsync -a` from an older copy), which the source's listing cannot see."""
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(dataset)}" for p in sorted(dataset.rglob("*.jpg"))]
    (dataset / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    dest = tmp_path / "project/data/fracatlas"
    assert ingest(iparams, dest, str(dataset)).checksums_verified == 8
    before = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    victim = next(dataset.rglob("*.jpg"))
    copytree = shutil.copytree

    def rewritten_meanwhile(src, dst, *args, **kwargs):
        stat = victim.stat()
        victim.write_bytes(bytes(stat.st_size))
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        return copytree(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copytree", rewritten_meanwhile)
    with pytest.raises(IngestError, match=rf"{re.escape(str(dataset))}: 1 files do not match SHA256SUMS.*{victim.name} \(hash differs\)"):
        ingest(iparams, dest, str(dataset))
    assert {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no staging folder left


@pytest.mark.parametrize("change", ["grown", "removed", "added"])
def test_a_source_changed_while_it_is_copied_is_refused_for_a_retry(dataset, tmp_path, iparams, monkeypatch, change):
    """Without SHA256SUMS the listing is all that sees an export still being written: a file that
    grows after its first bytes were copied, or one removed or added meanwhile, fails the ingest
    with a DownloadError (exit 75, which the flow's ingest task retries) naming the file, and
    leaves the previous dataset in place instead of versioning a torn copy."""
    dest = tmp_path / "project/data/fracatlas"
    ingest(iparams, dest, str(dataset))
    before = tree(dest)
    copytree, copy2 = shutil.copytree, shutil.copy2
    changed: list[str] = []

    def copy_then_change(src, dst, **kwargs):  # the export's writer, between two files of the copy
        result = copy2(src, dst, **kwargs)
        if not changed:
            first = Path(src)
            victim = {
                "grown": first,  # its copy holds only the bytes it had
                "removed": next(p for p in sorted(dataset.rglob("*.jpg")) if p != first),
                "added": first.with_name("IMG0000099.jpg"),
            }[change]
            if change == "grown":
                with victim.open("ab") as fh:
                    fh.write(b"more")
            elif change == "removed":
                victim.unlink()
            else:
                victim.write_bytes(b"new")
            changed.append(str(victim.relative_to(dataset)))
        return result

    def copying(src, dst, *args, **kwargs):  # copytree's own recursion passes copy_function on
        return copytree(src, dst, *args, **kwargs) if args else copytree(src, dst, copy_function=copy_then_change, **kwargs)

    monkeypatch.setattr(shutil, "copytree", copying)
    how = {"grown": r"resized from [\d,]+ to [\d,]+ bytes", "removed": "removed", "added": "added"}[change]
    with pytest.raises(DownloadError) as caught:
        ingest(iparams, dest, str(dataset))
    assert re.fullmatch(
        rf"{re.escape(str(dataset))}: the source changed while it was copied \({re.escape(changed[0])} {how}\); "
        r"nothing was ingested\. Run ingest again once the export has finished\.",
        str(caught.value),
    )
    assert tree(dest) == before
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no staging folder left
    monkeypatch.undo()  # the export has finished: the retry brings it in
    ingest(iparams, dest, str(dataset))
    assert tree(dest) == tree(dataset)


def test_a_zip_changed_while_it_is_extracted_is_refused_for_a_retry(dataset, tmp_path, iparams, monkeypatch):
    """A zip rewritten while it is read, or one still being written (it reads as no zip at all),
    is worth a retry once it is complete; the same unreadable zip left alone is not."""
    archive = zip_dir(dataset, tmp_path / "FracAtlas.zip")
    dest = tmp_path / "data/fracatlas"
    extract = safe_extract

    def appended_meanwhile(zip_path, target, label=None):
        extract(zip_path, target, label)
        with zipfile.ZipFile(zip_path, "a") as zf:
            zf.writestr("FracAtlas/images/Fractured/IMG0000099.jpg", b"late")

    monkeypatch.setattr("fracture.ingest.safe_extract", appended_meanwhile)
    with pytest.raises(DownloadError, match=rf"^{re.escape(str(archive))}: the source changed while it was extracted \(FracAtlas\.zip resized"):
        ingest(iparams, dest, str(archive))
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) // 2])  # no central directory yet

    def written_meanwhile(zip_path, target, label=None):
        try:
            extract(zip_path, target, label)
        finally:
            with open(zip_path, "ab") as fh:
                fh.write(whole[len(whole) // 2 :])

    monkeypatch.setattr("fracture.ingest.safe_extract", written_meanwhile)
    with pytest.raises(DownloadError, match=r"cannot be read as a zip \(File is not a zip file\), and it changed"):
        ingest(iparams, dest, str(archive))
    monkeypatch.undo()
    archive.write_bytes(whole[: len(whole) // 2])
    # Modified long ago, as a zip that has stayed damaged is: one modified moments ago may be a
    # copy onto the share that stalled, worth a retry.
    old = time.time() - ZIP_RECENT_S - 60
    os.utime(archive, (old, old))
    with pytest.raises(IngestError, match="is not a readable zip file") as unchanged:
        ingest(iparams, dest, str(archive))
    assert not isinstance(unchanged.value, DownloadError)
    assert not dest.exists()


@pytest.mark.parametrize("state", ["truncated", "damaged-member"])
def test_a_zip_still_being_copied_onto_the_share_is_refused_for_a_retry(dataset, tmp_path, iparams, state):
    """A zip still being copied has no central directory yet (or, copied over an older one, a member
    whose bytes are not all there), so it fails to open within milliseconds: it was called damaged
    for good, as no write landed in so short a read. Now a zip that cannot be read is watched for a
    moment: one that changes is a copy in progress, retried; one that does not stays a damaged zip."""
    whole = zip_dir(dataset, tmp_path / "whole.zip").read_bytes()
    archive = tmp_path / "share" / "FracAtlas.zip"
    archive.parent.mkdir()
    archive.write_bytes(whole[: len(whole) // 2] if state == "truncated" else _bit_rot(whole))
    dest = tmp_path / "data/fracatlas"

    def copy_finishes() -> None:  # the copy's last bytes land after ingest has failed to read it
        time.sleep(0.5)
        archive.write_bytes(whole)

    copier = threading.Thread(target=copy_finishes)
    copier.start()
    try:
        with pytest.raises(DownloadError) as caught:
            ingest(iparams, dest, str(archive))
    finally:
        copier.join()
    assert re.fullmatch(
        rf"{re.escape(str(archive))} cannot be read as a zip \(.+\), and it changed meanwhile \(FracAtlas\.zip "
        r"(resized from [\d,]+ to [\d,]+ bytes|rewritten)\): it is still being written, as a copy onto a share in "
        r"progress is\. Nothing was ingested; run ingest again once the copy has finished\.",
        str(caught.value),
    )
    assert not dest.exists()
    ingest(iparams, dest, str(archive))  # the retry, once the copy has finished
    assert tree(dest) == tree(dataset)


@pytest.mark.parametrize("skew", [0, 90], ids=["modified-now", "server-clock-ahead"])
def test_a_zip_whose_copy_onto_the_share_stalls_is_refused_for_a_retry(dataset, tmp_path, iparams, skew):
    """A copy over SMB or NFS that stalls for longer than the moment ingest watches an unreadable zip
    left it unchanged, so it was called damaged for good and waited for a person. A zip modified
    within ZIP_RECENT_S is now refused as worth a retry; so is one stamped ahead of this machine's
    clock (a file server whose clock runs ahead), which must neither crash nor count as old."""
    whole = zip_dir(dataset, tmp_path / "whole.zip").read_bytes()
    archive = tmp_path / "share" / "FracAtlas.zip"
    archive.parent.mkdir()
    archive.write_bytes(whole[: len(whole) // 2])  # the copy stalls here: nothing lands while ingest watches
    if skew:
        stamp = time.time() + skew
        os.utime(archive, (stamp, stamp))
    dest = tmp_path / "data/fracatlas"
    with pytest.raises(DownloadError) as caught:
        ingest(iparams, dest, str(archive))
    when = (
        r"its modification time is [\d,]+ s ahead of this machine's clock \(the file server's clock runs ahead of "
        r"this machine's; set both by NTP\), so how long ago it was written is not known" if skew
        else r"it was last modified [\d,]+ s ago"
    )
    assert re.fullmatch(
        rf"{re.escape(str(archive))} cannot be read as a zip \(File is not a zip file\), and {when}: it may "
        r"still be being copied onto the share, a copy that stalled for longer than the 2 s ingest watched it for "
        r"a change\. Nothing was ingested; the scheduled flow retries it, or run ingest again once the copy has "
        r"finished\. A zip that still cannot be read once it is 300 s past its modification time is taken as "
        r"damaged\.",
        str(caught.value),
    )
    assert not dest.exists()
    # The same zip, last modified longer ago than that: damaged, not retried.
    old = time.time() - ZIP_RECENT_S - 60
    os.utime(archive, (old, old))
    damaged_message = r"is not a readable zip file \(File is not a zip file\); fetch it again$"
    with pytest.raises(IngestError, match=damaged_message) as damaged:
        ingest(iparams, dest, str(archive))
    assert not isinstance(damaged.value, DownloadError)
    archive.write_bytes(whole)  # the copy resumes and finishes
    ingest(iparams, dest, str(archive))
    assert tree(dest) == tree(dataset)


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_checksums_at_the_exports_top_are_verified_for_the_folder_below(dataset, tmp_path, iparams, caplog, as_zip):
    """An export whose SHA256SUMS sits at its top, listing ``FracAtlas/images/...``, while the
    dataset is the folder below: the list is checked against the copy under that folder's name,
    not left behind uncopied with 0 files checked. Entries outside that folder name files ingest
    does not copy (so never versions): they are left out, with a warning."""
    top = tmp_path / "delivery"
    top.mkdir()
    dataset = dataset.rename(top / "FracAtlas")
    (top / "README.txt").write_text("FracAtlas, exported 2026-12\n")
    files = sorted(p for p in dataset.rglob("*") if p.is_file())
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(top)}" for p in files]
    lines.append(f"{hashlib.sha256((top / 'README.txt').read_bytes()).hexdigest()}  README.txt")

    def source() -> str:
        return shutil.make_archive(str(tmp_path / "delivery"), "zip", top) if as_zip else str(top)

    (top / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    dest = tmp_path / "data/fracatlas"
    with caplog.at_level(logging.WARNING, logger="fracture.ingest"):
        assert ingest(iparams, dest, source()).checksums_verified == len(files) == 9
    assert "lists 1 files outside FracAtlas/" in caplog.text and "README.txt" in caplog.text
    before = tree(dest)
    victim = files[0].relative_to(top)
    lines[0] = f"{'0' * 64}  ./{victim}"
    (top / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    shown = tmp_path / ("delivery.zip" if as_zip else "delivery")
    with pytest.raises(IngestError, match=(
        rf"^{re.escape(str(shown / 'FracAtlas'))}: 1 files do not match {re.escape(str(shown / 'SHA256SUMS'))} "
        rf"as copied, e\.g\. \['\./{re.escape(str(victim))} \(hash differs\)'\]"
    )):
        ingest(iparams, dest, source())
    assert tree(dest) == before
    (top / "SHA256SUMS").write_text(f"{'0' * 64}  ../elsewhere.jpg\n")
    with pytest.raises(IngestError, match=r"SHA256SUMS, line 1: '\.\./elsewhere\.jpg' points outside"):
        ingest(iparams, dest, source())


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("d41d8cd98f00b204e9800998ecf8427e  dataset.csv", r"line 2: 'd41d8cd9.*' is not '<64 hex digits>  <path>'"),
        ("not-a-hash-line", r"line 2: 'not-a-hash-line' is not '<64 hex digits>  <path>'"),
        (f"{'0' * 64}  ../outside.jpg", r"line 2: '../outside.jpg' points outside"),
    ],
)
def test_a_malformed_checksum_file_is_refused_naming_its_line(dataset, tmp_path, iparams, line, message):
    """An md5 list saved under the wrong name, a stray line or a path outside the copy: the ingest
    says which line of which file, and leaves nothing behind."""
    first = next(dataset.rglob("*.jpg"))
    good = f"{hashlib.sha256(first.read_bytes()).hexdigest().upper()} *{first.relative_to(dataset)}"
    (dataset / "SHA256SUMS").write_text(f"{good}\n{line}\n")
    with pytest.raises(IngestError, match=message) as caught:
        ingest(iparams, tmp_path / "bad", str(dataset))
    assert "SHA256SUMS, line 2" in str(caught.value)
    assert not (tmp_path / "bad").exists()
    (dataset / "SHA256SUMS").write_text(f"{good}\n")  # upper-case hex and the binary marker are sha256sum's too
    assert ingest(iparams, tmp_path / "ok", str(dataset)).checksums_verified == 1
    # A listed file that is a link into another store is the copy's own file, as written.
    store = tmp_path / "store"
    store.mkdir()
    first.rename(store / first.name)
    first.symlink_to(store / first.name)
    assert ingest(iparams, tmp_path / "linked", str(dataset)).checksums_verified == 1


def test_checksum_lines_for_escaped_names_are_read_as_sha256sum_writes_them(dataset, tmp_path, iparams):
    r"""GNU sha256sum marks a line whose name holds a backslash, a newline or a carriage return with
    a leading backslash, and writes those as \\, \n and \r; other characters as they are."""
    folder = dataset / "images/Fractured"
    names = ["back\\slash.jpg", "new\nline.jpg", "carriage\rreturn.jpg", "form\x0cfeed.jpg"]
    lines = []
    for i, name in enumerate(names):
        (folder / name).write_bytes(b"x" * (i + 1))
        digest = hashlib.sha256(b"x" * (i + 1)).hexdigest()
        escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        marker = "\\" if escaped != name else ""
        lines.append(f"{marker}{digest}  images/Fractured/{escaped}")
    (dataset / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    assert ingest(iparams, tmp_path / "ok", str(dataset)).checksums_verified == len(names)
    (folder / "back\\slash.jpg").write_bytes(b"changed")
    with pytest.raises(IngestError, match=r"back\\\\slash\.jpg \(hash differs\)"):
        ingest(iparams, tmp_path / "changed", str(dataset))
    # An escape sha256sum never writes is no checksum line.
    (dataset / "SHA256SUMS").write_text(f"\\{'0' * 64}  images/Fractured/tab\\tname.jpg\n")
    with pytest.raises(IngestError, match=r"line 1: .* is not '<64 hex digits>  <path>'"):
        ingest(iparams, tmp_path / "bad", str(dataset))


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs GNU coreutils' sha256sum")
def test_checksums_in_the_bsd_tag_form_are_verified_as_sha256sum_reads_them(dataset, tmp_path, iparams):
    r"""`sha256sum --tag` (and `shasum -a 256 --tag`, BSD's `sha256`) write `SHA256 (<path>) = <hex>`,
    escaping a name that holds a backslash or a newline as the text form does; GNU's `-c` reads
    them, mixed with text-form lines in one file."""
    folder = dataset / "images/Fractured"
    odd = ["back\\slash.jpg", "new\nline.jpg", "scan (1) = copy.jpg"]
    for i, name in enumerate(odd):
        (folder / name).write_bytes(b"y" * (i + 1))
    listed = sorted(str(p.relative_to(dataset)) for p in dataset.rglob("*.jpg"))
    tagged = subprocess.run(["sha256sum", "--tag", "--", *listed], cwd=dataset, capture_output=True, check=True).stdout
    assert b"\\SHA256 (images/Fractured/back\\\\slash.jpg) = " in tagged  # GNU escapes tag names too
    text = subprocess.run(["sha256sum", "--", listed[0]], cwd=dataset, capture_output=True, check=True).stdout
    (dataset / "SHA256SUMS").write_bytes(text + tagged)
    assert ingest(iparams, tmp_path / "ok", str(dataset)).checksums_verified == len(listed) + 1
    (folder / "back\\slash.jpg").write_bytes(b"changed")
    with pytest.raises(IngestError, match=r"back\\\\slash\.jpg \(hash differs\)"):
        ingest(iparams, tmp_path / "changed", str(dataset))
    for line, message in [
        (f"SHA256 (../outside.jpg) = {'0' * 64}", r"line 1: '../outside.jpg' points outside"),
        (f"\\SHA256 (images/Fractured/tab\\tname.jpg) = {'0' * 64}", r"line 1: .* is not '<64 hex digits>  <path>'"),
        (f"SHA256 (dataset.csv) = {'0' * 63}", r"line 1: .* is not '<64 hex digits>  <path>'"),
    ]:
        (dataset / "SHA256SUMS").write_text(f"{line}\n")
        with pytest.raises(IngestError, match=message):
            ingest(iparams, tmp_path / "bad", str(dataset))
        assert not (tmp_path / "bad").exists()


def test_a_checksum_file_with_a_byte_order_mark_is_read(dataset, tmp_path, iparams):
    """Notepad and PowerShell's `Out-File -Encoding utf8` start the file with a UTF-8 byte-order
    mark (and end lines with CRLF); the first line is still a checksum line. UTF-16, which Windows
    PowerShell writes by default, is refused by name."""
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(dataset)}" for p in sorted(dataset.rglob("*.jpg"))]
    text = "\r\n".join(lines) + "\r\n"
    (dataset / "SHA256SUMS").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert ingest(iparams, tmp_path / "ok", str(dataset)).checksums_verified == 8
    (dataset / "SHA256SUMS").write_bytes(text.encode("utf-16"))
    with pytest.raises(IngestError, match=r"SHA256SUMS is UTF-16 text; save it as UTF-8"):
        ingest(iparams, tmp_path / "bad", str(dataset))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("algorithm", ["MD5", "SHA1", "SHA512"])
def test_a_tag_line_for_another_algorithm_is_refused_naming_it(dataset, tmp_path, iparams, algorithm):
    first = next(dataset.rglob("*.jpg"))
    good = f"SHA256 ({first.relative_to(dataset)}) = {hashlib.sha256(first.read_bytes()).hexdigest()}"
    other = f"{algorithm} ({first.relative_to(dataset)}) = {hashlib.new(algorithm.lower(), first.read_bytes()).hexdigest()}"
    (dataset / "SHA256SUMS").write_text(f"{good}\n{other}\n")
    with pytest.raises(IngestError, match=rf"SHA256SUMS, line 2: .* is a {algorithm} checksum; only SHA256 is checked"):
        ingest(iparams, tmp_path / "bad", str(dataset))
    assert not (tmp_path / "bad").exists()


def test_wrong_layout_and_missing_source_say_what_to_do(tmp_path, iparams):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="images/Fractured"):
        ingest(iparams, tmp_path / "d", str(tmp_path / "empty"))
    with pytest.raises(IngestError, match="FRACATLAS_SOURCE"):
        ingest(iparams, tmp_path / "d", str(tmp_path / "nowhere"))


def test_zip_slip_member_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("FracAtlas/dataset.csv", "image_id\n")
        zf.writestr("../../escaped.txt", "x")
    with pytest.raises(IngestError, match="escaped.txt"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def _patch_headers(data: bytes, local: int, central: int, value: int) -> bytes:
    """Writes ``value`` (2 bytes) at offset ``local`` of every local file header and ``central`` of
    every central directory entry: how a zip records a member's flags and compression method."""
    out = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", local), (b"PK\x01\x02", central)):
        at = out.find(signature)
        while at != -1:
            struct.pack_into("<H", out, at + offset, value)
            at = out.find(signature, at + 4)
    return bytes(out)


def _members(*names: str, method: int = zipfile.ZIP_STORED) -> bytes:
    """A zip of ``names`` (a trailing ``/`` makes a folder), each file holding 8000 hex digits,
    which deflate cannot shrink below a few kilobytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for number, name in enumerate(names):
            zf.writestr(name, "" if name.endswith("/") else random.Random(number).randbytes(4000).hex())
    return buf.getvalue()


def _bit_rot(data: bytes) -> bytes:
    out = bytearray(data)
    start = 30 + len("FracAtlas/dataset.csv") + 40  # inside the first member's deflate stream
    out[start : start + 30] = bytes(b ^ 0xFF for b in out[start : start + 30])
    return bytes(out)


@pytest.mark.parametrize(
    ("data", "member", "advice"),
    [
        pytest.param(_bit_rot(_members("FracAtlas/dataset.csv", method=zipfile.ZIP_DEFLATED)),
                     "FracAtlas/dataset.csv", "is damaged", id="bit-rot"),
        pytest.param(_patch_headers(_members("FracAtlas/dataset.csv"), 6, 8, 0x1),  # flag bit 0: encrypted
                     "FracAtlas/dataset.csv", "without a password using plain deflate", id="encrypted"),
        pytest.param(_patch_headers(_members("FracAtlas/dataset.csv"), 8, 10, 9),  # method 9: Deflate64
                     "FracAtlas/dataset.csv", "without a password using plain deflate", id="deflate64"),
        pytest.param(_members("FracAtlas/images", "FracAtlas/images/Fractured/x.jpg"),
                     "FracAtlas/images/Fractured/x.jpg", "one a file and the other a folder", id="file-then-folder"),
        pytest.param(_members("FracAtlas/images/", "FracAtlas/images"),
                     "FracAtlas/images", "one a file and the other a folder", id="folder-then-file"),
    ],
)
def test_a_zip_member_that_cannot_be_extracted_is_named(tmp_path, iparams, tmpdir_root, data, member, advice):
    archive = tmp_path / "FracAtlas.zip"
    archive.write_bytes(data)
    # Modified long ago: a damaged zip modified moments ago may be a stalled copy, refused for a retry.
    old = time.time() - ZIP_RECENT_S - 60
    os.utime(archive, (old, old))
    dest = tmp_path / "data/fracatlas"
    with pytest.raises(IngestError) as err:
        ingest(iparams, dest, str(archive))
    message = str(err.value)
    assert str(archive) in message and repr(member) in message and advice in message
    assert "pass the extracted folder" in message
    assert not dest.exists()
    assert not any(tmpdir_root.iterdir())


def test_a_zip_larger_than_the_free_space_is_refused_before_extracting(dataset, tmp_path, monkeypatch):
    archive = zip_dir(dataset, tmp_path / "FracAtlas.zip")
    needed = sum(m.file_size for m in zipfile.ZipFile(archive).infolist())
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: real._replace(free=needed - 1))
    target = tmp_path / "out"
    with pytest.raises(IngestError, match="unpacks to") as err:
        safe_extract(archive, target)
    assert f"{needed:,} bytes" in str(err.value) and f"{needed - 1:,} bytes free" in str(err.value)
    assert not target.exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda _: real._replace(free=needed))
    safe_extract(archive, target)
    assert (target / "FracAtlas/dataset.csv").is_file()


@pytest.fixture()
def few_real_images(tmp_path) -> Path:
    """Two fractured and two intact real X-rays in the FracAtlas layout (synthetic without the copy).

    The download code is what is under test here, so a machine without the real copy still
    runs these tests on synthetic images rather than skipping them.
    """
    root = tmp_path / "src" / "FracAtlas"
    if (FRACATLAS / "dataset.csv").is_file():
        return make_subset(FRACATLAS, root, pick_ids(FRACATLAS, 2, 2))
    make_dataset(root, 2, 2)
    return root


@dataclasses.dataclass
class Reply:
    body: bytes
    status: int = 200
    cut_after: int | None = None  # send only this many bytes of the body, then hang up
    announce_length: bool = True  # send Content-Length for the whole body, cut or not
    headers: dict[str, str] = dataclasses.field(default_factory=dict)  # e.g. Content-Type, Location


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        reply = self.server.replies.get(self.path)  # type: ignore[attr-defined]
        if reply is None:
            self.send_error(404)
            return
        self.send_response(reply.status)
        if reply.announce_length:
            self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body[: reply.cut_after])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:  # keeps the test output quiet
        pass


@dataclasses.dataclass
class Figshare:
    """The figshare API stand-in: ``publish`` decides what the article and its file look like."""

    server: ThreadingHTTPServer
    params: IngestParams

    @property
    def url(self) -> str:
        return f"{self.params.figshare_api}/files/{self.params.figshare_file}"

    @property
    def base(self) -> str:
        return self.params.figshare_api

    def publish(self, archive: bytes, md5: str | None = None, body: bytes | None = None, **reply: object) -> None:
        """Lists ``archive`` (its size, and ``md5`` or its own; ``""`` lists none) and serves ``body``
        (the archive itself unless given) at its download URL."""
        article = {"files": [{
            "name": self.params.figshare_file, "download_url": self.url, "size": len(archive),
            "computed_md5": hashlib.md5(archive).hexdigest() if md5 is None else md5,
        }]}
        replies = self.server.replies  # type: ignore[attr-defined]
        replies[f"/articles/{self.params.figshare_article}"] = Reply(json.dumps(article).encode())
        replies[f"/files/{self.params.figshare_file}"] = Reply(archive if body is None else body, **reply)  # type: ignore[arg-type]

    def serve(self, path: str, reply: Reply) -> None:
        """Answers ``path`` (e.g. ``/login``) with ``reply``."""
        self.server.replies[path] = reply  # type: ignore[attr-defined]


@pytest.fixture()
def figshare(iparams) -> Iterator[Figshare]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.replies = {}  # type: ignore[attr-defined]
    # A short poll interval: shutdown() waits for it, in every test's teardown.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield Figshare(server, dataclasses.replace(iparams, figshare_api=base))
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def tmpdir_root(tmp_path, monkeypatch) -> Path:
    """Points the tempfile module at a folder of the test's own, to see what a run leaves there."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_figshare_download_is_md5_checked(figshare, few_real_images, tmp_path, tmpdir_root):
    archive = zip_dir(few_real_images, tmp_path / "FracAtlas.zip").read_bytes()
    figshare.publish(archive)
    result = ingest(figshare.params, tmp_path / "data/fracatlas", None)
    assert result.source.startswith("figshare:")
    assert tree(tmp_path / "data/fracatlas") == tree(few_real_images)

    # A complete transfer whose md5 differs is not cured by retrying: a plain IngestError.
    figshare.publish(archive, md5="0" * 32)
    with pytest.raises(IngestError, match="md5") as err:
        ingest(figshare.params, tmp_path / "other", None)
    assert not isinstance(err.value, DownloadError)
    assert figshare.url in str(err.value)
    assert not (tmp_path / "other").exists()
    assert not any(tmpdir_root.iterdir())


@pytest.mark.parametrize("announce_length", [True, False], ids=["content-length", "no-content-length"])
def test_truncated_transfer_leaves_nothing_behind(figshare, few_real_images, tmp_path, tmpdir_root, announce_length):
    archive = zip_dir(few_real_images, tmp_path / "FracAtlas.zip").read_bytes()
    dest = tmp_path / "project/data/fracatlas"
    # The API and the headers promise the whole zip; the server sends half and hangs up.
    figshare.publish(archive, cut_after=len(archive) // 2, announce_length=announce_length)
    with pytest.raises(DownloadError) as err:
        ingest(figshare.params, dest, None)
    message = str(err.value)
    assert figshare.url in message and "run ingest again" in message and "FRACATLAS_SOURCE" in message
    assert f"of {len(archive)} bytes" in message  # how much was expected, so the cut is visible
    assert not dest.exists()
    assert not dest.parent.exists() or not any(dest.parent.iterdir())  # no staging folder either
    assert not any(tmpdir_root.iterdir())  # no partial zip, no extraction folder

    # Straight to a work folder, as a caller that keeps its downloads would do.
    workdir = tmp_path / "downloads"
    workdir.mkdir()
    with pytest.raises(DownloadError):
        download_figshare(figshare.params, workdir)
    assert not any(workdir.iterdir())

    # The next run, once the server behaves, succeeds from scratch ...
    figshare.publish(archive)
    ingest(figshare.params, dest, None)
    assert tree(dest) == tree(few_real_images)
    # ... and a later cut-short run leaves that good copy as it was.
    figshare.publish(archive, cut_after=len(archive) // 3, announce_length=announce_length)
    with pytest.raises(DownloadError):
        ingest(figshare.params, dest, None)
    assert tree(dest) == tree(few_real_images)
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


@pytest.mark.parametrize(("status", "transient"), [(503, True), (404, False)])
def test_http_errors_are_transient_only_when_the_server_is_at_fault(figshare, tmp_path, tmpdir_root, status, transient):
    figshare.publish(b"<html>error</html>", status=status)
    with pytest.raises(IngestError, match=str(status)) as err:
        ingest(figshare.params, tmp_path / "d", None)
    assert isinstance(err.value, DownloadError) is transient
    assert "FRACATLAS_SOURCE" in str(err.value)
    assert not (tmp_path / "d").exists()
    assert not any(tmpdir_root.iterdir())


HTML_PAGE = b"<html><body><h1>Access denied</h1>This file is under embargo.</body></html>"


@pytest.mark.parametrize("redirected", [False, True], ids=["direct", "redirect"])
def test_a_complete_html_page_in_place_of_the_zip_is_not_retried(figshare, few_real_images, tmp_path, tmpdir_root,
                                                                  redirected):
    """An embargo, login or firewall page answered with HTTP 200 (straight away or at the end of a
    redirect) comes whole, so a retry gets it again: a plain IngestError that shows the page."""
    archive = zip_dir(few_real_images, tmp_path / "FracAtlas.zip").read_bytes()
    page = Reply(HTML_PAGE, headers={"Content-Type": "text/html; charset=utf-8"})
    if redirected:
        figshare.publish(archive, body=b"", status=302, headers={"Location": f"{figshare.base}/login"})
        figshare.serve("/login", page)
    else:
        figshare.publish(archive, body=page.body, headers=page.headers)
    dest = tmp_path / "data/fracatlas"
    with pytest.raises(IngestError) as err:
        ingest(figshare.params, dest, None)
    assert not isinstance(err.value, DownloadError)
    message = str(err.value)
    final = f"{figshare.base}/login" if redirected else figshare.url
    assert "HTTP 200" in message and "'text/html; charset=utf-8'" in message and f"from {final}" in message
    assert "Access denied" in message and f"lists ({len(archive)} bytes)" in message
    assert "retry will not help" in message and "FRACATLAS_SOURCE" in message
    assert not dest.exists()
    assert not any(tmpdir_root.iterdir())

    # Complete per its own Content-Length but not the listed size, whatever its Content-Type.
    figshare.publish(archive, body=archive[:1000])
    with pytest.raises(IngestError, match="1000 bytes in all") as err:
        ingest(figshare.params, dest, None)
    assert not isinstance(err.value, DownloadError)
    # A body that matches the listed md5 is the zip, even if the server calls it text/html.
    figshare.publish(archive, headers={"Content-Type": "text/html"})
    ingest(figshare.params, dest, None)
    assert tree(dest) == tree(few_real_images)


def test_a_body_longer_than_listed_is_refused_when_no_md5_is_listed(figshare, few_real_images, tmp_path, tmpdir_root):
    archive = zip_dir(few_real_images, tmp_path / "FracAtlas.zip").read_bytes()
    # Still a readable zip (its directory sits before the junk); only the size gives it away.
    figshare.publish(archive, md5="", body=archive + b"JUNK" * 1000)
    with pytest.raises(IngestError) as err:
        ingest(figshare.params, tmp_path / "d", None)
    assert not isinstance(err.value, DownloadError)
    message = str(err.value)
    assert f"lists ({len(archive)} bytes)" in message and f"{len(archive) + 4000} bytes in all" in message
    assert not (tmp_path / "d").exists()
    assert not any(tmpdir_root.iterdir())


def test_an_api_answer_that_is_not_json_is_not_retried(figshare, tmp_path, tmpdir_root):
    """A proxy's login page answered with HTTP 200 where the article's JSON should be."""
    login = Reply(b"<html>Proxy login required</html>", headers={"Content-Type": "text/html"})
    figshare.serve(f"/articles/{figshare.params.figshare_article}", login)
    with pytest.raises(IngestError, match="did not answer with a figshare article") as err:
        ingest(figshare.params, tmp_path / "d", None)
    assert not isinstance(err.value, DownloadError)
    message = str(err.value)
    assert "HTTP 200" in message and "'text/html'" in message and "Proxy login required" in message
    assert "FRACATLAS_SOURCE" in message
    assert not any(tmpdir_root.iterdir())


def test_a_certificate_the_client_does_not_trust_is_not_retried(iparams):
    """requests' SSLError is a ConnectionError, which is worth a retry; an untrusted certificate is not."""
    from fracture.ingest import _request_error

    untrusted = _request_error("listing", requests.exceptions.SSLError("certificate verify failed"), iparams)
    assert type(untrusted) is IngestError and "certificate verify failed" in str(untrusted)
    assert isinstance(_request_error("listing", requests.ConnectionError("reset by peer"), iparams), DownloadError)


def test_downloaded_zip_without_the_layout_is_refused(figshare, few_real_images, tmp_path, tmpdir_root):
    (few_real_images / "dataset.csv").unlink()
    figshare.publish(zip_dir(few_real_images, tmp_path / "FracAtlas.zip").read_bytes())
    with pytest.raises(IngestError, match="not in the FracAtlas layout") as err:
        ingest(figshare.params, tmp_path / "d", None)
    assert not isinstance(err.value, DownloadError)
    message = str(err.value)
    assert "dataset.csv" in message and "FracAtlas.zip from figshare article" in message
    assert "--source" in message
    assert not (tmp_path / "d").exists()
    assert not any(tmpdir_root.iterdir())


def test_downloaded_zip_with_a_zip_slip_member_is_refused(figshare, few_real_images, tmp_path, tmpdir_root):
    evil = zip_dir(few_real_images, tmp_path / "FracAtlas.zip", extra={"../../escaped.txt": "x"})
    figshare.publish(evil.read_bytes())
    with pytest.raises(IngestError, match=r"'\.\./\.\./escaped\.txt'.*zip-slip") as err:
        ingest(figshare.params, tmp_path / "d", None)
    assert not isinstance(err.value, DownloadError)
    assert "FracAtlas.zip from figshare article" in str(err.value)
    assert not (tmp_path / "d").exists()
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not any(tmpdir_root.iterdir())


def test_unreachable_api_explains_the_manual_route(tmp_path, iparams):
    params = dataclasses.replace(iparams, figshare_api="http://127.0.0.1:9")
    with pytest.raises(DownloadError, match="--source PATH or the FRACATLAS_SOURCE") as err:
        ingest(params, tmp_path / "d", None)
    assert "http://127.0.0.1:9/articles/" in str(err.value)


def test_cli_exit_status_tells_transient_from_permanent(tmp_path, monkeypatch):
    from fracture import cli  # noqa: PLC0415 - heavy (torch, mlflow); only this test needs it

    params = (REPO / "params.yaml").read_text().replace("https://api.figshare.com/v2", "http://127.0.0.1:9")
    assert "127.0.0.1:9" in params
    (tmp_path / "params.yaml").write_text(params)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FRACATLAS_SOURCE", raising=False)
    with pytest.raises(SystemExit) as unreachable:
        cli.main(["ingest"])
    assert unreachable.value.code == EX_TEMPFAIL
    # In the flow the command runs in its process: its failure says why, not only "exit 75", which
    # is all a run that failed after its retries said (the reason only in earlier attempts' log lines).
    from tasks.pipeline import StageFailed, run_command  # noqa: PLC0415 - heavy import

    with pytest.raises(StageFailed, match=r"^`fracture ingest` failed: exit 75: .*http://127\.0\.0\.1:9/articles/.*"
                                          r"--source PATH or the FRACATLAS_SOURCE") as failed:
        run_command(tmp_path, ["ingest"])
    assert failed.value.returncode == EX_TEMPFAIL
    with pytest.raises(SystemExit) as wrong_path:
        cli.main(["ingest", "--source", str(tmp_path / "nowhere")])
    assert wrong_path.value.code != EX_TEMPFAIL and "does not exist" in str(wrong_path.value.code)


def test_ingest_task_retries_only_transient_failures():
    from prefect.states import Failed  # noqa: PLC0415

    from tasks.pipeline import StageFailed, ingest_task, retry_transient_ingest  # noqa: PLC0415 - heavy import

    assert ingest_task.retry_condition_fn is retry_transient_ingest and ingest_task.retries == 2

    def retries(exc: BaseException) -> bool:
        # What Prefect's engine hands the condition: a Failed state holding the exception.
        return retry_transient_ingest(ingest_task, None, Failed(data=exc))  # type: ignore[arg-type]

    assert retries(StageFailed("`fracture ingest` failed (exit 75)", EX_TEMPFAIL))
    assert not retries(StageFailed("`fracture ingest` failed (exit 1): source does not exist", 1))
    assert not retries(StageFailed("`dvc add data` failed (exit 255)", 255))
    assert not retries(FileNotFoundError("python"))
