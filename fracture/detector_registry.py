"""Registers the fracture detector as its own MLflow model, champion only through its own gate.

The detector is registered under ``detect.model_name`` (``fracture-detector``), beside the
classifier, with the same aliases (``champion``, ``previous-champion``, ``challenger``) and the
same alias moves (:func:`fracture.registry._promote`, :func:`fracture.registry._mark_challenger`).

Its gate, in order:

- every floor of ``detect.floors`` (its run's ``test_*`` metrics, from ``detect_evaluate``);
- with a champion: the version and the champion, each loaded through the registry, find boxes
  on the same test images (every box, ``min_score: 0``); a paired bootstrap of their mAP@0.5
  difference (:func:`fracture.detection.paired_bootstrap_map`) must put it above 0 at
  ``detect.confidence``. Test images the champion learnt from (its run's
  :data:`fracture.seen.SEEN_ARTIFACT`: its own train and val images and its backbone's), with
  every image linked to them, are left out of both; when no fracture box is left, the two are
  not compared and the champion stays;
- the version, loaded through ``models:/<name>/<version>``, answers a fractured test X-ray in
  the served format (the load check).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion

from fracture.config import DetectParams
from fracture.consumer import loaded_version, predict_as_consumer
from fracture.detection import Detections, PairedMAP, paired_bootstrap_map
from fracture.gate import Evaluation, GateCheck, floors, paired_verdict
from fracture.intake import InputPolicy
from fracture.packaging import log_detector_pyfunc
from fracture.registry import (
    CHAMPION,
    DETECTOR_ROLLBACK_COMMAND,
    TAG_DATA,
    TAG_POLICY,
    TAG_SPLIT,
    Registration,
    RegistryError,
    _alias,
    _basis,
    _ensure_version,
    _gate_until_settled,
    _Outcome,
    _record_provenance,
    _registration,
    _seen_in_training,
    _test_metrics,
    _verdict,
    code_tags,
    require_ready,
    require_same_split,
    require_served_threshold,
)
from fracture.seen import SeenImages

log = logging.getLogger(__name__)

#: The run metric every detector version needs, reported next to the decision.
SCORE = "test_map_50"
#: Rows sent to the served detector per request, at most: fewer where the version takes fewer
#: (its ``serve.max_rows``), which it would otherwise refuse whole.
REQUEST_ROWS = 16


@dataclass(frozen=True)
class DetectorTestSplit:
    """The test images the detector was scored on, with their fracture boxes.

    Attributes:
        fingerprint: :func:`fracture.gate.split_fingerprint` of these images and their labels.
        paths: every image (fractured ones with boxes, and non-fractured ones).
        truth: each image's boxes in its own pixels (none for a non-fractured image).
        image_ids: each image's ``image_id`` in the test split table, in the same order; empty:
            not known, and the gate cannot tell which of them a champion learnt from.
        sha256: each image's content sha256 (the table's ``sha256``), in the same order; empty
            where the table has none.
        groups: each image's group of linked images (the table's ``group``), in the same order;
            empty: each image its own.
    """

    fingerprint: str
    paths: tuple[Path, ...]
    truth: tuple[np.ndarray, ...]
    image_ids: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.paths or len(self.paths) != len(self.truth):
            raise RegistryError(
                f"the detector's test split needs images with their boxes: {len(self.paths)} images, "
                f"{len(self.truth)} box lists; run `dvc repro detect/dvc.yaml`"
            )
        for field, values in (("image_ids", self.image_ids), ("sha256", self.sha256), ("groups", self.groups)):
            if values and len(values) != len(self.paths):
                raise RegistryError(f"the detector's test split has {len(self.paths)} images and {len(values)} "
                                    f"{field}: give one per image, or none")
        if not any(len(t) for t in self.truth):
            raise RegistryError("the detector's test split holds no fracture box: mAP is not defined on it")

    def seen_by(self, seen: SeenImages) -> np.ndarray | None:
        """Which of these images a detector learnt from, itself or through its group
        (:meth:`fracture.seen.SeenImages.among`); ``None`` when the split does not know its image ids."""
        return seen.among(self.image_ids, self.sha256, self.groups)

    def without(self, out: np.ndarray) -> DetectorTestSplit:
        """The same split on the images ``out`` does not mark (a boolean mask in the split's order),
        under the same fingerprint: the test split the version was scored on, less some of its images.

        Raises:
            RegistryError: no image with a fracture box is left.
        """
        keep = np.flatnonzero(~np.asarray(out, dtype=bool))

        def kept(values: tuple) -> tuple:
            return tuple(values[i] for i in keep) if values else ()

        return replace(self, paths=kept(self.paths), truth=kept(self.truth), image_ids=kept(self.image_ids),
                       sha256=kept(self.sha256), groups=kept(self.groups))

    @property
    def n_fractured(self) -> int:
        """Images with at least one fracture box."""
        return sum(len(t) > 0 for t in self.truth)

    @property
    def check_image(self) -> Path:
        """A fractured test X-ray, for the load check."""
        return next(p for p, t in zip(self.paths, self.truth, strict=True) if len(t))


def served_detections(name: str, version: str, split: DetectorTestSplit) -> tuple[Detections, float]:
    """Every box a registered detector finds on the split's images, as a registry consumer gets them.

    Returns:
        The boxes and scores per image (``min_score: 0``, so mAP sees every box the detector
        keeps), and the version's served threshold.

    Raises:
        RegistryError: a row came back with an error.
    """
    boxes, scores, threshold = [], [], math.nan
    with loaded_version(f"models:/{name}/{version}") as model:
        policy = getattr(model.unwrap_python_model(), "policy", None)
        rows = max(1, min(REQUEST_ROWS, getattr(policy, "max_rows", REQUEST_ROWS)))
        for start in range(0, len(split.paths), rows):
            chunk = split.paths[start : start + rows]
            out = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in chunk]}), params={"min_score": 0.0})
            for path, (_, row) in zip(chunk, out.iterrows(), strict=True):
                if row["error"]:
                    raise RegistryError(f"models:/{name}/{version} refused {path}: {row['error']}")
                found = np.array(json.loads(row["boxes"]), dtype=np.float64).reshape(-1, 5)
                boxes.append(found[:, :4])
                scores.append(found[:, 4])
                threshold = float(row["threshold"])
    return Detections(boxes, scores), threshold


def load_check(name: str, version: str, image: Path, threshold: float, isolated: bool = True) -> GateCheck:
    """Loads ``models:/<name>/<version>`` and finds boxes on one fractured X-ray in the served format:
    ``isolated`` (default), in a consumer's Python with the version's own packaged code
    (:mod:`fracture.consumer`); otherwise in this process, with this installation's code."""
    uri = f"models:/{name}/{version}"
    try:
        problems = []
        if isolated:
            answer = predict_as_consumer(uri, [image])
            out = answer.rows
            if answer.ran_installed_code:
                problems.append(f"it ran this installation's code ({answer.code}), not its own")
        else:
            with loaded_version(uri) as loaded:
                out = loaded.predict(pd.DataFrame({"image": [image.read_bytes()]}))
        row = out.iloc[0]
        boxes = json.loads(row["boxes"])
        score = float(row["fracture_score"])
        if len(out) != 1:
            problems.append(f"{len(out)} rows for one image")
        if row["error"]:
            problems.append(f"error {row['error']!r}")
        if not math.isclose(float(row["threshold"]), threshold):
            problems.append(f"threshold {row['threshold']} instead of {threshold}")
        if any(len(b) != 5 or b[4] < threshold for b in boxes):
            problems.append(f"boxes not [x0, y0, x1, y1, score >= threshold]: {boxes[:3]}")
        if row["label"] != ("fractured" if score >= threshold else "not_fractured"):
            problems.append(f"label {row['label']!r} for score {score:.4f}")
    except Exception as exc:  # noqa: BLE001 - any failure to load or predict keeps the alias where it is
        return GateCheck("load check", False, f"{uri} failed on {image.name}: {type(exc).__name__}: {exc}")
    if problems:
        return GateCheck("load check", False, f"{uri} on {image.name}: {'; '.join(problems)}")
    return GateCheck("load check", True, f"{uri} found {len(boxes)} boxes on {image.name} (top score {score:.4f})")


#: The version tags a comparison with the champion writes (:func:`map_tags`): a decision taken
#: without one removes those an earlier decision left.
MAP_COMPARISON_TAGS = (
    "gate_compared_with",
    "gate_images",
    "gate_map_50_difference",
    "gate_map_50_difference_ci",
    "gate_p_value",
    "gate_resamples",
    "gate_images_left_out",
)


def map_tags(paired: PairedMAP, champion: str, left_out: int = 0) -> dict[str, str]:
    """The paired comparison as version tags (:data:`MAP_COMPARISON_TAGS`); ``left_out``: the test
    images left out because the champion learnt from them, or from an image linked to them."""
    return {
        "gate_compared_with": champion,
        "gate_images": str(paired.n_images),
        "gate_images_left_out": str(left_out),
        "gate_map_50_difference": f"{paired.difference:.4f}",
        "gate_map_50_difference_ci": f"[{paired.ci_low:.4f}, {paired.ci_high:.4f}] ({paired.confidence:.0%})",
        "gate_p_value": f"{paired.p_value:.4g}",
        "gate_resamples": str(paired.resamples),
    }


def beats_champion(paired: PairedMAP, champion: str, confidence: float) -> GateCheck:
    """Passes when the mAP@0.5 gain is positive and its bootstrap p-value is below ``1 - confidence``."""
    wins, verdict = paired_verdict(paired.difference, paired.p_value, confidence)
    if not paired.measured:
        verdict = ("nothing measured: fewer than two test images (or groups of linked images) with boxes, which every "
                   "resample draws alike; not promoted on it")
    return GateCheck(
        "beats champion",
        wins,
        f"mAP@0.5 {paired.map_a:.4f} vs champion v{champion}'s {paired.map_b:.4f} on the same {paired.n_images} "
        f"images ({paired.n_fractured} with boxes): {paired.difference:+.4f} ({paired.confidence:.0%} CI "
        f"{paired.ci_low:+.4f} to {paired.ci_high:+.4f}, paired bootstrap p = {paired.p_value:.3g}, "
        f"{paired.resamples} resamples), {verdict}",
    )


def register_detector(
    params: DetectParams,
    run_id: str,
    weights: Path,
    described: dict[str, object],
    split: DetectorTestSplit,
    seed: int = 0,
    client: MlflowClient | None = None,
    isolated: bool = True,
) -> Registration:
    """Registers the detector run's model once and promotes it when it passes the detector's gate.

    As the classifier's :func:`fracture.registry.register`: a run registered before is not
    registered again but its gate runs again (an interrupted registration completes); the
    champion stays as it is, and a rolled-back version is not promoted again. A run whose
    threshold, test figures or input checks (``described["input"]``, ``serve`` in params.yaml)
    changed is registered as a new version, which serves them. A champion moved by another
    registration while this one scored or promoted is the one the version is scored against again.
    Where no version holds champion (its version was deleted), the version must beat
    ``previous-champion`` instead, and ``previous-champion``'s own run is left as it is.

    Args:
        params: ``detect``: the model name, the confidence, the floors and the bootstrap resamples.
        run_id: the detector's training run, holding ``detect_evaluate``'s ``test_*`` metrics.
        weights: the detector's safetensors file.
        described: its config, ``threshold`` and ``input`` policy (the pyfunc's ``model.json``).
        split: the test images it was scored on, with their boxes.
        seed: seeds the paired bootstrap.
        client: an MLflow client for the current tracking URI.
        isolated: the load check in a consumer's Python with the version's own code (default);
            ``False``: in this process (tests of the gate's rules).

    Returns:
        The version, the gate's decision and each check.

    Raises:
        RegistryError: the run lacks its test mAP@0.5 or a floor's metric, was evaluated on another
            test split (its ``split_fingerprint`` tag), or at another threshold than it would serve.
    """
    client = client or MlflowClient()
    name = params.model_name
    run = client.get_run(run_id)
    metrics = dict(run.data.metrics)
    missing = [k for k in (SCORE, *params.floors) if k not in metrics]
    if missing:
        raise RegistryError(
            f"detector run {run_id} has no metric {missing}: run `dvc repro detect/dvc.yaml` (detect_evaluate) first"
            + (f", or name one of its metrics in detect.floors: {sorted(metrics)}" if SCORE not in missing else "")
        )
    # The main job drew the split again (new data) and detect/dvc.yaml was not rerun: refused, as the classifier's run.
    require_same_split(run.data.tags.get(TAG_SPLIT), split.fingerprint, f"detector run {run_id}", "detect_evaluate",
                       "the detector's stages (dvc repro detect/dvc.yaml)")
    threshold = float(described["threshold"])
    require_served_threshold(
        metrics.get("test_image_threshold"), threshold,
        f"detector run {run_id}'s test figures were taken at image threshold", "the detector",
        "outputs/detect/metrics.json", "detect_evaluate", "detect/dvc.yaml:detect_evaluate",
    )
    provenance = {
        "classifier_run_id": run.data.tags.get("classifier_run_id"),
        TAG_DATA: run.data.tags.get("data_version") or None,
        **code_tags(run),
        "threshold": threshold,
        TAG_SPLIT: split.fingerprint,
        "metrics": json.dumps(_test_metrics(metrics), sort_keys=True),
        # The checks the pyfunc enforces (fracture.detector_serving reads model.json's input so),
        # in the classifier's form: a serve section changed since makes a new version.
        TAG_POLICY: json.dumps(InputPolicy.from_dict(described.get("input")).to_dict(), sort_keys=True),  # type: ignore[arg-type]
    }
    mv, created = _ensure_version(
        client, name, run, provenance, lambda: log_detector_pyfunc(run_id, weights, described),
        lambda: _description(run, described),
    )
    mv = _record_provenance(client, mv, provenance)
    require_ready(mv, "the gate cannot score it, and it cannot be made champion")
    candidate = Evaluation(str(mv.version), metrics, mv.tags.get(TAG_SPLIT) or split.fingerprint,
                           run.data.tags.get("data_version") or None)

    def decide(current: ModelVersion | None, role: str) -> tuple[_Outcome, dict[str, str] | None]:
        # ``role``: previous-champion where no version holds champion, compared with in its stead.
        checks, compared = _gate(client, params, mv, metrics, current, split, threshold, seed, isolated)
        beat = next((c for c in checks if c.name == "beats champion" and current is not None), None)
        return _verdict(checks, beat.detail if beat else "first version to pass the gate"), compared

    outcome, current = _gate_until_settled(
        client, mv, _alias(client, name, CHAMPION), lambda current: _basis(params, current, split), decide,
        MAP_COMPARISON_TAGS, rollback_command=DETECTOR_ROLLBACK_COMMAND,
    )
    return _registration(client, name, run_id, created, candidate, current, outcome, score_key=SCORE,
                         confidence=params.confidence, floors=params.floors)


def _fractured_among(split: DetectorTestSplit, mask: np.ndarray) -> int:
    """How many of the images ``mask`` marks hold a fracture box."""
    return sum(len(t) > 0 for t, marked in zip(split.truth, mask, strict=True) if marked)


def _description(run: Run, described: dict[str, object]) -> str:
    """The new version's description for the registry's page: what it is and its test figures."""
    m = run.data.metrics
    return (
        f"Fracture detector: {described['architecture']} over a feature pyramid on the classifier's "
        f"{described['backbone']} (classifier run {run.data.tags.get('classifier_run_id')}), images resized to "
        f"{described['image_size']} px on the longer side. Returns boxes [x0, y0, x1, y1, score] per X-ray.\n\n"
        f"Test split: mAP@0.5 {m[SCORE]:.3f} (95% CI {m.get('test_map_50_ci_low', math.nan):.3f}-"
        f"{m.get('test_map_50_ci_high', math.nan):.3f}), mAP@0.5:0.95 {m.get('test_map', math.nan):.3f}; the top box "
        f"as a classifier: sensitivity {m.get('test_image_sensitivity', math.nan):.3f}, specificity "
        f"{m.get('test_image_specificity', math.nan):.3f} at threshold {float(described['threshold']):.4g} (chosen on val)."
    )


def _gate(
    client: MlflowClient,
    params: DetectParams,
    mv: ModelVersion,
    metrics: dict[str, float],
    current: ModelVersion | None,
    split: DetectorTestSplit,
    threshold: float,
    seed: int,
    isolated: bool = True,
) -> tuple[tuple[GateCheck, ...], dict[str, str] | None]:
    """The detector's gate against the champion ``current``: every check, and the comparison's
    version tags (:func:`map_tags`; ``None`` when the two were not compared). The tags are
    written by the caller once the champion is known not to have moved meanwhile.

    Test images the champion learnt from (its run's :data:`fracture.seen.SEEN_ARTIFACT`), and every
    image linked to one of them, are left out of both detectors' scores: after a grown export's
    split is drawn afresh, the champion would otherwise find boxes on images it was trained on, or
    whose near-duplicates it was, which favours it. When no image with a fracture box is left,
    mAP cannot rank the two: they are not compared and the champion stays. A champion whose run
    does not list its images is scored on every image, and the check notes when it was scored on
    another test split.
    """
    name, version = params.model_name, str(mv.version)
    compared = None
    checks = floors(params, metrics)
    if current is None:
        checks += (GateCheck("beats champion", True, "no champion yet"),)
    elif all(c.passed for c in checks):
        champion = str(current.version)
        learnt = _seen_in_training(client, current.run_id)
        seen = None if learnt is None else split.seen_by(learnt)
        left_out = 0 if seen is None else int(seen.sum())
        # A grown export draws its split afresh: the champion may have learnt some of these images,
        # or their near-duplicates, and would be scored on what it learnt.
        if left_out and not _fractured_among(split, ~seen):
            checks += (GateCheck(  # settled: not scored again until the champion or the split changes
                "compared with champion", False,
                f"champion v{champion} was trained or validated on {left_out} of this test split's "
                f"{len(split.paths)} images (or on images linked to them), and the other "
                f"{len(split.paths) - left_out} hold no fracture box: mAP@0.5 cannot rank the two, so they are not "
                f"compared, and the champion stays. Weigh v{version} by its own test figures, on images it never "
                "learnt from",
            ),)
        else:
            scored = split.without(seen) if left_out else split
            try:
                ours, _ = served_detections(name, version, scored)
                theirs, _ = served_detections(name, champion, scored)
            except Exception as exc:  # noqa: BLE001 - a pair that cannot be scored is not compared
                checks += (GateCheck("scored with champion", False, f"v{version} and champion v{champion} could not "
                                     f"both be scored on this test split: {type(exc).__name__}: {exc}"),)
            else:
                detail = f"v{version} and champion v{champion} found boxes through the registry on "
                if left_out:
                    detail += (f"{len(scored.paths)} of this test split's {len(split.paths)} images "
                               f"({scored.n_fractured} with boxes): the other {left_out}, which champion v{champion} "
                               "was trained or validated on (or which are linked to such an image), are left out")
                else:
                    detail += f"this test split's {len(split.paths)} images"
                if seen is None and current.tags.get(TAG_SPLIT) != split.fingerprint:
                    detail += ("; the champion was scored on another test split and may have been trained on some "
                               "of these images, which favours it (its run does not list the images it learnt from)")
                paired = paired_bootstrap_map(scored.truth, ours, theirs, params.bootstrap_resamples, seed,
                                              params.confidence, groups=scored.groups or None)
                compared = map_tags(paired, champion, left_out)
                checks += (GateCheck("scored with champion", True, detail),
                           beats_champion(paired, champion, params.confidence))
    if all(c.passed for c in checks):
        checks += (load_check(name, version, split.check_image, threshold, isolated),)
    return checks, compared
