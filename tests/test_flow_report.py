"""The retrain flow's Markdown report and the register task's retry decision (no training)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest
import requests
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect.states import exception_to_failed_state

from flows.report import (
    METRIC_ROWS,
    no_champion_note,
    render_failure_report,
    render_report,
)
from flows.result import RetrainResult, SinceChampion, VersionOrigin
from fracture.data_config import DataConfig
from fracture.evaluation import PairedAUC
from fracture.gate import Comparison
from fracture.registry import Registration
from fracture.workspace import (
    EvaluateResult,
    PrepareResult,
    SplitResult,
    TrainedModel,
    TrainResult,
    ValidateResult,
)
from tasks.pipeline import (
    DVC_STAGES,
    IngestSummary,
    StageRun,
    register_task,
    retry_transient_registry,
)

METRICS = {
    "accuracy": 0.81,
    "precision": 0.42,
    "recall": 0.875,
    "specificity": 0.7931,
    "f1": 0.5676,
    "roc_auc": 0.9012,
    "average_precision": 0.6234,
    "threshold": 0.3125,
    "n_images": 37.0,  # metrics.json stores counts as floats
    "n_fractured": 8.0,
    "roc_auc_ci_low": 0.8011,
    "roc_auc_ci_high": 0.9733,
    "recall_ci_low": 0.625,
    "recall_ci_high": 1.0,
    "specificity_ci_low": 0.6552,
    "specificity_ci_high": 0.931,
    "ece": 0.0712,
    "brier": 0.1153,
}


CONFIG = DataConfig((3, 224, 224), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
COMPARISON = Comparison("2", PairedAUC(0.9012, 0.8875, 0.0137, 0.0021, 0.0253, 0.0207, 0.95, 37, 8), 0.875, 0.8571,
                        0.7931, 0.8276)


def result(
    *, ran: bool, previous: str | None, created: bool, champion: bool = True, reason: str = "",
    comparison: Comparison = COMPARISON,
) -> RetrainResult:

    registration = Registration(
        name="fracture-classifier",
        version="3" if created else "2",
        run_id="0123abcd",
        created=created,
        champion=champion,
        score=0.9012,
        reason=reason or ("ROC AUC 0.9012 beats champion v2's 0.8875" if created else "already champion"),
        comparison=comparison if created else None,
        confidence=0.95,
        sensitivity_tolerance=0.02,
        specificity_tolerance=0.05,
    )
    return RetrainResult(
        profile="cpu",
        ingest=IngestSummary("new-md5.dir", 4.2, previous),
        runs={name: StageRun(name, ran, 12.5, 11.25) if ran else StageRun(name, ran, 0.8) for name in DVC_STAGES},
        validate=ValidateResult(True, {"images": 250}, [], {f"IMG{i}.jpg": {"rule": "decodable", "reason": "-"} for i in range(3)}, [["a", "b"]]),
        split=SplitResult({"train": 175, "val": 38, "test": 37}, {"train": 38, "val": 8, "test": 8}),
        prepare=PrepareResult(250, [3, 224, 224], "squash", "none", 80.0),
        train=TrainResult(TrainedModel("tf_efficientnet_lite0", "cpu", ["not_fractured", "fractured"], CONFIG, 4, 0.88), "0123abcd", "1"),
        evaluate=EvaluateResult(METRICS, {"tn": 23, "fp": 6, "fn": 1, "tp": 7}),
        registration=registration,
    )


def table_row(text: str, label: str) -> list[str]:
    """The cells of the Markdown table row whose first cell is ``label``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in:\n{text}")


def test_unchanged_run_says_nothing_changed():
    unchanged = result(ran=False, previous="new-md5.dir", created=False)
    assert unchanged.nothing_changed
    text = render_report(unchanged)
    assert "**Nothing changed**" in text and "Retrained" not in text
    # The headline claims what DVC checked (data, and the code and params its stages depend on), not
    # the installed packages: an upgraded torch or timm is no DVC dependency.
    headline = text.splitlines()[2]
    assert "same data version, code and parameters" not in headline
    assert "their code and params as `dvc.lock` records them" in headline
    assert "installed packages, torch and timm among them, are no DVC dependency" in headline
    assert "## Since the champion" not in text  # no new version: nothing to set against the champion
    for stage in ("validate", "split", "prepare", "train", "evaluate"):
        assert table_row(text, stage)[1:] == ["up to date", "0.8", "", ""]
    assert table_row(text, "Data changed")[1] == "no"
    assert table_row(text, "Registered by this run")[1] == "no (already registered)"
    assert table_row(text, "Reason")[1] == "already champion"
    assert table_row(text, "Compared with the champion")[1] == "no: this version already is the champion"


def test_new_data_version_reports_the_retraining_and_the_gate():
    changed = result(ran=True, previous="old-md5.dir", created=True)
    assert not changed.nothing_changed
    text = render_report(changed)
    assert "**Retrained**: new data version `new-md5.dir` (was `old-md5.dir`)" in text
    assert "DVC ran validate, split, prepare, train, evaluate" in text
    assert "Test split: 37 images, 8 fractured" in text
    # The intervals' methods, where the card is, and what the model is not for (the report named none).
    assert "sensitivity's and specificity's Wilson score intervals over each class's effective number" in text
    assert "`outputs/evaluate/model_card.md`" in text and "NOT FOR CLINICAL USE." in text
    # Whether the figures meet the project's bar, which the gate's floors are far below.
    assert ("The project's quality bar (ROC AUC ≥ 0.92, sensitivity ≥ 0.85, specificity ≥ 0.85, at the decision "
            "threshold; docs/recipe.md): **not met** (ROC AUC 0.901 < 0.92; specificity 0.793 < 0.85)") in text
    # The command's seconds and DVC's work around it, when DVC ran it; the up-to-date check alone otherwise.
    assert table_row(text, "train")[1:] == ["ran", "12.5", "11.2", "1.2"]
    assert table_row(text, "Data version (DVC md5 of `data`)")[1] == "`new-md5.dir`"
    assert table_row(text, "Split (images)")[1] == "train 175, val 38, test 37"
    assert table_row(text, "Excluded by validation")[1] == (
        "3 (decodable 3); each image with its rule and reason under `excluded` in `outputs/validate/report.json`"
    )
    # Every metric row carries the value from metrics.json; intervals where the stage gives them.
    assert table_row(text, "ROC AUC")[1:] == ["0.9012", "0.8011 – 0.9733"]
    assert table_row(text, "Sensitivity (recall)")[1:] == ["0.8750", "0.6250 – 1.0000"]
    assert table_row(text, "Specificity")[1:] == ["0.7931", "0.6552 – 0.9310"]
    for label, value in {"Precision": 0.42, "F1": 0.5676, "Average precision": 0.6234, "Accuracy": 0.81,
                         "Decision threshold": 0.3125, "Expected calibration error": 0.0712,
                         "Brier score": 0.1153}.items():
        assert table_row(text, label)[1] == f"{value:.4f}", label
    assert len(METRIC_ROWS) == 10  # the three above and these seven: no row left out
    assert table_row(text, "Precision")[2] == ""
    assert table_row(text, "Model")[1] == "fracture-classifier version 3"
    assert table_row(text, "Holds `champion`")[1] == "yes"
    assert table_row(text, "Test ROC AUC (evaluate stage)")[1] == "0.9012"
    assert table_row(text, "Compared with")[1] == "champion version 2, on the same 37 test images"
    # The champion is compared on the images it never learnt from, and the report says how many it had.
    seen = result(ran=True, previous="old-md5.dir", created=True, comparison=dataclasses.replace(COMPARISON, left_out=6))
    assert table_row(render_report(seen), "Compared with")[1] == (
        "champion version 2, on the same 37 test images (6 it was trained or validated on, or linked to such, left out)"
    )
    assert table_row(text, "ROC AUC, this version vs champion")[1] == "0.9012 vs 0.8875"
    assert table_row(text, "AUC difference (95% CI)")[1] == "+0.0137 (+0.0021 to +0.0253)"
    assert table_row(text, "DeLong p-value (needs < 0.05)")[1] == "0.0207"
    assert table_row(text, "Sensitivity change at served thresholds (tolerance 0.02)")[1] == "+0.0179 (0.8750 vs 0.8571)"
    assert table_row(text, "Specificity change at served thresholds (tolerance 0.05)")[1] == "-0.0345 (0.7931 vs 0.8276)"
    assert table_row(text, "Reason")[1] == "ROC AUC 0.9012 beats champion v2's 0.8875"


def test_a_model_that_loses_the_gate_is_reported_as_not_champion():
    loser = result(ran=True, previous="old-md5.dir", created=True, champion=False, reason="below floor | recall\n0.61")
    text = render_report(loser)
    assert "| Reason | below floor \\| recall 0.61 |" in text  # one table row, pipe escaped
    assert table_row(text, "Holds `champion`")[1] == "no"
    assert table_row(text, "Registered by this run")[1] == "yes"


def challenger(previous: str | None, **registration: object) -> RetrainResult:
    """A new version that lost the gate and holds ``challenger``, its registration changed as given."""
    lost = result(ran=True, previous=previous, created=True, champion=False)
    changes = {"decision": "challenger", "aliases": ("challenger",)} | registration
    return dataclasses.replace(lost, registration=dataclasses.replace(lost.registration, **changes))


def test_the_headline_says_a_version_that_lost_the_gate_was_not_promoted_and_why():
    from flows.result import AliasMove
    from fracture.gate import GateCheck

    checks = (GateCheck("floor test_recall", True, "0.8750 >= 0.8"), GateCheck("beats champion", False, "not higher"),
              GateCheck("sensitivity kept", False, "-0.0500 < -0.02"))
    lost = challenger("old-md5.dir", champion_version="2", checks=checks)
    moved = dataclasses.replace(lost, moves=(AliasMove("challenger", None, "3"),))
    assert render_report(moved).splitlines()[2].endswith(
        "fracture-classifier version 3 registered, not promoted: champion stays version 2 (failed: beats champion, "
        "sensitivity kept); aliases moved: `challenger` none → version 3."
    )
    first = challenger(None, checks=(GateCheck("floor test_recall", False, "0.7791 < 0.8"),))
    assert render_report(first).splitlines()[2].endswith(
        "fracture-classifier version 3 registered, not promoted: no version holds `champion` (failed: floor test_recall)."
    )
    # A champion's headline and a promotion's say nothing of the kind.
    assert "not promoted" not in render_report(result(ran=True, previous="old-md5.dir", created=True)).splitlines()[2]

    # A scheduled run that finds nothing new keeps the challenger's recorded decision: it says so.
    unchanged = result(ran=False, previous="new-md5.dir", created=False, champion=False)
    decided = dataclasses.replace(unchanged.registration, champion_version="1", aliases=("challenger",), reason=(
        "already decided against champion v1, on this test split and these rules: stays challenger (beats champion: "
        "higher, but not with 95% confidence)"))
    text = render_report(dataclasses.replace(unchanged, registration=decided))
    assert text.splitlines()[2].endswith(
        "(fracture-classifier version 2 is the model these outputs belong to). Not promoted: champion stays version 1 "
        "(lost the gate before, on this test split and these rules)."
    )
    assert table_row(text, "Compared with the champion")[1] == (
        "no: decided before against champion version 1, on this test split and these rules; the recorded decision "
        "stands (see Reason)"
    )


def test_a_comparison_with_no_spread_reports_no_zero_width_interval_and_names_the_p_value_s_test():
    """Two versions that rank every test image alike: DeLong's variance is 0 and the report showed
    "+0.0000 (+0.0000 to +0.0000)" and "DeLong p-value 1", as if the difference were known to be 0.
    The rows come from the real DeLong function, here as in the gate."""
    import numpy as np

    from fracture.gate import PairedScores, compare

    y = np.r_[np.ones(10), np.zeros(27)].astype(int)
    champion = np.linspace(0.05, 0.95, 37)[np.random.default_rng(0).permutation(37)]

    def rows(candidate: np.ndarray) -> str:
        comparison = compare(PairedScores(y, candidate, 0.5, champion, 0.5, "2"), 0.95)
        r = result(ran=True, previous="old-md5.dir", created=True, champion=False, comparison=comparison)
        return render_report(r)

    same = rows(champion ** 2)  # a monotone rescaling: the same ranking
    assert table_row(same, "AUC difference (no interval)")[1] == (
        "+0.0000: no interval: the two rank the fractured against the non-fractured images alike, image by image, "
        "so there is no difference to measure"
    )
    assert table_row(same, "p-value (needs < 0.05)")[1] == "none: no difference to measure"
    assert "+0.0000 to +0.0000" not in same and "DeLong p-value" not in same

    # A perfect ranking against its inverse: the p-value is the randomisation test's, and named so.
    champion = np.r_[np.linspace(0.1, 0.4, 10), np.linspace(0.5, 0.9, 27)]
    fixed = rows(1 - champion)
    assert table_row(fixed, "AUC difference (no interval)")[1].startswith(
        "+1.0000: no interval: the difference is the same at every image")
    assert table_row(fixed, "p-value (needs < 0.05)")[1] == "0.0001 (paired randomisation test)"


def test_the_comparison_row_says_why_the_version_was_not_compared():
    def compared(**changes: object) -> str:
        r = result(ran=True, previous="old-md5.dir", created=True, comparison=None)
        registration = dataclasses.replace(r.registration, comparison=None, **changes)
        return table_row(render_report(dataclasses.replace(r, registration=registration)), "Compared with the champion")[1]

    assert compared(decision="promoted", reason="first version to pass the gate") == "no: there was no champion"
    assert compared(champion=False, decision="challenger", champion_version="2", reason="floor test_recall: 0.7 < 0.8") == (
        "no: decided without scoring champion version 2 (a floor failed, or the champion could not be scored: see the "
        "gate checks and Reason)"
    )
    rolled_back = "version 3 was rolled back from champion at 2026-11-30T08:00:00Z; it is not promoted again automatically"
    assert compared(champion=False, champion_version="2", reason=rolled_back) == (
        "no: this version was rolled back from champion; it is not scored again"
    )


def test_a_version_decided_against_previous_champion_in_the_champions_stead_names_it():
    """No version held champion (its version deleted): the gate compared with previous-champion v1
    instead, as the registry records it (the reason, `gate_compared_with`, `replaced_version`), and the
    report called that version "champion version 1", or said "there was no champion"."""
    from fracture.gate import GateCheck

    stand_in = dataclasses.replace(COMPARISON, champion_version="1", against="previous-champion")
    lost = challenger(None, previous_champion="1", stand_in="1", comparison=stand_in, reason=(
        "no version holds champion (...): compared with previous-champion v1, the last champion the registry holds, "
        "instead; beats champion: ..."), checks=(GateCheck("beats champion", False, "not higher"),))
    text = render_report(lost)
    assert table_row(text, "Compared with")[1] == (
        "previous-champion version 1, standing in for the champion (no version held `champion`), on the same 37 test "
        "images"
    )
    assert table_row(text, "ROC AUC, this version vs previous-champion")[1] == "0.9012 vs 0.8875"
    assert table_row(text, "Champion before this run")[1] == "none; `previous-champion` version 1 stood in for it"
    assert text.splitlines()[2].endswith(
        "not promoted: no version holds `champion`; `previous-champion` version 1 stood in for it (failed: beats "
        "champion).")
    assert "champion version 1" not in text.replace("previous-champion version 1", "")
    # What the version was built from is set against previous-champion, and says so.
    since = render_report(dataclasses.replace(lost, since_champion=SinceChampion(origin("1", "old-run"), origin("3", "r"))))
    assert "## Since previous-champion (version 1), standing in for the champion" in since
    assert "| | Previous-champion (version 1) | This run's (version 3) |" in since
    assert "## Since the champion" not in since and "against previous-champion version 1:" in since

    # Decided without scoring it (a floor failed), or decided before against it: named all the same.
    def compared(**changes: object) -> str:
        registration = dataclasses.replace(lost.registration, comparison=None, **changes)
        return table_row(render_report(dataclasses.replace(lost, registration=registration)), "Compared with the champion")[1]

    assert compared(reason="floor test_recall: 0.7 < 0.8") == (
        "no: decided without scoring previous-champion version 1, standing in for the champion (no version held "
        "`champion`) (a floor failed, or previous-champion could not be scored: see the gate checks and Reason)"
    )
    assert compared(decision="unchanged", reason="already decided with no champion, against previous-champion v1 in its "
                                                 "stead, on this test split and these rules: stays challenger (...)") == (
        "no: decided before against previous-champion version 1, standing in for the champion (no version held "
        "`champion`), on this test split and these rules; the recorded decision stands (see Reason)"
    )
    # previous-champion's own run registered again: not judged against itself.
    assert compared(version="1", decision="unchanged", stand_in=None, reason="no version holds champion (...); this "
                    "version is previous-champion: ...") == (
        "no: no version holds `champion`, and this version is `previous-champion`, which a rollback restores (see Reason)"
    )
    assert compared(stand_in=None, previous_champion=None, decision="promoted", reason=(
        "no version holds champion or previous-champion (...; earlier champions: 2): promoted on the floors and the "
        "load check alone, compared with none")) == "no: no version held `champion` or `previous-champion` (see Reason)"


def test_each_gate_check_is_a_row_of_the_report():
    from fracture.gate import GateCheck

    loser = challenger(
        "old-md5.dir",
        champion_version="2",
        checks=(
            GateCheck("floor test_recall", True, "0.8750 >= 0.8"),
            GateCheck("beats champion", False, "ROC AUC 0.9012 vs champion v2's 0.9000 on the same 37 images: +0.0012 (95% CI -0.0101 to +0.0125, DeLong p = 0.84), higher, but not with 95% confidence"),
        ),
    )
    text = render_report(loser)
    assert table_row(text, "Decision")[1] == "challenger"
    assert table_row(text, "Champion before this run")[1] == "version 2"
    assert table_row(text, "Aliases now")[1] == "challenger"
    assert table_row(text, "floor test_recall")[1:] == ["pass", "0.8750 >= 0.8"]
    assert table_row(text, "beats champion")[1] == "**fail**"
    assert "not with 95% confidence" in table_row(text, "beats champion")[2]


def test_a_run_that_leaves_the_registry_without_a_champion_says_so_and_what_to_do():
    from fracture.gate import GateCheck

    first = challenger(
        None,
        reason="floor test_recall: 0.7791 < 0.8",
        checks=(GateCheck("floor test_roc_auc", True, "0.9012 >= 0.85"), GateCheck("floor test_recall", False, "0.7791 < 0.8")),
    )
    note = no_champion_note(first.registration)
    assert "`models:/fracture-classifier@champion` has nothing to load" in note
    assert "version 3 stays `challenger` (floor test_recall: 0.7791 < 0.8)" in note  # the failed check, not the passed
    assert "floor test_roc_auc" not in note
    assert "Cross-validating a recipe" in note
    assert f"**No champion.** {note}" in render_report(first)

    # A champion from before still serves; a version that is champion needs no note.
    kept = dataclasses.replace(first.registration, champion_version="2")
    assert no_champion_note(kept) is None
    assert "**No champion.**" not in render_report(dataclasses.replace(first, registration=kept))
    assert no_champion_note(result(ran=True, previous=None, created=True).registration) is None


def test_with_the_champion_version_deleted_the_note_names_previous_champion_and_the_rollback():
    """No champion because its version was deleted, and previous-champion remains: one rollback serves
    again, where the note gave a first version's advice (stop chasing the floors, train on a GPU)."""
    from fracture.gate import GateCheck

    lost = challenger(
        None, previous_champion="1",
        reason="no version holds champion (...): compared with previous-champion v1, ...",
        checks=(GateCheck("beats champion", False, "ROC AUC 0.5 vs champion v1's 0.9, not higher"),),
    ).registration
    note = no_champion_note(lost)
    assert note is not None and "`previous-champion` is version 1, the last champion the registry holds" in note
    assert '`fracture rollback --reason "..."` restores it as champion' in note
    assert "Version 3 stays `challenger` (beats champion: ROC AUC 0.5 vs champion v1's 0.9, not higher)" in note
    assert "floors" not in note and "GPU" not in note
    detector = dataclasses.replace(lost, name="fracture-detector")
    assert '`fracture rollback --detector --reason "..."`' in no_champion_note(detector, detector=True)
    # previous-champion's own run registered again: it is the version the rollback restores.
    kept = dataclasses.replace(lost, version="1", decision="unchanged")
    assert no_champion_note(kept).endswith("once it loads as a consumer would.")
    # The first detector that fails its gate: the floor advice is the classifier's.
    assert no_champion_note(dataclasses.replace(detector, previous_champion=None), detector=True) is None


def test_same_data_but_changed_params_is_a_retraining():
    # e.g. more epochs: the data version is the same, yet DVC reruns train and evaluate.
    rerun = result(ran=True, previous="new-md5.dir", created=True)
    assert not rerun.nothing_changed
    assert "**Retrained**: same data version `new-md5.dir`" in render_report(rerun)


def test_stages_restored_from_dvcs_run_cache_are_not_reported_as_retrained():
    # The data went back to an earlier version: DVC restored every stage's outputs from its run
    # cache, and the version those outputs belong to was registered before.
    back = dataclasses.replace(
        result(ran=True, previous="newer-md5.dir", created=False),
        runs={name: StageRun(name, True, 0.9) for name in DVC_STAGES},
    )
    assert back.stages_ran == [] and back.stages_restored == list(DVC_STAGES) and not back.nothing_changed
    text = render_report(back)
    assert "Retrained" not in text
    assert text.count("**Restored**: new data version `new-md5.dir` (was `newer-md5.dir`); DVC ran no stage and "
                      "restored validate, split, prepare, train, evaluate from its run cache") == 1
    for stage in DVC_STAGES:
        assert table_row(text, stage)[1:] == ["restored", "0.9", "", ""]


def test_thresholds_are_printed_as_the_model_card_prints_them_not_rounded_to_zero():
    from flows.result import DetectorResult
    from fracture.model_card import _fmt_threshold

    run = result(ran=True, previous="old-md5.dir", created=True)
    tiny = dataclasses.replace(run, evaluate=EvaluateResult(dict(METRICS, threshold=8e-06), run.evaluate.confusion))
    detector = DetectorResult({}, {"map_50": 0.41, "image_threshold": 3.2e-05}, run.registration)
    text = render_report(dataclasses.replace(tiny, detector=detector))
    assert table_row(text, "Decision threshold")[1] == "8e-06" == _fmt_threshold(8e-06)  # as the card says
    assert table_row(text, "Image-level threshold (chosen on val)")[1] == "3.2e-05"
    assert table_row(text, "mAP@0.5")[1] == "0.4100"  # other metrics keep four decimals


def test_the_images_validation_left_out_are_counted_by_rule_and_the_list_named():
    run = result(ran=True, previous="old-md5.dir", created=True)
    excluded = {
        "IMG1.jpg": {"rule": "decodable", "reason": "truncated JPEG"},
        "IMG2.jpg": {"rule": "unique_content", "reason": "the same bytes as IMG9.jpg"},
        "IMG3.jpg": {"rule": "unique_content", "reason": "the same bytes as IMG8.jpg"},
        "IMG4.jpg": {"rule": "folder_label_matches_csv", "reason": "folder says fractured, dataset.csv not"},
    }
    text = render_report(dataclasses.replace(run, validate=dataclasses.replace(run.validate, excluded=excluded)))
    assert table_row(text, "Excluded by validation")[1] == (
        "4 (unique_content 2, decodable 1, folder_label_matches_csv 1); each image with its rule and reason under `excluded` in "
        "`outputs/validate/report.json`"
    )
    none = render_report(dataclasses.replace(run, validate=dataclasses.replace(run.validate, excluded={})))
    assert table_row(none, "Excluded by validation")[1] == "0"


def test_missing_metrics_render_as_not_available():
    old = result(ran=True, previous=None, created=True)
    metrics = {k: v for k, v in METRICS.items() if k not in {"ece", "brier", "roc_auc_ci_low"}}
    text = render_report(dataclasses.replace(old, evaluate=EvaluateResult(metrics, old.evaluate.confusion)))
    assert table_row(text, "Expected calibration error")[1] == "n/a"
    assert table_row(text, "ROC AUC")[1:] == ["0.9012", ""]
    assert "quality bar" in text
    without = {k: v for k, v in METRICS.items() if k != "specificity"}
    text = render_report(dataclasses.replace(old, evaluate=EvaluateResult(without, old.evaluate.confusion)))
    assert "quality bar" not in text  # not judged on a figure that is missing
    assert table_row(text, "Data version of the last completed run")[1] == "none"


def _failed(exc: BaseException):
    return asyncio.run(exception_to_failed_state(exc))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_register_retries_an_unreachable_tracking_server(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(MlflowException) as info:
        MlflowClient(f"http://127.0.0.1:{_closed_port()}").get_run("0123abcd")
    assert retry_transient_registry(register_task, None, _failed(info.value))  # type: ignore[arg-type]
    assert retry_transient_registry(register_task, None, _failed(ConnectionResetError("reset by peer")))  # type: ignore[arg-type]


def test_register_does_not_retry_what_a_retry_cannot_fix(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(MlflowException) as info:
        client.get_run("0123abcd")  # no such run: retrying changes nothing
    assert info.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert not retry_transient_registry(register_task, None, _failed(info.value))  # type: ignore[arg-type]
    missing_metric = KeyError("run 0123abcd has no metric 'test_roc_auc'; run the evaluate stage first")
    assert not retry_transient_registry(register_task, None, _failed(missing_metric))  # type: ignore[arg-type]
    assert register_task.retry_condition_fn is retry_transient_registry
    # INTERNAL_ERROR is MLflow's code for any error raised without one: an out-of-date schema stays.
    stale_schema = MlflowException("Detected out-of-date database schema (found version 1, but expected 2)")
    assert stale_schema.error_code == "INTERNAL_ERROR"
    assert not retry_transient_registry(register_task, None, _failed(stale_schema))  # type: ignore[arg-type]
    busy = MlflowException("(sqlite3.OperationalError) database is locked")
    assert retry_transient_registry(register_task, None, _failed(busy))  # type: ignore[arg-type]
    untrusted = requests.exceptions.SSLError("certificate verify failed: self-signed certificate")
    assert not retry_transient_registry(register_task, None, _failed(untrusted))  # type: ignore[arg-type]


def test_a_run_that_reproduces_nothing_but_promotes_says_so_in_its_headline():
    # register.floors lowered in params.yaml (no DVC param): DVC finds every stage up to date, and
    # the gate now promotes last week's challenger, version 2, over version 1.
    unchanged = result(ran=False, previous="new-md5.dir", created=False)
    promoted = dataclasses.replace(unchanged, registration=dataclasses.replace(
        unchanged.registration, decision="promoted", champion_version="1", reason="first version to pass the gate"
    ))
    assert not promoted.nothing_changed
    text = render_report(promoted)
    headline = text.splitlines()[2]
    assert headline == (
        "**Promoted**: same data version `new-md5.dir`, and DVC found every stage up to date (nothing retrained); "
        "fracture-classifier version 2 was already registered and promoted to `champion` (champion before: version 1)."
    )
    assert "Nothing changed" not in text and "nothing new was registered" not in text
    assert table_row(text, "Decision")[1] == "promoted"


def test_an_alias_moved_by_a_run_that_reproduced_nothing_is_a_change():
    from flows.result import AliasMove

    # A promotion stopped before it set previous-champion: this run's registration restores it.
    unchanged = result(ran=False, previous="new-md5.dir", created=False)
    restored = dataclasses.replace(unchanged, moves=(AliasMove("previous-champion", None, "1"),))
    assert unchanged.nothing_changed and not restored.nothing_changed and restored.registry_changed
    text = render_report(restored)
    assert text.splitlines()[2] == (
        "**Registry changed**: same data version `new-md5.dir`, and DVC found every stage up to date (nothing "
        "retrained); fracture-classifier version 2 was already registered; aliases moved: `previous-champion` "
        "none → version 1."
    )
    assert table_row(text, "Aliases moved by this run")[1] == "`previous-champion` none → version 1"
    assert table_row(render_report(unchanged), "Aliases moved by this run")[1] == "none"


def test_new_data_whose_stages_are_all_up_to_date_is_not_called_a_registry_change():
    # A run on new data failed in validate after data.dvc was rewritten; this run brought back the
    # old source: a data version other than the last ingest's, every stage as dvc.lock records it.
    back = result(ran=False, previous="old-md5.dir", created=False)
    assert not back.nothing_changed and not back.registry_changed
    assert render_report(back).splitlines()[2] == (
        "**Up to date**: new data version `new-md5.dir` (was `old-md5.dir`), and DVC found every stage up to "
        "date (nothing retrained); fracture-classifier version 2 was already registered."
    )


def test_a_version_the_register_task_s_first_try_created_is_registered_by_this_run():
    from flows.result import RegistryState, as_of_run

    # Try 1 registered version 2 and promoted it, then the connection dropped; try 2 found both done.
    retried = result(ran=True, previous="old-md5.dir", created=False)
    last_try = dataclasses.replace(retried.registration, champion_version="2", reason="already champion")
    before = RegistryState({"champion": "1"}, newest_version=1)
    after = RegistryState({"champion": "2", "previous-champion": "1"}, newest_version=2)
    registration, moves = as_of_run(last_try, before, after)
    assert registration.created and registration.version == "2"
    assert [m.describe() for m in moves] == ["`champion` version 1 → version 2", "`previous-champion` none → version 1"]
    text = render_report(dataclasses.replace(retried, registration=registration, moves=moves))
    assert table_row(text, "Registered by this run")[1] == "yes"
    assert "already registered" not in text
    assert text.splitlines()[2].endswith(
        "fracture-classifier version 2 registered and promoted to `champion`; aliases moved: `champion` version 1 → "
        "version 2, `previous-champion` none → version 1."
    )
    # A version from an earlier run stays one: the newest version before this run registered was 2.
    earlier, moved = as_of_run(last_try, after, after)
    assert not earlier.created and moved == ()


def test_the_registry_state_is_read_from_the_registry(tmp_path):
    from flows.retrain import registry_state

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert registry_state(client, "fracture-classifier").aliases == {}
    assert registry_state(client, "fracture-classifier").newest_version == 0
    client.create_registered_model("fracture-classifier")
    for _ in range(11):  # 11 > 9: versions compare as numbers, not as text
        client.create_model_version("fracture-classifier", (tmp_path / "model").as_uri())
    client.set_registered_model_alias("fracture-classifier", "champion", "10")
    client.set_registered_model_alias("fracture-classifier", "previous-champion", "3")
    state = registry_state(client, "fracture-classifier")
    assert state.aliases == {"champion": "10", "previous-champion": "3"} and state.newest_version == 11


def test_the_registry_state_lists_as_undecided_only_versions_the_next_registration_decides(tmp_path):
    """A version the gate holds back (its run rolled back, or its registration failed) never gets a
    decision: it was listed under "Registered, not decided by the gate" in every failed run's report,
    saying the next run decides it."""
    import sqlite3
    from contextlib import closing

    from flows.retrain import registry_state

    database = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{database}")
    client.create_registered_model("fracture-classifier")
    for tags in ({"gate_decision": "promoted"}, {}, {"gate_decision": "pending"},
                 {"rolled_back_at": "2026-01-02T03:04:05+00:00", "rolled_back_version": "1"}, {}):
        client.create_model_version("fracture-classifier", (tmp_path / "model").as_uri(), tags=tags)
    with closing(sqlite3.connect(database)) as con, con:
        con.execute("update model_versions set status = 'FAILED_REGISTRATION' where version = 5")
    assert registry_state(client, "fracture-classifier").undecided == ("2", "3")


def test_the_closing_advice_names_uncommitted_code_too():
    from flows.retrain import commit_advice

    assert commit_advice([], []) is None
    pinned = commit_advice(["dvc.lock"], [])
    assert pinned is not None and pinned.startswith("not committed yet: dvc.lock. `git add dvc.lock && git commit`")
    advice = commit_advice(["dvc.lock"], ["fracture/training.py"])
    assert advice is not None and advice.startswith("not committed yet: dvc.lock, fracture/training.py.")
    assert "(fracture/training.py): a model trained from it carries `git_commit` <commit>-dirty" in advice
    assert "`git add dvc.lock fracture/training.py && git commit`" in advice


def test_data_counts_as_evaluated_only_where_dvc_lock_has_the_evaluate_stage_run_on_it(tmp_path):
    """A project with no completed run on record: data.dvc's version is the last completed run's only
    if dvc.lock has the pipeline's last stage run on it (a first run that failed at evaluate has not)."""
    from tasks.pipeline import evaluated_on

    assert not evaluated_on(tmp_path, "abc.dir")  # no dvc.lock
    lock = {"schema": "2.0", "stages": {
        "validate": {"deps": [{"path": "data", "md5": "new.dir"}]},
        "evaluate": {"deps": [{"path": "outputs/train/run.json", "md5": "r"}, {"path": "data", "md5": "old.dir"}]},
    }}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert evaluated_on(tmp_path, "old.dir")
    assert not evaluated_on(tmp_path, "new.dir") and not evaluated_on(tmp_path, None)


class _Task:
    """A stand-in for a Prefect task the flow calls with ``with_options(...)`` first."""

    def __init__(self, fn):
        self.fn = fn

    def with_options(self, **_options):
        return self.fn


def test_a_failed_run_publishes_where_it_failed_and_the_registry_it_left_then_fails(tmp_path, client, monkeypatch):
    """Last week's report said "promoted"; this week's run fails in train: ``retrain-report`` must say so."""
    import flows.retrain
    from flows.report import REPORT_KEY
    from fracture.registry import TAG_DECISION
    from tasks.pipeline import StageFailed
    from tests.conftest import shipped_params_text

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(shipped_params_text())
    model = "fracture-classifier"
    client.create_registered_model(model)
    for _ in range(3):
        client.create_model_version(model, (tmp_path / "model").as_uri())
    client.set_model_version_tag(model, "1", TAG_DECISION, "promoted")
    client.set_model_version_tag(model, "2", TAG_DECISION, "challenger")
    client.set_registered_model_alias(model, "champion", "1")
    client.set_registered_model_alias(model, "challenger", "2")  # version 3: registered, its gate never ran

    error = StageFailed("stage train: `fracture train` failed: exit 1: CUDA out of memory\nTraceback ...", 1)

    def stage(project, name, up_to_date=False):
        if name == "train":
            raise error
        return StageRun(name, True, 1.0, 0.5), None

    published = []
    monkeypatch.setattr(flows.retrain, "ingest_task", _Task(lambda project, source: IngestSummary("new.dir", 1.0, "old.dir")))
    monkeypatch.setattr(flows.retrain, "stage_task", stage)
    monkeypatch.setattr(flows.retrain, "create_markdown_artifact", lambda **kw: published.append(kw))
    with pytest.raises(StageFailed) as info:
        flows.retrain._retrain(project, None, "cpu")
    assert info.value is error  # the run fails with its own error
    assert [p["key"] for p in published] == [REPORT_KEY]
    text = published[0]["markdown"]
    assert text.splitlines()[2] == (
        "**Failed** at stage train: StageFailed: stage train: `fracture train` failed: exit 1: CUDA out of memory"
    )
    assert published[0]["description"].startswith("FAILED at stage train: StageFailed")
    assert table_row(text, "Stages finished")[1] == "ingest (dataset copied and hashed), validate (ran), split (ran), prepare (ran)"
    assert table_row(text, "Data version (DVC md5 of `data`)")[1] == "`new.dir`"
    assert table_row(text, "Data version of the last completed run")[1] == "`old.dir`"
    assert table_row(text, model)[1:] == ["`champion` version 1, `challenger` version 2", "3", "version 3", "none"]
    assert "**Retrained**" not in text and "## Promotion decision" not in text

    # A report that cannot be made nor published hides nothing: the run still fails with its own error.
    def gone(*_args, **_kwargs):
        raise ConnectionError("the Prefect API is gone")

    monkeypatch.setattr(flows.retrain, "registry_states", gone)
    monkeypatch.setattr(flows.retrain, "create_markdown_artifact", gone)
    with pytest.raises(StageFailed) as info:
        flows.retrain._retrain(project, None, "cpu")
    assert info.value is error
    monkeypatch.setattr(flows.retrain, "render_failure_report", gone)
    with pytest.raises(StageFailed) as info:
        flows.retrain._retrain(project, None, "cpu")
    assert info.value is error

    # A run that fails before its pipeline (no project there) reports that too, reading no registry.
    published.clear()
    monkeypatch.setattr(flows.retrain, "create_markdown_artifact", lambda **kw: published.append(kw))
    monkeypatch.setattr(flows.retrain, "render_failure_report", render_failure_report)
    with pytest.raises(FileNotFoundError):
        flows.retrain.retrain.fn(project_dir=str(tmp_path / "elsewhere"))
    text = published[0]["markdown"]
    assert text.splitlines()[2].startswith("**Failed** at stage checks before the run: FileNotFoundError: the retrain")
    assert "Not read: the run failed before it read params.yaml" in text
    assert not (tmp_path / "elsewhere").exists()


def test_a_failure_of_dvc_s_status_check_after_ingest_is_not_reported_as_ingest_s(tmp_path, client, monkeypatch):
    """Ingest finished and is listed as such; DVC's status check after it failed: the report said
    "Failed at stage ingest" beside "Stages finished: ingest (...)"."""
    import flows.retrain
    from tests.conftest import shipped_params_text

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(shipped_params_text())

    def status(project, stages):
        raise RuntimeError("dvc status: ERROR: failed to read dvc.lock: unexpected key")

    published = []
    monkeypatch.setattr(flows.retrain, "ingest_task", _Task(lambda project, source: IngestSummary("same.dir", 1.0, "same.dir")))
    monkeypatch.setattr(flows.retrain, "dvc_status", status)
    monkeypatch.setattr(flows.retrain, "create_markdown_artifact", lambda **kw: published.append(kw))
    with pytest.raises(RuntimeError):
        flows.retrain._retrain(project, None, "cpu")
    text = published[0]["markdown"]
    assert text.splitlines()[2] == ("**Failed** at stage dvc status: RuntimeError: dvc status: ERROR: failed to read "
                                    "dvc.lock: unexpected key")
    assert table_row(text, "Stages finished")[1] == "ingest (dataset copied and hashed)"


def test_the_failed_run_s_report_names_its_registration_and_the_aliases_it_moved():
    from flows.result import RegistryState, RetrainFailure

    registration = result(ran=True, previous="old-md5.dir", created=True).registration
    failure = RetrainFailure(
        stage="detect", error="StageFailed: stage detect_train: exit 1", profile="cpu",
        ingest=IngestSummary("new-md5.dir", 1.0, "old-md5.dir"), previous_version="old-md5.dir",
        runs={name: StageRun(name, False, 0.5) for name in DVC_STAGES}, registration=registration,
        registry={"fracture-classifier": RegistryState({"champion": "3", "previous-champion": "2"}, 3)},
        registry_before={"fracture-classifier": RegistryState({"champion": "2"}, 2)},
    )
    text = render_failure_report(failure)
    assert table_row(text, "Registered before the failure")[1] == (
        "fracture-classifier version 3: unchanged (ROC AUC 0.9012 beats champion v2's 0.8875)"
    )
    assert table_row(text, "fracture-classifier")[1:] == [
        "`champion` version 3, `previous-champion` version 2", "3", "none",
        "`champion` version 2 → version 3, `previous-champion` none → version 2",
    ]
    assert "not decided" in text and "the next run's register task decides it" not in text


def origin(version: str, run_id: str | None, **changes: object) -> VersionOrigin:
    """A version built from the shipped recipe at commit 1111..., on ``old-md5.dir``, changed as given."""
    params = {f"train.p{i:02d}": str(i) for i in range(30)} | {"profile": "cpu", "train.lr": "0.001"}
    packages = {"mlflow": "3.1.0", "torch": "2.3.0", "timm": "1.0.9", "numpy": "2.0.2"}
    base = VersionOrigin(version, run_id, "old-md5.dir", "1" * 40, None, "cpu", params, packages)
    return dataclasses.replace(base, **changes)


def test_the_report_says_what_changed_since_the_champion():
    champion = origin("2", "champion-run")
    params = dict(champion.params) | {"train.lr": "0.0003", "train.mixup": "0.2"}
    new = origin("3", "0123abcd", data_version="new-md5.dir", git_commit="2" * 40 + "-dirty",
                 dirty_files="fracture/training.py", params=params, packages=dict(champion.packages) | {"torch": "2.4.1"})
    r = result(ran=True, previous="old-md5.dir", created=True)
    text = render_report(dataclasses.replace(r, since_champion=SinceChampion(champion, new)))
    assert "## Since the champion (version 2)" in text
    assert "| | Champion (version 2) | This run's (version 3) |" in text
    assert table_row(text, "Trained in MLflow run")[1:] == ["`champion-run`", "`0123abcd`"]
    assert table_row(text, "Data version")[1:] == ["`old-md5.dir`", "`new-md5.dir`"]
    assert table_row(text, "Code commit")[1:] == ["`111111111111`", "`222222222222-dirty`, not committed: fracture/training.py"]
    assert table_row(text, "Training profile")[1:] == ["cpu", "cpu (same)"]
    # Only the params and packages that differ, each on a row; a param one run lacks says so.
    assert table_row(text, "Param `train.lr`")[1:] == ["0.001", "0.0003"]
    assert table_row(text, "Param `train.mixup`")[1:] == ["not logged", "0.2"]
    assert table_row(text, "Package `torch`")[1:] == ["2.3.0", "2.4.1"]
    section = text.split("## Since the champion")[1].split("## Stages")[0]
    assert section.count("| Param `") == 2 and section.count("| Package `") == 1
    assert "Compared: 33 params and 4 packages; the rows name those that differ." in section

    # Many params changed (another recipe): the first 15 by name, and how many more.
    recipe = {k: v + "0" for k, v in champion.params.items()}
    text = render_report(dataclasses.replace(r, since_champion=SinceChampion(champion, dataclasses.replace(new, params=recipe))))
    section = text.split("## Since the champion")[1].split("## Stages")[0]
    assert section.count("| Param `") == 15 and table_row(text, "Param `profile`")[1:] == ["cpu", "cpu0"]
    assert table_row(text, "17 more params differ, not listed")

    # Nothing differs: one row each says so, counting what was compared.
    same = SinceChampion(champion, dataclasses.replace(champion, version="3", run_id="0123abcd"))
    text = render_report(dataclasses.replace(r, since_champion=same))
    assert table_row(text, "Training params (MLflow)")[1:] == ["32 logged", "32 logged, none differs"]
    assert table_row(text, "Packages")[1:] == ["4 pinned", "4 pinned, none differs"]
    assert table_row(text, "Data version")[1:] == ["`old-md5.dir`", "`old-md5.dir` (same)"]

    # A champion whose run is gone keeps its registry tags; what only the run held is said to be unknown.
    gone = dataclasses.replace(champion, params=None, packages=None, packages_unread="OSError: no requirements.txt")
    text = render_report(dataclasses.replace(r, since_champion=SinceChampion(gone, new)))
    assert table_row(text, "Training params (MLflow)")[1:] == ["not known: its run `champion-run` is gone", "33 logged"]
    assert table_row(text, "Packages")[1:] == ["not recorded (OSError: no requirements.txt)", "4 pinned"]
    assert table_row(text, "Code commit")[1] == "`111111111111`"
    assert "Compared:" not in text

    # A registry that could not be read is named; the registration stands.
    unread = SinceChampion(VersionOrigin("2"), VersionOrigin("3"), error="MlflowException: the server is gone")
    text = render_report(dataclasses.replace(r, since_champion=unread))
    assert "Not read from the registry (MlflowException: the server is gone); the registration below stands." in text


def register_version(client: MlflowClient, folder, params: dict[str, str], version_tags: dict[str, str],
                     pins: str | None, run_id: str | None = None) -> str:
    """A version of fracture-classifier as registration makes one: its provenance tags, its training
    run's params (a new run in experiment ``t``, unless ``run_id`` names one), its model's pins."""
    if run_id is None:
        experiment = client.get_experiment_by_name("t").experiment_id
        run_id = client.create_run(experiment, tags={"profile": version_tags["profile"]}).info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, value)
    model_dir = folder / f"model-{run_id}"
    model_dir.mkdir()
    if pins is not None:
        (model_dir / "requirements.txt").write_text(pins)
    version = client.create_model_version("fracture-classifier", model_dir.as_uri(), run_id=run_id,
                                          tags=version_tags | {"run_id": run_id})
    return str(version.version)


def test_what_changed_since_the_champion_is_read_from_the_registry_and_the_runs(tmp_path, client):
    from flows.result import RegistryState
    from flows.retrain import since_champion
    from fracture.registry import TAG_DATA
    from fracture.workspace import GIT_COMMIT_TAG, GIT_DIRTY_FILES_TAG

    model = "fracture-classifier"
    client.create_registered_model(model)

    def registered(params: dict[str, str], version_tags: dict[str, str], pins: str | None,
                   run_id: str | None = None) -> str:
        return register_version(client, tmp_path, params, version_tags, pins, run_id)

    shared = {"profile": "cpu", "train.epochs": "8", "train.lr": "0.001"}
    champion = registered(shared, {TAG_DATA: "old-md5.dir", GIT_COMMIT_TAG: "1" * 40, "profile": "cpu"},
                          "mlflow==3.1.0\ntorch==2.3.0\ntimm==1.0.9\n")
    new_params = shared | {"train.lr": "0.0003", "n_train": "190"}
    new = registered(new_params, {TAG_DATA: "new-md5.dir", GIT_COMMIT_TAG: "2" * 40 + "-dirty",
                                  GIT_DIRTY_FILES_TAG: "fracture/training.py", "profile": "cpu"},
                     "mlflow==3.1.0\ntorch==2.4.1 ; sys_platform == 'linux'\ntimm==1.0.9\n")
    new_run = client.get_model_version(model, new).run_id
    r = result(ran=True, previous="old-md5.dir", created=True)
    registration = dataclasses.replace(r.registration, version=new, run_id=new_run, champion_version=champion,
                                       comparison=dataclasses.replace(COMPARISON, champion_version=champion))
    before = RegistryState({"champion": champion}, int(champion))

    since = since_champion(tmp_path, registration, before)
    assert since is not None and since.error is None
    assert (since.champion.version, since.new.version) == (champion, new)
    assert since.champion.data_version == "old-md5.dir" and since.new.data_version == "new-md5.dir"
    assert since.new.git_commit == "2" * 40 + "-dirty" and since.new.dirty_files == "fracture/training.py"
    assert since.champion.params == shared and since.new.params == new_params
    assert since.champion.packages == {"mlflow": "3.1.0", "torch": "2.3.0", "timm": "1.0.9"}
    assert since.new.packages["torch"] == "2.4.1"
    text = render_report(dataclasses.replace(r, registration=registration, since_champion=since))
    assert table_row(text, "Param `train.lr`")[1:] == ["0.001", "0.0003"]
    assert table_row(text, "Param `n_train`")[1:] == ["not logged", "190"]
    assert table_row(text, "Package `torch`")[1:] == ["2.3.0", "2.4.1"]
    assert table_row(text, "Code commit")[1:] == ["`111111111111`", "`222222222222-dirty`, not committed: fracture/training.py"]

    # A champion whose run the store no longer holds (deleted for good, or logged to a store since
    # replaced), its model without pins: what its version tags say, and what is not known.
    lost = registered({}, {TAG_DATA: "older-md5.dir", GIT_COMMIT_TAG: "3" * 40, "profile": "paper"}, None,
                      run_id="f" * 32)
    since = since_champion(tmp_path, dataclasses.replace(registration, comparison=None), RegistryState({"champion": lost}, 3))
    assert since is not None and since.error is None
    assert since.champion.run_gone and since.champion.params is None and since.champion.profile == "paper"
    assert since.champion.packages is None and since.champion.packages_unread
    text = render_report(dataclasses.replace(r, registration=registration, since_champion=since))
    assert table_row(text, "Training params (MLflow)")[1:] == [f"not known: its run `{'f' * 32}` is gone", "4 logged"]
    assert table_row(text, "Packages")[1].startswith("not recorded (")
    assert table_row(text, "Training profile")[1:] == ["paper", "cpu"]

    # Nothing to set against: a version registered before this run, or no champion before it.
    assert since_champion(tmp_path, dataclasses.replace(registration, created=False), before) is None
    first = dataclasses.replace(registration, champion_version=None, comparison=None)
    assert since_champion(tmp_path, first, RegistryState({}, 0)) is None

    # A registry that cannot be read now: named, never raised (the registration is done).
    def unreadable(*_args):
        raise MlflowException("the tracking server is gone")

    since = since_champion(tmp_path, registration, before, read=unreadable)
    assert since is not None and since.error == "MlflowException: the tracking server is gone"


def test_the_flow_run_s_report_says_what_changed_since_the_champion(tmp_path, client, monkeypatch):
    """A scheduled run registers version 2 against champion version 1: its published report sets the two side by side."""
    import flows.retrain
    from fracture.registry import TAG_DATA
    from fracture.workspace import GIT_COMMIT_TAG
    from tests.conftest import shipped_params_text

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(shipped_params_text())
    client.create_registered_model("fracture-classifier")
    champion = register_version(client, tmp_path, {"train.lr": "0.001"},
                                {TAG_DATA: "old.dir", GIT_COMMIT_TAG: "1" * 40, "profile": "cpu"}, "torch==2.3.0\n")
    client.set_registered_model_alias("fracture-classifier", "champion", champion)
    done = result(ran=True, previous="old.dir", created=True)

    def register(project):
        version = register_version(client, tmp_path, {"train.lr": "0.0003"},
                                   {TAG_DATA: "new.dir", GIT_COMMIT_TAG: "2" * 40, "profile": "cpu"}, "torch==2.4.1\n")
        client.set_registered_model_alias("fracture-classifier", "champion", version)
        return dataclasses.replace(done.registration, version=version, champion_version=champion, comparison=None,
                                   run_id=client.get_model_version("fracture-classifier", version).run_id)

    stage_results = {"validate": done.validate, "split": done.split, "prepare": done.prepare, "train": done.train,
                     "evaluate": done.evaluate}
    published = []
    monkeypatch.setattr(flows.retrain, "ingest_task", _Task(lambda project, source: IngestSummary("new.dir", 1.0, "old.dir")))
    monkeypatch.setattr(flows.retrain, "stage_task", lambda project, name, up_to_date=False: (StageRun(name, True, 1.0, 0.5),
                                                                                             stage_results[name]))
    monkeypatch.setattr(flows.retrain, "register_task", _Task(register))
    monkeypatch.setattr(flows.retrain, "create_markdown_artifact", lambda **kw: published.append(kw))
    run = flows.retrain._retrain(project, None, "cpu")
    assert run.since_champion is not None and run.since_champion.champion.version == champion == "1"
    text = published[0]["markdown"]
    assert "## Since the champion (version 1)" in text
    assert table_row(text, "Data version")[1:] == ["`old.dir`", "`new.dir`"]
    assert table_row(text, "Param `train.lr`")[1:] == ["0.001", "0.0003"]
    assert table_row(text, "Package `torch`")[1:] == ["2.3.0", "2.4.1"]
