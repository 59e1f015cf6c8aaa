"""Brings the dataset into the project's data directory from a local copy, a zip or figshare.

The result is a directory that ``data.dvc`` versions, in the layout ``ingest.layout`` names:
FracAtlas's published layout (``images/Fractured``, ``images/Non_fractured``, ``dataset.csv``,
...), or a hospital's own export (``images/`` holding DICOM, JPEG or PNG files, and
``labels.csv``; see :mod:`fracture.manifest`). Only FracAtlas can be downloaded.
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3

from fracture.config import IngestParams
from fracture.vocabulary import Layout

log = logging.getLogger(__name__)

SOURCE_ENV = "FRACATLAS_SOURCE"
#: What a dataset folder must hold, per ``ingest.layout``.
REQUIRED: dict[Layout, tuple[str, ...]] = {
    "fracatlas": ("images/Fractured", "images/Non_fractured", "dataset.csv"),
    "csv": ("images", "labels.csv"),
}
LAYOUT_NAMES: dict[Layout, str] = {"fracatlas": "the FracAtlas layout", "csv": "the csv layout (a hospital's export)"}
CHUNK = 1 << 20
#: How much of an unexpected answer's body an error shows.
HEAD_BYTES = 120
# sysexits.h EX_TEMPFAIL: "temporary failure, try again later". The CLI exits with it for a
# DownloadError so that callers (the Prefect ingest task) retry only what a retry can fix.
EX_TEMPFAIL = 75


class IngestError(RuntimeError):
    """The dataset could not be brought in; the message says what to do."""


class _UnreadableZip(IngestError):
    """A zip that cannot be read as one (no central directory yet, a member's data damaged or cut
    short): what a zip still being copied looks like, as well as a damaged one. ``why`` is what
    failed, without the advice."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


class DownloadError(IngestError):
    """A transient failure (network, cut-short transfer, HTTP 5xx, a local source that changed
    while it was copied, as an export still being written does, a local zip that cannot be read and
    was modified moments ago, as a copy onto a share that stalled is): retrying may help.

    Everything else (a wrong local path, a bad layout, a checksum mismatch, a zip-slip member,
    an HTTP 4xx) stays a plain :class:`IngestError`, because running again changes nothing.
    """


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


def find_dataset_root(tree: Path, label: str | None = None, layout: Layout = "fracatlas") -> Path:
    """Finds the folder holding the dataset's layout in ``tree`` (itself or one level down).

    Args:
        tree: the folder to search.
        label: how to name ``tree`` in errors when it is a copy the user never sees (the zip it
            was extracted from); defaults to its path.
        layout: ``ingest.layout``: what the folder must hold (:data:`REQUIRED`).

    Returns:
        The folder that holds ``images/Fractured``, ``images/Non_fractured`` and ``dataset.csv``
        (layout ``fracatlas``), or ``images`` and ``labels.csv`` (layout ``csv``): ``tree`` itself
        when it does, else the one folder below it that does.

    Raises:
        IngestError: no such folder was found, or several folders below ``tree`` hold the layout
            (a folder of monthly exports): taking one of them by name order would bring in the
            same export on every scheduled run, so the user must name the one to ingest.
    """
    required = REQUIRED[layout]
    candidates = [tree, *sorted(p for p in tree.iterdir() if p.is_dir())]
    if all((tree / rel).exists() for rel in required):
        return tree
    matches = [root for root in candidates[1:] if all((root / rel).exists() for rel in required)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(f"{m.name}/" for m in matches)
        # A labelled tree is an extracted copy the user never sees: its folders are no paths to pass.
        pick = (
            f"extract the one to ingest and pass its folder with --source or {SOURCE_ENV}"
            if label is not None
            else f"pass the one to ingest with --source or {SOURCE_ENV}, e.g. {SOURCE_ENV}={matches[-1]}"
        )
        raise IngestError(
            f"{label or tree} holds {len(matches)} datasets in {LAYOUT_NAMES[layout]}: {names}. Ingest "
            f"brings in one and does not guess which: {pick}."
        )
    found = sorted(p.name for p in tree.iterdir())[:10]
    other = next(name for name in REQUIRED if name != layout)
    hint = (
        f" It looks like {LAYOUT_NAMES[other]}: set ingest.layout: {other} in params.yaml."
        if any(all((root / rel).exists() for rel in REQUIRED[other]) for root in candidates)
        else ""
    )
    what = (
        "the FracAtlas folder or FracAtlas.zip from figshare"
        if layout == "fracatlas"
        else "a folder (or zip) holding images/ and labels.csv"
    )
    raise IngestError(
        f"{label or tree} is not in {LAYOUT_NAMES[layout]} (ingest.layout: {layout}): expected "
        f"{', '.join(required)} in it or in one folder below it, found {found}.{hint} Pass {what} "
        f"with --source or {SOURCE_ENV}."
    )


def safe_extract(archive: Path, target: Path, label: str | None = None) -> None:
    """Extracts a zip, refusing members that would land outside ``target``.

    Every member's path is checked, and the unpacked size against the free space at ``target``,
    before anything is written, so an archive refused for those leaves ``target`` untouched.

    Args:
        archive: the zip file.
        target: the folder to extract into.
        label: how to name the archive in errors (e.g. where it was downloaded from); defaults
            to its path.

    Raises:
        IngestError: a member's path escapes the target (zip-slip), the members would not fit in
            the free space, the file is no zip, or a member cannot be extracted (damaged,
            encrypted, packed with a method Python cannot read, or a file and a folder share a
            path).
    """
    name = label or str(archive)
    target = target.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for member in members:
                dest = (target / member.filename).resolve()
                if not dest.is_relative_to(target):
                    raise IngestError(
                        f"{name}: member {member.filename!r} would be written outside the "
                        "extraction folder (zip-slip); refusing this archive. Get FracAtlas.zip "
                        "from its figshare article instead."
                    )
            _check_room(name, members, target)
            for member in members:
                try:
                    zf.extract(member, target)
                except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, OSError) as exc:
                    raise _member_error(name, member.filename, exc) from exc
    except zipfile.BadZipFile as exc:
        raise _UnreadableZip(f"{name} is not a readable zip file ({exc}); fetch it again", str(exc)) from exc


def _check_room(name: str, members: list[zipfile.ZipInfo], target: Path) -> None:
    """Refuses an archive whose members would not fit in the free space at ``target``, before a
    disk filled midway fails the extraction (or whatever else writes there)."""
    needed = sum(m.file_size for m in members)
    probe = target
    while not probe.exists():  # the target itself may not be made yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise IngestError(
            f"{name} unpacks to {needed:,} bytes, but {probe} has only {free:,} bytes free. Free "
            f"space there or point TMPDIR at a folder with room, or extract the zip yourself and "
            f"pass the extracted folder with --source or {SOURCE_ENV}."
        )


def _member_error(name: str, member: str, exc: BaseException) -> IngestError:
    """Says why ``member`` of the zip ``name`` could not be extracted, and what to do about it."""
    folder = f"pass the extracted folder with --source or {SOURCE_ENV}"
    if isinstance(exc, (RuntimeError, NotImplementedError)):
        # zipfile raises RuntimeError for an encrypted member, NotImplementedError for a method it
        # lacks (Deflate64, which Windows Explorer uses for large zips, among them).
        return IngestError(
            f"{name}: member {member!r} cannot be extracted ({exc}): it is encrypted or packed with "
            f"a compression method Python's zipfile cannot read. Re-zip the folder without a "
            f"password using plain deflate (`zip -r FracAtlas.zip FracAtlas`), or extract it with "
            f"the tool that made it and {folder}."
        )
    if isinstance(exc, (NotADirectoryError, IsADirectoryError, FileExistsError)):
        return IngestError(
            f"{name}: member {member!r} clashes with another member of the same path, one a file "
            f"and the other a folder ({exc}); the archive is malformed. Re-zip the dataset folder, "
            f"or {folder}."
        )
    if isinstance(exc, OSError):
        return IngestError(
            f"{name}: could not write member {member!r} ({exc}). Free space or fix the permissions "
            f"of the extraction folder (it is under TMPDIR), or {folder}."
        )
    # zlib.error, EOFError or a CRC mismatch (BadZipFile): the stored bytes are damaged.
    return _UnreadableZip(
        f"{name}: member {member!r} is damaged ({exc}). Fetch the archive again, or {folder}.",
        f"member {member!r}: {exc}",
    )


# The two forms of line GNU `sha256sum -c` reads, each led by a backslash when the name is written
# escaped, as GNU sha256sum writes one holding a backslash, a newline or a carriage return: the
# text and binary form `<hex>  <name>` / `<hex> *<name>`, and the BSD tag form
# `SHA256 (<name>) = <hex>` that `sha256sum --tag`, `shasum -a 256 --tag` and BSD's `sha256` write.
SHA256SUMS_LINE = re.compile(r"(\\?)([0-9A-Fa-f]{64}) [ *](.+)")
# A tag's name runs to the line's last ")", as GNU reads it, so a name may hold ") = " itself. The
# algorithm is matched loosely so that another one's list is refused by name, not as a stray line.
SHA256SUMS_TAG = re.compile(r"(\\?)([A-Za-z][A-Za-z0-9-]*) ?\((.+)\)[ \t]*=[ \t]*([0-9A-Fa-f]+)")
# OpenSSL 3's `openssl dgst -sha256` names the same digest SHA2-256.
_SHA256_TAGS = frozenset({"SHA256", "SHA2-256"})
_SUMS_ESCAPES = {"\\\\": "\\", "\\n": "\n", "\\r": "\r"}
_SUMS_ESCAPED_NAME = re.compile(r"(?:[^\\]|\\[\\nr])+")
_SUMS_REDO = "regenerate the file with `sha256sum`, or remove it to ingest without checksums"


def _sums_entry(sums: Path, number: int, line: str) -> tuple[str, str]:
    """Reads one line of ``sums`` as GNU `sha256sum -c` does, in either form.

    Args:
        sums: The SHA256SUMS file, for the error messages.
        number: The line's number in it, counted from 1.
        line: The line, without its line ending.

    Returns:
        The expected digest in lower case, and the listed path with its escapes undone.

    Raises:
        IngestError: the line is in neither form, holds another algorithm's checksum, or marks its
            name escaped but holds an escape sha256sum never writes.
    """
    if text := SHA256SUMS_LINE.fullmatch(line):
        escaped, digest, rel = text.groups()
    elif tag := SHA256SUMS_TAG.fullmatch(line):
        escaped, algorithm, rel, digest = tag.groups()
        if algorithm not in _SHA256_TAGS:
            raise IngestError(
                f"{sums}, line {number}: {line[:80]!r} is a {algorithm} checksum; only SHA256 is checked. "
                "Make the list with `sha256sum` or `shasum -a 256`, or remove it to ingest without checksums"
            )
    else:
        escaped, digest, rel = "", "", ""  # in neither form: refused below
    # An escaped name holds no backslash but the escapes sha256sum writes.
    if len(digest) != 64 or (escaped and not _SUMS_ESCAPED_NAME.fullmatch(rel)):
        raise IngestError(
            f"{sums}, line {number}: {line[:80]!r} is not '<64 hex digits>  <path>' or "
            f"'SHA256 (<path>) = <64 hex digits>' as `sha256sum` writes it; {_SUMS_REDO}"
        )
    if escaped:
        rel = re.sub(r"\\[\\nr]", lambda m: _SUMS_ESCAPES[m.group()], rel)
    return digest.lower(), rel


def verify_sha256sums(root: Path, shown: Path | None = None, above: tuple[Path, Path, str] | None = None) -> int:
    """Checks every file listed in ``SHA256SUMS`` when the copy ships one.

    The file may be in either of the forms GNU `sha256sum -c` reads, mixed as it allows, and may
    start with the UTF-8 byte-order mark Windows tools write.

    Args:
        root: the folder holding ``SHA256SUMS`` and the files it lists.
        shown: the folder the messages name instead of ``root``: the source, when ``root`` is a
            staging copy of it the user never sees.
        above: instead of ``root``'s own file, a ``SHA256SUMS`` in a folder above the dataset
            folder (the export's top, when the dataset is one folder down): that file, how to name
            it, and the dataset folder's path below it (``export``). Its entries under that path
            are checked against ``root`` with the path taken off; the others name files that were
            not copied, so they are left out with a warning rather than checked.

    Returns:
        The number of files verified (0 when there is no SHA256SUMS).

    Raises:
        IngestError: the file is UTF-16, a line is not in `sha256sum`'s format, holds another
            algorithm's checksum or names a path outside the copy, or a listed file is missing or
            its hash differs.
    """
    shown = shown or root
    listed, sums, prefix = above or (root / "SHA256SUMS", shown / "SHA256SUMS", "")
    if not listed.is_file():
        return 0
    data = listed.read_bytes()
    under = Path(prefix).parts
    outside: list[str] = []
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # What Windows PowerShell 5's `Out-File` and `>` write by default.
        raise IngestError(
            f"{sums} is UTF-16 text; save it as UTF-8 (PowerShell: `Out-File -Encoding utf8`), or "
            f"{_SUMS_REDO}"
        )
    bad: list[str] = []
    count = 0
    # Names decode as the file system's, so a listed path names the same bytes on disk. Split on
    # newlines only: str.splitlines() would also split a name at \f, \x1c or \u2028, which
    # sha256sum writes as they are.
    lines = os.fsdecode(data.removeprefix(codecs.BOM_UTF8)).split("\n")
    for number, raw in enumerate(lines, start=1):
        line = raw.removesuffix("\r")  # a CRLF file; sha256sum escapes a name's own \r
        if not line.strip():
            continue
        expected, rel = _sums_entry(sums, number, line)
        # Judged as written: a listed file may be a link into another store, as the copy may hold.
        if os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == "..":
            raise IngestError(f"{sums}, line {number}: {rel!r} points outside {sums.parent}; only the copy's own files are checked")
        path = root / rel
        if under:
            parts = Path(rel).parts  # as written, less any "./"
            if parts[: len(under)] != under or len(parts) == len(under):
                outside.append(rel)
                continue
            path = root.joinpath(*parts[len(under) :])
        if not path.is_file():
            bad.append(f"{rel} (missing)")
            continue
        with path.open("rb") as fh:
            actual = hashlib.file_digest(fh, "sha256").hexdigest()
        if actual != expected:
            bad.append(f"{rel} (hash differs)")
        count += 1
    if outside:
        log.warning(
            "%s lists %d files outside %s/, the dataset folder ingest copies: they are not versioned, so not "
            "checked, e.g. %s", sums, len(outside), prefix, outside[:3],
        )
    if bad:
        raise IngestError(
            f"{shown}: {len(bad)} files do not match {sums if above else 'SHA256SUMS'} as copied, e.g. {bad[:5]}; the copy is "
            "damaged, or was being written while ingest copied it: fetch it again (or let the export "
            "finish), then run ingest again"
        )
    return count


# Failures of the transfer itself: the connection dropped or timed out, or the body ended
# before its Content-Length (requests raises ChunkedEncodingError for urllib3's
# IncompleteRead; the raw urllib3/http.client forms are listed in case they escape it).
_TRANSIENT = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
)


def _request_error(what: str, exc: Exception, params: IngestParams) -> IngestError:
    """Turns a failed request into a DownloadError when retrying may help, else an IngestError."""
    status = exc.response.status_code if isinstance(exc, requests.HTTPError) and exc.response is not None else None
    # A certificate the client does not trust (requests' SSLError is a ConnectionError) stays untrusted.
    transient = (isinstance(exc, _TRANSIENT) and not isinstance(exc, requests.exceptions.SSLError)) or (
        status is not None and (status >= 500 or status == 429)
    )
    if transient:
        return DownloadError(
            f"{what} failed: {exc}. This is usually temporary (network or server trouble): run "
            f"ingest again later. {_manual_hint(params)}"
        )
    return IngestError(f"{what} failed: {exc}. {_manual_hint(params)}")


def _media_type(resp: requests.Response) -> str:
    """The response's Content-Type without its parameters (``text/html; charset=utf-8`` -> ``text/html``)."""
    return resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def _describe_answer(resp: requests.Response, head: bytes) -> str:
    """What a server answered, for an error: status, Content-Type, the final URL after any
    redirects and the body's first bytes."""
    redirected = f" (redirected from {resp.history[0].url})" if resp.history else ""
    return (
        f"HTTP {resp.status_code} with Content-Type {resp.headers.get('Content-Type', '(none)')!r} from "
        f"{resp.url}{redirected}, starting {head[:HEAD_BYTES]!r}"
    )


def download_figshare(params: IngestParams, workdir: Path, timeout: float = 60.0) -> Path:
    """Downloads the FracAtlas zip listed by the figshare API and checks its md5.

    The file is streamed to a hidden temporary name in ``workdir`` and only renamed to its
    final name once its size and md5 match what the API lists; on any failure the temporary
    file is removed, so an interrupted download leaves nothing a later run would trust.

    Args:
        params: the API base URL, article id and file name.
        workdir: where the verified zip is written (must exist).
        timeout: seconds to wait for the server on each request (connect and each read).

    Returns:
        The path of the verified zip.

    Raises:
        DownloadError: a transient failure: the server is unreachable or timed out, answered
            with HTTP 5xx or 429, or the transfer was cut short. Retrying may help.
        IngestError: a permanent failure: HTTP 4xx, the API does not answer with JSON or does
            not list the file, a complete answer is not the listed file (another size, or an
            HTML page), or the complete file's md5 differs from the listed one.
    """
    api = f"{params.figshare_api.rstrip('/')}/articles/{params.figshare_article}"
    try:
        resp = requests.get(api, timeout=timeout)
        resp.raise_for_status()
    except requests.RequestException as exc:
        raise _request_error(f"listing the files of {api}", exc, params) from exc
    # Parsed apart from the request: requests' JSONDecodeError is a RequestException too, and a
    # proxy's login page answered with HTTP 200 is no network trouble a retry would cure.
    try:
        files = resp.json()["files"]
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            raise TypeError(f"'files' is {type(files).__name__}, not a list of objects")
    except (KeyError, TypeError, ValueError) as exc:
        raise IngestError(
            f"{api} did not answer with a figshare article (JSON with 'files'): {exc!r}; it answered "
            f"{_describe_answer(resp, resp.content)}. A proxy or firewall may be answering in "
            f"figshare's place. {_manual_hint(params)}"
        ) from exc
    entry = next((f for f in files if f.get("name") == params.figshare_file), None)
    if entry is None or not entry.get("download_url"):
        raise IngestError(
            f"{api} lists no downloadable file named {params.figshare_file} (it lists "
            f"{[f.get('name') for f in files]}). {_manual_hint(params)}"
        )
    url = entry["download_url"]
    expected_md5 = entry.get("computed_md5") or entry.get("supplied_md5")
    expected_size = entry.get("size")
    if not expected_md5:
        log.warning("%s lists no md5 for %s; the download cannot be verified", api, params.figshare_file)
    final = workdir / params.figshare_file
    log.info("downloading %s (%s bytes) from %s", params.figshare_file, expected_size, url)
    # A unique hidden name, never the final one: a run killed mid-transfer leaves at worst a
    # dot-file that no run reads, and concurrent runs cannot write into each other's file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=workdir)
    partial = Path(tmp_name)
    md5 = hashlib.md5()
    size = 0
    head = b""  # the body's first bytes, to show what came instead of the zip
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with requests.get(url, stream=True, timeout=timeout) as r:
                    r.raise_for_status()
                    for chunk in r.iter_content(CHUNK):
                        out.write(chunk)
                        md5.update(chunk)
                        size += len(chunk)
                        if len(head) < HEAD_BYTES:
                            head += chunk[: HEAD_BYTES - len(head)]
            except (requests.RequestException, *_TRANSIENT) as exc:
                raise _request_error(
                    f"download of {params.figshare_file} from {url} (after {size} of {expected_size} bytes)",
                    exc,
                    params,
                ) from exc
            out.flush()
            os.fsync(out.fileno())  # the bytes are on disk before the name says "verified"
        wrong_size = isinstance(expected_size, int) and size != expected_size
        html = _media_type(r) == "text/html"
        # urllib3 raises for a body that ends before its Content-Length or its last chunk, so
        # only a body that ends when the server hangs up can arrive cut short without an error.
        delimited = "Content-Length" in r.headers or "chunked" in r.headers.get("Transfer-Encoding", "").lower()
        if wrong_size and size < expected_size and not delimited and not html:
            raise DownloadError(
                f"download of {params.figshare_file} from {url} was cut short: {size} of "
                f"{expected_size} bytes arrived. This is usually temporary (network or server "
                f"trouble): run ingest again later. {_manual_hint(params)}"
            )
        # A complete answer that is not the listed file: an embargo, login or firewall page, or
        # a redirect that ends at one. The next run gets the same page, so it is not retried.
        # A body that matches the listed md5 is the file, whatever its Content-Type says.
        if wrong_size or (html and md5.hexdigest() != expected_md5):
            listed = f"{expected_size} bytes" if isinstance(expected_size, int) else "no size"
            raise IngestError(
                f"{url} did not send the {params.figshare_file} that {api} lists ({listed}): it "
                f"answered {_describe_answer(r, head)}, {size} bytes in all. A complete answer of "
                f"another kind (an embargo, login or firewall page, or another file) comes again on "
                f"the next run, so an automatic retry will not help: open the URL in a browser to "
                f"see what it serves. {_manual_hint(params)}"
            )
        if expected_md5 and md5.hexdigest() != expected_md5:
            raise IngestError(
                f"{params.figshare_file} from {url}: md5 {md5.hexdigest()} after {size} bytes, "
                f"{api} lists {expected_md5}: the complete file does not match its listing, so an "
                f"automatic retry will not help. {_manual_hint(params)}"
            )
        partial.replace(final)
    except OSError as exc:
        # Network errors were turned into IngestErrors above; what is left is the local disk.
        partial.unlink(missing_ok=True)
        raise IngestError(
            f"could not write the download to {partial}: {exc}. Free space there or point TMPDIR "
            f"at a folder with room for {expected_size} bytes, then run ingest again."
        ) from exc
    except BaseException:
        # Also on KeyboardInterrupt: nothing half-written may survive.
        partial.unlink(missing_ok=True)
        raise
    return final


def source_listing(source: str | Path) -> dict[str, object]:
    """A local source's files by relative path, size and modification time, without reading them.

    Two listings are equal when no file was added, removed, resized or rewritten (writing a
    file updates its modification time), so copying and re-hashing the source would bring in
    nothing new. Files in linked folders are listed, as the copy takes them (a folder linked twice
    twice; a link back to a folder above it, once). A zip is listed as
    one file. The limit: a file rewritten with its size unchanged and its old modification time
    put back (``cp -p``, ``rsync -a`` or ``touch -r`` from an older copy, an archive unpacked with
    its stored times) lists as before; ``fracture ingest --source`` by hand always copies.

    Args:
        source: a local folder or zip.

    Returns:
        The resolved source, its number of files and bytes, and a digest of the listing.

    Raises:
        IngestError: a link in the folder is broken (the copy would fail on it too).
    """
    path = Path(source).expanduser().resolve()
    entries = _listing_entries(path)
    return {
        "source": str(path),
        "files": len(entries),
        "bytes": sum(e[1] for e in entries),
        "digest": hashlib.sha256(json.dumps(entries).encode()).hexdigest(),
    }


def _listing_entries(path: Path) -> list[list[object]]:
    """:func:`source_listing`'s entries, ``[relative path, size, modification time]`` sorted by path.

    A file or folder removed between the walk listing it and its stat (an export still being
    written deletes its temporary files) is left out, as the copy would find it gone too.
    """
    if path.is_file():
        stat = path.stat()
        entries = [[path.name, stat.st_size, stat.st_mtime_ns]]
    else:
        entries = []
        top = os.stat(path)
        # Each folder's own (device, inode) and its ancestors'. Into linked folders too, as the
        # copy goes: shutil.copytree copies every link to a folder, so a folder linked twice is
        # listed twice, and only a link back to an ancestor (a loop) is not followed.
        ancestry: dict[str, tuple[tuple[int, int], ...]] = {str(path): ((top.st_dev, top.st_ino),)}
        for dirpath, dirnames, names in os.walk(path, followlinks=True):
            above = ancestry.pop(dirpath)
            for dirname in list(dirnames):
                sub = os.path.join(dirpath, dirname)
                try:
                    here = os.stat(sub)
                except FileNotFoundError:  # removed since the walk listed it
                    dirnames.remove(dirname)
                    continue
                if (here.st_dev, here.st_ino) in above:
                    dirnames.remove(dirname)
                else:
                    ancestry[sub] = (*above, (here.st_dev, here.st_ino))
            for name in names:
                full = os.path.join(dirpath, name)
                try:
                    stat = os.stat(full)
                except OSError as exc:
                    if os.path.islink(full):
                        raise _broken_link_error(full) from exc
                    if isinstance(exc, FileNotFoundError):
                        continue  # removed since the walk listed it
                    raise
                entries.append([os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns])
        entries.sort()
    return entries


def _change(source: Path, before: list[list[object]]) -> str:
    """How ``source``'s listing differs from ``before`` (``"FracAtlas.zip resized from 1,024 to
    2,048 bytes"``), or ``""`` when it does not."""
    try:
        after = {e[0]: e[1:] for e in _listing_entries(source)}
    except FileNotFoundError:  # the source itself is gone
        after = {}
    old = {e[0]: e[1:] for e in before}
    changed = sorted(rel for rel in old.keys() | after.keys() if old.get(rel) != after.get(rel))
    if not changed:
        return ""
    first = str(changed[0])
    was, now = old.get(first), after.get(first)
    how = (
        "added" if was is None
        else "removed" if now is None
        else f"resized from {was[0]:,} to {now[0]:,} bytes" if was[0] != now[0]
        else "rewritten"
    )
    more = f", and {len(changed) - 1} more" if len(changed) > 1 else ""
    return f"{first} {how}{more}"


def _check_unchanged(source: Path, before: list[list[object]], shown: str | Path, doing: str) -> None:
    """Refuses a copy of ``source`` made while it changed: its listing differs from ``before``.

    Without ``SHA256SUMS`` nothing else sees a file still being written when it was read: the copy
    would hold its first megabytes and be versioned as the dataset. The export is likely to be
    complete on a later try, so this is a :class:`DownloadError`, which the flow retries.

    Raises:
        DownloadError: a file was added, removed, resized or rewritten since ``before``.
    """
    if changed := _change(source, before):
        raise DownloadError(
            f"{shown}: the source changed while it was {doing} ({changed}); nothing was "
            "ingested. Run ingest again once the export has finished."
        )


#: How long ingest watches a local zip it cannot read for a change, and how often it looks: a zip
#: still being copied reads as damaged at once (its central directory, at its end, is not there
#: yet), long before a copy in progress would change it while it is read.
ZIP_SETTLE_S = 2.0
ZIP_POLL_S = 0.2
#: How recently a local zip that cannot be read, and does not change while it is watched, may have
#: been modified and still be taken for a copy in progress rather than a damaged zip: a copy onto a
#: share over SMB or NFS stalls for longer than :data:`ZIP_SETTLE_S` (a busy file server, a network
#: dropping packets), and its zip is unfinished, not damaged. Past it, the zip is damaged.
ZIP_RECENT_S = 300.0


def _check_settled(archive: Path, before: list[list[object]], shown: str, error: _UnreadableZip) -> None:
    """Tells a zip still being written from a damaged one: refuses ``archive`` as worth a retry
    when it changes within :data:`ZIP_SETTLE_S` of failing to read, or when it was modified within
    :data:`ZIP_RECENT_S` (a copy stalled for longer than it is watched).

    Only an old zip left unchanged stays ``error``, a permanent failure. A modification time ahead
    of this machine's clock (a file server whose clock runs ahead) says nothing of how long ago the
    zip was written, so it counts as recent: a retry costs little, and a copy still in progress
    called damaged for good waits for a person.

    Raises:
        DownloadError: the archive changed since ``before`` (its size or modification time), or it
            was modified less than :data:`ZIP_RECENT_S` ago, or its modification time is ahead of
            this machine's clock.
    """
    deadline = time.monotonic() + ZIP_SETTLE_S
    while True:
        if changed := _change(archive, before):
            raise DownloadError(
                f"{shown} cannot be read as a zip ({error.why}), and it changed meanwhile ({changed}): it is "
                "still being written, as a copy onto a share in progress is. Nothing was ingested; run "
                "ingest again once the copy has finished."
            ) from error
        if time.monotonic() >= deadline:
            break
        time.sleep(ZIP_POLL_S)
    try:
        age = time.time() - archive.stat().st_mtime
    except FileNotFoundError:  # removed since it was last looked at: a copy starting over
        age = 0.0
    if age >= ZIP_RECENT_S:
        return
    when = (
        f"it was last modified {age:,.0f} s ago" if age >= 0
        else f"its modification time is {-age:,.0f} s ahead of this machine's clock (the file server's clock runs "
        "ahead of this machine's; set both by NTP), so how long ago it was written is not known"
    )
    raise DownloadError(
        f"{shown} cannot be read as a zip ({error.why}), and {when}: it may still be being copied onto "
        f"the share, a copy that stalled for longer than the {ZIP_SETTLE_S:g} s ingest watched it for a change. "
        "Nothing was ingested; the scheduled flow retries it, or run ingest again once the copy has finished. "
        f"A zip that still cannot be read once it is {ZIP_RECENT_S:,.0f} s past its modification time is taken "
        "as damaged."
    ) from error


def _broken_link_error(link: str) -> IngestError:
    """Names a link in the source whose target is missing (or that loops), and what to do."""
    return IngestError(
        f"{link} is a broken link: it points to {os.readlink(link)!r}, which does not exist (or "
        "leads back to itself). Fix the link or remove it from the source, then run ingest again."
    )


#: The staging folders' names, ``.<dest name>.ingest-<random>``, beside ``dest``. The project's
#: ``.dvcignore`` leaves them out of ``dvc add data``: a copy killed midway (SIGKILL, the OOM killer, a
#: cancelled run) is never versioned, and the next ingest removes it.
STAGING_INFIX = ".ingest-"


def _recover_staging(dest: Path) -> None:
    """Removes the staging folders an ingest killed midway left beside ``dest``; when ``dest`` is
    missing (killed between its two renames), first puts the previous copy back from one."""
    for stale in sorted(dest.parent.glob(f".{dest.name}{STAGING_INFIX}*")):
        old = stale / "old"
        if not dest.exists() and old.is_dir():
            old.replace(dest)
            log.warning("%s was missing after an interrupted ingest: the previous copy is back from %s", dest, stale)
        log.info("removing %s, left by an interrupted ingest", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _links_out_of(root: Path) -> Callable[[str, list[str]], set[str]]:
    """``shutil.copytree``'s ``ignore`` for a copy of ``root``: the links back up the tree
    (:func:`_links_to_ancestors`), after a warning for each link that leads out of ``root``.

    Such a link is followed, as a link into another store of the hospital's is meant to be (a
    series folder linked from its archive): what it names is copied into the dataset, versioned by
    ``dvc add`` and sent to a DVC remote by ``dvc push``. So each is named, with where it leads,
    where whoever runs the ingest sees it: a link to a file the export was never meant to hold
    would otherwise be copied without a word.
    """
    top = os.path.realpath(root)

    def ignore(folder: str, names: list[str]) -> set[str]:
        for name in names:
            full = os.path.join(folder, name)
            if os.path.islink(full):
                target = os.path.realpath(full)
                if target != top and not target.startswith(top.rstrip(os.sep) + os.sep):
                    log.warning("copying %s, a link out of the export, from %s: what it names joins the dataset "
                                "(and a DVC remote after dvc push)", full, target)
        return _links_to_ancestors(folder, names)

    return ignore


def _links_to_ancestors(folder: str, names: list[str]) -> set[str]:
    """``shutil.copytree``'s ``ignore``: the links in ``folder`` back to it or to a folder above it.

    Followed, each would be copied into itself until the path grew too long, and the copy failed
    naming a path of a thousand characters; the listing that tells an unchanged source does not
    follow them either (:func:`_listing_entries`). Nothing is lost: every file under such a link
    is copied once, through the folder it points to.
    """
    here = os.path.realpath(folder)
    loops = set()
    for name in names:
        full = os.path.join(folder, name)
        if os.path.islink(full) and os.path.isdir(full):
            target = os.path.realpath(full)
            if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                log.warning("not copying %s: a link back to %s, a folder above it, whose files are copied once",
                            full, target)
                loops.add(name)
    return loops


def _replace_dir(
    src: Path, dest: Path, shown: Path | None = None, above: tuple[Path, Path, str] | None = None
) -> int:
    """Copies ``src`` to ``dest`` through a sibling temporary folder (on the same file system, so
    the swap is two renames), checks that copy against its ``SHA256SUMS``, then swaps it in.

    ``src`` is listed (paths, sizes, modification times: no file is read) before and after the
    copy, and a copy made while it changed is refused: an export still being written would
    otherwise be versioned torn, since without ``SHA256SUMS`` nothing else notices. The copy,
    not ``src``, is checked against ``SHA256SUMS``: the files versioned are the ones checked, even
    when a file is rewritten with its size and modification time put back, which the listing
    does not see.

    Args:
        src: the dataset folder to copy.
        dest: the project's dataset folder it replaces.
        shown: how the messages name ``src`` (an extracted zip is named by the zip); defaults to it.
        above: a ``SHA256SUMS`` above ``src`` to check the copy against too
            (:func:`verify_sha256sums`).

    Returns:
        The number of files verified against ``SHA256SUMS`` (0 when the copy ships none).

    Raises:
        DownloadError: ``src`` changed while it was copied (worth a retry once the export is done).
        IngestError: a file could not be copied, or the copy does not match its ``SHA256SUMS``;
            ``dest`` is left as it was.
    """
    shown = shown or src
    dest.parent.mkdir(parents=True, exist_ok=True)
    _recover_staging(dest)
    before = _listing_entries(src)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}{STAGING_INFIX}", dir=dest.parent))
    try:
        try:
            shutil.copytree(src, staging / "copy", ignore=_links_out_of(src))
        except shutil.Error as exc:
            # A file removed midway fails the copy too: that is the export still being written.
            _check_unchanged(src, before, shown, "copied")
            # copytree copies what it can, then lists what it could not as (source, copy, reason).
            failed = [e for e in (exc.args[0] if exc.args else []) if isinstance(e, tuple) and len(e) == 3]
            broken = [s for s, _, _ in failed if os.path.islink(s) and not os.path.exists(s)]
            if broken:
                raise _broken_link_error(broken[0]) from exc
            raise IngestError(
                f"could not copy {src} to {dest.parent}: {[f'{s}: {why}' for s, _, why in failed[:3]] or exc}. "
                "Make those files readable and free space there, then run ingest again."
            ) from exc
        _check_unchanged(src, before, shown, "copied")
        # Copies of a read-only source are read-only too; DVC must be able to replace them.
        for dirpath, _, names in os.walk(staging / "copy"):
            os.chmod(dirpath, 0o755)
            for n in names:
                os.chmod(os.path.join(dirpath, n), 0o644)
        verified = verify_sha256sums(staging / "copy", shown=shown)
        if above is not None:
            verified += verify_sha256sums(staging / "copy", shown=shown, above=above)
        old = staging / "old"
        if dest.exists():
            dest.replace(old)
        try:
            (staging / "copy").replace(dest)
        except BaseException:
            # Put the previous copy back rather than leave no dataset at all.
            if old.exists():
                old.replace(dest)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return verified


def ingest(params: IngestParams, dest: Path, source: str | None = None) -> IngestResult:
    """Brings the dataset into ``dest`` from ``source`` or, when none is given, FracAtlas from figshare.

    Args:
        params: ingest parameters (the layout, the figshare location).
        dest: the project's dataset directory (replaced as a whole).
        source: a local folder or zip in ``params.layout``'s layout; ``None`` downloads FracAtlas.

    Returns:
        What was brought in.

    Raises:
        DownloadError: a transient failure; running again may succeed: a download cut short, a
            local source that changed while it was copied, or a local zip that cannot be read and
            changes within :data:`ZIP_SETTLE_S` or was modified within :data:`ZIP_RECENT_S` (a
            copy onto the share still in progress, or stalled).
        IngestError: the source is missing, not in ``ingest.layout``'s layout, or damaged (a zip
            that cannot be read, stays unchanged and was modified longer ago than
            :data:`ZIP_RECENT_S`). ``dest`` is left as it was.
    """
    with tempfile.TemporaryDirectory(prefix="fracture-ingest-") as tmp:
        tmpdir = Path(tmp)
        if source is None and params.layout != "fracatlas":
            raise IngestError(
                f"ingest.layout is {params.layout!r}: only FracAtlas can be downloaded. Give your export "
                f"(a folder or zip holding images/ and labels.csv) with --source or {SOURCE_ENV}."
            )
        if source is None:
            archive = download_figshare(params, tmpdir)
            origin = f"figshare:{params.figshare_article}/{params.figshare_file}"
            label = f"{params.figshare_file} from figshare article {params.figshare_article} ({params.figshare_api})"
        else:
            path = Path(source).expanduser()
            if not path.exists():
                raise IngestError(
                    f"source {path} does not exist. Give a FracAtlas folder or zip with --source "
                    f"or {SOURCE_ENV}, or leave both unset to download from figshare."
                )
            archive = path if path.is_file() else None
            origin = str(path.resolve())
            label = str(path)
        if archive is not None:
            extracted = tmpdir / "extracted"
            extracted.mkdir()
            local = source is not None
            before = _listing_entries(archive) if local else []
            try:
                safe_extract(archive, extracted, label)
            except _UnreadableZip as exc:
                # A zip still being written reads as damaged or as no zip: worth a retry.
                if local:
                    _check_settled(archive, before, label, exc)
                raise
            except IngestError:
                if local:
                    _check_unchanged(archive, before, label, "extracted")
                raise
            if local:
                _check_unchanged(archive, before, label, "extracted")
            # Messages name the files as in the zip (FracAtlas.zip/FracAtlas/SHA256SUMS), not
            # in the extracted copy, which is gone by then.
            tree, shown_tree = extracted, Path(label if local else params.figshare_file)
            root = find_dataset_root(extracted, label, params.layout)
        else:
            tree = shown_tree = path
            root = find_dataset_root(path, layout=params.layout)
        # A SHA256SUMS at the export's top, when the dataset is the folder below it, lists the
        # dataset's files under that folder's name: it is checked too, not left behind uncopied.
        sub = root.relative_to(tree)
        above = (tree / "SHA256SUMS", shown_tree / "SHA256SUMS", str(sub)) if sub.parts else None
        verified = _replace_dir(root, dest, shown_tree / sub, above)
    files = [p for p in dest.rglob("*") if p.is_file()]
    return IngestResult(
        dest=dest,
        source=origin,
        files=len(files),
        bytes=sum(p.stat().st_size for p in files),
        checksums_verified=verified,
    )
