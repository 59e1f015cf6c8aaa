"""The workspace: every file a stage writes, where it lives and what it holds.

Each stage writes its outputs and each reader (the next stage, the Prefect task that ran it,
the flow's report) reads them back through this module, as typed records: a file name or a
key of a stage's JSON is spelled here once. ``dvc.yaml`` lists the same paths as the stages'
outputs.

Reading a file that is not there raises :class:`FileNotFoundError` naming the stage to run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import pandas as pd

from fracture.data_config import DataConfig
from fracture.intake import InputPolicy
from fracture.vocabulary import Tta

if TYPE_CHECKING:
    from fracture.inference import ServingConfig
    from fracture.validation import ValidationReport

SPLITS = ("train", "val", "test")


class SplitTablesMixed(ValueError):
    """Two split tables share an image (:meth:`Workspace.read_split_tables`)."""


# Every image's split as the split stage recorded it (split.keep), at the project's root: a
# dependency of that stage and a file to commit with dvc.lock, as params.yaml is (fracture.split).
ASSIGNMENTS_FILE = "split_assignments.csv"
#: The MLflow tags naming the code a run ran: the commit, and the files that differ from it.
GIT_COMMIT_TAG, GIT_DIRTY_FILES_TAG = "git_commit", "git_dirty_files"
#: Tracked files the pipeline and the flow write (git pathspec globs, relative to the project): a
#: change to them is not a change to the code. The flow's closing advice names them when uncommitted.
PIPELINE_WRITTEN = ("**/dvc.lock", "**/*.dvc", "**/.gitignore", "params.yaml", ASSIGNMENTS_FILE)
#: How much of the dirty file list a ``git_dirty_files`` tag holds (MLflow takes up to 8000 characters).
_DIRTY_TAG_CHARS = 1000
#: Columns the split tables are read with as text (ids like ``IMG0000019.jpg``, hashes).
#: The columns of the pipeline's tables that hold ids, paths and hashes: text, whatever pandas would make of them.
#: ``near_duplicate_group`` (the manifest) and ``group`` (the split tables, oof.csv) name an image of the group.
_TEXT_COLUMNS = {"image_id": str, "path": str, "sha256": str, "patient_id": str, "near_duplicate_group": str,
                 "group": str}


def write_json(path: Path, data: Any) -> None:
    """Writes ``data`` as sorted, indented JSON with a final newline (stable bytes for DVC)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def replace_text(path: Path, write: Callable[[TextIO], None]) -> None:
    """Replaces the text file ``path`` with what ``write`` writes, all at once.

    params.yaml and split_assignments.csv are read at any time: by a scheduled run before it takes
    the project lock, by ``dvc`` and by ``fracture`` commands. Written in place, a reader could
    meet half a file, and a run stopped midway (a full disk, a kill) would leave it cut short. So
    the text goes to a hidden file beside it, with the file's permissions, is synced to disk and
    then moved over it: a reader sees the old file or the new one, and a write that fails leaves
    the old one as it was and nothing beside it. A link to the file stays a link; the file it names
    is replaced. Its owner and group are kept where this account may set them (a shared
    checkout's group keeps its write access).

    Raises:
        OSError: the file could not be written (a full disk, a folder this account cannot write
            to); ``path`` is unchanged.
    """
    target = path.resolve()
    before = target.stat()
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    partial = Path(name)
    try:
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), stat.S_IMODE(before.st_mode))
            with contextlib.suppress(PermissionError):  # only root may give a file away; a group, its members
                os.fchown(out.fileno(), before.st_uid, before.st_gid)
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise


def _read_json(path: Path, stage: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the {stage} stage first (dvc repro {stage})")
    return json.loads(path.read_text())


def _read_frame(path: Path, stage: str) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the {stage} stage first (dvc repro {stage})")
    return read_table(path)


def read_table(source: Path | TextIO) -> pd.DataFrame:
    """A csv the pipeline wrote (the manifest, a split table, the prepared cache's index), with its
    text columns (``image_id``, ``path``, ``sha256``, ``patient_id``, and the groups named by an
    image's id, ``near_duplicate_group`` and ``group``) read as written.

    pandas reads the text ``NA``, ``null``, ``None`` (and other spellings) as a missing value, and
    an export may name an image or a patient so: three such ids came back from the manifest as
    missing, and the split stopped on pandas' "Reindexing only valid with uniquely valued Index
    objects" (one came back as an image without an id). An empty cell stays missing.
    """
    text = source.read_text(encoding="utf-8") if isinstance(source, Path) else source.read()
    frame = pd.read_csv(io.StringIO(text), dtype=_TEXT_COLUMNS)
    names = [name for name in _TEXT_COLUMNS if name in frame.columns]
    if names:
        written = pd.read_csv(io.StringIO(text), usecols=names, dtype=str, keep_default_na=False)
        for name in names:
            frame[name] = written[name].mask(written[name] == "")
    return frame


def git_output(root: Path, *args: str) -> str | None:
    """Stdout of a git command run in ``root``, or ``None`` when git fails or is missing."""
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout


def status_paths(root: Path, *args: str) -> list[str]:
    """The paths ``git status --porcelain -z <args>`` run in ``root`` lists, relative to ``root``
    (as ``git add`` typed there takes them, also when ``root`` is a folder inside its repository);
    ``[]`` outside git. NUL-separated, so names with spaces or non-ASCII letters come unquoted;
    ``--no-optional-locks``, so a status run by a stage never competes with the user's git for
    ``index.lock``."""
    out = git_output(root, "--no-optional-locks", "status", "--porcelain", "-z", *args)
    entries = iter((out or "").split("\0"))
    found = []
    for entry in entries:
        if entry[3:]:
            found.append(entry[3:])
            if entry[0] in "RC":
                next(entries, None)  # a rename's or copy's source path follows
    # Porcelain output names paths from the repository's root; the project's own prefix is dropped.
    prefix = (git_output(root, "rev-parse", "--show-prefix") or "").strip()
    return [path.removeprefix(prefix) for path in found]


def dirty_files_tag(files: list[str], limit: int = _DIRTY_TAG_CHARS) -> str:
    """``files`` as one tag value, ``a.py, b.py``, cut at ``limit`` characters with how many were left out.

    Args:
        files: the paths, in git's order.
        limit: the most characters of paths kept (the count of the rest comes on top).
    """
    kept: list[str] = []
    for path in files:
        if kept and len(", ".join([*kept, path])) > limit:
            break
        kept.append(path)
    rest = len(files) - len(kept)
    return ", ".join(kept) + (f" and {rest} more (git status in the project lists them)" if rest else "")


# --- what each stage leaves behind ------------------------------------------------------------


@dataclass(frozen=True)
class ValidateResult:
    """``outputs/validate/report.json``: what the data-quality suite found and decided.

    Attributes:
        success: no hard rule failed.
        counts: totals, and per class, body part and view for all ids and included images.
        findings: one per rule: ``rule``, ``severity``, ``success``, ``unexpected_count``,
            ``unexpected_ids``, ``observed``.
        excluded: image id -> ``rule`` and ``reason`` it was left out for.
        duplicate_groups: ids of byte-identical files, two or more per group.
        gx_outputs: where GX's result, suite and Data Docs were written.
        data_version: DVC's md5 of ``data`` the stage validated.
        comparison: the comparison with the previous dataset version.
        near_duplicate_groups: ids of near-duplicate X-rays kept in one split, per group.
    """

    success: bool
    counts: dict[str, Any]
    findings: list[dict[str, Any]]
    excluded: dict[str, dict[str, str]]
    duplicate_groups: list[list[str]]
    gx_outputs: dict[str, str] = field(default_factory=dict)
    data_version: str | None = None
    comparison: dict[str, Any] = field(default_factory=dict)
    near_duplicate_groups: list[list[str]] = field(default_factory=list)

    @property
    def failed_rules(self) -> dict[str, int]:
        """Rule -> images it flagged, for every rule that did not pass (hard or soft)."""
        return {f["rule"]: f["unexpected_count"] for f in self.findings if not f["success"]}


@dataclass(frozen=True)
class SplitResult:
    """``outputs/split/``: how many images, and fractured images, each split holds."""

    sizes: dict[str, int]
    fractured: dict[str, int]

    @classmethod
    def of(cls, frames: dict[str, pd.DataFrame]) -> SplitResult:
        """The sizes of the split tables (``label`` 1: fractured)."""
        return cls({n: len(frames[n]) for n in SPLITS}, {n: int(frames[n]["label"].sum()) for n in SPLITS})


@dataclass(frozen=True)
class PrepareResult:
    """``outputs/prepare/meta.json`` and ``timing.json``: the prepared cache and its build rate."""

    images: int
    input_size: list[int]
    aspect: str
    enhance: str
    images_per_s: float


@dataclass(frozen=True)
class TrainedModel:
    """``outputs/train/model.json``: the fine-tuned network's architecture and preprocessing.

    ``tta`` is the profile's test-time augmentation, which chose the best epoch on val and which
    every later scoring pass applies; a ``model.json`` written before it existed reads as ``none``.
    """

    architecture: str
    profile: str
    classes: list[str]
    data_config: DataConfig
    best_epoch: int
    best_val_roc_auc: float
    tta: Tta = "none"
    # Networks in the model (fracture.ensemble.SeedEnsemble when more than one) and, then, each one's
    # best epoch (best_epoch is the first's); a model.json written before they existed reads as one
    members: int = 1
    member_best_epochs: list[int] = field(default_factory=list)
    # Above 1: the networks are snapshots of one, taken at the ends of its cosine cycles
    # (profiles.<p>.snapshots), and member_best_epochs holds the epochs they were taken after
    snapshots: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"data_config": self.data_config.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainedModel:
        return cls(**(data | {"data_config": DataConfig.from_dict(data["data_config"])}))


@dataclass(frozen=True)
class TrainResult:
    """The train stage's outputs: the model's description and its MLflow run."""

    model: TrainedModel
    run_id: str
    experiment_id: str


@dataclass(frozen=True)
class EvaluateResult:
    """``outputs/evaluate/metrics.json``: test-split metrics at the chosen threshold.

    Attributes:
        metrics: ROC AUC, recall (sensitivity), specificity, ... with ``*_ci_low`` /
            ``*_ci_high`` 95% intervals, calibration, ``threshold``, ``n_images``, ``n_fractured``.
        confusion: ``tn``, ``fp``, ``fn``, ``tp`` at the threshold.
    """

    metrics: dict[str, Any]
    confusion: dict[str, int]

    @property
    def threshold(self) -> float:
        return float(self.metrics["threshold"])

    def to_dict(self) -> dict[str, Any]:
        return self.metrics | {"confusion": self.confusion}


@dataclass(frozen=True)
class CrossvalFold:
    """One fold of the cross-validation: trained on the other folds, scored on this one.

    Attributes:
        fold: the held-out fold's number, from 1.
        n_train: images trained on (the other folds).
        n_val: images held out (this fold).
        n_fractured_val: fractured images among them.
        roc_auc: the held-out fold's ROC AUC after the last epoch (no selection on the fold).
        best_roc_auc: its highest ROC AUC over the epochs, as the train stage would select.
        best_epoch: the epoch of ``best_roc_auc``, from 1.
    """

    fold: int
    n_train: int
    n_val: int
    n_fractured_val: int
    roc_auc: float
    best_roc_auc: float
    best_epoch: int


#: The per-fold figures also written as flat ``fold_<n>_<name>`` keys, for ``dvc exp show``.
CROSSVAL_FLAT = ("roc_auc", "best_roc_auc")


@dataclass(frozen=True)
class CrossvalResult:
    """``outputs/crossval/metrics.json``: the recipe's cross-validated ROC AUC (train + val, never test).

    Attributes:
        folds: one record per fold.
        summary: ``n_folds``, ``n_images``, ``n_fractured``; ``mean_roc_auc`` and ``std_roc_auc``
            over the folds' last-epoch AUCs (``*_best_roc_auc`` the same for the selected epochs);
            ``oof_roc_auc`` of the pooled out-of-fold probabilities with ``oof_roc_auc_ci_low`` /
            ``_ci_high``; ``oof_threshold`` and ``oof_recall`` / ``oof_specificity`` at it, with
            intervals.
    """

    folds: list[CrossvalFold]
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Summary keys, flat per-fold keys (``fold_1_roc_auc``, ...) and the ``folds`` list."""
        flat = {f"fold_{f.fold}_{name}": getattr(f, name) for f in self.folds for name in CROSSVAL_FLAT}
        return self.summary | flat | {"folds": [asdict(f) for f in self.folds]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CrossvalResult:
        folds = [CrossvalFold(**f) for f in data["folds"]]
        flat = {f"fold_{f.fold}_{name}" for f in folds for name in CROSSVAL_FLAT}
        return cls(folds, {k: v for k, v in data.items() if k != "folds" and k not in flat})


# --- where everything lives -------------------------------------------------------------------


@dataclass(frozen=True)
class Workspace:
    """The project directory's stage outputs, read and written as typed records.

    Args:
        root: the project root (where ``dvc.yaml`` and ``params.yaml`` are).
    """

    root: Path = Path(".")

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    # ingest
    @property
    def ingest_record(self) -> Path:
        """What the last ingest copied (the source's listing) and the data version it made.

        The retraining flow compares it with the source before copying (:mod:`tasks.pipeline`).
        """
        return self.outputs / "ingest" / "source.json"

    @property
    def completed_run_record(self) -> Path:
        """The data version the retraining flow's last completed run ended with (:meth:`completed_data_version`)."""
        return self.outputs / "ingest" / "completed-run.json"

    def completed_data_version(self) -> str | None:
        """The data version of the retraining flow's last completed run; ``None`` before one completed.

        A run that failed after its ingest leaves ``data.dvc`` at the new version: compared with
        ``data.dvc`` alone, the run after it would report the same data as before, though no
        model was trained on it yet.
        """
        try:
            return json.loads(self.completed_run_record.read_text()).get("data_version")
        except (OSError, ValueError, AttributeError):
            return None

    def record_completed_run(self, data_version: str | None) -> None:
        """Records the data version a retraining run completed with (the next run's "previous")."""
        write_json(self.completed_run_record, {"data_version": data_version})

    # validate

    @property
    def manifest(self) -> Path:
        return self.outputs / "validate" / "manifest.csv"

    @property
    def validation_report(self) -> Path:
        return self.outputs / "validate" / "report.json"

    @property
    def gx_dir(self) -> Path:
        return self.outputs / "validate" / "gx"

    # split
    @property
    def split_dir(self) -> Path:
        return self.outputs / "split"

    def split_table(self, name: str) -> Path:
        return self.split_dir / f"{name}.csv"

    @property
    def split_report(self) -> Path:
        return self.split_dir / "report.json"

    @property
    def split_assignments(self) -> Path:
        """Each image's split as the split stage recorded it: :data:`ASSIGNMENTS_FILE` (:mod:`fracture.split`)."""
        return self.root / ASSIGNMENTS_FILE

    # prepare
    @property
    def prepare_dir(self) -> Path:
        return self.outputs / "prepare"

    @property
    def prepare_timing(self) -> Path:
        return self.prepare_dir / "timing.json"

    # train
    @property
    def train_dir(self) -> Path:
        return self.outputs / "train"

    @property
    def weights(self) -> Path:
        return self.train_dir / "model.safetensors"

    @property
    def model_json(self) -> Path:
        return self.train_dir / "model.json"

    @property
    def run_json(self) -> Path:
        return self.train_dir / "run.json"

    @property
    def history(self) -> Path:
        return self.train_dir / "history.json"

    @property
    def checkpoint_dir(self) -> Path:
        """The per-epoch checkpoint of a train stage in progress; removed once its model is written."""
        return self.train_dir / "checkpoint"

    # evaluate
    @property
    def evaluate_dir(self) -> Path:
        return self.outputs / "evaluate"

    @property
    def metrics(self) -> Path:
        return self.evaluate_dir / "metrics.json"

    @property
    def body_parts(self) -> Path:
        return self.evaluate_dir / "body_parts.json"

    @property
    def localisation(self) -> Path:
        """Per fractured test image: does the heat map point into its fracture boxes (:mod:`fracture.localisation`)."""
        return self.evaluate_dir / "localisation.csv"

    @property
    def model_card(self) -> Path:
        return self.evaluate_dir / "model_card.md"

    @property
    def plots_dir(self) -> Path:
        return self.evaluate_dir / "plots"

    def curve(self, name: str) -> Path:
        """A DVC plot's table: ``roc``, ``pr``, ``calibration`` or ``predictions``."""
        return self.evaluate_dir / f"{name}.csv"

    # detect (detect/dvc.yaml, outside the main job)
    @property
    def detect_dir(self) -> Path:
        return self.outputs / "detect"

    @property
    def detect_weights(self) -> Path:
        return self.detect_dir / "model.safetensors"

    @property
    def detect_model_json(self) -> Path:
        """The detector's config (:class:`fracture.detection.DetectorConfig`), best epoch and MLflow run."""
        return self.detect_dir / "model.json"

    @property
    def detect_history(self) -> Path:
        return self.detect_dir / "history.json"

    @property
    def detect_val_scores(self) -> Path:
        """Each val image's top box score from the kept epoch: ``detect_evaluate`` picks its threshold on them."""
        return self.detect_dir / "val_scores.csv"

    @property
    def detect_excluded(self) -> Path:
        """Train and val images left out of the detector's training, each with its reason."""
        return self.detect_dir / "excluded.csv"

    @property
    def detect_test_excluded(self) -> Path:
        """Test images left out of the detector's scoring, each with its reason."""
        return self.detect_dir / "test_excluded.csv"

    @property
    def detect_metrics(self) -> Path:
        return self.detect_dir / "metrics.json"

    # crossval (crossval/dvc.yaml, outside the main pipeline)
    @property
    def crossval_dir(self) -> Path:
        return self.outputs / "crossval"

    @property
    def crossval_metrics(self) -> Path:
        return self.crossval_dir / "metrics.json"

    @property
    def crossval_oof(self) -> Path:
        """Out-of-fold predictions: ``image_id``, ``fold``, ``label``, ``probability``, ``group``."""
        return self.crossval_dir / "oof.csv"

    # --- provenance ---------------------------------------------------------------------------

    def data_version(self) -> str | None:
        """The md5 that ``data.dvc`` records for the dataset directory (``None`` before any ingest)."""
        from fracture.versions import dvc_file_md5  # noqa: PLC0415 - DVC's API loads slowly

        return dvc_file_md5(self.root)

    def git_commit(self) -> str | None:
        """The checked-out commit, as ``<sha>-dirty`` when tracked files differ from it; ``None`` outside git.

        ``-dirty`` (as ``git describe --dirty`` spells it) says that the commit does not hold the
        code that ran: :meth:`git_dirty_files` names the files.
        """
        return self.git_tags().get(GIT_COMMIT_TAG)

    def git_dirty_files(self) -> list[str]:
        """Tracked files in the project whose content differs from the checked-out commit, staged or not.

        Paths are relative to the project, as ``git add`` typed there takes them. Untracked files
        are left out, and so are the files the pipeline and the flow write themselves
        (:data:`PIPELINE_WRITTEN`: ``dvc.lock``, ``.dvc`` files, params.yaml's ``train.profile``,
        the splits the split stage records),
        which the flow's closing advice names anyway. ``[]`` outside git.
        """
        return status_paths(self.root, "--untracked-files=no", "--", ".",
                            *(f":(exclude,glob){pattern}" for pattern in PIPELINE_WRITTEN))

    def git_tags(self) -> dict[str, str]:
        """The code version as MLflow tags: ``git_commit``, and ``git_dirty_files`` when the tree is dirty.

        Returns:
            ``{}`` outside a git repository (or before its first commit); ``{"git_commit": sha}`` for a
            clean tree; ``{"git_commit": "<sha>-dirty", "git_dirty_files": "a.py, b.py"}`` otherwise,
            the list cut short (:func:`dirty_files_tag`).
        """
        sha = (git_output(self.root, "rev-parse", "--verify", "HEAD") or "").strip()
        if not sha:
            return {}
        dirty = self.git_dirty_files()
        if not dirty:
            return {GIT_COMMIT_TAG: sha}
        return {GIT_COMMIT_TAG: f"{sha}-dirty", GIT_DIRTY_FILES_TAG: dirty_files_tag(dirty)}

    # --- validate -----------------------------------------------------------------------------

    def write_validate(
        self, resolved: pd.DataFrame, report: ValidationReport, data_version: str | None, comparison: dict[str, Any]
    ) -> ValidateResult:
        """Writes the manifest with labels and inclusion, and the report with the dataset version it covers."""
        self.manifest.parent.mkdir(parents=True, exist_ok=True)
        resolved.to_csv(self.manifest, index=False)
        write_json(self.validation_report, asdict(report) | {"data_version": data_version, "comparison": comparison})
        return self.read_validate()

    def read_manifest(self) -> pd.DataFrame:
        return _read_frame(self.manifest, "validate")

    def read_validate(self) -> ValidateResult:
        data = _read_json(self.validation_report, "validate")
        return ValidateResult(**data)

    # --- split --------------------------------------------------------------------------------

    def write_split(self, frames: dict[str, pd.DataFrame], report: dict[str, Any]) -> SplitResult:
        """Writes the three tables, then ``report.json``. The report goes first and comes back last
        (as the prepared cache's ``meta.json``): a split stopped between tables, which a command
        typed by hand can be (under DVC its outputs are gone before it starts), leaves no report,
        and the tables are not read without it; they would mix two draws, an image in train and test."""
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self.split_report.unlink(missing_ok=True)
        for name in SPLITS:
            frames[name].to_csv(self.split_table(name), index=False)
        write_json(self.split_report, report)
        return SplitResult.of(frames)

    def read_split_table(self, name: str) -> pd.DataFrame:
        """One split table, once the split that wrote it finished (its ``report.json`` is there).

        Raises:
            FileNotFoundError: the table, or the report written after the tables, is missing.
        """
        table = _read_frame(self.split_table(name), "split")
        if not self.split_report.is_file():
            raise FileNotFoundError(
                f"{self.split_report} not found: the split stage that wrote {self.split_table(name)} did not finish "
                "(its tables may come from two draws, an image in train and test); run the split stage again "
                "(dvc repro split)"
            )
        return table

    def read_split_tables(self) -> dict[str, pd.DataFrame]:
        """The train, val and test tables.

        Raises:
            SplitTablesMixed: two tables share an image (edited by hand, or two draws' tables
                mixed): the test figures would count images the model trained or chose on.
        """
        tables = {name: self.read_split_table(name) for name in SPLITS}
        for i, first in enumerate(SPLITS):
            for second in SPLITS[i + 1 :]:
                shared = sorted(set(tables[first]["image_id"]) & set(tables[second]["image_id"]))
                if shared:
                    raise SplitTablesMixed(
                        f"{self.split_table(first)} and {self.split_table(second)} share {len(shared)} images "
                        f"({', '.join(shared[:5])}{' ...' if len(shared) > 5 else ''}): an image belongs to one split; "
                        "run the split stage again (dvc repro split), or `dvc checkout split` for dvc.lock's tables"
                    )
        return tables

    def read_split(self) -> SplitResult:
        return SplitResult.of(self.read_split_tables())

    # --- prepare ------------------------------------------------------------------------------

    def write_prepare_timing(self, decode_seconds: float, images_per_s: float) -> None:
        # Apart from meta.json, so that a rebuild with identical pixels writes identical metadata.
        write_json(self.prepare_timing, {"decode_seconds": decode_seconds, "images_per_s": images_per_s})

    def read_prepare(self) -> PrepareResult:
        from fracture.prepare import META  # noqa: PLC0415 - the cache module owns its own files

        meta = _read_json(self.prepare_dir / META, "prepare")
        timing = _read_json(self.prepare_timing, "prepare")
        return PrepareResult(meta["images"], meta["input_size"], meta["aspect"], meta["enhance"], timing["images_per_s"])

    # --- train --------------------------------------------------------------------------------

    def write_train(self, model: TrainedModel, run_id: str, experiment_id: str, history: list[dict[str, float]]) -> None:
        """Writes ``model.json``, ``run.json`` and ``history.json`` (the weights are saved by the stage)."""
        write_json(self.model_json, model.to_dict())
        write_json(self.history, history)
        write_json(self.run_json, {"run_id": run_id, "experiment_id": experiment_id})

    def read_train(self) -> TrainResult:
        model = TrainedModel.from_dict(_read_json(self.model_json, "train"))
        run = _read_json(self.run_json, "train")
        return TrainResult(model, run["run_id"], run["experiment_id"])

    # --- evaluate -----------------------------------------------------------------------------

    def write_evaluate(self, result: EvaluateResult, body_parts: dict[str, Any]) -> None:
        write_json(self.metrics, result.to_dict())
        write_json(self.body_parts, body_parts)

    def read_evaluate(self) -> EvaluateResult:
        data = _read_json(self.metrics, "evaluate")
        return EvaluateResult({k: v for k, v in data.items() if k != "confusion"}, data["confusion"])

    # --- crossval -----------------------------------------------------------------------------

    def write_crossval(self, result: CrossvalResult, oof: pd.DataFrame) -> None:
        """Writes ``metrics.json`` and the out-of-fold predictions (``oof.csv``, sorted by ``image_id``;
        with each image's ``group`` of linked images where ``oof`` holds it; an ensemble's also with
        each member's ``probability_member_<k>``).

        ``metrics.json`` is removed first and written last, as the split's report is: a run stopped
        between the two (a full disk, a kill) leaves no figures beside another run's predictions, and
        ``fracture crossval-compare`` refuses predictions without them.
        """
        self.crossval_metrics.unlink(missing_ok=True)
        columns = ["image_id", "fold", "label", "probability"] + (["group"] if "group" in oof.columns else [])
        columns += sorted((c for c in oof.columns if c.startswith("probability_member_")), key=lambda c: int(c.rsplit("_", 1)[1]))
        self.crossval_oof.parent.mkdir(parents=True, exist_ok=True)
        oof[columns].sort_values("image_id").to_csv(self.crossval_oof, index=False)
        write_json(self.crossval_metrics, result.to_dict())

    def read_crossval(self) -> CrossvalResult:
        return CrossvalResult.from_dict(_read_json(self.crossval_metrics, "crossval/dvc.yaml:crossval"))

    def read_crossval_oof(self) -> pd.DataFrame:
        return _read_frame(self.crossval_oof, "crossval/dvc.yaml:crossval")

    def serving_config(self, policy: InputPolicy | None = None) -> ServingConfig:
        """The trained model's config with the decision threshold the evaluate stage chose.

        Args:
            policy: the served model's input checks (default: :class:`~fracture.intake.InputPolicy`'s).
        """
        from fracture.inference import ServingConfig  # noqa: PLC0415 - torch loads slowly

        trained = self.read_train().model
        extra = {k: v for k, v in trained.to_dict().items() if k not in {"architecture", "data_config", "tta"}}
        return ServingConfig(
            trained.architecture, trained.data_config, self.read_evaluate().threshold, extra, trained.tta,
            policy or InputPolicy(),
        )
