"""Compares the current dataset with the previous dataset version that DVC tracked.

``data.dvc`` records the md5 of the ``data`` directory after each ingest (``dvc add data``), so
the dataset's versions are the distinct md5s in the git history of ``data.dvc``. The previous
version is read back through DVC at that commit (``dvc.api.DVCFileSystem``), from the local
cache or a configured remote; only its file listing (which carries each file's md5) and
``dataset.csv`` are read, never the images themselves, so the comparison stays cheap even for the
full dataset.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from dvc.api import DVCFileSystem
from dvc.exceptions import DvcException
from dvc_data.index.index import DataIndexError

from fracture.decoding import hidden
from fracture.manifest import (
    BODY_PARTS,
    FOLDERS,
    VIEWS,
    ManifestError,
    join_files_and_csv,
    read_dataset_csv,
)
from fracture.vocabulary import CLASSES
from fracture.workspace import git_output

STATUS_COMPARED = "compared"
STATUS_FIRST = "first version"
STATUS_UNAVAILABLE = "unavailable"


class VersionUnavailableError(RuntimeError):
    """A dataset version named in the git history cannot be read (data not cached, layout gone)."""


# --- which version is the previous one --------------------------------------------------------


def _md5_from_dvc_file(text: str) -> str | None:
    """The md5 a ``.dvc`` file records for its (first) output, or None if it records none."""
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(content, Mapping):
        return None
    outs = content.get("outs") or [{}]
    return outs[0].get("md5") if isinstance(outs[0], Mapping) else None


def dvc_file_md5(project_root: Path, dvc_file: str = "data.dvc") -> str | None:
    """The md5 that the working tree's ``.dvc`` file records, or None if there is no such file.

    Args:
        project_root: the DVC project directory.
        dvc_file: the ``.dvc`` file, relative to ``project_root``.

    Returns:
        The recorded md5 (``<hash>.dir`` for a directory), or None.
    """
    path = Path(project_root) / dvc_file
    return _md5_from_dvc_file(path.read_text()) if path.is_file() else None


def dvc_file_history(project_root: Path, dvc_file: str = "data.dvc") -> list[tuple[str, str]] | None:
    """The committed versions of a ``.dvc`` file, newest first.

    Args:
        project_root: the DVC project directory (may be a subdirectory of the git repository).
        dvc_file: the ``.dvc`` file, relative to ``project_root``.

    Returns:
        ``(commit, md5)`` for each commit that changed the file and still holds it with an md5,
        newest first (consecutive commits may share an md5); an empty list when no commit has
        the file yet, None when ``project_root`` is not in a git repository.
    """
    project_root = Path(project_root)
    if git_output(project_root, "rev-parse", "--git-dir") is None:
        return None
    log = git_output(project_root, "log", "--format=%H", "--", f"./{dvc_file}")
    if log is None:  # an unborn branch (no commit at all) has no history to walk
        return []
    history = []
    for commit in log.split():
        # "./" makes the path relative to project_root rather than to the top of the repository.
        text = git_output(project_root, "show", f"{commit}:./{dvc_file}")
        md5 = _md5_from_dvc_file(text) if text is not None else None
        if md5 is not None:  # a commit that deleted the file is not a dataset version
            history.append((commit, md5))
    return history


def previous_version(
    project_root: Path, current_md5: str | None, dvc_file: str = "data.dvc"
) -> tuple[str, str] | None:
    """The most recent committed dataset version that differs from the current one.

    Args:
        project_root: the DVC project directory.
        current_md5: the md5 of the current data (from the working tree's ``data.dvc``, see
            :func:`dvc_file_md5`; it may be committed already or not). None means the current
            data is not tracked, so the newest committed version is the previous one.
        dvc_file: the ``.dvc`` file, relative to ``project_root``.

    Returns:
        ``(commit, md5)`` of the newest commit whose ``data.dvc`` records another md5 than
        ``current_md5``; None for a first version, outside git, or without any history.
    """
    return _previous_in(dvc_file_history(project_root, dvc_file), current_md5)


def _previous_in(history: list[tuple[str, str]] | None, current_md5: str | None) -> tuple[str, str] | None:
    # Skipping equal md5s, not just the newest commit: once the current version is committed,
    # the newest commit holds it, and a commit may also re-record an unchanged md5.
    return next(((commit, md5) for commit, md5 in history or [] if md5 != current_md5), None)


# --- reading and summarising one version ------------------------------------------------------


_READ_ERRORS = (DataIndexError, DvcException, OSError)


def _not_cached(project_root: Path, rev: str, dvc_file: str, what: str, exc: BaseException) -> VersionUnavailableError:
    # The error names where it failed and how to fetch the data; nothing else can fix it.
    return VersionUnavailableError(
        f"the dataset version of commit {rev[:12]} cannot be read through DVC in {project_root}: {what} "
        f"({type(exc).__name__}: {exc}). Its data is neither in the local DVC cache nor on a reachable "
        f"DVC remote. To compare with it, fetch it from a remote that holds it: "
        f"`dvc fetch --all-commits {dvc_file}` (or `dvc pull` in a checkout of {rev[:12]}); otherwise "
        f"ignore this comparison or set validate.compare_previous: false in params.yaml."
    )


def _not_fracatlas(rev: str, base: str, problem: str) -> VersionUnavailableError:
    # The version is readable but not in the FracAtlas layout: fetching would not help.
    return VersionUnavailableError(
        f"the dataset version of commit {rev[:12]} {problem}, so it is not in the FracAtlas layout "
        f"(images/Fractured, images/Non_fractured and dataset.csv under {base}) and cannot be compared "
        f"with the current data"
    )


def _current_remotes(project_root: Path) -> dict[str, Any] | None:
    """The remotes the working tree configures, to lend to an older revision.

    DVC opens a revision with the ``.dvc/config`` committed there, so a remote added after that
    commit would be invisible to it, although ``dvc pull`` would use it.
    """
    from dvc.repo import Repo  # noqa: PLC0415 - only needed when a previous version exists

    try:
        with Repo(str(project_root)) as repo:
            config = repo.config
            remotes = {name: dict(conf) for name, conf in config["remote"].items()}
            default = config["core"].get("remote")
    except DvcException:
        return None
    if not remotes:
        return None
    return {"remote": remotes} | ({"core": {"remote": default}} if default else {})


def read_version(
    project_root: Path, rev: str, data_dir: str = "data", dataset_subdir: str = "fracatlas"
) -> pd.DataFrame:
    """Reads a committed dataset version's file listing and ``dataset.csv`` through DVC.

    Only the directory listing and ``dataset.csv`` are read, never the images: from the local
    DVC cache, or else streamed from the default remote the working tree configures (or the
    one configured at ``rev``).

    Args:
        project_root: the DVC project directory (a git repository or inside one).
        rev: the git revision whose ``<data_dir>.dvc`` names the version.
        data_dir: the DVC-tracked directory, relative to ``project_root``.
        dataset_subdir: the FracAtlas-layout folder inside ``data_dir``.

    Returns:
        One row per id, like :func:`fracture.manifest.build_manifest` without the decoded
        facts: ``image_id``, ``path`` (relative to the dataset folder), ``folder_label``,
        ``md5`` (of the file's content, as DVC recorded it), ``csv_label``, ``has_file``,
        ``in_csv`` and the csv's flags.

    Raises:
        VersionUnavailableError: the version's data is not cached and no remote provides it, or
            the dataset folder, a class folder or ``dataset.csv`` does not exist at ``rev``, or
            that ``dataset.csv`` fails the current one's checks (:func:`fracture.manifest.read_dataset_csv`).
    """
    data_dir = Path(data_dir).as_posix()
    dvc_file = f"{data_dir}.dvc"
    base = posixpath.join(data_dir, dataset_subdir)
    try:
        fs = DVCFileSystem(str(project_root), rev=rev, config=_current_remotes(project_root))
    except _READ_ERRORS as exc:  # e.g. the revision is gone, or this is no DVC project
        raise _not_cached(project_root, rev, dvc_file, "opening the project at that commit", exc) from exc

    def ls(path: str) -> list[dict[str, Any]]:
        # fs.exists cannot tell a missing path from an uncached one: it answers False for both.
        try:
            return fs.ls(path, detail=True)
        except FileNotFoundError as exc:  # the listing loaded, and it lacks this path
            raise _not_fracatlas(rev, base, f"has no {path}") from exc
        except _READ_ERRORS as exc:  # DataIndexDirError: the .dir listing object is not cached
            raise _not_cached(project_root, rev, dvc_file, f"listing {path}", exc) from exc

    try:
        top = {posixpath.basename(info["name"]): info["type"] for info in ls(base)}
        rows = []
        for folder, label in FOLDERS.items():
            for info in ls(f"{base}/images/{folder}"):
                name = posixpath.basename(info["name"])
                # A hidden file (.DS_Store) is no X-ray: skipped as the manifest skips it.
                if info["type"] == "file" and not hidden(name):
                    rows.append({
                        "image_id": name, "path": f"images/{folder}/{name}", "folder_label": label,
                        # From the version's .dir listing: the image is not read. DVC 3 names a
                        # version DVC 2 recorded (no `hash: md5` in its .dvc) md5-dos2unix, which for
                        # an image, not text, is the md5 of its bytes too.
                        "md5": info.get("md5") or info.get("md5-dos2unix"),
                    })
        csv_path = f"{base}/dataset.csv"
        if top.get("dataset.csv") != "file":
            raise _not_fracatlas(rev, base, f"has no {csv_path}")
        try:
            with fs.open(csv_path, mode="rb") as f:
                data = f.read()
        except _READ_ERRORS as exc:  # "No storage files available": listed, but not cached
            raise _not_cached(project_root, rev, dvc_file, f"reading {csv_path}", exc) from exc
    finally:
        fs.close()
    try:
        # Read as the current data's dataset.csv is, with the same checks and messages.
        csv = read_dataset_csv(f"{rev[:12]}:{csv_path}", io.BytesIO(data))
    except ManifestError as exc:  # a missing column, a word where a label belongs, ...
        raise VersionUnavailableError(
            f"the dataset version of commit {rev[:12]} cannot be compared with the current data: {exc}. That "
            "version is history: this comparison is a report only (validate.compare_previous: false skips it)"
        ) from exc
    files = pd.DataFrame(rows, columns=["image_id", "path", "folder_label", "md5"])
    # Joined the way build_manifest joins the current data, so both versions count alike.
    return join_files_and_csv(files, csv).sort_values("image_id").reset_index(drop=True)


def _count_flags(files: pd.DataFrame, columns: tuple[str, ...]) -> dict[str, int | None]:
    # None, not 0, for a column the csv lacks: "not recorded" differs from "no such image".
    return {c: int((files[c] == 1).sum()) if c in files else None for c in columns}


def summarise(frame: pd.DataFrame) -> dict[str, Any]:
    """Counts of one dataset version's images per class, body part and view.

    Only images with a file in a class folder count (``folder_label`` set); an id that only
    ``dataset.csv`` names is a validation finding, not an image of the dataset.

    Args:
        frame: a manifest (:func:`fracture.manifest.build_manifest` or :func:`read_version`);
            needs ``image_id`` and ``folder_label``, and uses the body-part and view flags.

    Returns:
        ``images`` (the number of files), ``class`` (per class name from the folder),
        ``body_part`` and ``view`` (images whose flag is 1; None where the column is missing).
        These count flags, not :func:`fracture.manifest.body_part`'s one part per image: a
        ``mixed`` image counts under ``mixed`` and under each region it shows.
    """
    files = frame[frame["folder_label"].notna()]
    labels = files["folder_label"].astype(int)
    return {
        "images": int(len(files)),
        "class": {name: int((labels == index).sum()) for index, name in enumerate(CLASSES)},
        "body_part": _count_flags(files, BODY_PARTS),
        "view": _count_flags(files, VIEWS),
    }


def _difference(current: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """``current - previous`` for every count of two :func:`summarise` results."""
    diff: dict[str, Any] = {"images": current["images"] - previous["images"]}
    for group in ("class", "body_part", "view"):
        diff[group] = {
            key: None if current[group][key] is None or previous[group].get(key) is None
            else current[group][key] - previous[group][key]
            for key in current[group]
        }
    return diff


def _classes_by_id(frame: pd.DataFrame, column: str = "folder_label") -> dict[str, str | list[str]]:
    """Class name of each id ``column`` labels (``folder_label``: each id with a file;
    ``csv_label``: each id dataset.csv labels, the label ``validate.on_label_conflict: csv``
    trains on); a list of names for an id labelled both ways (filed in both folders)."""
    if column not in frame:
        return {}
    files = frame[frame[column].notna()]
    result: dict[str, str | list[str]] = {}
    for image_id, labels in files.groupby("image_id")[column]:
        names = sorted({CLASSES[int(label)] for label in labels})
        result[str(image_id)] = names[0] if len(names) == 1 else names
    return result


def _file_md5(path: Path) -> str | None:
    """The md5 of a file's content, as DVC records it for a file of a tracked directory; ``None``
    for an entry that is no regular file to read (a link whose target is gone, a FIFO, which
    reading would wait on forever, a file this user cannot read): the manifest never opens those
    either, and excludes each with its reason.

    DVC 3 (``hash: md5`` in the ``.dvc`` file) hashes a file's bytes as they are; DVC 2's
    ``md5-dos2unix`` converts line endings of text files only, so an image's is the same.
    """
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return None
        with path.open("rb") as f:
            return hashlib.file_digest(f, "md5").hexdigest()
    except OSError:
        return None


def _md5s_by_id(frame: pd.DataFrame, md5_of: Callable[[str], str | None]) -> dict[str, str | list[str]]:
    """The md5 of each id's file (``md5_of`` its ``path``); a sorted list for an id with several
    files (filed in both folders). Ids with no file, or no md5 known, are left out."""
    result: dict[str, set[str]] = {}
    for image_id, path in zip(frame["image_id"], frame["path"], strict=True):
        if path and (md5 := md5_of(path)):
            result.setdefault(str(image_id), set()).add(md5)
    return {i: min(md5s) if len(md5s) == 1 else sorted(md5s) for i, md5s in result.items()}


def _changed(now: dict[str, Any], before: dict[str, Any]) -> list[dict[str, Any]]:
    """The ids both versions hold, whose value changed: ``image_id``, ``previous``, ``current``."""
    return [
        {"image_id": i, "previous": before[i], "current": now[i]}
        for i in sorted(now.keys() & before.keys())
        if now[i] != before[i]
    ]


# --- the comparison the validate report carries -----------------------------------------------


def compare_with_previous(
    current: pd.DataFrame,
    project_root: Path,
    data_dir: str = "data",
    dataset_subdir: str = "fracatlas",
    current_md5: str | None = None,
) -> dict[str, Any]:
    """Compares the current manifest with the previous dataset version in git + DVC.

    Never raises because the previous version is missing or unreadable: that is reported in
    ``status`` and ``message``, since the comparison informs the report and gates nothing.

    Args:
        current: the manifest of the current data, as built from the folders by
            :func:`fracture.manifest.build_manifest` (before any policy drops rows, so both
            versions are counted the same way); needs ``image_id``, ``folder_label`` and
            ``path`` (relative to the dataset folder, whose files are hashed).
        project_root: the DVC project directory, holding ``<data_dir>.dvc``.
        data_dir: the DVC-tracked directory, relative to ``project_root``.
        dataset_subdir: the FracAtlas-layout folder inside ``data_dir``.
        current_md5: the current version's md5; default: what the working tree's
            ``<data_dir>.dvc`` records.

    Returns:
        A JSON-ready dict. Always: ``status`` (``"compared"``, ``"first version"`` or
        ``"unavailable"``), ``message`` and ``current`` (``md5``, ``commit`` — None while the
        version is not committed — and ``counts`` from :func:`summarise`). Unless a first
        version, ``previous`` (``md5``, ``commit``, and ``counts`` once compared). Once
        compared: ``difference`` (current minus previous counts), ``new_ids`` and
        ``removed_ids`` (sorted, complete), ``class_changed`` (``image_id``, ``previous``,
        ``current`` class folder), ``csv_label_changed`` (the same for the csv's label, which
        ``validate.on_label_conflict: csv`` trains on), ``content_changed`` (the same for the
        md5 of the image's file: an image replaced under its id, e.g. by a re-export) and their
        lengths ``n_new``, ``n_removed``, ``n_class_changed``, ``n_csv_label_changed``,
        ``n_content_changed``.

    Raises:
        ValueError: ``current`` lacks the ``image_id``, ``folder_label`` or ``path`` column.
    """
    missing = [c for c in ("image_id", "folder_label", "path") if c not in current.columns]
    if missing:
        raise ValueError(
            f"the current manifest lacks column(s) {missing}: pass the frame build_manifest returns"
        )
    project_root = Path(project_root)
    dvc_file = f"{Path(data_dir).as_posix()}.dvc"
    if current_md5 is None:
        current_md5 = dvc_file_md5(project_root, dvc_file)
    history = dvc_file_history(project_root, dvc_file)
    # The current version is committed only if the newest committed data.dvc records it.
    current_commit = history[0][0] if history and history[0][1] == current_md5 else None
    result: dict[str, Any] = {
        "current": {"md5": current_md5, "commit": current_commit, "counts": summarise(current)},
    }

    previous = _previous_in(history, current_md5)
    if previous is None:
        why = (
            f"{project_root} is not in a git repository, so {dvc_file} has no history"
            if history is None
            else f"no commit of {dvc_file} in {project_root} records an md5 other than the current {current_md5}"
        )
        return result | {
            "status": STATUS_FIRST,
            "message": f"no earlier dataset version to compare with: {why}",
            "previous": None,
        }

    prev_commit, prev_md5 = previous
    result["previous"] = {"md5": prev_md5, "commit": prev_commit}
    try:
        before = read_version(project_root, prev_commit, data_dir, dataset_subdir)
    except VersionUnavailableError as exc:
        return result | {"status": STATUS_UNAVAILABLE, "message": str(exc)}

    now_classes, before_classes = _classes_by_id(current), _classes_by_id(before)
    prev_counts = summarise(before)
    result["previous"]["counts"] = prev_counts
    new_ids = sorted(now_classes.keys() - before_classes.keys())
    removed_ids = sorted(before_classes.keys() - now_classes.keys())
    changed = _changed(now_classes, before_classes)
    # The csv's own label, relabelled with or without a move between folders (what the model
    # trains on under validate.on_label_conflict: csv).
    csv_changed = _changed(_classes_by_id(current, "csv_label"), _classes_by_id(before, "csv_label"))
    # Other pixels under the same id (a re-export, a corrected image): ids and labels alike, only
    # the files' md5s tell. The previous version's come with its listing; only the current files
    # that version also holds are hashed.
    dataset_dir = project_root / data_dir / dataset_subdir
    before_md5s = _md5s_by_id(before, dict(zip(before["path"], before["md5"], strict=True)).get)
    kept = current[current["image_id"].astype(str).isin(before_md5s.keys())]
    content_changed = _changed(_md5s_by_id(kept, lambda path: _file_md5(dataset_dir / path)), before_md5s)
    return result | {
        "status": STATUS_COMPARED,
        "message": f"compared with the dataset version of commit {prev_commit[:12]} (md5 {prev_md5}): "
        f"{len(new_ids)} new, {len(removed_ids)} removed, {len(changed)} changed class folder, "
        f"{len(csv_changed)} changed label in the csv, {len(content_changed)} changed image content",
        "csv_label_changed": csv_changed,
        "n_csv_label_changed": len(csv_changed),
        "content_changed": content_changed,
        "n_content_changed": len(content_changed),
        "difference": _difference(result["current"]["counts"], prev_counts),
        "new_ids": new_ids,
        "removed_ids": removed_ids,
        "class_changed": changed,
        "n_new": len(new_ids),
        "n_removed": len(removed_ids),
        "n_class_changed": len(changed),
    }
