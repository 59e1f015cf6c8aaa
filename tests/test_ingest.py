"""Ingest from a folder, a zip or the figshare API (served on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fracture.config import load_params
from fracture.ingest import IngestError, ingest, safe_extract
from tests.conftest import REPO
from tests.synthetic import make_dataset


@pytest.fixture()
def iparams():
    return load_params(REPO).ingest


@pytest.fixture()
def dataset(tmp_path) -> Path:
    root = tmp_path / "FracAtlas"
    make_dataset(root, 3, 5)
    return root


def zip_dir(root: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(root.rglob("*")):
            zf.write(p, Path(root.name) / p.relative_to(root))
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


def test_ingest_from_zip_finds_the_layout_one_level_down(dataset, tmp_path, iparams):
    archive = zip_dir(dataset, tmp_path / "FracAtlas.zip")
    dest = tmp_path / "data/fracatlas"
    ingest(iparams, dest, str(archive))
    assert (dest / "images/Non_fractured").is_dir()


def test_checksums_are_verified_when_the_copy_ships_them(dataset, tmp_path, iparams):
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(dataset)}" for p in sorted(dataset.rglob("*.jpg"))]
    (dataset / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    assert ingest(iparams, tmp_path / "ok", str(dataset)).checksums_verified == 8
    victim = next(dataset.rglob("*.jpg"))
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(IngestError, match=victim.name):
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


@pytest.fixture()
def figshare(tmp_path, dataset) -> Iterator[tuple[str, Path, dict]]:
    """A local figshare stand-in on 127.0.0.1: the article JSON and the zip, as files."""
    root = tmp_path / "www"
    (root / "articles").mkdir(parents=True)
    archive = zip_dir(dataset, root / "FracAtlas.zip")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    article = {"files": [{"name": "FracAtlas.zip", "download_url": f"{base}/FracAtlas.zip",
                          "computed_md5": hashlib.md5(archive.read_bytes()).hexdigest(), "size": archive.stat().st_size}]}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base, root, article
    finally:
        server.shutdown()
        server.server_close()


def publish(root: Path, article_id: int, article: dict) -> None:
    (root / "articles" / str(article_id)).write_text(json.dumps(article))


def test_figshare_download_is_md5_checked(figshare, tmp_path, iparams):
    import dataclasses

    base, root, article = figshare
    params = dataclasses.replace(iparams, figshare_api=base)
    publish(root, params.figshare_article, article)
    result = ingest(params, tmp_path / "data/fracatlas", None)
    assert result.source.startswith("figshare:")
    assert (tmp_path / "data/fracatlas/dataset.csv").is_file()

    article["files"][0]["computed_md5"] = "0" * 32
    publish(root, params.figshare_article, article)
    with pytest.raises(IngestError, match="md5"):
        ingest(params, tmp_path / "other", None)
    assert not (tmp_path / "other").exists()


def test_unreachable_api_explains_the_manual_route(tmp_path, iparams):
    import dataclasses

    params = dataclasses.replace(iparams, figshare_api="http://127.0.0.1:9")
    with pytest.raises(IngestError, match="--source PATH or the FRACATLAS_SOURCE"):
        ingest(params, tmp_path / "d", None)
