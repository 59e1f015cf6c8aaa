"""What one retrain flow run did: every stage's typed result, and the registry's decision.

Its own module, so that the flow (:mod:`flows.retrain`) and its report (:mod:`flows.report`)
both import it and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from fracture.registry import Registration
from fracture.workspace import EvaluateResult, PrepareResult, SplitResult, TrainResult, ValidateResult
from tasks.pipeline import IngestSummary, StageRun


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

    @property
    def stages_ran(self) -> list[str]:
        """The DVC stages this run executed, in pipeline order."""
        return [name for name, run in self.runs.items() if run.ran]

    @property
    def nothing_changed(self) -> bool:
        """Same data version, every DVC stage up to date, and no model version created."""
        return not self.ingest.changed and not self.stages_ran and not self.registration.created
