"""The model card states provenance, recipe, metrics with intervals, and the split's limitation."""

from __future__ import annotations

import dataclasses

from fracture.data_config import DataConfig
from fracture.model_card import render_model_card
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
PARTS = {
    "hand": {"n_images": 144, "n_fractured": 44, "roc_auc": 0.884, "recall": 0.93, "specificity": 0.53},
    "hip": {"n_images": 21, "n_fractured": 0, "roc_auc": None, "recall": None, "specificity": 1.0},
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
    assert "ROC AUC: 0.917 (95% CI 0.882–0.952)" in card
    assert "Sensitivity: 0.919 (95% CI 0.861–0.977)" in card
    assert "Specificity: 0.745 (95% CI 0.701–0.784)" in card
    assert "expected calibration error 0.021" in card and "Decision threshold 0.0884" in card
    assert "| hip | 21 | 0 | n/a | n/a | 1.000 |" in card
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
