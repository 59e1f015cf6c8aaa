"""Registers the trained model, runs the promotion gate and moves the registered model's aliases.

Aliases of the registered model:

- ``champion``: the version consumers load (``models:/<name>@champion``).
- ``previous-champion``: the version the current champion replaced; :func:`rollback` moves
  ``champion`` back to it, or, given a version, to the version chosen by hand.
- ``challenger``: the latest version that did not pass the gate (the reason is in its
  ``gate_reason`` tag and in the returned :class:`Registration`).

A version becomes champion only when its evaluation clears every floor in ``register.floors``
(:func:`fracture.gate.floors`); when there is a champion, when the two, each loaded from the
registry and scored on the version's test split (:func:`fracture.scoring.paired_scores`), show
the version's ROC AUC higher by DeLong's paired test at ``register.confidence`` and its
sensitivity and specificity no more than ``register.sensitivity_tolerance`` and
``register.specificity_tolerance`` below the champion's (:func:`fracture.gate.against_champion`);
and when, loaded back through ``models:/<name>/<version>``, it predicts a real image
(:func:`fracture.scoring.load_check`).
Recorded metrics of runs evaluated at different times are never compared with each other.

How the model is logged is :mod:`fracture.packaging`'s business, the rules are :mod:`fracture.gate`'s, and
loading a version to score it is :mod:`fracture.scoring`'s.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import math
import os
import socket
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from fracture.config import RegisterParams
from fracture.consumer import loaded_version, predict_as_consumer
from fracture.gate import (
    COMPARISON_TAGS,
    Comparison,
    EvaluatedSplit,
    Evaluation,
    GateCheck,
    against_champion,
    compare,
    floors,
)
from fracture.inference import ServingConfig
from fracture.model_card import version_description
from fracture.packaging import log_pyfunc
from fracture.scoring import load_check, scored_with_champion
from fracture.seen import SEEN_ARTIFACT, SeenImages, SeenListError, seen_table
from fracture.tracking import training_run
from fracture.workspace import GIT_COMMIT_TAG, GIT_DIRTY_FILES_TAG

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
CHALLENGER = "challenger"

#: Version tags the gate writes and reads.
TAG_SPLIT = "split_fingerprint"
TAG_DATA = "data_version"
TAG_DECISION = "gate_decision"
TAG_REASON = "gate_reason"
TAG_REPLACED = "replaced_version"
TAG_ROLLED_BACK = "rolled_back_at"
#: What a rollback or a hand pick tags the demoted champion with: when, to which version, why.
ROLLED_BACK_TAGS = (TAG_ROLLED_BACK, "rolled_back_to", "rolled_back_reason")
#: Which version of the training run was demoted: on the run, and on a later version of the run
#: that carries the rollback over.
TAG_ROLLED_BACK_VERSION = "rolled_back_version"
#: What a rollback or a hand pick tags the demoted champion's training run with (when, to which
#: version, why, and which of its versions), so that every later version of the run is held back,
#: even after the demoted version is deleted.
RUN_ROLLED_BACK_TAGS = (*ROLLED_BACK_TAGS, TAG_ROLLED_BACK_VERSION)
#: On a training run: when one of its versions was last made champion again by hand or by a
#: rollback; rollbacks its versions record from before then no longer hold the run back.
TAG_ROLLBACK_LIFTED = "rollback_lifted_at"
#: The command that moves the classifier's aliases; the detector's adds ``--detector``.
ROLLBACK_COMMAND = "fracture rollback"
#: The command that moves the fracture detector's aliases (:mod:`fracture.detector_registry`).
DETECTOR_ROLLBACK_COMMAND = f"{ROLLBACK_COMMAND} --detector"
#: The ``gate_decision`` of a version made champion by hand (``fracture rollback --to``).
CHOSEN = "chosen"
#: What a challenger was decided against: the champion, the test split and the gate's rules.
TAG_BASIS = "gate_basis"

#: The start of the version tags that keep its history, one per event (``event.<UTC time>``): each
#: gate decision, rollback and hand pick, with who ran it and where (:func:`_record_event`).
TAG_EVENT = "event."
#: The longest reason an event keeps (the gate's reasons run to a few hundred characters).
EVENT_REASON_CHARS = 4000

#: The input checks a version serves (``serve`` in params.yaml, its ``model.json``'s ``input``).
TAG_POLICY = "input_policy"
#: The provenance tags that say what a version serves: a run whose evaluation changed them, or
#: registered again under another ``serve`` section, is a new version.
SERVED = ("threshold", "metrics", TAG_POLICY)
#: The registered model's own description (the registry's page of the model, above its versions).
MODEL_DESCRIPTION = (
    "Fractured / not fractured classifier for musculoskeletal X-rays (JPEG, PNG or DICOM), registered by the "
    "fracture pipeline's register step. Consumers load `models:/{name}@champion`; a version becomes champion only "
    "through the promotion gate, and `fracture rollback` moves the alias back. Each version's description gives its "
    "test figures, their intervals and its decision threshold, and its model files hold its model card "
    "(`artifacts/model_card.md`). NOT FOR CLINICAL USE: research and decision support for a trained reader."
)

#: The run metric every version needs: its test ROC AUC, reported next to the decision.
SCORE = "test_roc_auc"
#: The threshold the run's test figures were taken at (the evaluate stage logs it with them).
TEST_THRESHOLD = "test_threshold"


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (a metric is missing, nothing to roll back to)."""


@dataclass(frozen=True)
class Registration:
    """What registration did: the version, the gate's decision and why.

    Attributes:
        name: the registered model name.
        version: the version of this run's model.
        run_id: the training run.
        created: whether this call created the version (``False``: the run was registered before).
        champion: whether the version holds ``champion`` afterwards.
        score: the version's score as its evaluate stage recorded it: test ROC AUC (the classifier),
            test mAP@0.5 (the detector).
        reason: one sentence: why it was promoted or why it lost.
        decision: ``promoted`` (alias moved to it), ``challenger`` (lost the gate; alias
            ``challenger``) or ``unchanged`` (it already was champion, or was rolled back before).
        champion_version: the champion before this registration (``None`` when there was none).
        previous_champion: the version holding ``previous-champion`` afterwards.
        comparison: how it compared with the champion on the same test images (``None``: no
            champion, or the two were not scored).
        confidence: the confidence its AUC gain had to reach (``register.confidence``).
        sensitivity_tolerance: how far its sensitivity could fall below the champion's.
        specificity_tolerance: how far its specificity could fall below the champion's.
        floors: the floors it had to clear (metric -> minimum).
        metrics: the version's test metrics (``test_*`` run metrics).
        checks: every gate rule evaluated, in order; the failed ones say why it lost.
        split_fingerprint: the test split it was evaluated on (see :func:`fracture.gate.split_fingerprint`).
        data_version: the dataset version (DVC md5) the run recorded.
        aliases: the aliases the version holds afterwards.
        stand_in: where no version held champion, the ``previous-champion`` version the gate
            decided this version against in the champion's stead (``comparison`` compares with it,
            when the two were scored); ``None`` otherwise.
    """

    name: str
    version: str
    run_id: str
    created: bool
    champion: bool
    score: float
    reason: str
    decision: str = "unchanged"
    champion_version: str | None = None
    previous_champion: str | None = None
    comparison: Comparison | None = None
    confidence: float = 0.95
    sensitivity_tolerance: float = 0.0
    specificity_tolerance: float = 0.0
    floors: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    checks: tuple[GateCheck, ...] = ()
    split_fingerprint: str | None = None
    data_version: str | None = None
    aliases: tuple[str, ...] = ()
    stand_in: str | None = None

    def summary(self) -> str:
        """The decision and each gate check, one per line, for logs and the command line."""
        head = (
            f"{self.name} version {self.version} ({'new' if self.created else 'already registered'}, "
            f"run {self.run_id}): {self.decision} - {self.reason}"
        )
        lines = [head]
        lines += [f"  [{'pass' if c.passed else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        lines.append(f"  aliases: {', '.join(self.aliases) or 'none'}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Rollback:
    """What :func:`rollback` did.

    Attributes:
        name: the registered model name.
        demoted: the version that was champion; it gets a ``rolled_back_at`` tag, so
            re-registering its run never promotes it again. After a rollback it keeps no alias;
            after a hand pick it holds ``previous-champion``. ``None`` where no version held
            ``champion`` (its version was deleted) and the rollback or pick gave it back.
        champion: the version now holding ``champion`` (the former ``previous-champion``, or
            the version chosen by hand).
        previous_champion: the version now holding ``previous-champion`` (after a rollback the
            one the new champion had itself replaced, after a hand pick the demoted version), or
            ``None`` when the alias was removed.
        chosen: whether the new champion was chosen by hand (``fracture rollback --to``).
        finished: whether this call finished a rollback or pick stopped after ``champion`` moved,
            which left ``champion`` and ``previous-champion`` on one version: ``champion`` was
            already on ``champion`` and stays; only ``previous-champion`` moved, and the stopped
            command's reason is the one recorded.
    """

    name: str
    demoted: str | None
    champion: str
    previous_champion: str | None
    chosen: bool = False
    finished: bool = False


class _ChampionMoved(Exception):
    """Another registration moved ``champion`` after this one decided against the old champion."""

    def __init__(self, latest: ModelVersion | None) -> None:
        super().__init__(f"champion is now version {_version_of(latest)}")
        self.latest = latest


@dataclass(frozen=True)
class _Outcome:
    """What the gate decided for a version, before the aliases are read back.

    Attributes:
        decision: ``promoted``, ``challenger`` or ``unchanged``.
        reason: why, in one sentence.
        checks: the gate rules evaluated (none when the gate did not run).
        comparison: how it compared with the champion on the same images, when they were scored.
        stand_in: the ``previous-champion`` version it was decided against where no version held
            champion (:func:`_without_champion`), or ``None``.
    """

    decision: str
    reason: str
    checks: tuple[GateCheck, ...] = ()
    comparison: Comparison | None = None
    stand_in: str | None = None


# --- registration -------------------------------------------------------------------------------


def register(
    params: RegisterParams,
    run_id: str,
    weights: Path,
    config: ServingConfig,
    split: EvaluatedSplit,
    client: MlflowClient | None = None,
    isolated: bool = True,
) -> Registration:
    """Registers the run's model once and promotes it when it passes the gate.

    A run that already has a version under ``params.model_name`` is not registered again; the
    gate runs again for it (so an interrupted registration completes), except that the current
    champion stays as it is and a version that was rolled back is not promoted again.

    The gate, in order: every floor; with a champion, the version and the champion are each
    loaded from the registry and scored on ``split``'s images, and DeLong's paired test must
    show the version's ROC AUC higher at ``params.confidence`` while its sensitivity and
    specificity at its served threshold fall by no more than ``params.sensitivity_tolerance``
    and ``params.specificity_tolerance``; then the version, loaded through
    ``models:/<name>/<version>``, predicts ``split.check_image``. Only then do
    the aliases move: ``champion`` to the version and ``previous-champion`` to the version it
    replaced. A version that fails gets ``challenger``. Either way the decision, the reason and
    the comparison (``gate_auc_difference``, its interval, ``gate_p_value``,
    ``gate_sensitivity_change``, ``gate_specificity_change``) become version tags.

    Args:
        params: model name, confidence, sensitivity and specificity tolerances, and floors.
        run_id: the training run (holding the evaluation's ``test_*`` metrics and the
            ``git_commit``, ``data_version`` and ``profile`` tags).
        weights: fine-tuned weights (safetensors).
        config: the serving config (see :func:`fracture.packaging.log_pyfunc`).
        split: the test split the run was evaluated on.
        client: an MLflow client for the current tracking URI (default: a new one).
        isolated: load and score each version in a consumer's Python with its own packaged code
            (:mod:`fracture.consumer`, the default); ``False`` in this process, with this
            installation's code (faster; for tests of the gate's rules).

    Returns:
        The version, the gate's decision and each check.

    Raises:
        RegistryError: the run lacks its test ROC AUC or a floor's metric.
        TrainingRunMissing: the tracking store does not hold the run.
    """
    client = client or MlflowClient()
    run = training_run(run_id, client)
    metrics = dict(run.data.metrics)
    _required_metrics(metrics, run_id, params)
    require_same_split(run.data.tags.get(TAG_SPLIT), split.fingerprint, f"run {run_id}", "its evaluate stage",
                       "the pipeline (dvc repro) so that split, train and evaluate agree")
    require_served_threshold(
        metrics.get(TEST_THRESHOLD), config.threshold, f"run {run_id}'s test figures were taken at threshold",
        "the model", "outputs/evaluate/metrics.json", "the evaluate stage", "evaluate",
    )

    provenance = _provenance_tags(run, config, split)
    packed: dict[str, bool] = {}

    def log_model() -> str:
        # The card of the evaluation the version is registered with goes into its own files: the
        # run's card is the latest evaluation's, which a later evaluate stage overwrites.
        with tempfile.TemporaryDirectory() as tmp:
            card = _evaluation_card(client, run_id, Path(tmp))
            packed["card"] = card is not None
            return log_pyfunc(run_id, weights, config, card)

    mv, created = _ensure_version(
        client, params.model_name, run, provenance, log_model,
        lambda: version_description(
            config.architecture, str(config.extra.get("profile") or run.data.tags.get("profile") or "unknown"),
            config.data_config.input_size, config.data_config.aspect, metrics, run_id,
            run.data.tags.get("data_version") or None, run.data.tags.get("threshold_source") or None,
            run.data.tags.get("dataset") or None, packed.get("card", False),
        ),
    )
    mv = _record_provenance(client, mv, provenance)
    require_ready(mv, "the gate cannot score it, and it cannot be made champion")
    # The split the version was evaluated on, as recorded when it was first registered.
    fingerprint = mv.tags.get(TAG_SPLIT) or split.fingerprint
    candidate = Evaluation(str(mv.version), metrics, fingerprint, run.data.tags.get("data_version") or None)

    def decide(current: ModelVersion | None, role: str) -> tuple[_Outcome, dict[str, str] | None]:
        outcome = _decide(client, params, candidate, current, split, config.threshold, isolated, role)
        return outcome, None if outcome.comparison is None else outcome.comparison.tags()

    outcome, current = _gate_until_settled(
        client, mv, _alias(client, params.model_name, CHAMPION), lambda current: _basis(params, current, split), decide,
        COMPARISON_TAGS,
    )
    return _registration(
        client, params.model_name, run_id, created, candidate, current, outcome, score_key=SCORE,
        confidence=params.confidence, floors=params.floors, sensitivity_tolerance=params.sensitivity_tolerance,
        specificity_tolerance=params.specificity_tolerance,
    )


def _evaluation_card(client: MlflowClient, run_id: str, folder: Path) -> Path | None:
    """The run's model card (its evaluate stage's ``evaluation/model_card.md``) downloaded into
    ``folder``, or ``None`` when the run has none."""
    if not any(f.path == "evaluation/model_card.md" for f in client.list_artifacts(run_id, "evaluation")):
        return None
    return Path(client.download_artifacts(run_id, "evaluation/model_card.md", str(folder)))


def require_same_split(evaluated_on: str | None, fingerprint: str, run: str, stage: str, reproduce: str) -> None:
    """Refuses a run whose test figures were taken on another test split than the one given.

    The split was drawn again (new data, another seed) and the stages that evaluate were not
    rerun: the figures are another split's, and the gate would score the version on images it may
    have been trained on. A run that recorded no split passes.

    Args:
        evaluated_on: the run's ``split_fingerprint`` tag; ``None``: not recorded.
        fingerprint: the given test split's.
        run: the run, as the message names it.
        stage: the stage that evaluated it.
        reproduce: what to reproduce (the stages and their ``dvc repro``).

    Raises:
        RegistryError: the two differ; the message says what to reproduce.
    """
    if evaluated_on and evaluated_on != fingerprint:
        raise RegistryError(
            f"{run} was evaluated on another test split than the one given (fingerprint {fingerprint[:12]}, the "
            f"run's {evaluated_on[:12]}: outputs/split/test.csv changed since {stage} ran); its test figures are "
            "not this split's, and the gate would score it on images it may have been trained on. Reproduce "
            f"{reproduce}, then register"
        )


def require_served_threshold(
    logged: float | None, served: float, taken: str, what: str, metrics_file: str, stage: str, target: str
) -> None:
    """Refuses a run whose test figures were taken at another threshold than the one it would serve.

    DVC restores an earlier evaluation's outputs (the metrics file, and the threshold served from it)
    from its run cache without running the command that logs the figures to the run: after a param
    is tried and undone, the run can hold another evaluation's figures, and a gate would judge the
    version on figures taken at a threshold it does not serve. A run that logged no threshold passes.

    Args:
        logged: the threshold the run's test figures were taken at; ``None``: not logged.
        served: the threshold the version would serve (``metrics_file``'s).
        taken: the message's start, naming the run and its figures.
        what: what would be served (``the model``, ``the detector``).
        metrics_file: the stage output the served threshold comes from.
        stage: the stage that writes it, as the message names it.
        target: the stage's DVC address, for ``dvc repro --force``.

    Raises:
        RegistryError: the two differ; the message says how to log this evaluation's figures.
    """
    if logged is not None and not math.isclose(logged, served, rel_tol=1e-9, abs_tol=1e-12):
        raise RegistryError(
            f"{taken} {logged:.6g}, but {what} would be served at {served:.6g} ({metrics_file}): {stage}'s outputs "
            "come from another evaluation than the one logged to the run, as when DVC restores an earlier "
            "evaluation's outputs from its run cache without running the command that logs them. The gate would "
            f"judge the version on figures taken at a threshold it does not serve. Run it again (`dvc repro --force "
            f"{target}`), then register"
        )


def _gate_until_settled(
    client: MlflowClient,
    mv: ModelVersion,
    current: ModelVersion | None,
    basis: Callable[[ModelVersion | None], str],
    decide: Callable[[ModelVersion | None, str], tuple[_Outcome, dict[str, str] | None]],
    comparison_tags: Iterable[str],
    rollback_command: str = ROLLBACK_COMMAND,
) -> tuple[_Outcome, ModelVersion | None]:
    """Runs the gate for ``mv`` against the champion ``current`` until its decision is applied
    against the champion it was taken against (the classifier's and the detector's registration).

    Where no version holds ``champion``, ``mv`` is decided against ``previous-champion`` instead
    (:func:`_without_champion`), and a ``mv`` that holds ``previous-champion`` is left as it is.

    Args:
        client: the registry's client.
        mv: the version, its provenance recorded.
        current: the champion read before the gate.
        basis: what a decision against a champion rests on (:func:`_basis`).
        decide: the gate against a champion, or against ``None`` (no champion to compare with),
            holding the role given (``champion``, or ``previous-champion`` in its stead): the
            outcome, and the comparison's version tags (``None``: decided without one, so the
            tags in ``comparison_tags`` an earlier decision left are removed).
        comparison_tags: the tags a comparison writes.
        rollback_command: the command that moves this model's aliases, as the reasons name it.

    Returns:
        The outcome, and the champion it was decided against.
    """
    name = mv.name

    def held_back(current: ModelVersion | None) -> _Outcome | None:
        return (_kept_as_previous(client, mv, rollback_command) if current is None else None) or _held_back(
            mv, current, rollback_command)

    def settled_basis(current: ModelVersion | None) -> str:
        stand_in = None if current is not None else _alias(client, name, PREVIOUS_CHAMPION)
        if stand_in is None:
            return basis(current)
        return json.dumps(json.loads(basis(current)) | {PREVIOUS_CHAMPION: str(stand_in.version)}, sort_keys=True)

    if current is not None:
        _complete_moves(client, current)
    _complete_challenger(client, name)
    outcome = held_back(current) or _decided_before(mv, current, settled_basis(current))
    while outcome is None:
        if current is not None:
            decided, tags = decide(current, CHAMPION)
        else:
            decided, tags = _without_champion(client, mv, decide, rollback_command)
        # Scoring takes minutes; another registration against this registry may have moved the
        # champion meanwhile. The aliases move only as decided against the champion they replace.
        latest = _alias(client, name, CHAMPION)
        if _version_of(latest) != _version_of(current):
            log.warning(
                "%s: champion moved from version %s to %s while version %s was scored; scoring it against the new one",
                name, _version_of(current), _version_of(latest), mv.version,
            )
            current = latest
            outcome = held_back(current)
            continue
        outcome = decided
        if tags is not None:
            _tag_version(client, name, str(mv.version), tags)
        else:
            # Decided without a comparison (no champion, a floor, a champion that could not be
            # scored): the figures of an earlier decision would contradict this one.
            _untag_version(client, name, str(mv.version), comparison_tags)
        try:
            # Promoted over previous-champion in the champion's stead: it records that version as the
            # one it replaced, where previous-champion stays, as it would a champion's.
            stand_in = _alias(client, name, PREVIOUS_CHAMPION) if current is None else None
            _apply(client, mv, current, outcome, settled_basis(current), stand_in)
        except _ChampionMoved as moved:
            log.warning(
                "%s: champion moved from version %s to %s while version %s was being promoted; scoring it against "
                "the new one", name, _version_of(current), _version_of(moved.latest), mv.version,
            )
            current = moved.latest
            outcome = held_back(current)
    if outcome.decision == "unchanged" and _version_of(current) == str(mv.version):
        _restore_previous(client, mv)
    elif outcome.decision != "promoted" and current is not None and current.tags.get(TAG_DECISION) == "promoted":
        # Another run's promotion stopped before previous-champion moved: put right by the next
        # registration, whichever run it registers, not only by that run's.
        _restore_previous(client, current)
    return outcome, current


def _serves(mv: ModelVersion, served: dict[str, str]) -> bool:
    """Whether the version was registered with the run's threshold and test figures as they are now
    (a tag it lacks, from before the tag existed, counts as the same)."""
    return all(mv.tags.get(key) in (None, "", value) for key, value in served.items())


def _ensure_version(
    client: MlflowClient, name: str, run: Run, provenance: dict[str, Any], log_model: Callable[[], str],
    describe: Callable[[], str],
) -> tuple[ModelVersion, bool]:
    """The run's registered version, logged and registered first when it has none that serves as the run now says.

    A run whose evaluate stage ran again (another threshold rule, say) has another threshold or
    other test figures than its version was registered with, and that version's model serves
    the old threshold: the run is registered as a new version, which the gate then decides on.
    The new version inherits a rollback of the old one, so re-running evaluate does not promote a
    rolled-back run again.

    A new version is created with its provenance and an inherited rollback as tags of the one
    request that creates it: a registration stopped right after (a lost response, a locked
    database, retried by the flow) leaves no version that lacks them, which the retry would
    reuse as it is (a rollback missed, and promoted again; its input checks unrecorded, and
    reused after ``serve`` changed). The description, which ``mlflow.register_model`` does not
    take, and a rollback of another version of the run are given to the version this call
    returns whenever it lacks them, whether this call created it or not.

    Args:
        client: the registry's client.
        name: the registered model.
        run: the training run.
        provenance: the version's provenance tags (:func:`_provenance_tags`), among them the
            ``threshold``, ``metrics`` and ``input_policy`` (:data:`SERVED`) the run's version must carry.
        log_model: logs the run's model and returns its URI (called only for a new version).
        describe: the version's description for the registry's page (what it is, its test
            figures with intervals, its threshold).

    Returns:
        The version, and whether this call created it.
    """
    run_id = run.info.run_id
    served = {k: _tag_value(provenance[k]) for k in SERVED}
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    rolled_back = _run_rollback(run, existing)
    # A version whose registration failed, or has not finished (its files still being copied), has
    # no model to serve: the run is registered anew rather than that version reused and promoted.
    current = [v for v in existing if _ready(v) and _serves(v, served)]
    if current:
        mv = max(current, key=lambda v: int(v.version))
        log.info("run %s is already registered as %s version %s", run_id, name, mv.version)
        return _completed(client, mv, rolled_back, describe), False
    unready = [v for v in existing if not _ready(v)]
    if unready:
        log.warning("run %s is registered as %s version(s) %s whose registration failed or has not finished (%s); "
                    "registering it as a new version, which the gate decides on", run_id, name,
                    ", ".join(str(v.version) for v in unready), ", ".join(sorted({str(v.status) for v in unready})))
    if len(unready) < len(existing):
        log.warning(
            "run %s is registered as %s version(s) %s with another threshold, other test figures or other input "
            "checks than it has now (its evaluate stage ran again, or params.yaml's serve section changed); "
            "registering it as a new version, which the gate decides on", run_id, name,
            ", ".join(str(v.version) for v in existing if _ready(v)),
        )
    tags = {k: _tag_value(v) for k, v in provenance.items()} | {"run_id": run_id} | (rolled_back or {})
    mv = mlflow.register_model(log_model(), name, tags=tags)
    if not client.get_registered_model(name).description:  # the registry's page of the model: one a team wrote stays
        client.update_registered_model(name, description=MODEL_DESCRIPTION.format(name=name))
    # Two registrations of one run at once (two checkouts sharing a registry) both found none and
    # both registered: the first version stays the run's, and a later one is removed again.
    before = {str(v.version) for v in existing}
    mine = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
            if str(v.version) not in before]
    first = min(mine, key=lambda v: int(v.version), default=mv)
    if str(first.version) != str(mv.version):
        log.warning("run %s was registered twice at once (versions %s and %s); version %s is removed",
                    run_id, first.version, mv.version, mv.version)
        client.delete_model_version(name, str(mv.version))
        return _completed(client, first, rolled_back, describe), False
    return _completed(client, mv, rolled_back, describe), True


#: The status of a version whose registration finished (MLflow's ``ModelVersionStatus``).
READY = "READY"


def _ready(mv: ModelVersion) -> bool:
    return mv.status in (None, "", READY)  # a store that reports no status holds only finished versions


def require_ready(mv: ModelVersion, consequence: str) -> None:
    """Refuses a version whose registration failed (``FAILED_REGISTRATION``) or has not finished
    (``PENDING_REGISTRATION``: its files still being copied): it has no model a consumer could load.

    Raises:
        RegistryError: naming the version, its status and MLflow's message, and what to do.
    """
    if _ready(mv):
        return
    said = f": {mv.status_message}" if mv.status_message else ""
    raise RegistryError(
        f"{mv.name} version {mv.version} is {mv.status}{said}, not {READY}: {consequence}. A pending registration "
        "may still finish (look again in a few minutes); a failed one is deleted in the registry "
        f"(MlflowClient().delete_model_version({mv.name!r}, {str(mv.version)!r})), and registering its run again "
        "makes a new version"
    )


def _run_rollback(run: Run, existing: list[ModelVersion]) -> dict[str, str] | None:
    """The rollback that holds the training run back, as the version tags a new or reused version of
    the run carries over (``rolled_back_at``, ``rolled_back_reason``, ``rolled_back_version``), or
    ``None`` when the run is not rolled back.

    The run's own tags say so first: a rollback or a hand pick records it on the demoted champion's
    run too, so it holds after that version is deleted (a clean-up of the bad version), where the
    versions' tags alone let the next registration of the run promote it again. A version of the
    run rolled back before runs were tagged (an earlier release) counts too, unless one of the
    run's versions was made champion again since (``rollback_lifted_at``); so does none that was
    replaced by another version of the same run (chosen by hand after ``serve`` changed): the run
    still serves."""
    tags = run.data.tags
    if tags.get(TAG_ROLLED_BACK):
        return {TAG_ROLLED_BACK: tags[TAG_ROLLED_BACK], "rolled_back_reason": tags.get("rolled_back_reason", ""),
                TAG_ROLLED_BACK_VERSION: tags.get(TAG_ROLLED_BACK_VERSION, "")}
    lifted = tags.get(TAG_ROLLBACK_LIFTED, "")
    versions = {str(v.version) for v in existing}
    for v in existing:
        when = v.tags.get(TAG_ROLLED_BACK)
        if when and when > lifted and v.tags.get("rolled_back_to") not in versions:
            return {TAG_ROLLED_BACK: when, "rolled_back_reason": v.tags.get("rolled_back_reason", ""),
                    TAG_ROLLED_BACK_VERSION: v.tags.get(TAG_ROLLED_BACK_VERSION) or str(v.version)}
    return None


def _completed(
    client: MlflowClient, mv: ModelVersion, rolled_back: dict[str, str] | None, describe: Callable[[], str],
) -> ModelVersion:
    """The run's version with the rollback of its run (``rolled_back``, :func:`_run_rollback`) and
    its description: a version registered by an earlier release, which wrote them in requests
    after the version's creation, may lack them when that registration stopped in between, and is
    then reused as it is. Without the rollback it would be promoted again."""
    name, version = mv.name, str(mv.version)
    if rolled_back and not mv.tags.get(TAG_ROLLED_BACK) and CHAMPION not in mv.aliases:
        log.warning("%s version %s: its run was rolled back at %s; the version carries that over", name, version,
                    rolled_back[TAG_ROLLED_BACK])
        _tag_version(client, name, version, rolled_back)
    if not mv.description:
        return client.update_model_version(name, version, description=describe())
    return mv


def code_tags(run: Run) -> dict[str, str | None]:
    """The code a run trained with, as its version carries it: ``git_commit``, and with a
    ``<sha>-dirty`` commit the ``git_dirty_files`` no commit holds (only when the run has them)."""
    tags = run.data.tags
    dirty = tags.get(GIT_DIRTY_FILES_TAG)
    return {GIT_COMMIT_TAG: tags.get(GIT_COMMIT_TAG)} | ({GIT_DIRTY_FILES_TAG: dirty} if dirty else {})


def _provenance_tags(run: Run, config: ServingConfig, split: EvaluatedSplit) -> dict[str, Any]:
    """Where the version came from: code, data, profile, threshold, test split and test metrics."""
    tags = run.data.tags
    return {
        **code_tags(run),
        TAG_DATA: tags.get("data_version") or None,
        "profile": tags.get("profile") or config.extra.get("profile"),
        "threshold": config.threshold,
        TAG_SPLIT: split.fingerprint,
        "metrics": json.dumps(_test_metrics(run.data.metrics), sort_keys=True),
        TAG_POLICY: json.dumps(config.input.to_dict(), sort_keys=True),
    }


def _record_provenance(client: MlflowClient, mv: ModelVersion, tags: dict[str, Any]) -> ModelVersion:
    """Fills in the provenance tags the version lacks and reads it back.

    A version is created with its provenance (:func:`_ensure_version`) and keeps what was
    recorded then (the split it was evaluated on may no longer be the one in the workspace); only
    its missing tags are filled in: one registered before a tag existed, or by an earlier release
    that tagged it after creating it and stopped in between.
    """
    name, version = mv.name, str(mv.version)
    # A version registered before its input policy was tagged serves the policy its model.json
    # holds, which need not be today's serve section: once the gate has decided on it, that tag
    # is never filled in. One with no decision yet was left by a registration stopped before its
    # gate (the one now retried, as a rule under this serve section): left untagged, its policy
    # would match every later serve section, and a change would never make a new version.
    undecided = not mv.tags.get(TAG_DECISION)
    fill = {k: v for k, v in tags.items()
            if _tag_value(v) and not mv.tags.get(k) and (k != TAG_POLICY or undecided)}
    _tag_version(client, name, version, fill)
    return client.get_model_version(name, version)


#: The version of the gate's comparison, part of every decision's basis (:func:`_basis`): raised
#: when what the gate compares changes, so that a challenger an earlier gate decided is decided
#: again. 2: the test images the champion learnt from are left out (:mod:`fracture.seen`).
GATE_VERSION = 2


def _basis(params: Any, current: ModelVersion | None, split: Any) -> str:
    """What the gate's decision rests on: the champion, the test split, the rules in ``params`` and
    the gate's own version (:data:`GATE_VERSION`).

    ``params``: :class:`RegisterParams`, or the detector's :class:`fracture.config.DetectParams`.
    """
    keys = ("confidence", "sensitivity_tolerance", "specificity_tolerance", "floors", "bootstrap_resamples")
    rules = {k: getattr(params, k) for k in keys if hasattr(params, k)}
    basis = {"champion": _version_of(current), "test_split": split.fingerprint, "gate": GATE_VERSION}
    return json.dumps(basis | rules, sort_keys=True)


def _decided_before(mv: ModelVersion, current: ModelVersion | None, basis: str) -> _Outcome | None:
    """The recorded decision of a version that already lost the gate against the champion ``current``,
    on the same test split, under the same rules (``basis``), or ``None``: scoring it again would
    decide the same, and costs minutes in every scheduled run that finds nothing new."""
    if mv.tags.get(TAG_DECISION) != "challenger" or mv.tags.get(TAG_BASIS) != basis:
        return None
    stand_in = json.loads(basis).get(PREVIOUS_CHAMPION)  # where no version held champion (_gate_until_settled)
    if current is not None:
        against = f"against champion v{current.version}"
    elif stand_in is not None:
        against = f"with no champion, against {PREVIOUS_CHAMPION} v{stand_in} in its stead"
    else:
        against = "with no champion"
    return _Outcome("unchanged", f"already decided {against}, on this test split and these rules: stays "
                                 f"challenger ({mv.tags.get(TAG_REASON, '')})",
                    stand_in=None if current is not None or stand_in is None else str(stand_in))


def _held_back(mv: ModelVersion, current: ModelVersion | None, rollback_command: str = ROLLBACK_COMMAND) -> _Outcome | None:
    """Why the gate does not run for this version (already champion, or rolled back), or ``None``;
    the reason names ``rollback_command``, the one that serves this model's version again."""
    if current is not None and str(current.version) == str(mv.version):
        return _Outcome("unchanged", "already champion")
    rolled_back = mv.tags.get(TAG_ROLLED_BACK)
    if rolled_back:
        demoted = mv.tags.get(TAG_ROLLED_BACK_VERSION) or str(mv.version)
        what = (f"version {mv.version} was rolled back from champion at {rolled_back}" if demoted == str(mv.version)
                else f"version {mv.version}'s training run was rolled back from champion at {rolled_back} (as "
                     f"version {demoted})")
        why = mv.tags.get("rolled_back_reason")
        reason = (
            f"{what}{f' ({why})' if why else ''}; it is not promoted again automatically. To serve it again, "
            f"choose it by hand: {rollback_command} --to {mv.version} --reason \"...\""
        )
        return _Outcome("unchanged", reason)
    return None


def _decide(
    client: MlflowClient,
    params: RegisterParams,
    candidate: Evaluation,
    current: ModelVersion | None,
    split: EvaluatedSplit,
    threshold: float,
    isolated: bool = True,
    role: str = CHAMPION,
) -> _Outcome:
    """Runs the gate against the champion, and the load check when every rule passed.

    ``role``: the alias ``current`` holds (``previous-champion`` where no version holds champion).

    Returns:
        ``promoted`` or ``challenger``, why, every check in order, and the comparison with the
        champion when the two were scored.
    """
    checks = floors(params, candidate.metrics)
    comparison = answer = None
    # Scoring both models is the slow part: only a version that clears the floors is compared.
    if current is None:
        checks += (GateCheck("beats champion", True, "no champion yet"),)
    elif all(c.passed for c in checks):
        champion = _evaluation_of(client, current)
        scores, scored, answer = scored_with_champion(params.model_name, candidate, champion, split, isolated)
        if _run_gone(champion):
            scored = dataclasses.replace(scored, detail=(
                f"{scored.detail}; champion v{current.version}'s training run {current.run_id} is gone from the "
                "tracking store: it is compared from its version's own record, and the images it learnt from cannot "
                "be left out"
            ))
        checks += (scored,)
        if scores is None:
            _require_loadable(params.model_name, str(current.version), role, isolated)
        else:
            try:
                comparison = compare(scores, params.confidence, role)
            except ValueError as exc:  # a split the two cannot be compared on (one class only)
                checks += (GateCheck("compared with champion", False, str(exc)),)
            else:
                checks += against_champion(params, comparison)
    if all(c.passed for c in checks):
        # Isolated, the version's scoring above already loaded it as a consumer does: its answer
        # for the check image is read, not a third consumer's Python started.
        checks += (load_check(params.model_name, str(candidate.version), split.check_image, threshold, isolated,
                              answer),)
    if comparison is None:
        return _verdict(checks, "first version to pass the gate")
    a = comparison.auc
    left_out = f" ({comparison.left_out} it was trained or validated on left out)" if comparison.left_out else ""
    reason = (
        f"ROC AUC {a.auc_a:.4f} beats {role} v{comparison.champion_version}'s {a.auc_b:.4f} on the same "
        f"{a.n_images} images{left_out} by {a.difference:+.4f} ({a.evidence()})"
    )
    return _verdict(checks, reason, comparison)


#: Why a registered model that had a champion has none: MLflow removes an alias with its version.
NO_CHAMPION_WHY = "the champion version was deleted from the registry, or its alias removed"
#: The ``gate_decision`` values of a version that held ``champion``.
WAS_CHAMPION = ("promoted", "restored", CHOSEN)


def _without_champion(
    client: MlflowClient,
    mv: ModelVersion,
    decide: Callable[[ModelVersion | None, str], tuple[_Outcome, dict[str, str] | None]],
    rollback_command: str = ROLLBACK_COMMAND,
) -> tuple[_Outcome, dict[str, str] | None]:
    """The gate for version ``mv`` when no version holds ``champion`` (``decide``: the gate against
    a champion, :func:`_gate_until_settled`), the classifier's and the detector's alike.

    Where the champion's version was deleted (MLflow removes its alias with it) and
    ``previous-champion`` remains, the version must beat that one, the last champion the registry
    still holds, as it would a champion: a version that loses stays challenger, and
    ``rollback_command`` restores ``previous-champion``. Where earlier champions existed but neither
    alias remains, the version is promoted on the floors and the load check alone, and the reason
    says so rather than calling it the first version.
    """
    name = mv.name
    stand_in = _alias(client, name, PREVIOUS_CHAMPION)
    if stand_in is not None:
        outcome, tags = decide(stand_in, PREVIOUS_CHAMPION)
        lead = (f"no version holds champion ({NO_CHAMPION_WHY}): compared with {PREVIOUS_CHAMPION} "
                f"v{stand_in.version}, the last champion the registry holds, instead")
        outcome = dataclasses.replace(outcome, stand_in=str(stand_in.version))
        if outcome.decision == "promoted":
            return dataclasses.replace(outcome, reason=f"{lead}; {outcome.reason}"), tags
        return dataclasses.replace(outcome, reason=(
            f"{lead}; {outcome.reason}. `{rollback_command} --reason \"...\"` restores v{stand_in.version} as champion"
        )), tags
    outcome, tags = decide(None, CHAMPION)
    earlier = sorted(
        (int(v.version) for v in client.search_model_versions(f"name = '{name}'")
         if v.tags.get(TAG_DECISION) in WAS_CHAMPION and str(v.version) != str(mv.version)),
    )
    if not earlier or outcome.decision != "promoted":
        return outcome, tags
    return dataclasses.replace(outcome, reason=(
        f"no version holds champion or {PREVIOUS_CHAMPION} ({NO_CHAMPION_WHY}; earlier champions: "
        f"{', '.join(map(str, earlier))}): promoted on the floors and the load check alone, compared with none"
    )), tags


def _kept_as_previous(client: MlflowClient, mv: ModelVersion, rollback_command: str = ROLLBACK_COMMAND) -> _Outcome | None:
    """``unchanged`` for a version that holds ``previous-champion`` where no version holds ``champion``,
    or ``None``: the last champion the registry still holds. Restoring it is a rollback's business
    (``rollback_command``), and judging it against itself would overwrite its record with a lost decision."""
    if _version_of(_alias(client, mv.name, PREVIOUS_CHAMPION)) != str(mv.version):
        return None
    return _Outcome("unchanged", f"no version holds champion ({NO_CHAMPION_WHY}); this version is "
                                 f"{PREVIOUS_CHAMPION}: `{rollback_command} --reason \"...\"` restores it")


def _require_loadable(
    name: str, version: str, role: str, isolated: bool = True, command: str = ROLLBACK_COMMAND,
) -> None:
    """Raises when ``models:/<name>/<version>`` (holding ``role``) cannot be loaded from the registry
    (``isolated``: in a consumer's Python, with its own packaged code). The message suggests
    ``command``, the one that moves this model's aliases.

    A champion that cannot be loaded fails every consumer of ``@champion``, and would keep every
    later version a challenger without a word; the registration fails instead, naming it.

    Raises:
        RegistryError: the version cannot be loaded (its artifacts are gone, its code does not
            import, or the tracking server does not answer).
    """
    failure = _load_failure(name, version, isolated)
    if failure is not None:
        raise RegistryError(
            f"{role} {name} version {version} cannot be loaded from the registry ({_described(failure)}); a consumer "
            f"of @{role} cannot load it either. If the tracking server is down, run again when it answers; if the "
            f"version is broken, roll back (`{command} --reason ...`) or choose a version by hand "
            f"(`{command} --to <version> --reason ...`)"
        ) from failure


def _load_failure(name: str, version: str, isolated: bool = True) -> Exception | None:
    """Why ``models:/<name>/<version>`` cannot be loaded from the registry as a consumer would load
    it (``isolated``: in a consumer's Python, with its own packaged code), or ``None`` when it loads."""
    uri = f"models:/{name}/{version}"
    try:
        if isolated:
            predict_as_consumer(uri, [])
        else:
            with loaded_version(uri):
                pass
    except Exception as exc:  # noqa: BLE001 - whatever stops a consumer from loading it
        return exc
    return None


def _described(exc: Exception) -> str:
    """The error's type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _verdict(checks: tuple[GateCheck, ...], promoted_because: str, comparison: Comparison | None = None) -> _Outcome:
    """``challenger`` with every failed check as the reason, or ``promoted`` for the reason given."""
    failed = [c for c in checks if not c.passed]
    if failed:
        return _Outcome("challenger", "; ".join(f"{c.name}: {c.detail}" for c in failed), checks, comparison)
    return _Outcome("promoted", promoted_because, checks, comparison)


def _apply(
    client: MlflowClient, mv: ModelVersion, current: ModelVersion | None, outcome: _Outcome, basis: str | None = None,
    stand_in: ModelVersion | None = None,
) -> None:
    """Moves the aliases as the gate decided; a challenger records the ``basis`` of its decision when
    the decision rests on the rules alone. It records none when a check that can fail for a passing
    reason failed (a model that could not be loaded or scored: a registry or network error), so that
    the next registration of the run tries again. ``stand_in``: ``previous-champion``, where no
    version holds champion (:func:`_promote`)."""
    if outcome.decision == "promoted":
        _promote(client, mv, current, outcome.reason, stand_in)
    else:
        retried = ("scored with champion", "load check")
        settled = not any(c.name in retried and not c.passed for c in outcome.checks)
        _mark_challenger(client, mv, outcome.reason, basis if settled else None)


def _promote(
    client: MlflowClient, mv: ModelVersion, current: ModelVersion | None, reason: str,
    stand_in: ModelVersion | None = None,
) -> None:
    """Moves ``champion`` to the version and ``previous-champion`` to the version it replaces.

    Where no version held ``champion`` (``current`` is ``None``), ``stand_in`` is ``previous-champion``,
    which the version was compared with instead: recorded as the version it replaced, it stays
    ``previous-champion``, and a rollback to this version later steps back to it.
    """
    name, version = mv.name, str(mv.version)
    replaced = current if current is not None else stand_in
    # Everything about the decision is written before champion moves, and previous-champion
    # after it: a run stopped at any point leaves champion either where it was or on a version
    # that carries its decision and the version it replaced, and registering the run again
    # (already champion) restores previous-champion from that record (_restore_previous).
    tags = {TAG_DECISION: "promoted", TAG_REASON: reason}
    if replaced is not None:
        tags[TAG_REPLACED] = replaced.version
    elif TAG_REPLACED in mv.tags:
        client.delete_model_version_tag(name, version, TAG_REPLACED)  # from a promotion that did not land
    _untag_version(client, name, version, (TAG_BASIS,))  # the rules an earlier challenger decision rested on
    _tag_version(client, name, version, tags)
    # MLflow has no compare-and-set for aliases: the champion is read once more right before it
    # moves, so another registration's promotion since the decision is seen, not overwritten.
    latest = _alias(client, name, CHAMPION)
    if _version_of(latest) == version:
        # Another registration of the same run promoted this version meanwhile, against the same
        # champion (it re-reads the champion before moving it, as this one does): what it wrote is
        # what this one wrote. Only previous-champion may be left to move, if it was stopped.
        if current is not None:
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, current.version)
        log.info("%s version %s is champion (another registration of its run promoted it): %s", name, version, reason)
        return
    if _version_of(latest) != _version_of(current):
        # Nothing of this promotion stays: the version is decided again against the new champion.
        if replaced is not None:
            client.delete_model_version_tag(name, version, TAG_REPLACED)
        moved = f"champion moved to version {_version_of(latest)} while this version was promoted; scored again"
        _tag_version(client, name, version, {TAG_DECISION: "pending", TAG_REASON: moved})
        raise _ChampionMoved(latest)
    if CHALLENGER in mv.aliases:
        client.delete_registered_model_alias(name, CHALLENGER)
    # The history names the version replaced as its tag does: previous-champion, where it stood in.
    promoted = _record_event(client, name, version, "promoted", reason, replaced=_version_of(replaced))
    client.set_registered_model_alias(name, CHAMPION, version)
    promoted.complete(client)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, current.version)
    log.info("%s version %s is champion: %s", name, version, reason)


def _restore_previous(client: MlflowClient, mv: ModelVersion) -> None:
    """Points ``previous-champion`` at the version the champion ``mv`` replaced, when a stopped
    promotion left it elsewhere (never at a version that was rolled back)."""
    name, before = mv.name, mv.tags.get(TAG_REPLACED)
    if not before or before == str(mv.version):
        return
    replaced = _version_or_none(client, name, before)
    if replaced is None:
        return  # deleted since
    if TAG_ROLLED_BACK in replaced.tags:
        return
    previous = _alias(client, name, PREVIOUS_CHAMPION)
    if _version_of(previous) != before:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, before)
        log.warning("%s: previous-champion restored to version %s, the version champion %s replaced", name, before, mv.version)


def _version_of(mv: ModelVersion | None) -> str | None:
    return None if mv is None else str(mv.version)


def _mark_challenger(client: MlflowClient, mv: ModelVersion, reason: str, basis: str | None = None) -> None:
    """Gives the version that lost the gate ``challenger`` and tags it with the reason and the ``basis``."""
    name, version = mv.name, str(mv.version)
    # The basis of an earlier decision goes first and this one's comes last: a registration stopped
    # in between leaves none, and the run's next registration decides again.
    if TAG_BASIS in mv.tags:
        client.delete_model_version_tag(name, version, TAG_BASIS)
    decided = _record_event(client, name, version, "challenger", reason)
    # A version that holds previous-champion keeps that role rather than becoming the challenger.
    if PREVIOUS_CHAMPION not in mv.aliases:
        client.set_registered_model_alias(name, CHALLENGER, version)
    _tag_version(client, name, version, {TAG_DECISION: "challenger", TAG_REASON: reason})
    if basis is not None:
        _tag_version(client, name, version, {TAG_BASIS: basis})
    decided.complete(client)
    log.info("%s version %s stays challenger: %s", name, version, reason)


def _registration(
    client: MlflowClient,
    name: str,
    run_id: str,
    created: bool,
    candidate: Evaluation,
    current: ModelVersion | None,
    outcome: _Outcome,
    *,
    score_key: str,
    confidence: float,
    floors: dict[str, float],
    sensitivity_tolerance: float = 0.0,
    specificity_tolerance: float = 0.0,
) -> Registration:
    """The :class:`Registration` report, with the aliases read back from the registry.

    ``score_key`` names the run metric reported as its score (``test_roc_auc``, or the
    detector's ``test_map_50``).
    """
    version = str(candidate.version)
    after = client.get_model_version(name, version)
    previous = _alias(client, name, PREVIOUS_CHAMPION)
    return Registration(
        name=name,
        version=version,
        run_id=run_id,
        created=created,
        champion=CHAMPION in after.aliases,
        score=candidate.metrics[score_key],
        reason=outcome.reason,
        decision=outcome.decision,
        champion_version=None if current is None else str(current.version),
        previous_champion=None if previous is None else str(previous.version),
        comparison=outcome.comparison,
        confidence=confidence,
        sensitivity_tolerance=sensitivity_tolerance,
        specificity_tolerance=specificity_tolerance,
        floors=dict(floors),
        metrics=_test_metrics(candidate.metrics),
        checks=outcome.checks,
        split_fingerprint=candidate.split_fingerprint,
        data_version=candidate.data_version,
        aliases=tuple(sorted(after.aliases)),
        stand_in=outcome.stand_in,
    )


# --- rollback -------------------------------------------------------------------------------------


def rollback(
    name: str,
    client: MlflowClient | None = None,
    reason: str = "",
    isolated: bool = True,
    to: str | int | None = None,
    command: str = ROLLBACK_COMMAND,
) -> Rollback:
    """Moves ``champion`` back to the ``previous-champion`` version, or to version ``to``.

    The version to return to is loaded from the registry first, as a consumer would load it; one
    that cannot be loaded is refused and ``champion`` stays. The demoted version loses
    ``champion``, keeps no alias and is tagged ``rolled_back_at``, ``rolled_back_to`` and
    ``rolled_back_reason``, so a later registration of its run does not promote it again; the
    restored version's gate tags say it was restored, when and why, and it loses ``rolled_back_*``
    tags of its own (a version a hand pick replaced, returned to on purpose). ``previous-champion``
    moves to the version the restored champion had itself replaced, or is removed when there is
    none, so rolling back again steps further back through the champions.

    With ``to``, the version chosen by hand replaces the champion (:func:`_choose`): the demoted
    champion is tagged as above and becomes ``previous-champion``, so a later rollback without
    ``to`` undoes the pick.

    Where no version holds ``champion`` (its version was deleted, which removes the alias), the
    rollback gives it back to ``previous-champion``, and ``to`` to the version chosen, each loaded
    first (:func:`_rollback_without_champion`); nothing is demoted.

    Args:
        name: the registered model name.
        client: an MLflow client (default: one for the current tracking URI).
        reason: why, for the registry's record (the command asks for it).
        isolated: load the version to return to in a consumer's Python (default) or in this one.
        to: the version to make champion (default: ``previous-champion``).
        command: the command that moves this model's aliases, as the messages suggest it
            (:data:`DETECTOR_ROLLBACK_COMMAND` for the fracture detector's).

    Returns:
        Which version was demoted and where the aliases point now.

    Raises:
        RegistryError: the model has neither champion nor previous champion, or no previous
            champion to return to; version ``to`` does not exist or already is champion, or the
            version cannot be loaded. Each command the message suggests is ``command``.
    """
    client = client or MlflowClient()
    current = _alias(client, name, CHAMPION)
    if current is not None:
        _complete_moves(client, current)
    _complete_challenger(client, name)
    if current is None:
        return _rollback_without_champion(client, name, None if to is None else str(to).strip(), reason, isolated,
                                          command)
    if to is not None:
        return _choose(client, name, current, str(to).strip(), reason, isolated, command)
    if current.tags.get(TAG_DECISION) == "promoted":
        # A promotion stopped after champion moved and before previous-champion did left it on the
        # version before (or on none): the champion's own record names the version it replaced.
        _restore_previous(client, current)
    previous = _alias(client, name, PREVIOUS_CHAMPION)
    replaced = _unfinished_choice(client, name, current, previous)
    if replaced is not None:
        # A hand pick stopped before previous-champion moved: it is finished, and this rollback
        # then undoes it as it would a finished one (back to the version the pick replaced).
        log.warning("%s: finishing the hand pick of version %s that was stopped", name, current.version)
        _finish_choice(client, name, str(replaced.version), str(current.version))
        previous = replaced
    pick = _stopped_pick(client, name, current, previous) if replaced is None else None
    if pick is not None:
        # The champion is tagged as replaced by a pick that never became champion: undoing the last
        # change would demote a champion the pick never replaced.
        raise RegistryError(
            f"a hand pick of version {pick.version} in place of champion version {current.version} was stopped before "
            f"champion moved: finish it with `{command} --to {pick.version} --reason ...` (then a plain "
            "rollback undoes it), or choose another version with --to; champion stays at version "
            f"{current.version}"
        )
    if previous is not None and str(previous.version) == str(current.version):
        # A rollback stopped after champion moved back: finish it rather than step further. The
        # champion's history names the version that rollback demoted; its entry names none where no
        # version held champion. Records from before the history: the latest version rolled back to it.
        _, entry = _latest_entry(current, lambda e: e.get("event") in TO_CHAMPION)
        if entry is not None:
            named = entry.get("replaced")
            demoted = [v for v in [_version_or_none(client, name, named)] if v is not None] if named else []
        else:
            demoted = client.search_model_versions(f"name = '{name}' and tags.rolled_back_to = '{current.version}'")
        if demoted:
            last = max(demoted, key=lambda v: (v.tags.get(TAG_ROLLED_BACK, ""), int(v.version)))
            log.warning("%s: finishing the rollback from version %s to %s that was stopped", name, last.version, current.version)
            return dataclasses.replace(_finish_rollback(client, name, str(last.version), current), finished=True)
        # Nothing demoted: a rollback (or a pick of previous-champion) where no version held
        # champion, stopped before previous-champion stepped back from it.
        log.warning("%s: finishing the rollback to version %s, where no version held champion, that was stopped",
                    name, current.version)
        done = _finish_rollback(client, name, None, current)
        return dataclasses.replace(done, chosen=current.tags.get(TAG_DECISION) == CHOSEN, finished=True)
    if previous is None:
        raise RegistryError(
            f"registered model '{name}' has no '{PREVIOUS_CHAMPION}' to roll back to (champion is version "
            f"{current.version}); to choose a version by hand: {command} --to <version> --reason \"...\""
        )
    require_ready(previous, f"champion stays at version {current.version}")
    _require_loadable(name, str(previous.version), PREVIOUS_CHAMPION, isolated, command)
    _require_champion_unmoved(client, name, current, str(previous.version))
    # The demoted version is tagged before champion leaves it: a rollback stopped at any point
    # leaves no untagged version that a later registration of its run would promote again.
    when, why = _now(), reason or "not given"
    _withdraw_run(client, current, previous, _rolled_back(when, str(previous.version), why))
    _tag_version(client, name, current.version, _rolled_back(when, str(previous.version), why))
    _tag_version(client, name, previous.version, {
        TAG_DECISION: "restored",
        TAG_REASON: f"restored by rollback from version {current.version} at {when}: {why}",
    })
    moves = (_record_event(client, name, str(current.version), "rolled back", why, to=str(previous.version)),
             _record_event(client, name, str(previous.version), "restored", why, replaced=str(current.version)))
    client.set_registered_model_alias(name, CHAMPION, previous.version)
    for move in moves:
        move.complete(client)
    return _finish_rollback(client, name, str(current.version), previous)


def _require_champion_unmoved(client: MlflowClient, name: str, current: ModelVersion | None, target: str) -> None:
    """Refuses to go on when ``champion`` is no longer on ``current``, the version a rollback or a hand
    pick replaces: loading ``target`` takes seconds, and a registration may have promoted another
    version meanwhile, which moving ``champion`` now would displace without a word. MLflow has no
    compare-and-set for aliases: the champion is read once more right before anything is written.

    ``current`` is ``None`` where no version held ``champion``: one that does now was promoted meanwhile.

    Raises:
        RegistryError: ``champion`` moved (or was removed); nothing was changed.
    """
    latest = _version_of(_alias(client, name, CHAMPION))
    if latest != _version_of(current):
        if current is None:
            moved = f"was given to version {latest}"
        else:
            moved = f"moved from version {current.version} to {latest}" if latest is not None else "was removed"
        raise RegistryError(
            f"the champion of '{name}' {moved} while version {target} was loaded (a registration promoted "
            "another version, say): nothing was changed. Look at the registry as it is now, and run the command "
            "again if it still applies"
        )


def _finish_rollback(client: MlflowClient, name: str, demoted: str | None, previous: ModelVersion) -> Rollback:
    """Clears the restored champion ``previous``'s own ``rolled_back_*`` tags and moves
    ``previous-champion`` one step back from it (``demoted``: ``None`` where no version held champion)."""
    # The restored version is champion by now: its run, registered again, stays as it is anyway.
    _untag_version(client, name, str(previous.version), RUN_ROLLED_BACK_TAGS)
    _lift_run_rollback(client, previous)
    before = previous.tags.get(TAG_REPLACED)
    if before and before != demoted and _version_or_none(client, name, before) is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, before)
        new_previous: str | None = before
    else:
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
        new_previous = None
    log.info("%s: champion rolled back from version %s to %s", name, demoted or "none", previous.version)
    return Rollback(name, demoted, str(previous.version), new_previous)


def _rollback_without_champion(
    client: MlflowClient, name: str, to: str | None, reason: str, isolated: bool, command: str = ROLLBACK_COMMAND,
) -> Rollback:
    """Gives ``champion`` back where no version holds it (the champion's version was deleted, which
    removes its alias, or the alias was removed): to ``previous-champion``, the last champion the
    registry holds, or to version ``to``, chosen by hand. The version is loaded first, as a
    consumer would load it; nothing is demoted, and ``previous-champion`` steps back from the
    restored version as after any rollback, ``previous-champion`` chosen by ``to`` included (a hand
    pick of another version leaves it where it is).

    Raises:
        RegistryError: no ``previous-champion`` and no ``to``, version ``to`` does not exist, the
            version cannot be loaded, or a registration gave ``champion`` to a version meanwhile.
    """
    previous = _alias(client, name, PREVIOUS_CHAMPION)
    if to is None and previous is None:
        raise RegistryError(
            f"registered model '{name}' has no '{CHAMPION}' alias and no '{PREVIOUS_CHAMPION}' to restore: nothing to "
            f"roll back to. To make a version champion by hand: {command} --to <version> --reason \"...\""
        )
    target = previous if to is None else _version_or_none(client, name, to) if to.isdigit() else None
    if target is None:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise RegistryError(
            f"registered model '{name}' has no version {to!r} (its versions: {', '.join(map(str, known))}); no "
            "version holds champion. Give one of those to --to"
        )
    version, role = str(target.version), PREVIOUS_CHAMPION if to is None else "chosen"
    require_ready(target, "no version was made champion")
    failure = _load_failure(name, version, isolated)
    if failure is not None:
        raise RegistryError(
            f"{name} version {version} ({role}) cannot be loaded from the registry ({_described(failure)}); a consumer "
            "could not load it either, so no version was made champion. If the tracking server is down, run again "
            "when it answers; otherwise choose another version with --to"
        ) from failure
    _require_champion_unmoved(client, name, None, version)
    when, why = _now(), reason or "not given"
    # A restored version keeps the version it replaced as champion, as after any rollback: the step
    # back of previous-champion reads it (_finish_rollback). One chosen by hand replaced none,
    # unless it is previous-champion: champion and previous-champion would then name one version.
    restores_previous = version == _version_of(previous)
    _untag_version(client, name, version, (TAG_BASIS,) if restores_previous else (TAG_BASIS, TAG_REPLACED))
    if to is None:
        tags = {TAG_DECISION: "restored", TAG_REASON: f"restored by rollback at {when}, when no version held champion "
                                                       f"({NO_CHAMPION_WHY}): {why}"}
    else:
        tags = {TAG_DECISION: CHOSEN, TAG_REASON: f"chosen by hand at {when}, when no version held champion "
                                                  f"({NO_CHAMPION_WHY}): {why}"}
    _tag_version(client, name, version, tags)
    if CHALLENGER in target.aliases:
        client.delete_registered_model_alias(name, CHALLENGER)
    given = _record_event(client, name, version, "restored" if to is None else CHOSEN, f"{why} (no version held champion)")
    client.set_registered_model_alias(name, CHAMPION, version)
    given.complete(client)
    if restores_previous:
        done = _finish_rollback(client, name, None, client.get_model_version(name, version))
        return dataclasses.replace(done, chosen=to is not None)
    _untag_version(client, name, version, RUN_ROLLED_BACK_TAGS)
    _lift_run_rollback(client, target)
    log.info("%s: version %s chosen by hand as champion, where no version held it", name, version)
    return Rollback(name, None, version, _version_of(_alias(client, name, PREVIOUS_CHAMPION)), chosen=True)


def _choose(
    client: MlflowClient, name: str, current: ModelVersion, version: str, reason: str, isolated: bool,
    command: str = ROLLBACK_COMMAND,
) -> Rollback:
    """Makes ``version``, chosen by hand, champion in place of ``current`` (``fracture rollback --to``;
    ``command`` is the one the messages suggest).

    The version is loaded first as a consumer would load it. The champion it replaces is tagged
    ``rolled_back_*`` before ``champion`` leaves it, as a rollback tags it, so the flow does not
    promote it again. The chosen version's ``gate_decision`` becomes ``chosen`` (``gate_reason``:
    in place of which version, when, why) and its ``replaced_version`` the replaced champion;
    a ``challenger`` alias on it is removed. After ``champion`` moves, its own ``rolled_back_*``
    tags (it is chosen again on purpose) are removed and ``previous-champion`` moves to the
    replaced champion, where a rollback without a version returns. Run again after a stop, it
    finishes the pick.

    Raises:
        RegistryError: the version does not exist, already is champion, or cannot be loaded;
            ``champion`` stays.
    """
    champion = str(current.version)
    chosen = _version_or_none(client, name, version) if version.isdigit() else None
    if chosen is None:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise RegistryError(
            f"registered model '{name}' has no version {version!r} (its versions: "
            f"{', '.join(map(str, known))}); champion stays at version {champion}. Give one of those to --to"
        )
    version = str(chosen.version)
    if str(chosen.version) == champion:
        replaced = _unfinished_choice(client, name, current, _alias(client, name, PREVIOUS_CHAMPION))
        if replaced is not None:
            log.warning("%s: finishing the hand pick of version %s that was stopped", name, version)
            return _finish_choice(client, name, str(replaced.version), version)
        raise RegistryError(
            f"version {version} of '{name}' already is champion: nothing to change. To go back to the version it "
            f"replaced: {command} --reason \"...\""
        )
    require_ready(chosen, f"champion stays at version {champion}")
    failure = _load_failure(name, version, isolated)
    if failure is not None:
        raise RegistryError(
            f"{name} version {version} cannot be loaded from the registry ({_described(failure)}); a consumer "
            f"could not load it either, so champion stays at version {champion}. If the tracking server is down, "
            "run again when it answers; otherwise choose another version"
        ) from failure
    _require_champion_unmoved(client, name, current, version)
    _drop_stopped_pick(client, name, current, version)
    when, why = _now(), reason or "not given"
    # As in a rollback, everything is written before champion moves, and the demoted version first:
    # a pick stopped at any point leaves no untagged demoted version, and a chosen version that
    # says what it replaced, from which the pick is finished.
    _withdraw_run(client, current, chosen, _rolled_back(when, version, why))
    _tag_version(client, name, champion, _rolled_back(when, version, why))
    _untag_version(client, name, version, (TAG_BASIS,))  # the rules an earlier challenger decision rested on
    _tag_version(client, name, version, {
        TAG_DECISION: CHOSEN,
        TAG_REASON: f"chosen by hand in place of version {champion} at {when}: {why}",
        TAG_REPLACED: champion,
    })
    if CHALLENGER in chosen.aliases:
        client.delete_registered_model_alias(name, CHALLENGER)
    moves = (_record_event(client, name, champion, "rolled back", why, to=version, by_hand=True),
             _record_event(client, name, version, CHOSEN, why, replaced=champion))
    client.set_registered_model_alias(name, CHAMPION, version)
    for move in moves:
        move.complete(client)
    return _finish_choice(client, name, champion, version)


def _stopped_pick(
    client: MlflowClient, name: str, current: ModelVersion, previous: ModelVersion | None
) -> ModelVersion | None:
    """The version a hand pick of which was stopped before ``champion`` left ``current``; ``None`` otherwise.

    Such a pick tagged the champion ``current`` as rolled back to it, and itself ``chosen`` in
    place of ``current``, and never became champion. A pick that did become champion is either the
    ``previous-champion`` (rolled back since) or carries ``rolled_back_to`` ``current`` itself
    (demoted in favour of ``current`` by a rollback or pick stopped before it cleared
    ``current``'s old tags); neither is a stopped pick.
    """
    stopped = current.tags.get("rolled_back_to")
    if not stopped or stopped == _version_of(previous):
        return None
    pick = _version_or_none(client, name, stopped)
    if (
        pick is None
        or pick.tags.get(TAG_DECISION) != CHOSEN
        or pick.tags.get(TAG_REPLACED) != str(current.version)
        or pick.tags.get("rolled_back_to") == str(current.version)
    ):
        return None
    return pick


def _drop_stopped_pick(client: MlflowClient, name: str, current: ModelVersion, version: str) -> None:
    """Removes the choice tags of a hand pick of another version stopped before ``champion`` moved
    (:func:`_stopped_pick`): it never became champion, and with another version chosen instead it
    would keep a ``gate_decision`` and ``gate_reason`` that say it was."""
    pick = _stopped_pick(client, name, current, _alias(client, name, PREVIOUS_CHAMPION))
    if pick is not None and str(pick.version) != version:
        log.warning("%s: the hand pick of version %s was stopped before champion moved; its choice is undone",
                    name, pick.version)
        _untag_version(client, name, str(pick.version), (TAG_DECISION, TAG_REASON, TAG_REPLACED))


def _unfinished_choice(
    client: MlflowClient, name: str, current: ModelVersion, previous: ModelVersion | None,
) -> ModelVersion | None:
    """The version a hand pick of the champion ``current`` replaced, when the pick stopped after
    ``champion`` moved and before ``previous-champion`` did; ``None`` otherwise."""
    before = current.tags.get(TAG_REPLACED)
    if current.tags.get(TAG_DECISION) != CHOSEN or not before or before in (_version_of(previous), str(current.version)):
        return None
    replaced = _version_or_none(client, name, before)
    if replaced is None or replaced.tags.get("rolled_back_to") != str(current.version):
        return None
    return replaced


def _finish_choice(client: MlflowClient, name: str, replaced: str, chosen: str) -> Rollback:
    """Removes the chosen champion's own ``rolled_back_*`` tags, then points ``previous-champion``
    at the version it replaced (last: until then a stopped pick is found and finished)."""
    _untag_version(client, name, chosen, RUN_ROLLED_BACK_TAGS)
    _lift_run_rollback(client, client.get_model_version(name, chosen))
    client.set_registered_model_alias(name, PREVIOUS_CHAMPION, replaced)
    log.info("%s: version %s chosen by hand as champion in place of version %s", name, chosen, replaced)
    return Rollback(name, replaced, chosen, replaced, chosen=True)


def _withdraw_run(client: MlflowClient, demoted: ModelVersion, restored: ModelVersion, tags: dict[str, str]) -> None:
    """Records the rollback of champion ``demoted`` on its training run too (``tags``, and which of
    its versions), so that no later version of the run is promoted automatically: not once the
    demoted version is deleted, nor when the run's evaluation changed. A rollback to another
    version of the same run (chosen by hand after ``serve`` changed) is none of the run's."""
    if demoted.run_id == restored.run_id:
        return
    _tag_run(client, demoted.run_id, tags | {TAG_ROLLED_BACK_VERSION: str(demoted.version)},
             f"{demoted.name} version {demoted.version}'s rollback")


def _lift_run_rollback(client: MlflowClient, restored: ModelVersion) -> None:
    """Clears the rollback from the training run of ``restored``, made champion again on purpose (a
    hand pick, or a rollback that undid a pick), and records when (``rollback_lifted_at``)."""
    held = _run_or_none(client, restored.run_id)
    if held is None:
        return
    for key in RUN_ROLLED_BACK_TAGS:
        if key in held.data.tags:
            client.delete_tag(restored.run_id, key)
    _tag_run(client, restored.run_id, {TAG_ROLLBACK_LIFTED: _now()}, f"{restored.name} version {restored.version}'s restoration")


def _run_or_none(client: MlflowClient, run_id: str) -> Run | None:
    """The training run, or ``None`` when the tracking store no longer holds it (deleted, or
    removed by ``mlflow gc``). Any other error is raised."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return run if run.info.lifecycle_stage == "active" else None


def _tag_run(client: MlflowClient, run_id: str, tags: dict[str, str], what: str) -> None:
    """Sets the run's tags; a run the tracking store no longer holds, or holds deleted, cannot be
    tagged: warned, and the version's own tags keep the record."""
    if _run_or_none(client, run_id) is None:
        log.warning("%s is not recorded on training run %s: the tracking store no longer holds it, or holds it "
                    "deleted; the version's own tags keep the record", what, run_id)
        return
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def _who() -> str:
    """Who runs the command, for the record: ``MLFLOW_TRACKING_USERNAME`` when set (the account the
    tracking server knows), else the operating-system user."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "").strip()
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name known to the system (a container's uid alone)
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


@dataclass(frozen=True)
class _Event:
    """An entry of a version's history, written before its alias moves (:func:`_record_event`)."""

    name: str
    version: str
    key: str
    entry: dict[str, Any]

    def complete(self, client: MlflowClient) -> None:
        """Marks the entry ``completed``: its alias has moved."""
        client.set_model_version_tag(self.name, self.version, self.key,
                                     json.dumps(self.entry | {"completed": True}, sort_keys=True))


def _record_event(client: MlflowClient, name: str, version: str, event: str, reason: str, **about: Any) -> _Event:
    """Adds an entry to the version's history: a tag ``event.<UTC time to the microsecond>`` whose value
    is JSON (``event``, ``at``, ``by``, ``host``, ``reason``, ``completed`` and what ``about`` names:
    ``to``, ``replaced``, ``by_hand``). Entries are only ever added, so an earlier rollback's or pick's
    reason outlives the next one, which overwrites ``gate_reason`` and ``rolled_back_reason``.

    Written before the alias moves, with ``completed`` false, and marked completed
    (:meth:`_Event.complete`) once it has moved: a command stopped in between (a killed worker, the
    tracking server gone) leaves every move with its entry, and an entry not completed says that the
    move may not have happened. The next command that finds the move made marks it (:func:`_complete_moves`,
    :func:`_complete_challenger`)."""
    at = datetime.now(timezone.utc)
    entry = {"event": event, "at": at.isoformat(timespec="seconds"), "by": _who(), "host": socket.gethostname(),
             "reason": reason[:EVENT_REASON_CHARS]} | {k: v for k, v in about.items() if v is not None}
    key = f"{TAG_EVENT}{at.strftime('%Y-%m-%dT%H-%M-%S.%fZ')}"
    client.set_model_version_tag(name, version, key, json.dumps(entry | {"completed": False}, sort_keys=True))
    return _Event(name, version, key, entry)


#: The history's events that give a version ``champion``.
TO_CHAMPION = ("promoted", "restored", CHOSEN)


def _complete_moves(client: MlflowClient, champion: ModelVersion) -> None:
    """Marks completed the history entries of the move that made ``champion`` (which holds the
    alias) champion, when the command that moved it stopped before it marked them: the champion's
    latest entry of :data:`TO_CHAMPION`, and the ``rolled back`` entry the same command wrote on the
    version it replaced. An earlier entry left not completed is of a move that did not happen (a
    later one gave the version champion), and stays so."""
    key, entry = _latest_entry(champion, lambda e: e.get("event") in TO_CHAMPION)
    if entry is None or entry.get("completed", True):
        return
    log.warning("%s: completing the history of version %s's %s, whose command stopped after champion moved",
                champion.name, champion.version, entry["event"])
    _Event(champion.name, str(champion.version), key, entry).complete(client)
    # A rollback or a pick wrote the demoted version's entry too; a promotion writes none there.
    replaced = entry.get("replaced") if entry["event"] != "promoted" else None
    demoted = _version_or_none(client, champion.name, replaced) if replaced else None
    if demoted is None:
        return
    key, entry = _latest_entry(demoted, lambda e: e.get("event") == "rolled back")
    if entry is not None and not entry.get("completed", True) and entry.get("to") == str(champion.version):
        _Event(demoted.name, str(demoted.version), key, entry).complete(client)


def _complete_challenger(client: MlflowClient, name: str) -> None:
    """Marks completed the ``challenger`` history entry of a gate decision whose command stopped
    before it marked it (:func:`_mark_challenger`), as :func:`_complete_moves` does a champion's:
    the latest such entry of the version holding ``challenger``, whose alias moved; and of the version
    holding ``previous-champion``, which keeps that alias instead of taking ``challenger``, once its
    ``gate_decision`` and ``gate_reason`` are the entry's (written where the alias would have moved).
    An earlier entry left not completed, or one of a version that no longer holds the alias, stays
    so: whether its alias moved cannot be told."""
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        raise
    for alias in (CHALLENGER, PREVIOUS_CHAMPION):
        if aliases.get(alias) is None:
            continue
        mv = client.get_model_version(name, str(aliases[alias]))
        key, entry = _latest_entry(mv, lambda e: e.get("event") == "challenger")
        if entry is None or entry.get("completed", True):
            continue
        if alias == PREVIOUS_CHAMPION and (
            mv.tags.get(TAG_DECISION) != "challenger"
            or mv.tags.get(TAG_REASON, "")[:EVENT_REASON_CHARS] != entry.get("reason")
        ):
            continue
        log.warning("%s: completing the history of version %s's challenger decision, whose command stopped after "
                    "its alias moved", name, mv.version)
        _Event(name, str(mv.version), key, entry).complete(client)


def _latest_entry(mv: ModelVersion, which: Callable[[dict[str, Any]], bool]) -> tuple[str, dict[str, Any] | None]:
    """The version's latest history entry that ``which`` accepts, and its tag; ``("", None)`` when none."""
    for key in sorted((k for k in mv.tags if k.startswith(TAG_EVENT)), reverse=True):
        try:
            entry = json.loads(mv.tags[key])
        except ValueError:  # not an entry this module wrote
            continue
        if isinstance(entry, dict) and which(entry):
            return key, entry
    return "", None


def history(client: MlflowClient, name: str, version: str | int) -> list[dict[str, Any]]:
    """The version's history (:func:`_record_event`), oldest first. An entry whose ``completed`` is
    false is of a command stopped around its alias move, which may not have happened; entries
    written before ``completed`` existed have none and were written once their move was made."""
    tags = client.get_model_version(name, str(version)).tags
    return [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(TAG_EVENT))]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _rolled_back(when: str, to: str, why: str) -> dict[str, str]:
    """The tags of a champion demoted at ``when`` in favour of version ``to``, for reason ``why``."""
    return dict(zip(ROLLED_BACK_TAGS, (when, to, why), strict=True))


# --- registry helpers -----------------------------------------------------------------------------


def _test_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The evaluate stage's metrics of a run (``test_*``)."""
    return {k: v for k, v in metrics.items() if k.startswith("test_")}


def _required_metrics(metrics: dict[str, float], run_id: str, params: RegisterParams) -> None:
    if SCORE not in metrics:
        raise RegistryError(f"run {run_id} has no metric '{SCORE}'; run the evaluate stage first")
    if not math.isfinite(metrics[SCORE]):
        raise RegistryError(
            f"run {run_id} has {SCORE} {metrics[SCORE]}: its test split cannot rank the model (one class only?). "
            "Split again so that the test split holds fractured and non-fractured X-rays, then register"
        )
    for key in params.floors:
        if key not in metrics:
            raise RegistryError(
                f"run {run_id} has no metric '{key}' (named in register.floors); run the evaluate stage first, "
                f"or name one of its metrics in params.yaml: {sorted(metrics)}"
            )


def _evaluation_of(client: MlflowClient, mv: ModelVersion) -> Evaluation:
    """The champion ``mv``'s evaluation, for the gate: its test split and data version as the version
    records them, and the images its run trained on.

    A champion whose training run the tracking store no longer holds (deleted, then removed by
    ``mlflow gc``) still loads from the registry, as its consumers load it: it is compared from what
    the version itself carries (its ``metrics``, ``split_fingerprint`` and ``data_version`` tags),
    with a warning, rather than failing every later registration. The gate scores both models
    from their registered files, so what is lost is the list of images the champion learnt from:
    it is scored on every test image, which can only favour it, and the ``scored with champion``
    check says so when it was evaluated on another split or data version.
    """
    try:
        run = client.get_run(mv.run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        log.warning(
            "%s version %s (champion): its training run %s is gone from the tracking store; the gate compares with "
            "it from the version's own tags, and scores it on every test image (the images it learnt from are no "
            "longer listed), which can favour it", mv.name, mv.version, mv.run_id,
        )
        return _GoneRunEvaluation(
            str(mv.version), _recorded_metrics(mv), mv.tags.get(TAG_SPLIT) or None, mv.tags.get(TAG_DATA) or None,
        )
    return Evaluation(
        str(mv.version),
        dict(run.data.metrics),
        mv.tags.get(TAG_SPLIT) or None,
        mv.tags.get(TAG_DATA) or run.data.tags.get("data_version") or None,
        _seen_in_training(client, mv.run_id),
    )


@dataclass(frozen=True)
class _GoneRunEvaluation(Evaluation):
    """A champion's evaluation read from its version's tags: its training run is gone from the store."""


def _run_gone(evaluation: Evaluation) -> bool:
    return isinstance(evaluation, _GoneRunEvaluation)


def _recorded_metrics(mv: ModelVersion) -> dict[str, float]:
    """The test metrics the version was registered with (its ``metrics`` tag), or none when unreadable."""
    try:
        recorded = json.loads(mv.tags.get("metrics") or "{}")
        return {str(k): float(v) for k, v in recorded.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def _seen_in_training(client: MlflowClient, run_id: str) -> SeenImages | None:
    """The images run ``run_id`` trained and validated on (its :data:`SEEN_ARTIFACT`), or ``None``
    when the run did not record them, its list cannot be read (damaged: warned, and the gate
    compares on every image, as for a champion registered before runs recorded it), or the
    tracking store no longer holds the run (deleted and removed by ``mlflow gc``: warned alike); a
    store that cannot be read raises, as every registry read does.

    A classifier's run or a detector's: both record the list (the detector's counts its backbone's
    images too, :func:`fracture.stages.detect.seen_by_detector`)."""
    try:
        text = seen_table(client, run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        log.warning("the champion's training run %s is gone from the tracking store: the gate cannot tell which "
                    "test images that model learnt from, and scores it on every one, which may favour it", run_id)
        return None
    if text is None:
        return None
    try:
        return SeenImages.from_table(text, f"run {run_id}'s artifact {SEEN_ARTIFACT}")
    except SeenListError as exc:
        log.warning("%s: the gate cannot tell which test images that model learnt from, and scores it on every "
                    "one, which may favour it", exc)
        return None


def _tag_value(value: Any) -> str:
    """A version tag's value: ``None`` is written as an empty string."""
    return "" if value is None else str(value)


def _tag_version(client: MlflowClient, name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, _tag_value(value))


def _untag_version(client: MlflowClient, name: str, version: str, keys: Iterable[str]) -> None:
    """Deletes those of ``keys`` the version carries now (read afresh, not from a snapshot)."""
    held = client.get_model_version(name, version).tags
    for key in keys:
        if key in held:
            client.delete_model_version_tag(name, version, key)


def _alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version ``alias`` points at, or ``None`` when the model or the alias does not exist.

    Any other error (the tracking server down or overloaded) is raised, never read as "no
    champion": a version judged against no champion would be promoted without a comparison.
    The registered model's alias map tells a missing alias apart, which the by-alias lookup
    does not (its error code is the one a malformed request gets).
    """
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = aliases.get(alias)
    return None if version is None else client.get_model_version(name, str(version))


def _version_or_none(client: MlflowClient, name: str, version: str) -> ModelVersion | None:
    """The version, or ``None`` when it does not exist. Any other error (the tracking server down
    or overloaded) is raised, never read as a deleted version."""
    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise

