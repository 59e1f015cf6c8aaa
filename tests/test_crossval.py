"""Cross-validation: whole groups per fold, never the test split, figures computed from the folds."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.special import expit
from scipy.stats import t as student_t
from sklearn.metrics import recall_score, roc_auc_score
from sklearn.utils import resample

from fracture.config import (
    ConfigError,
    CrossvalParams,
    EvaluateParams,
    Params,
    load_params,
    parse_params,
)
from fracture.crossval import (
    ENSEMBLE,
    CrossvalError,
    compare_oof,
    draw_folds,
    oof_groups,
    pool_splits,
    read_oof,
    summarise,
)
from fracture.evaluation import (
    choose_threshold,
    confidence_intervals,
    delong_mean_difference,
    delong_paired,
    rechosen_rate_intervals,
    wilson_interval,
)
from fracture.imaging import Preprocessor
from fracture.prepare import cache_key, prepare_images
from fracture.stages.prepare import active_cache
from fracture.workspace import CrossvalFold, CrossvalResult, Workspace
from tests.conftest import REPO, dvc, run
from tests.synthetic import make_dataset, training_frame

# --- the folds ---------------------------------------------------------------------------------


def pooled_with_groups(n_groups: int = 60, seed: int = 0) -> tuple[pd.DataFrame, dict[str, int]]:
    """Train + val rows in groups of 1 to 3: copies share ``sha256``, a third member is linked to
    the second only by ``near_duplicate_group`` (so the group is transitive). About 20% fractured.

    Returns:
        The frame and each image's true group number.
    """
    rng = np.random.default_rng(seed)
    rows, truth = [], {}
    for g in range(n_groups):
        label = int(g % 5 == 0)
        ids = [f"IMG{g:04d}_{c}.jpg" for c in range(int(rng.integers(1, 4)))]
        for c, image_id in enumerate(ids):
            rows.append({
                "image_id": image_id,
                "label": label,
                "sha256": f"h{g}" if c < 2 else f"h{g}_near",
                "near_duplicate_group": ids[1] if c >= 1 else image_id,
            })
            truth[image_id] = g
    return pd.DataFrame(rows), truth


@pytest.mark.parametrize("folds", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folds_partition_the_images_and_keep_each_group_whole(folds, seed):
    pooled, truth = pooled_with_groups(seed=seed)
    fold_of = draw_folds(pooled, folds, seed)
    assert len(fold_of) == len(pooled) and set(fold_of) == set(range(1, folds + 1))
    per_group = pd.Series(fold_of).groupby(pooled["image_id"].map(truth)).nunique()
    assert (per_group == 1).all()
    # ... including the chains: a copy (same sha256) and a near-duplicate of that copy.
    chained = [g for g, size in pooled["image_id"].map(truth).value_counts().items() if size == 3]
    assert chained


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_folds_are_stratified_by_label(seed):
    pooled, _ = pooled_with_groups(n_groups=150, seed=seed)
    fold_of = draw_folds(pooled, 3, seed)
    share = pooled["label"].mean()
    for number in (1, 2, 3):
        held_out = pooled[fold_of == number]
        # Whole groups of up to 3 images move at once, so allow a few images either way.
        assert abs(held_out["label"].sum() - share * len(held_out)) <= 4, (number, held_out["label"].mean(), share)
        assert abs(len(held_out) - len(pooled) / 3) <= 0.1 * len(pooled)


def test_same_seed_same_folds_and_another_seed_other_folds():
    pooled, _ = pooled_with_groups()
    assert np.array_equal(draw_folds(pooled, 3, 0), draw_folds(pooled, 3, 0))
    assert not np.array_equal(draw_folds(pooled, 3, 0), draw_folds(pooled, 3, 1))


def test_too_many_folds_or_a_fold_without_fractures_names_the_param():
    pooled, _ = pooled_with_groups(n_groups=10)
    # The one-line error alone: scikit-learn's "least populated class" warning (4 fractured images,
    # fewer than 5 or 12 folds) printed above it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for folds in (20, 12):  # more folds than images, or than groups
            with pytest.raises(CrossvalError, match=rf"crossval.folds={folds} .*lower crossval.folds"):
                draw_folds(pooled, folds, 0)
        # 2 fractured groups cannot reach 3 folds, nor 4 fractured images 5.
        for folds in (3, 5):
            with pytest.raises(CrossvalError,
                               match=rf"fold \d of crossval.folds={folds} holds 0 fractured .*lower crossval.folds"):
                draw_folds(pooled, folds, 0)


def test_pooling_refuses_an_image_in_both_train_and_val():
    train = pd.DataFrame({"image_id": ["a", "b"], "label": [0, 1]})
    val = pd.DataFrame({"image_id": ["b", "c"], "label": [1, 0]})
    with pytest.raises(CrossvalError, match=r"train.csv and val.csv share 1 image ids.*dvc repro split"):
        pool_splits(train, val)
    assert pool_splits(train.iloc[:1], val.iloc[1:])["image_id"].tolist() == ["a", "c"]


def test_out_of_fold_groups_are_the_folds_groups_in_the_out_of_fold_order():
    pooled, truth = pooled_with_groups()
    oof = pooled.sample(frac=1, random_state=0)[["image_id"]]
    groups = oof_groups(pooled, oof)
    assert len(groups) == len(oof)
    # One key per true group, the same for all its images, whatever order the folds listed them in.
    assert pd.Series(groups).groupby(oof["image_id"].map(truth).to_numpy()).nunique().eq(1).all()
    assert len(set(groups)) == len(set(truth.values()))
    with pytest.raises(CrossvalError, match=r"1 out-of-fold image\(s\) are not in train \+ val"):
        oof_groups(pooled, pd.DataFrame({"image_id": ["IMG0000_0.jpg", "elsewhere.jpg"]}))


def oof_scores(n: int, seed: int) -> pd.DataFrame:
    """Out-of-fold predictions of 3 folds, about 30% fractured, AUC about 0.85."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    return pd.DataFrame({
        "image_id": [f"IMG{i:05d}.jpg" for i in range(n)],
        "fold": np.arange(n) % 3 + 1,
        "label": labels,
        "probability": expit(rng.normal(size=n) + 1.5 * labels - 0.8),
    })


FOLDS = [CrossvalFold(fold=k, n_train=200, n_val=100, n_fractured_val=30, roc_auc=a, best_roc_auc=a, best_epoch=1)
         for k, a in ((1, 0.84), (2, 0.86), (3, 0.85))]
CHOSEN = EvaluateParams(threshold=0.5, batch_size=8, target_sensitivity=0.85, bootstrap_resamples=300, seed=0)


def test_oof_specificity_at_a_threshold_chosen_on_the_oof_predictions_has_the_choices_noise_in_its_interval():
    """The threshold is chosen on the very predictions it scores: Wilson's interval, which holds it
    fixed, covered the true specificity in 69% of simulated datasets (nominal 95%). The interval
    now chooses it again in every resample: wider, around the same estimate."""
    oof = oof_scores(300, 5)
    s = summarise(FOLDS, oof, CHOSEN)
    labels, probs = oof["label"].to_numpy(), oof["probability"].to_numpy()
    negatives = labels == 0
    wilson = wilson_interval(int(np.sum(probs[negatives] < s["oof_threshold"])), int(negatives.sum()))
    low, high = s["oof_specificity_ci_low"], s["oof_specificity_ci_high"]
    assert low <= s["oof_specificity"] <= high
    assert high - low > 1.5 * (wilson[1] - wilson[0])
    assert CHOSEN.target_sensitivity <= s["oof_recall_ci_low"] <= s["oof_recall"] <= s["oof_recall_ci_high"]
    expected = rechosen_rate_intervals(labels, probs, 0.85, 300, 0)
    assert (s["oof_specificity_ci_low"], s["oof_specificity_ci_high"]) == expected["specificity"]
    # At a fixed threshold the rates are binomial proportions: Wilson's intervals stay.
    fixed = summarise(FOLDS, oof, dataclasses.replace(CHOSEN, target_sensitivity=None))
    assert fixed["oof_threshold"] == 0.5
    assert (fixed["oof_specificity_ci_low"], fixed["oof_specificity_ci_high"]) == pytest.approx(
        wilson_interval(int(np.sum(probs[negatives] < 0.5)), int(negatives.sum()))
    )


def test_oof_intervals_resample_whole_groups_so_a_copy_of_each_image_changes_none():
    """Each image stored twice, the copies in one group (as the folds keep them): the same
    intervals as the images stored once, where the image bootstrap narrowed the AUC's."""
    oof = oof_scores(300, 5)
    twice = oof.loc[oof.index.repeat(2)].reset_index(drop=True)
    once = summarise(FOLDS, oof, CHOSEN, groups=oof["image_id"].to_numpy())
    doubled = summarise(FOLDS, twice, CHOSEN, groups=twice["image_id"].to_numpy())
    keys = [k for k in once if "_ci_" in k]
    assert len(keys) == 6
    assert {k: doubled[k] for k in keys} == pytest.approx({k: once[k] for k in keys})
    assert {k: v for k, v in doubled.items() if k not in keys} == pytest.approx(
        {k: v for k, v in once.items() if k not in keys} | {"n_images": 600, "n_fractured": 2 * once["n_fractured"]}
    )
    ungrouped = summarise(FOLDS, twice, CHOSEN)
    width = {name: s["oof_roc_auc_ci_high"] - s["oof_roc_auc_ci_low"] for name, s in (("g", doubled), ("i", ungrouped))}
    assert width["i"] < 0.85 * width["g"]


@pytest.mark.parametrize("folds", [1, 0, 2.5, "3", True])
def test_crossval_folds_must_be_a_whole_number_of_at_least_two(folds):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert raw["crossval"] == {"folds": 3, "seed": 0}
    raw["crossval"]["folds"] = folds
    with pytest.raises(ConfigError, match="crossval.folds must be a whole number of at least 2"):
        parse_params(raw)


# --- a tiny run ----------------------------------------------------------------------------------


def tiny_params(folds: int = 3) -> Params:
    """The real params with the CPU profile shrunk to one network at 64 px and 2 epochs, on the CPU."""
    base = load_params(REPO)
    profile = dataclasses.replace(base.profiles["cpu"], image_size=64, epochs=2, lr=1e-3, members=1)
    return dataclasses.replace(
        base,
        train=dataclasses.replace(base.train, profile="cpu", batch_size=4, device="cpu"),
        profiles={"cpu": profile},
        evaluate=dataclasses.replace(base.evaluate, bootstrap_resamples=50),
        crossval=CrossvalParams(folds=folds, seed=0),
    )


def tiny_workspace(root: Path, params: Params) -> Workspace:
    """Synthetic split tables (two images joined as near-duplicates) and their prepared cache."""
    make_dataset(root, 10, 18)
    frame = training_frame(root).assign(sha256=lambda f: "h" + f["image_id"], near_duplicate_group=lambda f: f["image_id"])
    frame.loc[frame["image_id"] == "IMG0000001.jpg", "near_duplicate_group"] = "IMG0000000.jpg"
    test_ids = ["IMG0000008.jpg", "IMG0000009.jpg", "IMG0000026.jpg", "IMG0000027.jpg"]
    val_ids = ["IMG0000006.jpg", "IMG0000007.jpg", "IMG0000020.jpg", "IMG0000021.jpg", "IMG0000022.jpg"]
    is_test, is_val = frame["image_id"].isin(test_ids), frame["image_id"].isin(val_ids)
    workspace = Workspace(root)
    workspace.write_split({"train": frame[~is_test & ~is_val], "val": frame[is_val], "test": frame[is_test]}, {})
    config, key = active_cache(params)
    # The cache holds the test images too, as the real one does: only the tables keep them out.
    prepare_images(frame, root, Preprocessor(config), key["allow_truncated"], workspace.prepare_dir, workers=1)
    assert key == cache_key(config, params.validate.on_truncated == "keep")
    return workspace


def tiny_ensemble_project(root: Path, monkeypatch: pytest.MonkeyPatch, folds: int = 3,
                          **profile_changes: object) -> tuple[Params, Workspace]:
    """The tiny recipe with ``profile_changes`` (an ensemble's ``members`` or ``snapshots``) and no fracture
    boxes, its synthetic project at ``root`` as the working directory, MLflow in the project's own store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(root)
    base = tiny_params(folds)
    params = dataclasses.replace(base, profiles={"cpu": dataclasses.replace(base.profiles["cpu"], **profile_changes)},
                                 evaluate=dataclasses.replace(base.evaluate, boxes=None))
    return params, tiny_workspace(root, params)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real cross-validation of the tiny recipe, with the split tables it asked for."""
    from fracture.stages.crossval import run_crossval

    root = tmp_path_factory.mktemp("crossval")
    params = tiny_params()
    workspace = tiny_workspace(root, params)
    read: list[str] = []
    original = Workspace.read_split_table
    patch = pytest.MonkeyPatch()
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    patch.setattr(Workspace, "read_split_table", lambda self, name: read.append(name) or original(self, name))
    try:
        result = run_crossval(params, workspace)
    finally:
        patch.undo()
    return params, workspace, result, read


def test_crossval_never_reads_the_test_split(tiny_run):
    _, workspace, _, read = tiny_run
    assert sorted(read) == ["train", "val"]
    oof = workspace.read_crossval_oof()
    tables = {name: workspace.read_split_table(name) for name in ("train", "val", "test")}
    assert sorted(oof["image_id"]) == sorted(pd.concat([tables["train"], tables["val"]])["image_id"])
    assert not set(oof["image_id"]) & set(tables["test"]["image_id"])
    assert list(oof.columns) == ["image_id", "fold", "label", "probability", "group"]
    # The two near-duplicates are held out together, and named as one group of linked images.
    folds = oof.set_index("image_id")["fold"]
    assert folds["IMG0000000.jpg"] == folds["IMG0000001.jpg"]
    pooled = pool_splits(tables["train"], tables["val"])
    assert oof["group"].tolist() == oof_groups(pooled, oof).tolist()
    assert oof.set_index("image_id").loc[["IMG0000000.jpg", "IMG0000001.jpg"], "group"].nunique() == 1
    # So comparing the stage's runs counts that pair once.
    paired = compare_oof({"a": oof, "b": oof}, load_params().evaluate).rows[1].versus_reference
    assert (paired.n_images, paired.n_groups) == (len(oof), len(oof) - 1)


def test_metrics_are_the_figures_of_the_out_of_fold_predictions(tiny_run):
    params, workspace, result, _ = tiny_run
    oof = workspace.read_crossval_oof()
    assert workspace.read_crossval() == result
    n = len(oof)
    assert [f.fold for f in result.folds] == [1, 2, 3]
    for f in result.folds:
        held_out = oof[oof["fold"] == f.fold]
        assert (f.n_val, f.n_train, f.n_fractured_val) == (len(held_out), n - len(held_out), held_out["label"].sum())
        # The primary figure is the held-out fold's AUC of the very probabilities kept.
        assert f.roc_auc == pytest.approx(roc_auc_score(held_out["label"], held_out["probability"]), abs=1e-6)
        assert f.best_roc_auc >= f.roc_auc - 1e-9 and 1 <= f.best_epoch <= 2
    aucs = np.array([f.roc_auc for f in result.folds])
    s = result.summary
    assert (s["n_folds"], s["n_images"], s["n_fractured"]) == (3, n, oof["label"].sum())
    assert s["mean_roc_auc"] == pytest.approx(aucs.mean())
    assert s["std_roc_auc"] == pytest.approx(aucs.std(ddof=1))
    assert s["mean_best_roc_auc"] == pytest.approx(np.mean([f.best_roc_auc for f in result.folds]))
    labels, probs = oof["label"].to_numpy(), oof["probability"].to_numpy()
    assert s["oof_roc_auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-6)
    assert s["oof_roc_auc_ci_low"] <= s["oof_roc_auc"] <= s["oof_roc_auc_ci_high"]
    threshold = choose_threshold(labels, probs, params.evaluate.target_sensitivity)
    assert s["oof_threshold"] == pytest.approx(threshold, abs=1e-6)
    predicted = (probs >= threshold).astype(int)
    assert s["oof_recall"] == pytest.approx(recall_score(labels, predicted))
    assert s["oof_recall"] >= params.evaluate.target_sensitivity
    assert s["oof_specificity"] == pytest.approx(recall_score(labels, predicted, pos_label=0))
    # The intervals resample the groups the folds were drawn in (the near-duplicates together),
    # and choose the threshold again in each resample.
    pooled = pool_splits(*(workspace.read_split_table(name) for name in ("train", "val")))
    groups = oof_groups(pooled, oof)
    assert len(set(groups)) < len(oof)
    ev = params.evaluate
    expected = confidence_intervals(labels, probs, threshold, ev.bootstrap_resamples, ev.seed, groups=groups)
    expected |= rechosen_rate_intervals(labels, probs, ev.target_sensitivity, ev.bootstrap_resamples, ev.seed,
                                        groups=groups)
    for name, (low, high) in expected.items():
        assert (s[f"oof_{name}_ci_low"], s[f"oof_{name}_ci_high"]) == pytest.approx((low, high), abs=1e-6), name


def test_metrics_json_has_flat_keys_for_dvc_and_the_folds_list(tiny_run):
    _, workspace, result, _ = tiny_run
    raw = yaml.safe_load(workspace.crossval_metrics.read_text())
    for key in ("oof_roc_auc", "mean_roc_auc", "std_roc_auc", "fold_1_roc_auc", "fold_3_best_roc_auc"):
        assert isinstance(raw[key], float), key
    assert raw["fold_2_roc_auc"] == result.folds[1].roc_auc
    assert [f["fold"] for f in raw["folds"]] == [1, 2, 3]
    assert CrossvalResult.from_dict(raw) == result


def test_one_mlflow_run_of_kind_crossval_holds_the_recipe_and_the_figures(tiny_run):
    params, workspace, result, _ = tiny_run
    mlflow.set_tracking_uri(f"sqlite:///{workspace.root.resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[params.register.experiment], output_format="list")
    assert len(runs) == 1
    logged = runs[0].data
    assert logged.tags["kind"] == "crossval"
    # The machine the folds trained on, as on a training run (tracking.hardware_tags): fold figures
    # from two cross-validations compare bit for bit only on the same kind of CPU.
    assert logged.tags["device"] == "cpu" and logged.tags["cpu_capability"] and logged.tags["cpu_model"]
    assert logged.params["crossval.folds"] == "3" and logged.params["profile.image_size"] == "64"
    assert logged.metrics["oof_roc_auc"] == pytest.approx(result.summary["oof_roc_auc"])
    assert logged.metrics["fold_2_roc_auc"] == pytest.approx(result.folds[1].roc_auc)
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "fold_1_val_roc_auc")
    assert [m.step for m in history] == [1, 2]


def test_cli_prints_one_line_per_fold_and_the_summary(tiny_run, capsys):
    from fracture.cli import _print_crossval

    _, workspace, result, _ = tiny_run
    _print_crossval(result)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["fold 1", "fold 2", "fold 3"]
    # Each figure as the held-out predictions written to oof.csv give it (the last epoch's).
    oof = workspace.read_crossval_oof()
    folds = []
    for fold, line in enumerate(lines[:3], start=1):
        held = oof[oof["fold"] == fold]
        folds.append(roc_auc_score(held["label"], held["probability"]))
        assert f"held out {len(held)} ({int(held['label'].sum())} fractured): ROC AUC {folds[-1]:.4f} after the " \
               "last epoch (best " in line, line
    assert lines[3].startswith(f"3 folds: ROC AUC {np.mean(folds):.4f} +/- "), lines[3]
    everything = roc_auc_score(oof["label"], oof["probability"])
    assert lines[4].startswith(f"out-of-fold, 24 images ({int(oof['label'].sum())} fractured): ROC AUC "
                               f"{everything:.4f} (95% CI "), lines[4]


def test_cli_exits_with_one_line_when_the_folds_cannot_be_drawn(tmp_path, monkeypatch):
    from fracture.cli import main

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    ws = Workspace(tmp_path)
    frame = pd.DataFrame({"image_id": [f"i{k}" for k in range(8)], "label": [1, 0, 0, 0, 0, 0, 0, 0]})
    ws.write_split({"train": frame.iloc[:6], "val": frame.iloc[6:], "test": frame.iloc[:0]}, {})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["crossval"])
    message = str(exit_.value.code)
    assert message.startswith("fracture crossval: fold ") and "lower crossval.folds" in message
    assert "\n" not in message


def test_a_crossval_stopped_writing_leaves_no_figures_and_its_predictions_are_refused(tiny_run, tmp_path, monkeypatch):
    """metrics.json was written before oof.csv: a full disk between them left the new figures beside
    the previous run's predictions, which crossval-compare then compared as this run's."""
    import errno

    from fracture.cli import main

    _, done, result, _ = tiny_run
    oof = done.read_crossval_oof()
    workspace = Workspace(tmp_path)
    workspace.write_crossval(result, oof)
    before = workspace.crossval_oof.read_bytes()
    assert read_oof(str(workspace.crossval_oof), tmp_path).equals(read_oof(str(done.crossval_oof), done.root))

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(pd.DataFrame, "to_csv", full)
        with pytest.raises(OSError, match="No space left"):
            workspace.write_crossval(result, oof.assign(probability=0.5))
    assert not workspace.crossval_metrics.exists() and workspace.crossval_oof.read_bytes() == before
    with pytest.raises(CrossvalError, match=r"the cross-validation that wrote it did not finish .*metrics\.json is "
                                            r"written last and is missing.*`dvc repro crossval/dvc\.yaml` again"):
        read_oof(str(workspace.crossval_oof), tmp_path)
    # By hand, the stage's own message names the DVC stage and the lock file that describe its outputs.
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("fracture.stages.crossval.run_crossval", lambda *_: full())
    with pytest.raises(SystemExit) as exit_:
        main(["crossval"])
    message = str(exit_.value.code)
    assert "`dvc checkout --force crossval/dvc.yaml:crossval` puts them back, and crossval/dvc.lock still" in message


#: The start of a Python of its own whose cross-validation's first fold is stopped by SIGTERM (a
#: scheduler's time limit, ``kill``), on the tiny recipe; what runs the fold follows it.
SIGTERM_STOPS_THE_FIRST_FOLD = """
import os, signal, sys, time
from pathlib import Path
import fracture.cli as cli
import fracture.stages.crossval as stage
from fracture.workspace import Workspace
from tests.test_crossval import tiny_params

def stopped(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
    raise AssertionError("SIGTERM did not stop the fold")

stage.fit_fold = stopped
"""
#: ... the stage called directly: under pytest SIGTERM raises KeyboardInterrupt (tests/conftest.py).
SIGTERM_IN_A_FOLD = SIGTERM_STOPS_THE_FIRST_FOLD + """
stage.run_crossval(tiny_params(), Workspace(Path(sys.argv[1])))
"""


@pytest.mark.parametrize(("stop", "status"), [("ctrl-c", "KILLED"), ("sigterm", "KILLED"), ("error", "FAILED")])
def test_a_crossval_stopped_in_a_fold_ends_its_mlflow_run_killed_or_failed_never_running(
    tmp_path, monkeypatch, stop, status
):
    """A fold stopped part-way (Ctrl-C, a scheduler's SIGTERM, an error) left the run RUNNING in
    MLflow's UI for good, or FAILED for a run a user stopped: it ends KILLED when stopped, FAILED on an error."""
    import signal

    import fracture.stages.crossval as stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    params = tiny_params()
    workspace = tiny_workspace(tmp_path, params)
    if stop == "sigterm":
        handler = signal.getsignal(signal.SIGTERM)
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", SIGTERM_IN_A_FOLD, str(tmp_path)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode != 0 and "KeyboardInterrupt: signal SIGTERM" in done.stderr, done.stderr[-2000:]
        assert signal.getsignal(signal.SIGTERM) is handler
    else:
        def stopped(*_args, **_kwargs):
            raise KeyboardInterrupt if stop == "ctrl-c" else RuntimeError("CUDA error: an illegal memory access")

        monkeypatch.setattr(stage, "fit_fold", stopped)
        with pytest.raises(KeyboardInterrupt if stop == "ctrl-c" else RuntimeError):
            stage.run_crossval(params, workspace)
        assert mlflow.active_run() is None
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=[params.register.experiment], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    assert [(r.data.tags["kind"], r.info.status) for r in runs] == [("crossval", status)]
    assert runs[0].info.end_time is not None


#: ... ``fracture crossval``, the command.
SIGTERM_IN_THE_COMMAND = SIGTERM_STOPS_THE_FIRST_FOLD + """
cli.load_params = lambda *_args, **_kwargs: tiny_params()
cli.main(["crossval"])
"""


def test_crossval_stopped_by_sigterm_exits_143_with_one_line_as_predict_does(tmp_path):
    """A scheduler's SIGTERM ended `fracture crossval` with exit status 130, as Ctrl-C does, not
    the 143 (128 + 15) a shell, a scheduler and `fracture predict` report for it."""
    tiny_workspace(tmp_path, tiny_params())
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SIGTERM_IN_THE_COMMAND], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "fracture crossval: interrupted by SIGTERM; its MLflow run is ended KILLED and no figures are written: run "
        "it again to cross-validate"
    )
    assert not (tmp_path / "outputs" / "crossval" / "metrics.json").exists()


# --- the DVC pipeline file ------------------------------------------------------------------------


def test_crossval_is_a_separate_pipeline_with_the_train_stages_recipe():
    root = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "crossval" not in root and not any("crossval" in str(s.get("cmd")) for s in root.values())
    spec = yaml.safe_load((REPO / "crossval" / "dvc.yaml").read_text())
    assert spec["vars"] == ["../params.yaml"]
    assert list(spec["stages"]) == ["crossval"]
    stage = spec["stages"]["crossval"]
    assert stage["wdir"] == ".." and stage["cmd"] == "fracture crossval"
    deps = set(stage["deps"])
    assert "outputs/split/test.csv" not in deps
    # The same inputs and code as the train stage; of the train stage module, crossval runs only
    # its MLflow logging, left out as fracture/tracking.py is.
    trains_on = set(root["train"]["deps"]) - {"outputs/split/test.csv", "fracture/stages/train.py"}
    assert trains_on <= deps
    assert {"fracture/stages/crossval.py", "fracture/crossval.py", "fracture/split.py", "fracture/evaluation.py"} <= deps
    for path in deps:
        assert path.startswith("outputs/") or (REPO / path).is_file() or path == "pretrained", path
    # Every param of the train stage is tracked (itself or a section holding it), and crossval.
    params = stage["params"]
    assert "crossval" in params
    for name in root["train"]["params"]:
        assert any(name == p or name.startswith(f"{p}.") for p in params), name
    ws = Workspace(Path("."))
    assert stage["metrics"] == [{str(ws.crossval_metrics): {"cache": True}}]
    assert stage["outs"] == [str(ws.crossval_oof)]


#: Stands in for the `fracture` command under DVC: records the command and its working directory
#: and writes the outputs its stage declares, so real dvc runs the real pipeline files in seconds.
STUB = """
import sys
import warnings
from pathlib import Path

import yaml

command, root = sys.argv[1], Path.cwd()
with open(root / "calls.log", "a") as log:
    log.write(f"{command} {root}\\n")
for spec in (root / "dvc.yaml", root / "crossval" / "dvc.yaml"):
    for stage in yaml.safe_load(spec.read_text())["stages"].values():
        if stage["cmd"] != f"fracture {command}":
            continue
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = root / (entry if isinstance(entry, str) else next(iter(entry)))
            folder = path if not path.suffix else path.parent
            folder.mkdir(parents=True, exist_ok=True)
            (path / "stub" if not path.suffix else path).write_text("{}\\n")
"""


def calls(root: Path) -> list[str]:
    """The stub's log: ``<command> <working directory>`` per call, then emptied."""
    log = root / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


@pytest.mark.integration
def test_dvc_runs_crossval_only_when_its_file_is_named(tmp_path, monkeypatch):
    """With the real dvc and the real pipeline files: a root `dvc repro` never runs crossval; naming
    crossval/dvc.yaml runs it from the repository root, with params from the root params.yaml."""
    for name in ("dvc.yaml", "params.yaml", "crossval/dvc.yaml", "pretrained/README.md", "split_assignments.csv"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "fracture", tmp_path / "fracture", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.csv").write_text("image_id\n")
    stub = tmp_path / "bin" / "fracture"
    stub.parent.mkdir()
    stub.write_text(f"#!{sys.executable}\n{STUB}")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    run(tmp_path, "git", "init", "-q")
    dvc(tmp_path, "init", "-q")
    root = str(tmp_path)

    dvc(tmp_path, "repro")
    assert calls(tmp_path) == [f"{c} {root}" for c in ("validate", "split", "prepare", "train", "evaluate")]
    assert not (tmp_path / "crossval" / "dvc.lock").exists()

    out = dvc(tmp_path, "repro", "crossval/dvc.yaml")
    assert "Running stage 'crossval/dvc.yaml:crossval'" in out
    assert calls(tmp_path) == [f"crossval {root}"]  # wdir: .. ; upstream stages were up to date
    assert (tmp_path / "outputs" / "crossval" / "oof.csv").is_file()
    lock = yaml.safe_load((tmp_path / "crossval" / "dvc.lock").read_text())["stages"]["crossval"]
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    active = params["train"]["profile"]
    assert lock["params"] == {"params.yaml": {
        "crossval": params["crossval"], "train": params["train"], f"profiles.{active}": params["profiles"][active],
        "prepare.aspect": params["prepare"]["aspect"], "prepare.enhance": params["prepare"]["enhance"],
        "validate.on_truncated": params["validate"]["on_truncated"],
        **{f"evaluate.{k}": params["evaluate"][k] for k in ("threshold", "target_sensitivity", "bootstrap_resamples", "seed")},
    }}
    assert "Data and pipelines are up to date" in dvc(tmp_path, "status", "crossval/dvc.yaml")

    # A recipe change: the root pipeline retrains, crossval only reports itself changed.
    params["profiles"][active]["epochs"] += 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert re.search(rf"modified:\s+profiles\.{active}\n", dvc(tmp_path, "status", "crossval/dvc.yaml"))
    dvc(tmp_path, "repro")
    assert calls(tmp_path) == [f"train {root}", f"evaluate {root}"]


# --- comparing recipes on their out-of-fold predictions -----------------------------------------


def oof_frame(labels: np.ndarray, probs: np.ndarray, folds: np.ndarray | None = None) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame({
        "image_id": [f"IMG{k:07d}.jpg" for k in range(n)],
        "fold": folds if folds is not None else np.arange(n) % 3 + 1,
        "label": labels,
        "probability": probs,
    })


def two_recipes(
    images: int, fractured: int, signal: float, noise: tuple[float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (the first ``fractured`` images fractured), and two recipes' probabilities: the same
    ``signal`` on the fractured images under each recipe's own ``noise`` (the weaker first)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(images) < fractured).astype(int)
    # Through the logistic function, as a network's logits become probabilities: oof.csv holds [0, 1].
    weak, strong = (expit(labels * signal + rng.normal(0, sd, images)) for sd in noise)
    return labels, weak, strong


@pytest.fixture(scope="module")
def scored() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """400 images (80 fractured): one recipe's probabilities, and a better one's (less noise on the same signal)."""
    return two_recipes(400, 80, 1.5, (1.5, 0.6), seed=0)


def test_comparing_a_run_with_itself_finds_no_difference(scored):
    labels, weak, _ = scored
    ev = load_params().evaluate
    reference, same = compare_oof({"a": oof_frame(labels, weak), "b": oof_frame(labels, weak)}, ev).rows
    assert reference.versus_reference is None and reference.roc_auc == pytest.approx(roc_auc_score(labels, weak))
    assert same.versus_reference.difference == 0 and same.versus_reference.p_value == 1
    # The rule of `fracture crossval`'s summary: the threshold reaching the target sensitivity.
    assert reference.threshold == choose_threshold(labels, weak, ev.target_sensitivity)
    pred = weak >= reference.threshold
    assert reference.recall == pytest.approx(recall_score(labels, pred))
    assert reference.specificity == pytest.approx(recall_score(labels, pred, pos_label=0))


def test_a_better_recipe_is_found_better_whatever_order_its_images_are_listed_in(scored):
    labels, weak, strong = scored
    shuffled = oof_frame(labels, strong).sample(frac=1, random_state=1)
    rows = compare_oof({"weak": oof_frame(labels, weak), "strong": shuffled}, load_params().evaluate).rows
    paired = rows[1].versus_reference
    assert paired.auc_a == pytest.approx(roc_auc_score(labels, strong)) and paired.auc_b == pytest.approx(rows[0].roc_auc)
    assert paired.difference > 0 and paired.ci_low > 0 and paired.p_value < 0.05
    assert (paired.n_images, paired.n_fractured) == (400, 80)


def test_the_ensemble_row_scores_the_mean_of_every_runs_probabilities(scored):
    labels, weak, strong = scored
    rows = compare_oof(
        {"weak": oof_frame(labels, weak), "strong": oof_frame(labels, strong)}, load_params().evaluate, ensemble=True
    ).rows
    assert [r.name for r in rows] == ["weak", "strong", ENSEMBLE]
    assert rows[2].roc_auc == pytest.approx(roc_auc_score(labels, (weak + strong) / 2))
    assert rows[2].versus_reference.auc_b == pytest.approx(rows[0].roc_auc)


def test_runs_on_other_folds_images_or_labels_are_not_compared(scored):
    labels, weak, strong = scored
    ev = load_params().evaluate
    reference = oof_frame(labels, weak)
    other_folds = oof_frame(labels, strong, folds=np.arange(400) % 3 + 1)
    other_folds.loc[5, "fold"] = other_folds.loc[5, "fold"] % 3 + 1
    with pytest.raises(CrossvalError, match=r"differ in `fold` for 1 image\(s\) \(first: IMG0000005.jpg\).*crossval.seed"):
        compare_oof({"ref": reference, "new": other_folds}, ev)
    with pytest.raises(CrossvalError, match=r"new held out 0 image\(s\) ref did not and missed 1"):
        compare_oof({"ref": reference, "new": oof_frame(labels, strong).iloc[1:]}, ev)
    flipped = oof_frame(labels, strong)
    flipped.loc[0, "label"] = 0
    with pytest.raises(CrossvalError, match=r"differ in `label`"):
        compare_oof({"ref": reference, "new": flipped}, ev)
    with pytest.raises(CrossvalError, match=r"lack the column\(s\) \['fold'\]"):
        compare_oof({"ref": reference, "new": oof_frame(labels, strong).drop(columns="fold")}, ev)
    twice = pd.concat([oof_frame(labels, strong), oof_frame(labels, strong).iloc[:1]])
    with pytest.raises(CrossvalError, match=r"new: image_id IMG0000000.jpg is listed twice"):
        compare_oof({"ref": reference, "new": twice}, ev)
    with pytest.raises(CrossvalError, match="two runs or more"):
        compare_oof({"ref": reference}, ev)


def copies_of(labels: np.ndarray, probs: np.ndarray, copies: int) -> pd.DataFrame:
    """Out-of-fold predictions of each image stored ``copies`` times, the copies one group (named by
    the first of them, as :func:`fracture.split.group_key` names a group) in one fold."""
    folds = np.repeat(np.arange(len(labels)) % 3 + 1, copies)
    frame = oof_frame(np.repeat(labels, copies), np.repeat(probs, copies), folds)
    return frame.assign(group=frame["image_id"].to_numpy()[np.arange(len(frame)) // copies * copies])


@pytest.fixture(scope="module")
def undecided() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """60 images (20 fractured) on which a better recipe's lead is too small for DeLong's test to call."""
    return two_recipes(60, 20, 1.2, (1.3, 1.0), seed=2)


def test_linked_images_count_as_one_so_copies_find_no_difference_the_images_themselves_do_not_show(undecided):
    """Each of 60 X-rays stored 10 times: counted as 600 independent images, DeLong's test "finds"
    a difference; counted as their 60 groups, the test gives what the 60 X-rays alone give."""
    labels, weak, strong = undecided
    ev = load_params().evaluate
    alone = delong_paired(labels, strong, weak)
    assert alone.p_value > 0.2
    grouped = compare_oof({"weak": copies_of(labels, weak, 10), "strong": copies_of(labels, strong, 10)}, ev)
    paired = grouped.rows[1].versus_reference
    assert grouped.ungrouped == () and (paired.n_images, paired.n_groups) == (600, 60)
    assert paired.difference == pytest.approx(alone.difference)
    assert (paired.ci_low, paired.ci_high, paired.p_value) == pytest.approx(
        (alone.ci_low, alone.ci_high, alone.p_value)
    )
    as_images = compare_oof(
        {"weak": copies_of(labels, weak, 10).drop(columns="group"), "strong": copies_of(labels, strong, 10)}, ev
    ).rows[1].versus_reference
    assert as_images.difference == pytest.approx(alone.difference) and as_images.p_value < 0.01


def test_groups_of_one_image_give_the_per_image_difference(scored):
    labels, weak, strong = scored
    ev = load_params().evaluate
    runs = {"weak": oof_frame(labels, weak), "strong": oof_frame(labels, strong)}
    per_image = compare_oof(runs, ev, ensemble=True)
    grouped = {name: frame.assign(group=frame["image_id"]) for name, frame in runs.items()}
    alone = compare_oof(grouped, ev, ensemble=True)
    assert per_image.ungrouped == ("weak", "strong") and alone.ungrouped == ()
    for image, group in zip(per_image.rows[1:], alone.rows[1:], strict=True):
        d, g = image.versus_reference, group.versus_reference
        assert (d.n_groups, g.n_groups) == (None, 400)
        assert (g.difference, g.ci_low, g.ci_high, g.p_value) == pytest.approx(
            (d.difference, d.ci_low, d.ci_high, d.p_value), rel=1e-9
        )


def test_runs_that_link_the_images_into_other_groups_are_refused_naming_both_and_the_first_image(undecided):
    labels, weak, strong = undecided
    ev = load_params().evaluate
    reference = copies_of(labels, weak, 2)
    # The same groups named otherwise are the same grouping.
    renamed = copies_of(labels, strong, 2).assign(group=lambda f: "patient-" + f["group"])
    assert compare_oof({"ref": reference, "new": renamed}, ev).rows[1].versus_reference.n_groups == 60
    split_up = copies_of(labels, strong, 2)
    split_up.loc[5, "group"] = split_up.loc[5, "image_id"]  # IMG0000005.jpg apart from its copy IMG0000004.jpg
    with pytest.raises(
        CrossvalError,
        match=r"^new and ref link the images into other groups in `group` \(2 image\(s\) grouped otherwise, first: "
        r"IMG0000004\.jpg\): .*cross-validate both on the same split",
    ):
        compare_oof({"ref": reference, "new": split_up}, ev)
    empty = copies_of(labels, strong, 2).astype({"group": object})
    empty.loc[[3, 8], "group"] = np.nan
    with pytest.raises(CrossvalError, match=r"^new: `group` of IMG0000003\.jpg is empty.*\(2 image\(s\) in all\)"):
        compare_oof({"ref": reference, "new": empty}, ev)


def test_predictions_written_before_groups_were_are_compared_per_image_and_the_cli_says_so(
    tmp_path, undecided, monkeypatch, capsys
):
    from fracture.cli import main

    labels, weak, strong = undecided
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    copies_of(labels, weak, 10).to_csv(tmp_path / "weak.csv", index=False)
    copies_of(labels, strong, 10).to_csv(tmp_path / "strong.csv", index=False)
    copies_of(labels, strong, 10).drop(columns="group").to_csv(tmp_path / "old.csv", index=False)
    monkeypatch.chdir(tmp_path)
    main(["crossval-compare", "weak.csv", "strong.csv"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[4] == (
        "Each difference counts linked images (copies, near-duplicates, one patient's X-rays) as one: its variance "
        "is over their 60 groups, not the 600 images."
    )
    assert float(lines[3].rpartition("p = ")[2]) > 0.2
    main(["crossval-compare", "weak.csv", "old.csv"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[4].startswith(
        "Each difference counts every image as independent evidence, because the predictions of old.csv name no "
        "groups of linked images (re-run its crossval to get them)"
    )
    assert float(lines[3].rpartition("p = ")[2]) < 0.01


@pytest.mark.parametrize(
    ("column", "value", "shown"),
    [
        ("probability", np.nan, "empty"),
        ("probability", np.inf, "inf"),
        ("probability", 1.5, "1.5"),
        ("probability", -0.1, "-0.1"),
        ("probability", "high", "'high'"),
        ("label", 2, "2"),
        ("label", np.nan, "empty"),
    ],
)
def test_a_value_that_cannot_be_scored_is_refused_naming_the_run_column_and_image(scored, column, value, shown):
    labels, weak, strong = scored
    bad = oof_frame(labels, strong).astype({column: object})
    bad.loc[[7, 9], column] = value
    expected = re.escape("0 (not fractured) or 1 (fractured)" if column == "label" else "a probability in [0, 1]")
    with pytest.raises(
        CrossvalError,
        match=rf"^new: `{column}` of IMG0000007\.jpg is {re.escape(shown)}, not {expected} \(2 image\(s\) in all\); "
        r"give the oof\.csv `fracture crossval` wrote",
    ):
        compare_oof({"ref": oof_frame(labels, weak), "new": bad}, load_params().evaluate)


def test_an_empty_probability_in_the_file_is_refused_by_the_cli_naming_the_file_and_image(tmp_path, scored, monkeypatch):
    from fracture.cli import main

    labels, weak, strong = scored
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    oof_frame(labels, weak).to_csv(tmp_path / "a.csv", index=False)
    oof_frame(labels, strong).assign(probability=lambda f: f["probability"].where(f.index != 16)).to_csv(
        tmp_path / "b.csv", index=False
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["crossval-compare", "a.csv", "b.csv"])
    assert str(exit_.value.code).startswith(
        "fracture crossval-compare: b.csv: `probability` of IMG0000016.jpg is empty, not a probability in [0, 1]"
    )


def test_runs_of_one_class_are_refused_naming_the_run_and_its_counts(scored):
    labels, weak, strong = scored
    ev = load_params().evaluate
    intact = labels == 0
    one_class = {name: oof_frame(labels[intact], probs[intact]) for name, probs in (("ref", weak), ("new", strong))}
    with pytest.raises(
        CrossvalError,
        match=r"^ref: `label` holds 0 fractured and 320 not fractured images: ROC AUC and DeLong's test need both classes",
    ):
        compare_oof(one_class, ev)


def seed_runs(rng: np.random.Generator, labels: np.ndarray, runs: int, quality: float = 0.2) -> list[np.ndarray]:
    """Runs of one recipe under other training seeds: every run scores the same images (whose
    difficulty they share), and each fold's model of each run learned the task a little better or
    worse and scores on a shifted scale, as the cross-validated networks do. 1 fractured in 6.
    Probabilities: the logistic function of those scores."""
    folds = np.arange(len(labels)) % 3
    difficulty = rng.normal(0, 1, len(labels))
    return [
        expit(
            labels * (2.2 + rng.normal(0, quality, 3)[folds]) + difficulty + rng.normal(0, 0.5, len(labels))
            + rng.normal(0, quality, 3)[folds]
        )
        for _ in range(runs)
    ]


def test_the_mean_difference_of_several_runs_has_the_spread_resampling_the_images_gives():
    """DeLong's variance of a contrast of several correlated AUCs (2 runs against 3) is what
    resampling the images gives, and one run a side is DeLong's paired test itself."""
    rng = np.random.default_rng(5)
    labels = (np.arange(600) < 100).astype(int)
    a, b = seed_runs(rng, labels, 2), seed_runs(rng, labels, 3)
    result = delong_mean_difference(labels, a, b)
    assert result.auc_a == pytest.approx(np.mean([roc_auc_score(labels, x) for x in a]))
    assert result.auc_b == pytest.approx(np.mean([roc_auc_score(labels, x) for x in b]))
    state = np.random.RandomState(0)
    diffs = []
    for _ in range(400):
        rows = resample(np.arange(600), stratify=labels, random_state=state)
        y = labels[rows]
        diffs.append(np.mean([roc_auc_score(y, x[rows]) for x in a]) - np.mean([roc_auc_score(y, x[rows]) for x in b]))
    assert (result.ci_high - result.ci_low) / 2 / 1.959964 == pytest.approx(np.std(diffs), rel=0.15)
    assert delong_mean_difference(labels, a[:1], b[:1]) == delong_paired(labels, a[0], b[0])
    with pytest.raises(ValueError, match="each side needs a run at least: 2 and 0"):
        delong_mean_difference(labels, a, [])


def test_the_spread_between_runs_is_added_and_read_with_students_t():
    rng = np.random.default_rng(6)
    labels = (np.arange(600) < 100).astype(int)
    a, b = seed_runs(rng, labels, 1), seed_runs(rng, labels, 3)
    fixed = delong_mean_difference(labels, a, b)
    images = ((fixed.ci_high - fixed.ci_low) / 2 / 1.959964) ** 2
    runs = 4e-5
    wider = delong_mean_difference(labels, a, b, between_run_variance=runs, between_run_df=2)
    total = images + runs
    half = student_t.ppf(0.975, total**2 * 2 / runs**2) * total**0.5  # Welch-Satterthwaite
    assert wider.difference == fixed.difference
    assert (wider.ci_high - wider.ci_low) / 2 == pytest.approx(half)
    assert wider.p_value > fixed.p_value
    # Without degrees of freedom the normal approximation, as for the images alone.
    normal = delong_mean_difference(labels, a, b, between_run_variance=runs)
    assert (normal.ci_high - normal.ci_low) / 2 == pytest.approx(1.959964 * total**0.5, rel=1e-6)


def test_recipes_of_several_runs_pool_the_spread_between_seeds_into_each_difference():
    rng = np.random.default_rng(7)
    labels = (np.arange(600) < 100).astype(int)
    three, two, one = seed_runs(rng, labels, 3), seed_runs(rng, labels, 2), seed_runs(rng, labels, 1)
    compared = compare_oof(
        {
            "a": {f"a{i}": oof_frame(labels, x) for i, x in enumerate(three)},
            "b": {f"b{i}": oof_frame(labels, x) for i, x in enumerate(two)},
            "c": oof_frame(labels, one[0]),
        },
        load_params().evaluate,
        ensemble=True,
    )
    aucs = {name: np.array([roc_auc_score(labels, x) for x in runs]) for name, runs in (("a", three), ("b", two))}
    pooled = (((aucs["a"] - aucs["a"].mean()) ** 2).sum() + ((aucs["b"] - aucs["b"].mean()) ** 2).sum()) / 3
    assert compared.run_sd == pytest.approx(pooled**0.5) and compared.run_sd_df == 3
    a, b, c, mean = compared.rows
    assert [r.name for r in compared.rows] == ["a", "b", "c", ENSEMBLE] and [r.runs for r in compared.rows] == [3, 2, 1, 1]
    assert a.roc_auc == pytest.approx(aucs["a"].mean()) and a.roc_auc_sd == pytest.approx(aucs["a"].std(ddof=1))
    assert c.roc_auc_sd is None and a.versus_reference is None
    assert b.versus_reference == delong_mean_difference(
        labels, two, three, between_run_variance=pooled * (1 / 2 + 1 / 3), between_run_df=3
    )
    assert c.versus_reference == delong_mean_difference(
        labels, one, three, between_run_variance=pooled * (1 + 1 / 3), between_run_df=3
    )
    assert mean.roc_auc == pytest.approx(roc_auc_score(labels, np.mean(three + two + one, axis=0)))
    assert mean.versus_reference == delong_mean_difference(
        labels, [np.mean(three + two + one, axis=0)], three, between_run_variance=pooled * (1 + 1 / 3), between_run_df=3
    )
    with pytest.raises(CrossvalError, match="a1 is a run of both a and b: give each run to one recipe only"):
        compare_oof({"a": {"a1": oof_frame(labels, three[0])}, "b": {"a1": oof_frame(labels, two[0])}}, load_params().evaluate)


def test_one_recipe_under_other_seeds_is_not_found_different_once_their_spread_is_counted():
    """Same recipe, other seeds, 100 times over: DeLong's test on one run each calls the runs
    different far more often than its 5%, since each fold's model moves with the seed; counting
    the spread of three more runs brings the rate back to about 5%. (Over 1,000 such draws: 26.2%
    and 5.1%; the bounds below leave room for 100 draws' own spread.)"""
    rng = np.random.default_rng(8)
    labels = (np.arange(600) < 100).astype(int)
    ev = load_params().evaluate
    one_each = counted = 0
    for _ in range(100):
        runs = [oof_frame(labels, x) for x in seed_runs(rng, labels, 4)]
        one_each += compare_oof({"a": runs[0], "b": runs[1]}, ev).rows[1].versus_reference.p_value < 0.05
        compared = compare_oof({"a": runs[0], "b": {"b1": runs[1], "b2": runs[2], "b3": runs[3]}}, ev)
        counted += compared.rows[1].versus_reference.p_value < 0.05
    assert one_each >= 15 and counted <= 12


def test_runs_are_read_from_dvc_experiments_revisions_and_files(tmp_path, scored):
    """`fracture crossval-compare` reads outputs/crossval/oof.csv where `dvc exp run` left it."""
    labels, weak, strong = scored
    run(tmp_path, "git", "init", "-q")
    dvc(tmp_path, "init", "-q")
    oof = Workspace(tmp_path).crossval_oof
    oof.parent.mkdir(parents=True)
    oof_frame(labels, weak).to_csv(oof, index=False)
    dvc(tmp_path, "add", "-q", "outputs/crossval/oof.csv")
    run(tmp_path, "git", "add", "-A")
    run(tmp_path, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "weak recipe")
    oof_frame(labels, strong).to_csv(oof, index=False)
    dvc(tmp_path, "add", "-q", "outputs/crossval/oof.csv")
    dvc(tmp_path, "exp", "save", "-q", "-n", "cv-strong")
    oof.unlink()  # read from the experiment and from DVC's cache, not from the working tree

    assert np.allclose(read_oof("cv-strong", tmp_path)["probability"], strong)
    assert np.allclose(read_oof("HEAD", tmp_path)["probability"], weak)
    copy = tmp_path / "weak.csv"
    oof_frame(labels, weak).to_csv(copy, index=False)
    assert np.allclose(read_oof(str(copy), tmp_path)["probability"], weak)
    with pytest.raises(CrossvalError, match=r"cv-missing: no file of that name, and no revision or `dvc exp`"):
        read_oof("cv-missing", tmp_path)
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(CrossvalError, match=r"empty.csv: not a CSV of out-of-fold predictions"):
        read_oof(str(tmp_path / "empty.csv"), tmp_path)
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CrossvalError, match=r"model.bin: not a CSV of out-of-fold predictions"):
        read_oof(str(tmp_path / "model.bin"), tmp_path)
    shutil.rmtree(tmp_path / ".dvc" / "cache")  # the experiment stays; its file's content is gone
    with pytest.raises(CrossvalError, match=r"cv-strong: this revision of the project has outputs/crossval/oof.csv, "
                       r"but neither DVC's cache nor its remote holds the file's content .*`dvc exp pull <remote> cv-strong`"):
        read_oof("cv-strong", tmp_path)
    with pytest.raises(CrossvalError, match=r"cv-missing: no file of that name, and no revision or `dvc exp`"):
        read_oof("cv-missing", tmp_path)


def test_one_member_of_an_ensembles_run_is_read_as_a_run_of_its_own(tmp_path, scored):
    labels, weak, strong = scored
    pair = oof_frame(labels, (weak + strong) / 2).assign(probability_member_1=weak, probability_member_2=strong)
    path = tmp_path / "pair#1.csv"  # a file's own name is read whole, even with a # in it
    pair.to_csv(path, index=False)
    assert np.allclose(read_oof(str(path), tmp_path)["probability"], (weak + strong) / 2)
    assert np.allclose(read_oof(f"{path}#member_2", tmp_path)["probability"], strong)
    assert np.allclose(read_oof(f"{path}#member_1", tmp_path)["probability"], weak)
    with pytest.raises(CrossvalError, match=r"pair#1.csv's predictions hold no 'member_3'; it holds #member_1, #member_2"):
        read_oof(f"{path}#member_3", tmp_path)
    one = tmp_path / "one.csv"
    oof_frame(labels, weak).to_csv(one, index=False)
    with pytest.raises(CrossvalError, match=r"one.csv's predictions hold no 'probability'; it is one network's"):
        read_oof(f"{one}#probability", tmp_path)


def test_cli_prints_each_run_and_its_paired_difference(tmp_path, scored, monkeypatch, capsys):
    from fracture.cli import main

    labels, weak, strong = scored
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    for name, probs in (("weak.csv", weak), ("strong.csv", strong)):
        oof_frame(labels, probs).to_csv(tmp_path / name, index=False)
    monkeypatch.chdir(tmp_path)
    main(["crossval-compare", "weak.csv", "strong.csv", "--ensemble"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("out-of-fold, 400 images (80 fractured)")
    assert [line.split()[0] for line in lines[2:5]] == ["weak.csv", "strong.csv", "mean"]
    # Files written before the crossval stage named each image's group: compared image by image, and said so.
    assert lines[5].startswith("Each difference counts every image as independent evidence, because the predictions "
                               "of weak.csv, strong.csv name no groups of linked images (re-run their crossval")
    assert lines[6].startswith("DeLong's test holds each run's predictions fixed") and len(lines) == 7
    assert lines[2].rstrip().endswith("reference") and ", p = " in lines[3]
    with pytest.raises(SystemExit) as exit_:
        main(["crossval-compare", "weak.csv"])
    assert str(exit_.value.code) == "fracture crossval-compare: comparing needs two runs or more, the reference first; got 1"
    # The same run given twice was read once, then refused as "got 1".
    with pytest.raises(SystemExit) as exit_:
        main(["crossval-compare", "weak.csv", "weak.csv"])
    assert str(exit_.value.code) == ("fracture crossval-compare: 'weak.csv' given twice; give each recipe once, the "
                                     "reference first")
    # A file whose name holds a comma is one run, not two (the error named a fragment of the path).
    (tmp_path / "seed 7, lr 6e-4.csv").write_bytes((tmp_path / "strong.csv").read_bytes())
    capsys.readouterr()
    main(["crossval-compare", "weak.csv", "seed 7, lr 6e-4.csv"])
    assert capsys.readouterr().out.splitlines()[3].startswith("seed 7, lr 6e-4.csv ")


def test_cli_takes_a_recipes_runs_joined_by_commas_and_counts_their_spread(tmp_path, monkeypatch, capsys):
    from fracture.cli import main

    rng = np.random.default_rng(9)
    labels = (np.arange(600) < 100).astype(int)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    for i, probs in enumerate(seed_runs(rng, labels, 4)):
        oof_frame(labels, probs).to_csv(tmp_path / f"s{i}.csv", index=False)
    monkeypatch.chdir(tmp_path)
    main(["crossval-compare", "s0.csv,s1.csv,s2.csv", "s3.csv"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("out-of-fold, 600 images (100 fractured)")
    assert lines[2].split()[:2] == ["s0.csv,s1.csv,s2.csv", "3"] and lines[3].split()[:2] == ["s3.csv", "1"]
    sd = np.std([roc_auc_score(labels, pd.read_csv(tmp_path / f"s{i}.csv")["probability"]) for i in range(3)], ddof=1)
    assert f"({sd:.4f})" in lines[2] and f"sd {sd:.4f}" in lines[5] and "2 degrees of freedom" in lines[5]
    assert "paired variance over the images and" in lines[5] and "name no groups" in lines[4]
    assert len(lines) == 6
    # The same runs naming their groups (pairs of linked images): every line speaks of groups.
    for i in range(4):
        frame = pd.read_csv(tmp_path / f"s{i}.csv")
        frame.assign(group=np.arange(600) // 2).to_csv(tmp_path / f"s{i}.csv", index=False)
    main(["crossval-compare", "s0.csv,s1.csv,s2.csv", "s3.csv"])
    lines = capsys.readouterr().out.splitlines()
    assert "over their 300 groups, not the 600 images" in lines[4]
    assert "paired variance over the groups and" in lines[5] and "over the images" not in lines[5]
    with pytest.raises(SystemExit) as exit_:
        main(["crossval-compare", "s0.csv,s0.csv", "s3.csv"])
    assert str(exit_.value.code) == (
        "fracture crossval-compare: 's0.csv,s0.csv': name each of a recipe's runs once, joined by commas"
    )
