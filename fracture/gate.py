"""The promotion gate's rules: the floors every champion clears, and when a version beats the champion.

A version beats the champion only on the same test images: both are scored through the
registry (:mod:`fracture.scoring`), and DeLong's paired test of their ROC AUCs must show the
version higher with the confidence ``register.confidence`` sets (its variance estimated over the
split's groups of linked images, which are not independent evidence), while its sensitivity and
its specificity at its served threshold fall by no more than ``register.sensitivity_tolerance``
and ``register.specificity_tolerance``.

Pure functions of the scores and metrics; no MLflow calls. :mod:`fracture.registry` gathers
them from the registry, runs the rules, loads the model back and moves the aliases.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from fracture.config import DetectParams, RegisterParams
from fracture.evaluation import PairedAUC, delong_paired, point_metrics
from fracture.fingerprints import split_fingerprint
from fracture.model_card import beside
from fracture.seen import SeenImages
from fracture.split import split_groups
from fracture.workspace import read_table


class SplitTableError(ValueError):
    """The test split table cannot be compared on: a column, an image path or a label is missing."""


@dataclass(frozen=True)
class EvaluatedSplit:
    """The test split a run was evaluated on, as the gate compares it.

    Attributes:
        fingerprint: sha256 of the split's sorted ``image_id<TAB>label`` lines, recorded on the
            version so that a later gate knows which images it was evaluated on.
        images: how many images the split holds.
        check_image: a real image of the split, predicted by the registered model before any
            alias moves to it.
        paths: every image of the split, to score the version and the champion on.
        labels: their labels (1: fractured), in the same order.
        allow_truncated: whether files that end early are scored (as ``validate.on_truncated:
            keep`` let the evaluate stage score them).
        groups: each image's group of linked images (the table's ``group``), in the same order,
            which DeLong's test counts as one piece of evidence each; empty: each image its own.
        image_ids: each image's ``image_id``, in the same order; empty for a split built without them.
        sha256: each image's content sha256 (the table's ``sha256``), in the same order; empty
            where the table has none.
    """

    fingerprint: str
    images: int
    check_image: Path
    paths: tuple[Path, ...] = ()
    labels: tuple[int, ...] = ()
    allow_truncated: bool = True
    groups: tuple[str, ...] = ()
    image_ids: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()

    @classmethod
    def from_csv(cls, test_csv: Path, dataset_dir: Path, allow_truncated: bool = True) -> EvaluatedSplit:
        """Reads the split table the evaluate stage scored (``outputs/split/test.csv``).

        Args:
            test_csv: the test split table (``image_id``, ``path`` relative to the dataset, ``label``).
            dataset_dir: the dataset folder the paths are relative to (``ingest.dest``).
            allow_truncated: score files that end early (``validate.on_truncated: keep``).

        Returns:
            The split's fingerprint, size, first image, and every image with its label and its
            group of linked images (the ``group`` column; for a table written before the split
            recorded it, :func:`fracture.split.split_groups` of its own rows, as the evaluate stage
            takes it).

        Raises:
            FileNotFoundError: the table does not exist.
            SplitTableError: the table lacks a column, or a row lacks its image path or a label of 0
                or 1; the message names the table and the rows.
        """
        if not test_csv.is_file():
            raise FileNotFoundError(f"{test_csv} not found: run the split stage first (dvc repro)")
        frame = read_table(test_csv)
        missing = {"image_id", "path", "label"} - set(frame.columns)
        if missing:
            raise SplitTableError(f"{test_csv}: columns {sorted(missing)} missing; rebuild it with `dvc repro split`")
        if frame.empty:
            raise SplitTableError(f"{test_csv}: no image paths; rebuild it with `dvc repro split`")
        # The fingerprint covers every row, so every row must be scored: none may lack its image
        # or its label. Line numbers count the header as line 1, as an editor shows them.
        no_path = frame["path"].isna() | (frame["path"].str.strip() == "")
        label = pd.to_numeric(frame["label"], errors="coerce")
        bad_label = ~label.isin([0, 1])
        for bad, what in ((no_path, "no image path"), (bad_label, "a label other than 0 or 1")):
            if bad.any():
                lines = ", ".join(str(i + 2) for i in frame.index[bad][:10])
                raise SplitTableError(
                    f"{test_csv}: {int(bad.sum())} row(s) with {what} (lines {lines}); rebuild it with `dvc repro split`"
                )
        return cls(
            split_fingerprint(frame),
            len(frame),
            dataset_dir / frame["path"].iloc[0],
            tuple(dataset_dir / p for p in frame["path"]),
            tuple(int(v) for v in label),
            allow_truncated,
            tuple(split_groups(frame)),
            tuple(frame["image_id"].astype(str)),
            tuple(frame["sha256"].fillna("").astype(str)) if "sha256" in frame.columns else (),
        )

    def seen_by(self, seen: SeenImages) -> np.ndarray | None:
        """Which of the split's images a model trained or validated on, itself or through its group.

        An image counts as seen when its ``image_id`` or its content's sha256 is in ``seen``, and
        so does every image of its group of linked images (copies, near-duplicates, one
        patient's X-rays): a near-duplicate of a training image is no unseen evidence either.

        Returns:
            A boolean mask in the split's order; ``None`` when the split does not know its image
            ids, so that what the model saw cannot be told.
        """
        return seen.among(self.image_ids, self.sha256, self.groups)


@dataclass(frozen=True)
class GateCheck:
    """One rule of the promotion gate and how the version fared.

    Attributes:
        name: e.g. ``floor test_recall``, ``scored with champion``, ``beats champion``,
            ``sensitivity held``, ``specificity held``, ``load check``.
        passed: whether the version passed it.
        detail: the numbers behind it, in words.
    """

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Evaluation:
    """A model's evaluation as the evaluate stage recorded it.

    Attributes:
        version: the registered version (``None`` for a run not registered yet).
        metrics: the training run's metrics (``test_*`` from the evaluate stage).
        split_fingerprint: the test split it was evaluated on (see :func:`split_fingerprint`).
        data_version: the dataset version (DVC md5 of ``data``) it was trained and evaluated on.
        seen: the images it was trained and validated on (its run's :data:`fracture.seen.SEEN_ARTIFACT`);
            ``None``: its run did not record them (registered before the train stage did).
    """

    version: str | None
    metrics: dict[str, float]
    split_fingerprint: str | None
    data_version: str | None
    seen: SeenImages | None = None


@dataclass(frozen=True)
class PairedScores:
    """A version and the champion, scored on the same test images.

    Attributes:
        labels: the images' labels (1: fractured).
        candidate: the version's fracture probability for each image.
        candidate_threshold: the version's served threshold.
        champion: the champion's fracture probability for the same images, in the same order.
        champion_threshold: the champion's served threshold.
        champion_version: the champion's registered version.
        groups: each image's group of linked images (:attr:`EvaluatedSplit.groups`); ``None``:
            each image independent.
        left_out: how many of the split's images were left out because the champion trained or
            validated on them (:meth:`without`).
    """

    labels: np.ndarray
    candidate: np.ndarray
    candidate_threshold: float
    champion: np.ndarray
    champion_threshold: float
    champion_version: str
    groups: np.ndarray | None = None
    left_out: int = 0

    def without(self, out: np.ndarray) -> PairedScores:
        """The same pair on the images ``out`` does not mark (a boolean mask in the split's order)."""
        keep = ~np.asarray(out, dtype=bool)
        return replace(
            self,
            labels=np.asarray(self.labels)[keep],
            candidate=np.asarray(self.candidate)[keep],
            champion=np.asarray(self.champion)[keep],
            groups=None if self.groups is None else np.asarray(self.groups)[keep],
            left_out=self.left_out + int((~keep).sum()),
        )


#: The version tags a comparison with the champion writes (:meth:`Comparison.tags`): a decision
#: taken without one removes those an earlier decision left.
COMPARISON_TAGS = (
    "gate_compared_with",
    "gate_images",
    "gate_auc_difference",
    "gate_auc_difference_ci",
    "gate_p_value",
    "gate_sensitivity_change",
    "gate_specificity_change",
    "gate_images_left_out",
)


@dataclass(frozen=True)
class Comparison:
    """How a version compares with the champion on the same test images.

    Attributes:
        champion_version: the champion it was compared with.
        auc: DeLong's paired test, the version as model A and the champion as model B.
        candidate_sensitivity: the version's sensitivity at its served threshold.
        champion_sensitivity: the champion's, at its own served threshold.
        candidate_specificity: the version's specificity at its served threshold.
        champion_specificity: the champion's, at its own served threshold.
        left_out: the test images left out because the champion trained or validated on them,
            or on an image linked to them (:attr:`PairedScores.left_out`).
        against: the alias the compared version held: ``champion``, or ``previous-champion``
            where no version held champion and it stood in for the champion.
    """

    champion_version: str
    auc: PairedAUC
    candidate_sensitivity: float
    champion_sensitivity: float
    candidate_specificity: float
    champion_specificity: float
    left_out: int = 0
    against: str = "champion"

    @property
    def sensitivity_change(self) -> float:
        """The version's sensitivity minus the champion's."""
        return self.candidate_sensitivity - self.champion_sensitivity

    @property
    def specificity_change(self) -> float:
        """The version's specificity minus the champion's."""
        return self.candidate_specificity - self.champion_specificity

    def tags(self) -> dict[str, str]:
        """The comparison as registered-model version tags (:data:`COMPARISON_TAGS`)."""
        a = self.auc
        return {
            "gate_compared_with": self.champion_version,
            "gate_images": str(a.n_images),
            "gate_auc_difference": f"{a.difference:.4f}",
            "gate_auc_difference_ci": (f"[{a.ci_low:.4f}, {a.ci_high:.4f}] ({a.confidence:.0%})" if not a.no_interval
                                       else f"none ({a.no_interval})"),
            "gate_p_value": f"{a.p_value:.4g}",
            "gate_sensitivity_change": f"{self.sensitivity_change:.4f}",
            "gate_specificity_change": f"{self.specificity_change:.4f}",
            "gate_images_left_out": str(self.left_out),
        }


def compare(scores: PairedScores, confidence: float, against: str = "champion") -> Comparison:
    """DeLong's paired test of the two ROC AUCs, and each model's sensitivity and specificity at its
    served threshold; ``against``: the alias the compared version holds (:attr:`Comparison.against`).

    With the split's ``groups`` of linked images the test is Obuchowski's clustered DeLong
    (:func:`fracture.evaluation.delong_paired`): copies and one patient's images counted as
    independent made the p-value too small, and the gate promoted on noise."""
    y = np.asarray(scores.labels).astype(int)
    ours = point_metrics(y, np.asarray(scores.candidate), scores.candidate_threshold)
    theirs = point_metrics(y, np.asarray(scores.champion), scores.champion_threshold)
    return Comparison(
        scores.champion_version,
        delong_paired(y, scores.candidate, scores.champion, confidence, groups=scores.groups),
        float(ours["recall"]),
        float(theirs["recall"]),
        float(ours["specificity"]),
        float(theirs["specificity"]),
        scores.left_out,
        against,
    )


def floors(params: RegisterParams | DetectParams, metrics: dict[str, float]) -> tuple[GateCheck, ...]:
    """Every floor of ``register.floors`` (or the detector's ``detect.floors``) against the version's run metrics."""
    return tuple(
        GateCheck(f"floor {key}", metrics[key] >= floor, _floor_detail(metrics[key], floor))
        for key, floor in params.floors.items()
    )


def _floor_detail(value: float, floor: float) -> str:
    """``0.7900 < 0.8``: the metric to four decimals, or to as many more as show it on the side of the floor
    it is on (:func:`fracture.model_card.beside`), so that 0.84996 against 0.85 reads ``0.84996 < 0.85``."""
    shown_floor = f"{floor:g}" if float(f"{floor:g}") == floor else repr(floor)
    return f"{beside(value, floor, 4)} {'>=' if value >= floor else '<'} {shown_floor}"


def paired_verdict(difference: float, p_value: float, confidence: float) -> tuple[bool, str]:
    """Whether a paired gain beats the champion (positive, two-sided p below ``1 - confidence``), and why in words.

    The classifier's gate (ROC AUC, DeLong) and the detector's (mAP@0.5, paired bootstrap) both decide by it.
    """
    # Rounded: 1 - 0.95 is 0.05000000000000004 in floating point, which let p = 0.05 pass "p < 0.05".
    alpha = round(1 - confidence, 12)
    if difference > 0 and p_value < alpha:
        return True, f"higher with {confidence:.0%} confidence"
    if difference > 0:
        return False, f"higher, but not with {confidence:.0%} confidence (p must be < {alpha:.3g})"
    return False, "not higher"


def against_champion(params: RegisterParams, comparison: Comparison) -> tuple[GateCheck, GateCheck, GateCheck]:
    """Whether the version beats the champion on the same images without losing sensitivity or specificity.

    ``beats champion`` passes when the AUC difference is positive and DeLong's two-sided
    p-value is below ``1 - register.confidence`` (the interval at that confidence lies above 0).
    Where DeLong's variance is 0 the interval has no width, which is no certainty
    (:attr:`fracture.evaluation.PairedAUC.no_interval`): the same ranking of every image has no
    difference to measure and is not higher; a difference with no spread is judged by a paired
    randomisation test's p-value; with too few images of a class nothing is measured and the
    champion stays. The detail says which, and shows no interval.
    ``sensitivity held`` passes when the version's sensitivity at its served threshold is at most
    ``register.sensitivity_tolerance`` below the champion's at its own; ``specificity held``
    likewise with ``register.specificity_tolerance``: a better ranking whose threshold lands
    where readers clear many more false alarms is no gain in use either.
    """
    # ``previous-champion`` where it stood in for the champion: named as what it is, not as the champion.
    a, v, role = comparison.auc, comparison.champion_version, comparison.against
    wins, verdict = paired_verdict(a.difference, a.p_value, params.confidence)
    if a.test == "none" and a.difference > 0:
        # Nothing was measured (too few images of a class, or no spread): the p-value of 1 is no
        # finding that the gain falls short of the confidence asked for; the champion stays for want of evidence.
        verdict = "higher, but with nothing measured the gain is no evidence: not promoted on it"
    linked = "" if a.n_groups is None else f" ({a.n_groups} groups of linked images)"
    if comparison.left_out:
        linked += f", {comparison.left_out} it was trained or validated on left out"
    auc = GateCheck(
        "beats champion",
        wins,
        f"ROC AUC {a.auc_a:.4f} vs {role} v{v}'s {a.auc_b:.4f} on the same {a.n_images} images{linked}: "
        f"{a.difference:+.4f} ({a.evidence()}), {verdict}" + (
            "; with most of the test split left out, weigh the newcomer by its cross-validated (out-of-fold) "
            "figures too" if not wins and comparison.left_out > a.n_images else ""
        ),
    )

    def held(name: str, ours: float, theirs: float, tolerance: float) -> GateCheck:
        change = ours - theirs
        kept = change >= -tolerance - 1e-12
        return GateCheck(
            f"{name} held",
            kept,
            f"{name} {ours:.4f} vs {role} v{v}'s {theirs:.4f} at their served thresholds: {change:+.4f}, "
            f"{'within' if kept else 'beyond'} the tolerance {tolerance:g}",
        )

    c = comparison
    return (
        auc,
        held("sensitivity", c.candidate_sensitivity, c.champion_sensitivity, params.sensitivity_tolerance),
        held("specificity", c.candidate_specificity, c.champion_specificity, params.specificity_tolerance),
    )
