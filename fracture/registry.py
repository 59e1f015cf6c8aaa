"""Logs the trained model as an MLflow pyfunc, registers it and runs the promotion gate.

Aliases of the registered model:

- ``champion``: the version consumers load (``models:/<name>@champion``).
- ``previous-champion``: the version the current champion replaced; :func:`rollback` moves
  ``champion`` back to it.
- ``challenger``: the latest version that did not pass the gate (the reason is in its
  ``gate_reason`` tag and in the returned :class:`Registration`).

A version becomes champion only when its evaluation clears every floor in ``register.floors``,
beats the champion on ``register.metric`` by at least ``register.margin`` on the same test split
and data version, and, loaded back through ``models:/<name>/<version>``, predicts a real image.
When the champion was evaluated on another split or data version (a new dataset export), its
recorded metrics are not compared: with ``register.rescore_champion`` the champion, loaded from
the registry, is scored on the new version's test split first, and the two are compared there.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from PIL import Image

import fracture
from fracture.config import RegisterParams
from fracture.serving import SIGNATURE

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
CHALLENGER = "challenger"
ENTRY = Path(__file__).with_name("pyfunc_entry.py")
REQUIREMENTS = ("torch", "torchvision", "timm", "pillow", "pandas", "numpy", "safetensors", "mlflow")
#: What a model trained with an ablation enhancement (``prepare.enhance``) needs besides.
ENHANCE_REQUIREMENTS = {
    "clahe": ("opencv-contrib-python-headless",),
    "canny": ("opencv-contrib-python-headless",),
    "anisotropic_diffusion": ("SimpleITK",),
}

#: Version tags the gate writes and reads.
TAG_SPLIT = "split_fingerprint"
TAG_DATA = "data_version"
TAG_DECISION = "gate_decision"
TAG_REASON = "gate_reason"
TAG_REPLACED = "replaced_version"
TAG_ROLLED_BACK = "rolled_back_at"


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (a metric is missing, nothing to roll back to)."""


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
        """
        if not test_csv.is_file():
            raise FileNotFoundError(f"{test_csv} not found: run the split stage first (dvc repro)")
        frame = pd.read_csv(test_csv, dtype={"image_id": str, "path": str})
        missing = {"image_id", "path", "label"} - set(frame.columns)
        if missing:
            raise RegistryError(f"{test_csv}: columns {sorted(missing)} missing; rebuild it with `dvc repro split`")
        paths = frame["path"].dropna()
        paths = paths[paths != ""]
        if paths.empty:
            raise RegistryError(f"{test_csv}: no image paths; rebuild it with `dvc repro split`")
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
class Registration:
    """What registration did: the version, the gate's decision and why.

    Attributes:
        name: the registered model name.
        version: the version of this run's model.
        run_id: the training run.
        created: whether this call created the version (``False``: the run was registered before).
        champion: whether the version holds ``champion`` afterwards.
        metric: the gate metric (``register.metric``).
        score: the version's value of ``metric``.
        champion_score: the value of the champion it was compared with (``None``: no champion,
            or not comparable).
        reason: one sentence: why it was promoted or why it lost.
        decision: ``promoted`` (alias moved to it), ``challenger`` (lost the gate; alias
            ``challenger``) or ``unchanged`` (it already was champion, or was rolled back before).
        champion_version: the champion before this registration (``None`` when there was none).
        previous_champion: the version holding ``previous-champion`` afterwards.
        margin: the margin it had to beat the champion by.
        floors: the floors it had to clear (metric -> minimum).
        metrics: the version's test metrics (``test_*`` run metrics).
        checks: every gate rule evaluated, in order; the failed ones say why it lost.
        split_fingerprint: the test split it was evaluated on (see :func:`split_fingerprint`).
        data_version: the dataset version (DVC md5) the run recorded.
        aliases: the aliases the version holds afterwards.
    """

    name: str
    version: str
    run_id: str
    created: bool
    champion: bool
    metric: str
    score: float
    champion_score: float | None
    reason: str
    decision: str = "unchanged"
    champion_version: str | None = None
    previous_champion: str | None = None
    margin: float = 0.0
    floors: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    checks: tuple[GateCheck, ...] = ()
    split_fingerprint: str | None = None
    data_version: str | None = None
    aliases: tuple[str, ...] = ()

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
        demoted: the version that was champion; it keeps no alias and gets a ``rolled_back_at``
            tag, so re-registering its run never promotes it again.
        champion: the version now holding ``champion`` (the former ``previous-champion``).
        previous_champion: the version now holding ``previous-champion`` (the one the new
            champion had itself replaced), or ``None`` when the alias was removed.
    """

    name: str
    demoted: str
    champion: str
    previous_champion: str | None


def _input_example() -> pd.DataFrame:
    # A small synthetic greyscale image: the example must not carry patient data.
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((64, 64)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})


def requirements(config: dict[str, Any]) -> tuple[str, ...]:
    """The packages the served model needs: the base set plus its enhancement's library."""
    enhance = config.get("data_config", {}).get("enhance", "none")
    return REQUIREMENTS + ENHANCE_REQUIREMENTS.get(enhance, ())


def log_pyfunc(run_id: str, weights: Path, config: dict[str, Any]) -> str:
    """Logs the model with its preprocessing code into the training run.

    Args:
        run_id: the MLflow run of the train stage.
        weights: the safetensors file of the fine-tuned model.
        config: architecture, data config and decision threshold (``model.json`` plus the
            threshold the evaluate stage chose).

    Returns:
        The logged model's URI. The run's experiment becomes the active one.
    """
    # MLflow resumes a run only inside its own experiment, which may not be the active one.
    mlflow.set_experiment(experiment_id=MlflowClient().get_run(run_id).info.experiment_id)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        config_path = Path(tmp) / "model.json"
        config_path.write_text(json.dumps(config, indent=2))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(ENTRY),
            artifacts={"weights": str(weights), "config": str(config_path)},
            code_paths=[str(Path(fracture.__file__).parent)],
            signature=SIGNATURE,
            input_example=_input_example(),
            pip_requirements=[f"{pkg}=={metadata.version(pkg)}" for pkg in requirements(config)],
        )
    return info.model_uri


def _alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _required_metrics(metrics: dict[str, float], run_id: str, params: RegisterParams) -> None:
    for key, source in [(params.metric, "register.metric"), *((k, "register.floors") for k in params.floors)]:
        if key not in metrics:
            raise RegistryError(
                f"run {run_id} has no metric '{key}' (named in {source}); run the evaluate stage first, "
                f"or name one of its metrics in params.yaml: {sorted(metrics)}"
            )


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


def _same(what: str, ours: str | None, theirs: str | None, version: str) -> GateCheck:
    name = f"same {what}"
    if not ours:
        return GateCheck(name, False, f"this run recorded no {what}")
    if not theirs:
        return GateCheck(name, False, f"champion v{version} has no recorded {what}")
    if ours != theirs:
        return GateCheck(name, False, f"{what} {ours[:12]} differs from champion v{version}'s {theirs[:12]}")
    return GateCheck(name, True, f"{what} {ours[:12]} as champion v{version}")


def load_check(name: str, version: str, image: Path, threshold: float) -> GateCheck:
    """Loads ``models:/<name>/<version>`` as a consumer would and predicts one real image.

    Args:
        name: the registered model name.
        version: the version to load.
        image: a real X-ray file.
        threshold: the decision threshold the model must report.

    Returns:
        A passed check naming the prediction, or a failed one naming what went wrong.
    """
    uri = f"models:/{name}/{version}"
    try:
        model = mlflow.pyfunc.load_model(uri)
        out = model.predict(pd.DataFrame({"path": [str(image)]}))
        prob = float(out["fracture_probability"].iloc[0])
        problems = []
        if len(out) != 1:
            problems.append(f"{len(out)} rows for one image")
        if not (math.isfinite(prob) and 0.0 <= prob <= 1.0):
            problems.append(f"fracture_probability {prob} outside [0, 1]")
        if not math.isclose(float(out["threshold"].iloc[0]), threshold):
            problems.append(f"threshold {out['threshold'].iloc[0]} instead of {threshold}")
        expected = "fractured" if prob >= threshold else "not_fractured"
        if out["label"].iloc[0] != expected:
            problems.append(f"label {out['label'].iloc[0]!r} for probability {prob:.4f}")
    except Exception as exc:  # noqa: BLE001 - any failure to load or predict keeps the alias where it is
        return GateCheck("load check", False, f"{uri} failed on {image.name}: {type(exc).__name__}: {exc}")
    if problems:
        return GateCheck("load check", False, f"{uri} on {image.name}: {'; '.join(problems)}")
    return GateCheck("load check", True, f"{uri} predicted {image.name}: fracture_probability {prob:.4f}")


def rescore(name: str, version: str, split: EvaluatedSplit, batch_size: int = 32) -> dict[str, float]:
    """Scores a registered version on ``split`` at its own threshold, as the evaluate stage would.

    The version is loaded through ``models:/<name>/<version>`` with the preprocessing it was
    logged with; images are decoded as the evaluate stage decodes them (files that end early
    are kept when ``split.allow_truncated``).

    Returns:
        ``test_*`` metrics (ROC AUC, recall, specificity, ...) named as the evaluate stage logs them.

    Raises:
        RegistryError: the split carries no images to score.
    """
    import numpy as np
    import torch

    from fracture.evaluation import evaluate_probabilities
    from fracture.imaging import open_xray

    if not split.paths:
        raise RegistryError("the test split carries no image paths to score the champion on")
    if len(split.paths) != split.images:
        raise RegistryError(
            f"{split.images - len(split.paths)} of the test split's {split.images} rows have no image path; "
            "rebuild it with `dvc repro split`"
        )
    served = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model()
    probs = []
    with torch.inference_mode():
        for start in range(0, len(split.paths), batch_size):
            chunk = split.paths[start : start + batch_size]
            batch = torch.stack([served.transform(open_xray(p, allow_truncated=split.allow_truncated)) for p in chunk])
            probs.append(served.model(batch).softmax(dim=-1)[:, 1].double().numpy())
    result = evaluate_probabilities(np.array(split.labels), np.concatenate(probs), float(served.threshold))
    return {f"test_{k}": float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}


def _rescored(
    client: MlflowClient, params: RegisterParams, champion: Evaluation, candidate: Evaluation, split: EvaluatedSplit
) -> tuple[Evaluation, GateCheck]:
    """The champion's evaluation on the candidate's split and data version, and how it went."""
    v = champion.version
    try:
        metrics = rescore(params.model_name, str(v), split)
    except Exception as exc:  # noqa: BLE001 - a champion that cannot be scored is not compared
        return champion, GateCheck(
            "champion re-scored", False, f"champion v{v} could not be scored on this split: {type(exc).__name__}: {exc}"
        )
    recorded = champion.metrics.get(params.metric)
    was = f" (recorded {recorded:.4f} on its own split)" if recorded is not None else ""
    detail = (
        f"champion v{v} was evaluated on another split or data version; scored on this one "
        f"({split.images} images): {params.metric} {metrics.get(params.metric, float('nan')):.4f}{was}"
    )
    return Evaluation(champion.version, metrics, candidate.split_fingerprint, candidate.data_version), GateCheck(
        "champion re-scored", True, detail
    )


def _evaluation_of(client: MlflowClient, mv: ModelVersion) -> Evaluation:
    run = client.get_run(mv.run_id)
    return Evaluation(
        str(mv.version),
        dict(run.data.metrics),
        mv.tags.get(TAG_SPLIT) or None,
        mv.tags.get(TAG_DATA) or run.data.tags.get("data_version") or None,
    )


def _tag_version(client: MlflowClient, name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, "" if value is None else str(value))


def register(
    params: RegisterParams,
    run_id: str,
    weights: Path,
    config: dict[str, Any],
    split: EvaluatedSplit,
    client: MlflowClient | None = None,
) -> Registration:
    """Registers the run's model once and promotes it when it passes the gate.

    A run that already has a version under ``params.model_name`` is not registered again; the
    gate runs again for it (so an interrupted registration completes), except that the current
    champion stays as it is and a version that was rolled back is not promoted again.

    With ``params.rescore_champion``, a champion evaluated on another split or data version is
    first scored on ``split`` (:func:`rescore`), so the two are compared on the same images.

    The gate, in order: every floor; the same test split and data version as the champion; the
    gate metric above the champion's by at least the margin; then the version, loaded through
    ``models:/<name>/<version>``, predicts ``split.check_image``. Only then do the aliases move:
    ``champion`` to the version and ``previous-champion`` to the version it replaced. A version
    that fails gets ``challenger``. Either way the decision and reason become version tags.

    Args:
        params: model name, gate metric, margin and floors.
        run_id: the training run (holding the evaluation's ``test_*`` metrics and the
            ``git_commit``, ``data_version`` and ``profile`` tags).
        weights: fine-tuned weights (safetensors).
        config: the serving config (see :func:`log_pyfunc`).
        split: the test split the run was evaluated on.
        client: an MLflow client for the current tracking URI (default: a new one).

    Returns:
        The version, the gate's decision and each check.

    Raises:
        RegistryError: the run lacks the gate metric or a floor's metric.
    """
    client = client or MlflowClient()
    name = params.model_name
    run = client.get_run(run_id)
    metrics = dict(run.data.metrics)
    _required_metrics(metrics, run_id, params)
    data_version = run.data.tags.get("data_version") or None
    test_metrics = {k: v for k, v in metrics.items() if k.startswith("test_")}

    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        mv = max(existing, key=lambda v: int(v.version))
        created = False
        log.info("run %s is already registered as %s version %s", run_id, name, mv.version)
    else:
        uri = log_pyfunc(run_id, weights, config)
        mv = mlflow.register_model(uri, name, tags={"run_id": run_id})
        created = True
    version = str(mv.version)
    provenance = {
        "git_commit": run.data.tags.get("git_commit"),
        TAG_DATA: data_version,
        "profile": run.data.tags.get("profile") or config.get("profile"),
        "threshold": config.get("threshold"),
        TAG_SPLIT: split.fingerprint,
        "metrics": json.dumps(test_metrics, sort_keys=True),
    }
    # An existing version keeps what was recorded when it was registered (the split it was
    # evaluated on may no longer be the one in the workspace); missing tags are filled in.
    _tag_version(client, name, version, {k: v for k, v in provenance.items() if created or not mv.tags.get(k)})
    mv = client.get_model_version(name, version)
    fingerprint = mv.tags.get(TAG_SPLIT) or split.fingerprint

    current = _alias(client, name, CHAMPION)
    score = metrics[params.metric]
    base = {
        "name": name, "version": version, "run_id": run_id, "created": created, "metric": params.metric,
        "score": score, "margin": params.margin, "floors": dict(params.floors), "metrics": test_metrics,
        "split_fingerprint": fingerprint, "data_version": data_version,
        "champion_version": None if current is None else str(current.version),
    }

    def result(decision: str, reason: str, checks: tuple[GateCheck, ...], champion_score: float | None) -> Registration:
        after = client.get_model_version(name, version)
        previous = _alias(client, name, PREVIOUS_CHAMPION)
        return Registration(
            **base, champion=CHAMPION in after.aliases, champion_score=champion_score, reason=reason,
            decision=decision, checks=checks, aliases=tuple(sorted(after.aliases)),
            previous_champion=None if previous is None else str(previous.version),
        )

    if current is not None and str(current.version) == version:
        return result("unchanged", "already champion", (), score)
    if mv.tags.get(TAG_ROLLED_BACK):
        reason = (
            f"version {version} was rolled back from champion at {mv.tags[TAG_ROLLED_BACK]}; it is not "
            "promoted again automatically"
        )
        return result("unchanged", reason, (), None)

    candidate = Evaluation(version, metrics, fingerprint, data_version)
    theirs = None if current is None else _evaluation_of(client, current)
    rescored: tuple[GateCheck, ...] = ()
    if (
        theirs is not None
        and params.rescore_champion
        and (theirs.split_fingerprint, theirs.data_version) != (fingerprint, data_version)
        and fingerprint == split.fingerprint
    ):
        theirs, check = _rescored(client, params, theirs, candidate, split)
        rescored = (check,)
    checks = rescored + gate(params, candidate, theirs)
    comparable = theirs is not None and all(c.passed for c in checks if c.name.startswith("same "))
    champion_score = theirs.metrics.get(params.metric) if comparable and theirs is not None else None
    if all(c.passed for c in checks):
        checks += (load_check(name, version, split.check_image, float(config["threshold"])),)
    failed = [c for c in checks if not c.passed]

    if failed:
        reason = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        # A version that holds previous-champion keeps that role rather than becoming the challenger.
        if PREVIOUS_CHAMPION not in mv.aliases:
            client.set_registered_model_alias(name, CHALLENGER, version)
        _tag_version(client, name, version, {TAG_DECISION: "challenger", TAG_REASON: reason})
        log.info("%s version %s stays challenger: %s", name, version, reason)
        return result("challenger", reason, checks, champion_score)

    if current is None:
        reason = "first version to pass the gate"
    else:
        reason = f"{params.metric} {score:.4f} beats champion v{current.version}'s {champion_score:.4f}"
        _tag_version(client, name, version, {TAG_REPLACED: current.version})
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, current.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    if CHALLENGER in mv.aliases:
        client.delete_registered_model_alias(name, CHALLENGER)
    _tag_version(client, name, version, {TAG_DECISION: "promoted", TAG_REASON: reason})
    log.info("%s version %s is champion: %s", name, version, reason)
    return result("promoted", reason, checks, champion_score)


def rollback(name: str, client: MlflowClient | None = None) -> Rollback:
    """Moves ``champion`` back to the ``previous-champion`` version.

    The demoted version loses ``champion``, keeps no alias and is tagged ``rolled_back_at``, so
    a later registration of its run does not promote it again. ``previous-champion`` moves to
    the version the restored champion had itself replaced, or is removed when there is none, so
    rolling back again steps further back through the champions.

    Args:
        name: the registered model name.
        client: an MLflow client (default: one for the current tracking URI).

    Returns:
        Which version was demoted and where the aliases point now.

    Raises:
        RegistryError: the model has no champion or no previous champion to return to.
    """
    client = client or MlflowClient()
    current = _alias(client, name, CHAMPION)
    if current is None:
        raise RegistryError(f"registered model '{name}' has no '{CHAMPION}' alias: nothing to roll back")
    previous = _alias(client, name, PREVIOUS_CHAMPION)
    if previous is None or str(previous.version) == str(current.version):
        raise RegistryError(
            f"registered model '{name}' has no '{PREVIOUS_CHAMPION}' to roll back to (champion is version "
            f"{current.version}); to choose a version by hand: "
            f"MlflowClient().set_registered_model_alias('{name}', '{CHAMPION}', <version>)"
        )
    client.set_registered_model_alias(name, CHAMPION, previous.version)
    _tag_version(
        client,
        name,
        current.version,
        {TAG_ROLLED_BACK: datetime.now(timezone.utc).isoformat(timespec="seconds"), "rolled_back_to": previous.version},
    )
    before = previous.tags.get(TAG_REPLACED)
    if before and before != str(current.version) and _exists(client, name, before):
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, before)
        new_previous: str | None = before
    else:
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
        new_previous = None
    log.info("%s: champion rolled back from version %s to %s", name, current.version, previous.version)
    return Rollback(name, str(current.version), str(previous.version), new_previous)


def _exists(client: MlflowClient, name: str, version: str) -> bool:
    try:
        client.get_model_version(name, version)
    except MlflowException:
        return False
    return True
