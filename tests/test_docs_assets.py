"""Data Docs that open offline: pinned npm tarballs checked and installed, pages pointed at the copies.

The tarballs here are made in the test and read through ``file://`` URLs, so nothing is downloaded.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from fracture.docs_assets import AssetsError, fetch, make_offline

CDN = "https://cdn.example.org/widget@1.2.3/dist/widget.min.js"


def tarball(path: Path, files: dict[str, bytes]) -> str:
    """An npm-style tarball (files under ``package/``) at ``path``; returns its sha512 integrity."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return "sha512-" + base64.b64encode(hashlib.sha512(buffer.getvalue()).digest()).decode()


def lock_file(tmp_path: Path, integrity: str, tgz: Path) -> Path:
    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"assets": [{
        "package": "@scope/widget", "version": "1.2.3", "tarball": tgz.as_uri(), "integrity": integrity,
        "files": {CDN: "dist/widget.min.js"}, "dirs": ["fonts"],
    }]}))
    return lock


def test_a_pinned_tarball_is_checked_installed_and_kept(tmp_path):
    tgz = tmp_path / "widget-1.2.3.tgz"
    integrity = tarball(tgz, {"dist/widget.min.js": b"widget()", "fonts/a.woff2": b"font", "README.md": b"not used"})
    lock, target = lock_file(tmp_path, integrity, tgz), tmp_path / "assets"
    assert fetch(target, lock) == target
    folder = target / "@scope__widget@1.2.3"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "dist/widget.min.js", "fonts/a.woff2"]  # the files the pages use and the folders copied whole, no more
    assert (folder / "dist/widget.min.js").read_bytes() == b"widget()"
    tgz.unlink()  # installed already: nothing is downloaded again
    assert fetch(target, lock) == target


def test_a_tarball_that_does_not_match_its_integrity_installs_nothing(tmp_path):
    tgz = tmp_path / "widget-1.2.3.tgz"
    integrity = tarball(tgz, {"dist/widget.min.js": b"widget()"})
    tarball(tgz, {"dist/widget.min.js": b"evil()"})  # the registry's file changed after it was pinned
    target = tmp_path / "assets"
    with pytest.raises(AssetsError, match=r"^@scope/widget@1\.2\.3: the downloaded tarball's sha512 does not match "
                                          r"docs_assets\.lock\.json$"):
        fetch(target, lock_file(tmp_path, integrity, tgz))
    assert not target.exists() or not any(target.iterdir())


def test_a_tarball_without_a_pinned_file_is_refused_naming_it(tmp_path):
    tgz = tmp_path / "widget-1.2.3.tgz"
    integrity = tarball(tgz, {"dist/other.js": b"other()", "fonts/a.woff2": b"font"})
    with pytest.raises(AssetsError, match=r"@scope/widget@1\.2\.3 has no \['dist/widget\.min\.js'\]"):
        fetch(tmp_path / "assets", lock_file(tmp_path, integrity, tgz))
    assert list((tmp_path / "assets").iterdir()) == []  # neither the folder nor the part already copied


def test_the_data_docs_pages_are_pointed_at_their_local_copies(tmp_path):
    tgz = tmp_path / "widget-1.2.3.tgz"
    lock = lock_file(tmp_path, tarball(tgz, {"dist/widget.min.js": b"widget()", "fonts/a.woff2": b"font"}), tgz)
    installed = fetch(tmp_path / "assets", lock)
    docs = tmp_path / "data_docs"
    (docs / "validations" / "run").mkdir(parents=True)
    (docs / "static" / "images").mkdir(parents=True)
    (docs / "static" / "images" / "logo-long.png").write_bytes(b"png")
    logo = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=20230101"
    page = f'<script src="{CDN}"></script><img src="{logo}">'
    (docs / "index.html").write_text(page)
    (docs / "validations" / "run" / "page.html").write_text(page)

    assert make_offline(docs, installed, lock) == 4  # the script and the logo on each of the two pages
    assert (docs / "index.html").read_text() == (
        '<script src="static/vendor/@scope__widget@1.2.3/dist/widget.min.js"></script>'
        '<img src="static/images/logo-long.png">'
    )
    assert (docs / "validations" / "run" / "page.html").read_text() == (
        '<script src="../../static/vendor/@scope__widget@1.2.3/dist/widget.min.js"></script>'
        '<img src="../../static/images/logo-long.png">'
    )
    assert (docs / "static" / "vendor" / "@scope__widget@1.2.3" / "fonts" / "a.woff2").read_bytes() == b"font"


def test_data_docs_without_the_installed_copies_say_to_run_make_venv(tmp_path):
    tgz = tmp_path / "widget-1.2.3.tgz"
    lock = lock_file(tmp_path, tarball(tgz, {"dist/widget.min.js": b"widget()"}), tgz)
    with pytest.raises(AssetsError, match=r"not installed in .*missing \['@scope__widget@1\.2\.3'\]\); run `make venv`"):
        make_offline(tmp_path / "data_docs", tmp_path / "nothing-here", lock)
