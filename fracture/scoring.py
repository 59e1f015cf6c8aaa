"""A registered version scored as a consumer would score it, for the promotion gate.

:func:`load_check` loads ``models:/<name>/<version>`` and predicts one real image before any
alias moves; :func:`paired_scores` scores a version and the champion on the version's test
split, each through the registry and the one inference path, so that the gate compares the
two on the same images. By default (``isolated``) each version loads and scores in a Python of
its own that sees only its requirements and its own packaged code (:mod:`fracture.consumer`),
as a consumer loads it: a version whose packaged code is broken fails the load check, and a
champion logged by older code is scored by that code, not by this process's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from fracture.consumer import (
    ConsumerAnswer,
    ConsumerError,
    loaded_version,
    predict_as_consumer,
)
from fracture.gate import (
    EvaluatedSplit,
    Evaluation,
    GateCheck,
    PairedScores,
    SplitTableError,
)
from fracture.serving import FracturePyfunc


def load_check(
    name: str, version: str, image: Path, threshold: float, isolated: bool = True, answer: ConsumerAnswer | None = None
) -> GateCheck:
    """Loads ``models:/<name>/<version>`` as a consumer would and predicts one real image.

    Args:
        name: the registered model name.
        version: the version to load.
        image: a real X-ray file.
        threshold: the decision threshold the model must report.
        isolated: in a consumer's Python with the version's own code (:mod:`fracture.consumer`);
            ``False``: in this process, whose installed code the version then runs.
        answer: what the version already answered in a consumer's Python (its scoring on the
            test split): when it holds ``image``, that row is checked instead of loading the
            version a second time; the same load, the same code, the same row.

    Returns:
        A passed check naming the prediction, or a failed one naming what went wrong.
    """
    uri = f"models:/{name}/{version}"
    try:
        problems = []
        if isolated or answer is not None:
            key = str(image.resolve())
            if answer is None or key not in answer.files:
                answer = predict_as_consumer(uri, [image])
            out = answer.rows.iloc[[answer.files.index(key)]]
            if answer.ran_installed_code:
                problems.append(f"it ran this installation's code ({answer.code}), not its own")
        else:
            with loaded_version(uri) as loaded:
                out = loaded.predict(pd.DataFrame({"image": [image.read_bytes()]}))
        prob = float(out["fracture_probability"].iloc[0])
        if len(out) != 1:
            problems.append(f"{len(out)} rows for one image")
        if "error" in out and out["error"].iloc[0]:
            problems.append(f"error {out['error'].iloc[0]!r}")
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


def served_scores(
    name: str, version: str, split: EvaluatedSplit, batch_size: int = 32, isolated: bool = True
) -> tuple[np.ndarray, float]:
    """Scores a registered version on every image of ``split``, as a consumer of the registry would.

    The version is loaded through ``models:/<name>/<version>`` and scores through its own
    classifier, with the preprocessing and input checks it was logged with. ``isolated``
    (default): in a consumer's Python with the version's own packaged code
    (:mod:`fracture.consumer`); a file its checks refuse fails the scoring. ``False``: in this
    process, with this installation's code, images decoded as the prepared cache was (files
    that end early are kept when ``split.allow_truncated``).

    Args:
        name: the registered model name.
        version: the version to score.
        split: the test split, with every image path and label.
        batch_size: images decoded and scored together in this process; bounds the memory
            full-size X-rays take.
        isolated: see above.

    Returns:
        The fracture probability of each image (float64, in the split's order) and the
        version's served threshold.

    Raises:
        SplitTableError: the split carries no images to score, or rows without an image path.
        TypeError: the version is no fracture classifier.
        ConsumerError: isolated, the version did not load or answer, or refused a file.
    """
    probs, threshold, _ = _scored(name, version, split, batch_size, isolated)
    return probs, threshold


def _scored(
    name: str, version: str, split: EvaluatedSplit, batch_size: int = 32, isolated: bool = True
) -> tuple[np.ndarray, float, ConsumerAnswer | None]:
    """:func:`served_scores`, and the consumer's answer it read them from (``None``: in this process)."""
    if not split.paths:
        raise SplitTableError("the test split carries no image paths to score on")
    if len(split.paths) != split.images:
        raise SplitTableError(
            f"{split.images - len(split.paths)} of the test split's {split.images} rows have no image path; "
            "rebuild it with `dvc repro split`"
        )
    uri = f"models:/{name}/{version}"
    if isolated:
        answer = predict_as_consumer(uri, list(split.paths))
        rows = answer.rows
        # A version logged up to 2026-11-30 answers without an error column: it raised on a file it refused.
        errors = rows["error"] if "error" in rows else [""] * len(rows)
        refused = [(p, e) for p, e in zip(split.paths, errors, strict=True) if e]
        if refused:
            raise ConsumerError(
                f"{uri} refused {len(refused)} of the test split's {len(split.paths)} images, e.g. "
                f"{Path(refused[0][0]).name}: {refused[0][1]}"
            )
        return rows["fracture_probability"].to_numpy(dtype=np.float64), float(rows["threshold"].iloc[0]), answer
    with loaded_version(uri) as loaded:  # the network is in memory once loaded; its files can go
        served = loaded.unwrap_python_model()
    if not isinstance(served, FracturePyfunc):
        raise TypeError(f"{uri} is a {type(served).__name__}, not a model logged by fracture.packaging")
    classifier = served.classifier
    probs = []
    # Decoded a batch at a time, so the split's full-size X-rays are never all in memory at once.
    for start in range(0, len(split.paths), batch_size):
        chunk = split.paths[start : start + batch_size]
        images = [classifier.preprocessor.open(p, split.allow_truncated) for p in chunk]
        probs.append(classifier.probabilities(images, batch_size))
    # float64 as the evaluate stage compares them with the threshold.
    return np.concatenate(probs).astype(np.float64), float(classifier.threshold), None


def paired_scores(
    name: str, candidate: str, champion: str, split: EvaluatedSplit, isolated: bool = True
) -> PairedScores:
    """The version and the champion, each loaded from the registry and scored on ``split``'s images.

    Both go through the same path, so the comparison does not depend on how either was
    evaluated when it was trained, nor on which split that was; ``isolated``: each with its own
    packaged code, as its consumers score it (:func:`served_scores`).
    """
    return _paired(name, candidate, champion, split, isolated)[0]


def _paired(
    name: str, candidate: str, champion: str, split: EvaluatedSplit, isolated: bool
) -> tuple[PairedScores, ConsumerAnswer | None]:
    """:func:`paired_scores`, and the candidate's answer in its consumer's Python (``None``: in this process)."""
    ours, our_threshold, answer = _scored(name, candidate, split, isolated=isolated)
    theirs, their_threshold, _ = _scored(name, champion, split, isolated=isolated)
    groups = np.array(split.groups) if split.groups else None
    return PairedScores(np.array(split.labels), ours, our_threshold, theirs, their_threshold, champion, groups), answer


def scored_with_champion(
    name: str, candidate: Evaluation, champion: Evaluation, split: EvaluatedSplit, isolated: bool = True
) -> tuple[PairedScores | None, GateCheck, ConsumerAnswer | None]:
    """Scores the version and the champion on the same images, and the check saying how it went.

    A pair that cannot be scored gives no scores and a failed check, so the champion stays.
    Images the champion was trained or validated on (its run's list,
    :data:`fracture.seen.SEEN_ARTIFACT`), and every image linked to one of them, are left out of
    both models' scores: after a grown export's split is drawn afresh, the champion would otherwise
    be scored on what it learnt, which favours it. When too few are left to rank (no image of a
    class), the pair is not compared and the check fails. A champion whose run does not list its
    images is compared on every image, and the check notes when it was evaluated on another test
    split or data version.
    The third item is the version's answer in its consumer's Python (``isolated``), which
    :func:`load_check` reads instead of loading the version once more.
    """
    v = champion.version
    try:
        scores, answer = _paired(name, str(candidate.version), str(v), split, isolated)
    except Exception as exc:  # noqa: BLE001 - a pair that cannot be scored is not compared
        return None, GateCheck(
            "scored with champion", False, f"v{candidate.version} and champion v{v} could not both be scored on "
            f"this test split: {type(exc).__name__}: {exc}"
        ), None
    labels = scores.labels
    detail = (
        f"v{candidate.version} and champion v{v} scored through the registry on this test split's "
        f"{len(labels)} images ({int(labels.sum())} fractured)"
    )
    seen = None if champion.seen is None else split.seen_by(champion.seen)
    if seen is not None and seen.any():
        # A grown export draws its split afresh: the champion may have trained on some of these
        # images, or on their near-duplicates, and would be scored on what it learnt.
        scores = scores.without(seen)
        kept = scores.labels
        if kept.sum() == 0 or kept.sum() == len(kept):
            # Settled, unlike a pair that could not be scored: the same images give the same answer
            # until the champion or the split changes, so it is not scored again on every run.
            return None, GateCheck(
                "compared with champion", False, f"{detail}; champion v{v} was trained or validated on {int(seen.sum())} "
                f"of them (or on images linked to them), and the other {len(kept)} ({int(kept.sum())} fractured) "
                "cannot rank the two: they are not compared, and the champion stays. Weigh the newcomer by its "
                "cross-validated (out-of-fold) figures"
            ), answer
        detail += (
            f"; {int(seen.sum())} of them, which champion v{v} was trained or validated on (or which are linked "
            f"to such an image), are left out: the two are compared on the other {len(kept)} "
            f"({int(kept.sum())} fractured)"
        )
    elif seen is None and (champion.split_fingerprint, champion.data_version) != (split.fingerprint, candidate.data_version):
        # Against the split scored now: the candidate was evaluated on it (fracture.registry checks).
        detail += (
            "; the champion was evaluated on another test split or data version and may have been trained "
            "on some of these images, which favours it (its run does not list the images it trained on, or the "
            "list could not be read)"
        )
    return scores, GateCheck("scored with champion", True, detail), answer
