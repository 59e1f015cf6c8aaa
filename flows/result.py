"""What one retrain flow run did: every stage's typed result, and the registry's decision.

Its own module, so that the flow (:mod:`flows.retrain`) and its report (:mod:`flows.report`)
both import it and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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
class RegistryState:
    """A registered model's aliases and newest version, as the flow read them before or after registering.

    Attributes:
        aliases: alias -> the version holding it.
        newest_version: the highest version number (0: the model has no version yet).
        undecided: the versions, among the newest, that the gate has not decided on (no
            ``gate_decision``, or a promotion left ``pending``): a registration stopped before its
            gate, which the next run's registration completes.
    """

    aliases: dict[str, str]
    newest_version: int = 0
    undecided: tuple[str, ...] = ()


@dataclass(frozen=True)
class AliasMove:
    """An alias that pointed elsewhere after this flow run registered than before it did.

    Attributes:
        alias: ``champion``, ``previous-champion``, ``challenger``, ...
        before: the version holding it before (``None``: none did).
        after: the version holding it afterwards (``None``: none does).
    """

    alias: str
    before: str | None
    after: str | None

    def describe(self) -> str:
        """``champion`` version 1 -> version 2, in words."""
        def version(v: str | None) -> str:
            return "none" if v is None else f"version {v}"

        return f"`{self.alias}` {version(self.before)} → {version(self.after)}"


def alias_moves(before: RegistryState, after: RegistryState) -> tuple[AliasMove, ...]:
    """The aliases that moved between the two readings, ``champion`` first, then by name."""
    names = sorted(set(before.aliases) | set(after.aliases), key=lambda a: (a != "champion", a))
    return tuple(
        AliasMove(a, before.aliases.get(a), after.aliases.get(a))
        for a in names
        if before.aliases.get(a) != after.aliases.get(a)
    )


def was_promoted(registration: Registration, moves: tuple[AliasMove, ...] = ()) -> bool:
    """Whether the flow run moved ``champion`` to the registration's version.

    The register task's own ``decision`` says so for its last try; ``moves`` also for a first try
    that promoted before its connection dropped, whose retry finds the version already champion.
    """
    return registration.decision == "promoted" or any(
        m.alias == "champion" and m.after == registration.version for m in moves
    )


def registry_changed(registration: Registration, moves: tuple[AliasMove, ...] = ()) -> bool:
    """Whether the flow run changed the registry: created the version, promoted it, or moved an alias."""
    return registration.created or was_promoted(registration, moves) or bool(moves)


def as_of_run(
    registration: Registration, before: RegistryState, after: RegistryState
) -> tuple[Registration, tuple[AliasMove, ...]]:
    """The register task's result as this flow run saw it, over all of the task's tries.

    A try that created the version and then lost its connection is retried, and the retry finds
    the version registered (``created=False``): the flow run still created it when the version is
    newer than the newest one before the run registered.

    Args:
        registration: what the register task returned (its last try).
        before: the model's state read before the register task ran.
        after: the model's state read after it.

    Returns:
        The registration with ``created`` for the whole flow run, and the aliases the run moved.
    """
    created = registration.created or int(registration.version) > before.newest_version
    return replace(registration, created=created), alias_moves(before, after)


@dataclass(frozen=True)
class VersionOrigin:
    """What one registered version was built from, as its version tags and its training run record it.

    Attributes:
        version: the registered version.
        run_id: the MLflow run that trained it (``None``: the version names none).
        data_version: the dataset version (DVC md5 of ``data``) its version tags name.
        git_commit: the code's commit (``<sha>-dirty`` when the code differed from it).
        dirty_files: with a ``-dirty`` commit, the files no commit holds.
        profile: the training profile.
        params: its training run's MLflow params; ``None`` when the run is not in the tracking store.
        packages: package -> version, as pinned in the version's model (``requirements.txt``, written
            when it was registered); ``None`` when it could not be read.
        packages_unread: why ``packages`` is ``None``.
    """

    version: str
    run_id: str | None = None
    data_version: str | None = None
    git_commit: str | None = None
    dirty_files: str | None = None
    profile: str | None = None
    params: dict[str, str] | None = None
    packages: dict[str, str] | None = None
    packages_unread: str | None = None

    @property
    def run_gone(self) -> bool:
        """Whether the version names a training run the tracking store no longer holds."""
        return self.run_id is not None and self.params is None


@dataclass(frozen=True)
class SinceChampion:
    """The champion a new version was compared with, and what each of the two was built from.

    Attributes:
        champion: the champion before this run registered.
        new: the version this run registered.
        error: why the two could not be read from the registry (``None``: they were); the run's
            registration stands either way.
    """

    champion: VersionOrigin
    new: VersionOrigin
    error: str | None = None


@dataclass(frozen=True)
class DetectorResult:
    """The detector's part of a run (``detect.enabled``): its DVC stages, test metrics and registration.

    Attributes:
        runs: ``detect_train`` and ``detect_evaluate`` -> whether DVC ran each.
        metrics: ``outputs/detect/metrics.json`` (mAP with intervals, the top box as a classifier).
        registration: the detector registry's decision (``detect.model_name``); ``created`` as in
            :class:`RetrainResult`.
        moves: the detector's aliases this flow run moved.
    """

    runs: dict[str, StageRun]
    metrics: dict[str, float]
    registration: Registration
    moves: tuple[AliasMove, ...] = ()


@dataclass(frozen=True)
class RetrainFailure:
    """A flow run that failed: where, why, what it finished, and the registry as it was left.

    Attributes:
        stage: where it failed: ``checks before the run``, ``ingest``, ``dvc status`` (the check
            that finds what changed), a DVC stage, ``register``,
            ``detect``, ``detect-register`` or ``report`` (after the registrations).
        error: the error's type and the first line of its message.
        profile: the training profile, when the run got as far as choosing it.
        ingest: the data version ingest left, when ingest finished.
        previous_version: the data version of the last completed run, when known.
        runs: the DVC stages that finished, in pipeline order (the detector's last).
        registration: the classifier's registration, when the register task finished before the failure.
        registry: each registered model's state read after the failure (model name -> state).
        registry_before: the same, read before this run registered (only once the run got that far).
        registry_error: why the registry was not read (``None``: it was).
    """

    stage: str
    error: str
    profile: str | None = None
    ingest: IngestSummary | None = None
    previous_version: str | None = None
    runs: dict[str, StageRun] = field(default_factory=dict)
    registration: Registration | None = None
    registry: dict[str, RegistryState] = field(default_factory=dict)
    registry_before: dict[str, RegistryState] = field(default_factory=dict)
    registry_error: str | None = None


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
        registration: the registry's decision. Its ``created`` says whether this flow run created
            the version, over all of the register task's tries: a retry after a dropped connection
            finds the version its first try created.
        detector: the detector's stages and registration, when ``detect.enabled``.
        moves: the classifier's aliases this flow run moved (``champion``, ``previous-champion``,
            ``challenger``), over all of the register task's tries.

        since_champion: what the version this run registered was built from against the champion
            it challenged (``None``: no champion before the run, or no new version).
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
    moves: tuple[AliasMove, ...] = ()
    since_champion: SinceChampion | None = None

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
    def promoted(self) -> bool:
        """Whether this flow run moved the classifier's ``champion`` to its version."""
        return was_promoted(self.registration, self.moves)

    @property
    def registry_changed(self) -> bool:
        """Whether this flow run created a version, promoted one or moved an alias, the detector's included."""
        detector = self.detector is not None and registry_changed(self.detector.registration, self.detector.moves)
        return registry_changed(self.registration, self.moves) or detector

    @property
    def nothing_changed(self) -> bool:
        """Same data version, every DVC stage up to date, and the registry as it was.

        A run that reproduced nothing can still promote: ``register.*`` in params.yaml is no DVC
        param, and a registration stopped before its gate ran completes in the next run.
        """
        return not self.ingest.changed and not self.stages_ran and not self.stages_restored and not self.registry_changed
