"""Brings FracAtlas into the project's data directory from a local copy, a zip or figshare.

The result is a directory in the published layout (``images/Fractured``,
``images/Non_fractured``, ``dataset.csv``, ...) that ``data.dvc`` versions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import requests

from fracture.config import IngestParams

log = logging.getLogger(__name__)

SOURCE_ENV = "FRACATLAS_SOURCE"
REQUIRED = ("images/Fractured", "images/Non_fractured", "dataset.csv")
CHUNK = 1 << 20


class IngestError(RuntimeError):
    """The dataset could not be brought in; the message says what to do."""


@dataclass(frozen=True)
class IngestResult:
    dest: Path
    source: str
    files: int
    bytes: int
    checksums_verified: int


def _manual_hint(params: IngestParams) -> str:
    return (
        f"Download {params.figshare_file} by hand from figshare article {params.figshare_article} "
        f"(https://doi.org/10.6084/m9.figshare.{params.figshare_article}) and pass the zip or its "
        f"extracted folder with --source PATH or the {SOURCE_ENV} environment variable."
    )


def find_dataset_root(tree: Path) -> Path:
    """Finds the folder holding FracAtlas's layout in ``tree`` (itself or one level down).

    Raises:
        IngestError: no folder with ``images/Fractured``, ``images/Non_fractured`` and
            ``dataset.csv`` was found.
    """
    candidates = [tree, *sorted(p for p in tree.iterdir() if p.is_dir())]
    for root in candidates:
        if all((root / rel).exists() for rel in REQUIRED):
            return root
    raise IngestError(
        f"{tree} is not in the FracAtlas layout: expected {', '.join(REQUIRED)} in it or in one "
        "folder below it"
    )


def safe_extract(archive: Path, target: Path) -> None:
    """Extracts a zip, refusing members that would land outside ``target``.

    Raises:
        IngestError: a member's path escapes the target (zip-slip) or the file is no zip.
    """
    target = target.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                dest = (target / member.filename).resolve()
                if not dest.is_relative_to(target):
                    raise IngestError(
                        f"{archive}: member {member.filename!r} would be written outside the "
                        "extraction folder; refusing this archive"
                    )
            zf.extractall(target)
    except zipfile.BadZipFile as exc:
        raise IngestError(f"{archive} is not a readable zip file ({exc})") from exc


def verify_sha256sums(root: Path) -> int:
    """Checks every file listed in ``SHA256SUMS`` when the copy ships one.

    Returns:
        The number of files verified (0 when there is no SHA256SUMS).

    Raises:
        IngestError: a listed file is missing or its hash differs.
    """
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        return 0
    bad: list[str] = []
    count = 0
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        expected, rel = line.split(maxsplit=1)
        rel = rel.lstrip("*")
        path = root / rel
        if not path.is_file():
            bad.append(f"{rel} (missing)")
            continue
        if _file_hash(path, hashlib.sha256()) != expected:
            bad.append(f"{rel} (hash differs)")
        count += 1
    if bad:
        raise IngestError(
            f"{root}: {len(bad)} files do not match SHA256SUMS, e.g. {bad[:5]}; the copy is "
            "damaged: fetch it again"
        )
    return count


def _file_hash(path: Path, h: "hashlib._Hash") -> str:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download_figshare(params: IngestParams, workdir: Path, timeout: float = 60.0) -> Path:
    """Downloads the FracAtlas zip listed by the figshare API and checks its md5.

    The file is streamed to a temporary name and only renamed once its md5 matches, so an
    interrupted download leaves nothing a later run would trust.

    Args:
        params: the API base URL, article id and file name.
        workdir: where the verified zip is written.
        timeout: seconds to wait for the server on each request.

    Returns:
        The path of the verified zip.

    Raises:
        IngestError: the API or download failed, or the checksum differs.
    """
    api = f"{params.figshare_api.rstrip('/')}/articles/{params.figshare_article}"
    try:
        resp = requests.get(api, timeout=timeout)
        resp.raise_for_status()
        files = resp.json()["files"]
    except (requests.RequestException, KeyError, ValueError) as exc:
        raise IngestError(f"could not list the files of {api}: {exc}. {_manual_hint(params)}") from exc
    entry = next((f for f in files if f.get("name") == params.figshare_file), None)
    if entry is None:
        raise IngestError(
            f"{api} lists no file named {params.figshare_file} (it lists "
            f"{[f.get('name') for f in files]}). {_manual_hint(params)}"
        )
    expected = entry.get("computed_md5") or entry.get("supplied_md5")
    final = workdir / params.figshare_file
    partial = final.with_name(final.name + ".part")
    md5 = hashlib.md5()
    size = 0
    log.info("downloading %s (%s bytes) from %s", params.figshare_file, entry.get("size"), entry["download_url"])
    try:
        with requests.get(entry["download_url"], stream=True, timeout=timeout) as r:
            r.raise_for_status()
            with partial.open("wb") as out:
                for chunk in r.iter_content(CHUNK):
                    out.write(chunk)
                    md5.update(chunk)
                    size += len(chunk)
    except requests.RequestException as exc:
        partial.unlink(missing_ok=True)
        raise IngestError(f"download of {entry['download_url']} failed: {exc}. {_manual_hint(params)}") from exc
    if expected and md5.hexdigest() != expected:
        partial.unlink(missing_ok=True)
        raise IngestError(
            f"{params.figshare_file}: md5 {md5.hexdigest()} after {size} bytes, figshare lists "
            f"{expected}; the transfer was damaged or cut short, run ingest again. {_manual_hint(params)}"
        )
    partial.replace(final)
    return final


def _replace_dir(src: Path, dest: Path) -> None:
    """Copies ``src`` to ``dest`` through a sibling temporary folder, then swaps it in."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        shutil.copytree(src, staging / "copy")
        # Copies of a read-only source are read-only too; DVC must be able to replace them.
        for dirpath, _, names in os.walk(staging / "copy"):
            os.chmod(dirpath, 0o755)
            for n in names:
                os.chmod(os.path.join(dirpath, n), 0o644)
        if dest.exists():
            old = staging / "old"
            dest.replace(old)
        (staging / "copy").replace(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ingest(params: IngestParams, dest: Path, source: str | None = None) -> IngestResult:
    """Brings FracAtlas into ``dest`` from ``source`` or, when none is given, from figshare.

    Args:
        params: ingest parameters (figshare location).
        dest: the project's dataset directory (replaced as a whole).
        source: a local folder or zip in the FracAtlas layout; ``None`` downloads.

    Returns:
        What was brought in.

    Raises:
        IngestError: the source is missing, not in the FracAtlas layout, or damaged.
    """
    with tempfile.TemporaryDirectory(prefix="fracatlas-ingest-") as tmp:
        tmpdir = Path(tmp)
        if source is None:
            archive = download_figshare(params, tmpdir)
            origin = f"figshare:{params.figshare_article}/{params.figshare_file}"
        else:
            path = Path(source).expanduser()
            if not path.exists():
                raise IngestError(
                    f"source {path} does not exist. Give a FracAtlas folder or zip with --source "
                    f"or {SOURCE_ENV}, or leave both unset to download from figshare."
                )
            archive = path if path.is_file() else None
            origin = str(path.resolve())
        if archive is not None:
            extracted = tmpdir / "extracted"
            extracted.mkdir()
            safe_extract(archive, extracted)
            root = find_dataset_root(extracted)
        else:
            root = find_dataset_root(Path(source))  # type: ignore[arg-type]
        verified = verify_sha256sums(root)
        _replace_dir(root, dest)
    files = [p for p in dest.rglob("*") if p.is_file()]
    return IngestResult(
        dest=dest,
        source=origin,
        files=len(files),
        bytes=sum(p.stat().st_size for p in files),
        checksums_verified=verified,
    )
