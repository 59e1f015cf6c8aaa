"""What one retrain flow run did: every stage's typed result, and the registry's decision.

Its own module, so that the flow (:mod:`flows.retrain`) and its report (:mod:`flows.report`)
both import it and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from fracture.registry import Registration
from fracture.workspace import (
    EvaluateResult,
    PrepareResult,
    SplitResult,
    TrainResult,
    ValidateResult,
)
from tasks.pipeline import IngestSummary, StageRun


@dataclass(frozen=True)
class DetectorResult:
    """The detector's part of a run (``detect.enabled``): its DVC stages, test metrics and registration.

    Attributes:
        runs: ``detect_train`` and ``detect_evaluate`` -> whether DVC ran each.
        metrics: ``outputs/detect/metrics.json`` (mAP with intervals, the top box as a classifier).
        registration: the detector registry's decision (``detect.model_name``).
    """

    runs: dict[str, StageRun]
    metrics: dict[str, float]
    registration: Registration


@dataclass(frozen=True)
class RetrainResult:
    """One flow run.

    Attributes:
        profile: the training profile it used.
        ingest: the dataset version before and after ingest.
        runs: stage name -> whether DVC ran it, for every DVC stage in pipeline order.
        validate: the validate stage's report.
        split: the split sizes.
        prepare: the prepared cache.
        train: the trained model and its MLflow run.
        evaluate: the test metrics.
        registration: the registry's decision.
        detector: the detector's stages and registration, when ``detect.enabled``.
    """

    profile: str
    ingest: IngestSummary
    runs: dict[str, StageRun]
    validate: ValidateResult
    split: SplitResult
    prepare: PrepareResult
    train: TrainResult
    evaluate: EvaluateResult
    registration: Registration
    detector: DetectorResult | None = None

    @property
    def stages_ran(self) -> list[str]:
        """The DVC stages whose command this run executed, in pipeline order (the detector's last)."""
        return [name for name, run in self._all_runs().items() if run.ran and not run.restored]

    @property
    def stages_restored(self) -> list[str]:
        """The DVC stages whose outputs DVC restored from its run cache, their command not run."""
        return [name for name, run in self._all_runs().items() if run.restored]

    def _all_runs(self) -> dict[str, StageRun]:
        return {**self.runs, **(self.detector.runs if self.detector else {})}

    @property
    def nothing_changed(self) -> bool:
        """Same data version, every DVC stage up to date, and no model version created."""
        created = self.registration.created or (self.detector is not None and self.detector.registration.created)
        return not self.ingest.changed and not self.stages_ran and not self.stages_restored and not created
