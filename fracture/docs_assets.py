"""Great Expectations Data Docs that open on a network without internet.

GX's static pages load Bootstrap, jQuery, popper, bootstrap-table, the datepicker, Font
Awesome and Vega from public CDNs; offline, the pages are unstyled and the index's table stays
empty. The same files are pinned in ``docs_assets.lock.json`` to their npm registry tarballs,
with the registry's sha512 integrity:

- ``python -m fracture.docs_assets fetch`` (run by ``make venv``) downloads each tarball,
  checks its integrity and installs the files the pages use into the virtual environment
  (``<venv>/share/fracture/docs-assets``);
- :func:`make_offline`, called by the validate stage after GX builds the pages, copies them
  into the Data Docs (``static/vendor``) and points every page at its local copy. GX's logo,
  which the pages load from S3, is pointed at the copy GX ships in ``static/images``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = Path(__file__).with_name("docs_assets.lock.json")
VENDOR = Path("static") / "vendor"
_GX_LOGO = re.compile(r"https://great-expectations-web-assets\.s3\.[a-z0-9-]+\.amazonaws\.com/logo-long\.png(\?[^\"']*)?")


class AssetsError(RuntimeError):
    """A pinned asset is missing or does not match its integrity; the message says what to run."""


@dataclass(frozen=True)
class Asset:
    """One npm package's files, as pinned in the lock file."""

    package: str
    version: str
    tarball: str
    integrity: str
    files: dict[str, str]  # CDN URL -> path inside the package
    dirs: tuple[str, ...] = ()  # folders copied whole (Font Awesome's webfonts, which its CSS loads)

    @property
    def folder(self) -> str:
        return f"{self.package.replace('/', '__')}@{self.version}"


def pinned(lock: Path = LOCK) -> list[Asset]:
    data = json.loads(lock.read_text())
    return [Asset(a["package"], a["version"], a["tarball"], a["integrity"], a["files"], tuple(a["dirs"]))
            for a in data["assets"]]


def installed_dir() -> Path:
    """Where ``fetch`` installs the files: inside the running virtual environment."""
    return Path(sys.prefix) / "share" / "fracture" / "docs-assets"


def _check_integrity(data: bytes, integrity: str, name: str) -> None:
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512":
        raise AssetsError(f"{name}: integrity {integrity[:20]}... is not sha512")
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if actual != expected:
        raise AssetsError(f"{name}: the downloaded tarball's sha512 does not match docs_assets.lock.json")


def fetch(target: Path | None = None, lock: Path = LOCK, timeout: float = 120) -> Path:
    """Downloads, checks and installs every pinned asset; files already installed are kept.

    Raises:
        AssetsError: a download fails or a tarball does not match its integrity.
    """
    target = target or installed_dir()
    for asset in pinned(lock):
        folder = target / asset.folder
        wanted = [folder / p for p in asset.files.values()] + [folder / d for d in asset.dirs]
        if all(p.exists() for p in wanted):
            continue
        try:
            with urllib.request.urlopen(asset.tarball, timeout=timeout) as response:  # noqa: S310 - pinned https URL
                data = response.read()
        except OSError as exc:
            raise AssetsError(
                f"cannot download {asset.tarball} ({exc}); the npm registry must be reachable to install the Data "
                "Docs' scripts and styles"
            ) from exc
        _check_integrity(data, asset.integrity, f"{asset.package}@{asset.version}")
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [
                m for m in tar.getmembers()
                if m.isfile() and (
                    m.name.removeprefix("package/") in asset.files.values()
                    or any(m.name.removeprefix("package/").startswith(d + "/") for d in asset.dirs)
                )
            ]
            for member in members:
                dest = partial / member.name.removeprefix("package/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
        missing = [p for p in asset.files.values() if not (partial / p).is_file()]
        if missing:
            shutil.rmtree(partial, ignore_errors=True)
            raise AssetsError(f"{asset.package}@{asset.version} has no {missing}; fix docs_assets.lock.json")
        shutil.rmtree(folder, ignore_errors=True)
        partial.replace(folder)
        log.info("installed %s@%s into %s", asset.package, asset.version, folder)
    return target


def make_offline(docs: Path, source: Path | None = None, lock: Path = LOCK) -> int:
    """Copies the pinned assets into the Data Docs and points every page at them.

    Args:
        docs: the Data Docs folder (holding ``index.html`` and ``static``).
        source: where :func:`fetch` installed the assets (default: this environment's).
        lock: the lock file.

    Returns:
        How many links were rewritten.

    Raises:
        AssetsError: the assets are not installed; the message says to run ``make venv``.
    """
    source = source or installed_dir()
    assets = pinned(lock)
    absent = [a.folder for a in assets if not (source / a.folder).is_dir()]
    if absent:
        raise AssetsError(
            f"the Data Docs' scripts and styles are not installed in {source} (missing {absent}); run `make venv` "
            "(or `python -m fracture.docs_assets fetch`)"
        )
    vendor = docs / VENDOR
    shutil.rmtree(vendor, ignore_errors=True)
    local: dict[str, Path] = {}
    for asset in assets:
        shutil.copytree(source / asset.folder, vendor / asset.folder)
        local |= {url: vendor / asset.folder / path for url, path in asset.files.items()}
    logo = docs / "static" / "images" / "logo-long.png"
    rewritten = 0
    for page in docs.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        for url, path in local.items():
            rewritten += text.count(f'"{url}"')
            text = text.replace(f'"{url}"', f'"{Path(os.path.relpath(path, page.parent)).as_posix()}"')
        if logo.is_file():
            text, n = _GX_LOGO.subn(Path(os.path.relpath(logo, page.parent)).as_posix(), text)
            rewritten += n
        page.write_text(text, encoding="utf-8")
    return rewritten


def main(argv: list[str] | None = None) -> None:
    """``python -m fracture.docs_assets fetch``: installs the pinned assets into this environment."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["fetch"]:
        sys.exit("usage: python -m fracture.docs_assets fetch")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        target = fetch()
    except AssetsError as exc:
        sys.exit(f"fracture.docs_assets: {exc}")
    print(f"Data Docs assets installed in {target}")


if __name__ == "__main__":
    main()
