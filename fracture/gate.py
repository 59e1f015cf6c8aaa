"""The promotion gate's rules: which evaluations are comparable and when a version beats the champion.

Pure functions of the evaluations; no MLflow calls. :mod:`fracture.registry` gathers the
evaluations from the registry, runs :func:`gate`, loads the model back and moves the aliases.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fracture.config import RegisterParams


class SplitTableError(ValueError):
    """The test split table cannot be compared on: a column or every image path is missing."""


@dataclass(frozen=True)
class EvaluatedSplit:
    """The test split a run was evaluated on, as the gate compares it.

    Attributes:
        fingerprint: sha256 of the split's sorted ``image_id<TAB>label`` lines; two
            evaluations are comparable only when their fingerprints (and data versions) match.
        images: how many images the split holds.
        check_image: a real image of the split, predicted by the registered model before any
            alias moves to it.
        paths: every image of the split, to score a champion evaluated on another split.
        labels: their labels (1: fractured), in the same order.
        allow_truncated: whether files that end early are scored (as ``validate.on_truncated:
            keep`` let the evaluate stage score them).
    """

    fingerprint: str
    images: int
    check_image: Path
    paths: tuple[Path, ...] = ()
    labels: tuple[int, ...] = ()
    allow_truncated: bool = True

    @classmethod
    def from_csv(cls, test_csv: Path, dataset_dir: Path, allow_truncated: bool = True) -> EvaluatedSplit:
        """Reads the split table the evaluate stage scored (``outputs/split/test.csv``).

        Args:
            test_csv: the test split table (``image_id``, ``path`` relative to the dataset, ``label``).
            dataset_dir: the dataset folder the paths are relative to (``ingest.dest``).
            allow_truncated: score files that end early (``validate.on_truncated: keep``).

        Returns:
            The split's fingerprint, size, first image, and every image with its label.

        Raises:
            FileNotFoundError: the table does not exist.
            SplitTableError: the table lacks a column or holds no image path.
        """
        # Raised as the registry's error, which the register command and task report as such;
        # imported here so that the gate's rules load without MLflow.

        if not test_csv.is_file():
            raise FileNotFoundError(f"{test_csv} not found: run the split stage first (dvc repro)")
        frame = pd.read_csv(test_csv, dtype={"image_id": str, "path": str})
        missing = {"image_id", "path", "label"} - set(frame.columns)
        if missing:
            raise SplitTableError(f"{test_csv}: columns {sorted(missing)} missing; rebuild it with `dvc repro split`")
        paths = frame["path"].dropna()
        paths = paths[paths != ""]
        if paths.empty:
            raise SplitTableError(f"{test_csv}: no image paths; rebuild it with `dvc repro split`")
        return cls(
            split_fingerprint(frame),
            len(frame),
            dataset_dir / paths.iloc[0],
            tuple(dataset_dir / p for p in paths),
            tuple(int(v) for v in frame.loc[paths.index, "label"]),
            allow_truncated,
        )


def split_fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of the sorted ``image_id<TAB>label`` lines: the same images with the same labels.

    Row order and path spelling do not matter; the image contents are covered by the data version.
    """
    lines = sorted(f"{i}\t{int(label)}" for i, label in zip(frame["image_id"], frame["label"], strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@dataclass(frozen=True)
class GateCheck:
    """One rule of the promotion gate and how the version fared.

    Attributes:
        name: e.g. ``floor test_recall``, ``same split``, ``same data version``, ``beats champion``,
            ``load check``.
        passed: whether the version passed it.
        detail: the numbers behind it, in words.
    """

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Evaluation:
    """A model's evaluation as the gate compares it.

    Attributes:
        version: the registered version (``None`` for a run not registered yet).
        metrics: the training run's metrics (``test_*`` from the evaluate stage).
        split_fingerprint: the test split it was evaluated on (see :func:`split_fingerprint`).
        data_version: the dataset version (DVC md5 of ``data``) it was trained and evaluated on.
    """

    version: str | None
    metrics: dict[str, float]
    split_fingerprint: str | None
    data_version: str | None


def gate(params: RegisterParams, candidate: Evaluation, champion: Evaluation | None) -> tuple[GateCheck, ...]:
    """The promotion rules that need no model loading: floors, comparability and the margin.

    Args:
        params: the gate metric, margin and floors.
        candidate: the new version's evaluation; it holds every metric ``params`` names.
        champion: the current champion's evaluation (``None`` when there is none).

    Returns:
        Every check evaluated, in order; the candidate may be promoted when all passed.
    """
    metrics = candidate.metrics
    checks = [
        GateCheck(
            f"floor {key}",
            metrics[key] >= floor,
            f"{metrics[key]:.4f} {'>=' if metrics[key] >= floor else '<'} {floor:g}",
        )
        for key, floor in params.floors.items()
    ]
    if champion is None:
        checks.append(GateCheck("beats champion", True, "no champion yet"))
        return tuple(checks)
    v = champion.version
    same_split = _same("test split", candidate.split_fingerprint, champion.split_fingerprint, v)
    same_data = _same("data version", candidate.data_version, champion.data_version, v)
    checks += [same_split, same_data]
    if not (same_split.passed and same_data.passed):
        checks.append(
            GateCheck(
                "beats champion",
                False,
                f"not compared with champion v{v}: metrics are comparable only on the same test split and "
                "data version (re-evaluate, or choose the champion by hand)",
            )
        )
        return tuple(checks)
    score, theirs = metrics[params.metric], champion.metrics.get(params.metric)
    if theirs is None:
        checks.append(GateCheck("beats champion", False, f"champion v{v}'s run has no metric '{params.metric}'"))
        return tuple(checks)
    gain = score - theirs
    wins = gain > 0 and gain >= params.margin
    checks.append(
        GateCheck(
            "beats champion",
            wins,
            f"{params.metric} {score:.4f} vs champion v{v}'s {theirs:.4f}: {gain:+.4f}, "
            f"{'at least' if wins else 'short of'} the margin {params.margin:g}",
        )
    )
    return tuple(checks)


def _same(what: str, ours: str | None, theirs: str | None, version: str | None) -> GateCheck:
    name = f"same {what}"
    if not ours:
        return GateCheck(name, False, f"this run recorded no {what}")
    if not theirs:
        return GateCheck(name, False, f"champion v{version} has no recorded {what}")
    if ours != theirs:
        return GateCheck(name, False, f"{what} {ours[:12]} differs from champion v{version}'s {theirs[:12]}")
    return GateCheck(name, True, f"{what} {ours[:12]} as champion v{version}")
