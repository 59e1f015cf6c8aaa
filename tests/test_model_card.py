"""The model card states provenance, recipe, metrics with intervals, and the split's limitation."""

from __future__ import annotations

import dataclasses

from fracture.data_config import DataConfig
from fracture.model_card import render_model_card, version_description
from fracture.workspace import TrainedModel

MODEL = TrainedModel(
    architecture="tf_efficientnet_lite0",
    profile="cpu",
    classes=["not_fractured", "fractured"],
    data_config=DataConfig((3, 224, 224), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), aspect="squash"),
    best_epoch=4,
    best_val_roc_auc=0.8891,
)
METRICS = {
    "roc_auc": 0.9175, "roc_auc_ci_low": 0.8817, "roc_auc_ci_high": 0.9518,
    "recall": 0.9186, "recall_ci_low": 0.8605, "recall_ci_high": 0.9767,
    "specificity": 0.7451, "specificity_ci_low": 0.7010, "specificity_ci_high": 0.7844,
    "average_precision": 0.787, "precision": 0.432, "f1": 0.587, "accuracy": 0.775,
    "ece": 0.0213, "brier": 0.0726, "threshold": 0.0884, "n_images": 494.0, "n_fractured": 86.0,
}
PARTS = {  # as fracture.evaluation.by_group gives them: Wilson intervals (hand 41 of 44, 53 of 100; hip 21 of 21)
    "hand": {"n_images": 144, "n_fractured": 44, "roc_auc": 0.884, "recall": 0.9318, "specificity": 0.53,
             "recall_ci_low": 0.8177, "recall_ci_high": 0.9765, "specificity_ci_low": 0.4329, "specificity_ci_high": 0.6249},
    "hip": {"n_images": 21, "n_fractured": 0, "roc_auc": None, "recall": None, "specificity": 1.0,
            "recall_ci_low": None, "recall_ci_high": None, "specificity_ci_low": 0.8454, "specificity_ci_high": 1.0},
}


def test_card_states_what_a_reviewer_needs():
    card = render_model_card(
        MODEL,
        {"optimiser": "Adam, lr 0.0001", "batch size": 16},
        {"version": "0e34281f.dir", "git_commit": "abc123", "splits": {"train": 2283, "val": 490, "test": 494}},
        METRICS,
        PARTS,
        "the highest reaching sensitivity 0.85 on the validation split",
        "run42",
    )
    assert card.startswith("# Model card: tf_efficientnet_lite0 (cpu profile)")
    assert "`run42`" in card and "`abc123`" in card and "`0e34281f.dir`" in card and "test 494" in card
    assert "uncommitted" not in card
    assert "ROC AUC: 0.917 (95% CI 0.882–0.952)" in card
    assert "Sensitivity: 0.919 (95% CI 0.861–0.977)" in card
    assert "Specificity: 0.745 (95% CI 0.701–0.784)" in card
    assert "expected calibration error 0.021" in card and "Decision threshold 0.0884" in card
    assert "| body part | images | fractured | ROC AUC | sensitivity (95% CI) | specificity (95% CI) |" in card
    assert "| hand | 144 | 44 | 0.884 | 0.932 (0.818–0.977) | 0.530 (0.433–0.625) |" in card
    assert "| hip | 21 | 0 | n/a | n/a | 1.000 (0.845–1.000) |" in card
    # The card says which interval each figure carries.
    assert "ROC AUC's is a stratified percentile bootstrap" in card
    assert "sensitivity's and specificity's (here and per body part) are Wilson score intervals" in card
    assert "224×224 px" in card and "epoch 4" in card and "- batch size: 16" in card
    assert "aspect: squash), enhancement: none, normalised with mean [0.5, 0.5, 0.5]; JPEGs decoded in full" in card
    assert "image-level" in card and "no patient identifier" in card
    # The selection protocol sits before the test figures it explains.
    protocol = card.index("## How the recipe was chosen")
    assert protocol < card.index("## Test metrics")
    assert "No choice was made on the test split" in card[protocol:] and "crossval/dvc.yaml" in card


def test_the_card_names_its_own_recipe_its_intended_use_and_how_its_threshold_was_set():
    def card(profile: str, threshold_source: str) -> str:
        model = dataclasses.replace(MODEL, profile=profile)
        return render_model_card(model, {}, {"splits": {}}, METRICS, PARTS, threshold_source, "run42")

    cpu = card("cpu", "fixed at evaluate.threshold 0.5")
    # Only the paper profile trains the paper's recipe; another profile's card says whose recipe it is.
    assert "Gupta & Sharma, 2024 recipe)" not in cpu and "the cpu profile's recipe" in cpu
    assert "(Gupta & Sharma, 2024 recipe)." in card("paper", "fixed at evaluate.threshold 0.5")
    assert "## Intended use" in cpu and "NOT FOR CLINICAL USE" in cpu
    # How the threshold was set comes from the evaluate stage, never a fixed phrase.
    protocol = cpu[cpu.index("## How the recipe was chosen"):cpu.index("## Test metrics")]
    assert "- The decision threshold: fixed at evaluate.threshold 0.5." in protocol
    assert "chosen on the validation split" not in protocol


def test_a_tiny_threshold_keeps_its_digits_in_the_card_and_the_registry_description():
    """An overconfident network's val-chosen threshold can be 8e-06; four decimals printed 0.0000,
    which read as 'call every image fractured' (sensitivity 1, specificity 0)."""
    metrics = METRICS | {"threshold": 7.974010259204078e-06}
    card = render_model_card(MODEL, {}, {"splits": {}}, metrics, PARTS, "chosen on val", "run42")
    assert "- Decision threshold 7.974e-06 (chosen on val);" in card and "0.0000" not in card
    described = version_description(
        "tf_efficientnet_lite0", "cpu", (3, 224, 224), "squash", {f"test_{k}": v for k, v in metrics.items()}, "run42", None
    )
    assert "at the decision threshold 7.974e-06." in described and "0.0000" not in described
    # An ordinary threshold reads as before.
    assert "Decision threshold 0.5 (fixed)" in render_model_card(
        MODEL, {}, {"splits": {}}, METRICS | {"threshold": 0.5}, PARTS, "fixed", "run42"
    )


def test_a_model_trained_from_uncommitted_code_names_the_files_no_commit_holds():
    data = {"git_commit": "abc123-dirty", "git_dirty_files": "fracture/training.py, params.yaml", "splits": {}}
    card = render_model_card(MODEL, {}, data, METRICS, PARTS, "fixed", "run42")
    assert "- Code: git commit `abc123-dirty`, with uncommitted changes to fracture/training.py, params.yaml" in card


def test_a_hospitals_export_is_named_as_what_the_model_was_trained_on():
    """A card of a model trained on a hospital's own export (ingest.layout: csv) names that export,
    not FracAtlas, and its limitations are the export's; FracAtlas's layout keeps FracAtlas's."""
    from fracture.model_card import dataset_name

    export = dataset_name("csv", "data/north")
    assert export == "the hospital export in `data/north` (ingest.layout: csv)"
    assert dataset_name("fracatlas", "data/fracatlas") == "FracAtlas"
    card = render_model_card(MODEL, {}, {"splits": {}, "dataset": export, "version": "ab.dir"}, METRICS, PARTS,
                             "fixed at evaluate.threshold 0.5", "run42")
    assert "FracAtlas" not in card
    assert f"weights on {export} (the cpu profile's recipe" in card and f"- Data: {export}, DVC version `ab.dir`" in card
    assert "Images without a patient id are split one by one" in card and "held-out images of the same export" in card
    public = render_model_card(MODEL, {}, {"splits": {}}, METRICS, PARTS, "fixed at evaluate.threshold 0.5", "run42")
    assert "- Data: FracAtlas, DVC version" in public and "one public dataset (FracAtlas)" in public
    described = version_description("tf_efficientnet_lite0", "cpu", (3, 224, 224), "squash", {}, "run42", "ab.dir",
                                    dataset=export)
    assert f"weights on {export} (DVC data version `ab.dir`)" in described
