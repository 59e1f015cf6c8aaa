"""The workspace: each stage's files written and read back as typed records, and the CLI's help."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from fracture.data_config import DataConfig
from fracture.workspace import (
    EvaluateResult,
    SplitTablesMixed,
    TrainedModel,
    Workspace,
    read_table,
)

CONFIG = DataConfig((3, 224, 224), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_train_outputs_round_trip_and_keep_model_json_layout(tmp_path):
    ws = Workspace(tmp_path)
    model = TrainedModel("tf_efficientnet_lite0", "cpu", ["not_fractured", "fractured"], CONFIG, 4, 0.91)
    ws.write_train(model, "run-1", "7", [{"epoch": 1, "val_roc_auc": 0.9}])
    back = ws.read_train()
    assert back.model == model and (back.run_id, back.experiment_id) == ("run-1", "7")
    # model.json is what the registered model carries: every key of the data config, as JSON lists.
    raw = json.loads(ws.model_json.read_text())
    assert raw["data_config"] == {
        "input_size": [3, 224, 224], "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5], "aspect": "squash", "enhance": "none", "decode": "full",
    }
    assert set(raw) == {"architecture", "profile", "classes", "data_config", "best_epoch", "best_val_roc_auc", "tta",
                        "members", "member_best_epochs", "snapshots"}
    assert (raw["members"], raw["member_best_epochs"], raw["snapshots"]) == (1, [], 1)
    # A model.json written before ensembles existed reads as one network.
    ws.model_json.write_text(json.dumps({k: v for k, v in raw.items()
                                         if k not in ("members", "member_best_epochs", "snapshots")}))
    assert ws.read_train().model == model


def test_serving_config_is_the_trained_model_with_the_evaluated_threshold(tmp_path):
    ws = Workspace(tmp_path)
    ws.write_train(TrainedModel("tf_efficientnet_lite0", "cpu", ["n", "f"], CONFIG, 2, 0.8), "r", "1", [])
    written = EvaluateResult({"threshold": 0.123, "roc_auc": 0.9}, {"tn": 3, "fp": 1, "fn": 2, "tp": 5})
    ws.write_evaluate(written, {})
    config = ws.serving_config()
    assert (config.architecture, config.data_config, config.threshold) == ("tf_efficientnet_lite0", CONFIG, 0.123)
    assert config.to_dict()["profile"] == "cpu"
    # metrics.json holds the metrics and the confusion counts as written, and reads back as the same result.
    assert json.loads(ws.metrics.read_text()) == {"threshold": 0.123, "roc_auc": 0.9,
                                                  "confusion": {"tn": 3, "fp": 1, "fn": 2, "tp": 5}}
    assert ws.read_evaluate() == written


def test_split_sizes_are_read_from_the_tables(tmp_path):
    ws = Workspace(tmp_path)
    frames = {
        name: pd.DataFrame({"image_id": [f"{name}{i}" for i in range(n)], "label": [1] * k + [0] * (n - k)})
        for name, n, k in (("train", 5, 2), ("val", 3, 1), ("test", 2, 0))
    }
    result = ws.write_split(frames, {"strategy": "stratified"})
    assert result.sizes == {"train": 5, "val": 3, "test": 2}
    assert result.fractured == {"train": 2, "val": 1, "test": 0}


def test_a_split_stopped_between_its_tables_is_not_read(tmp_path, monkeypatch):
    """`fracture split` typed by hand with a new seed, stopped while writing val.csv: train.csv was the
    new draw's and test.csv the old one's, sharing images, and train read them without a word. The
    report goes first and comes back last, and the tables are not read without it."""
    ws = Workspace(tmp_path)

    def tables(seed: int) -> dict[str, pd.DataFrame]:
        ids = pd.Series([f"IMG{i}" for i in range(12)]).sample(frac=1, random_state=seed).tolist()
        return {name: pd.DataFrame({"image_id": ids[a:b], "label": [0, 1] * ((b - a) // 2)})
                for name, a, b in (("train", 0, 6), ("val", 6, 8), ("test", 8, 12))}

    ws.write_split(tables(1), {"seed": 1})
    assert set(ws.read_split_tables()) == {"train", "val", "test"}
    written = pd.DataFrame.to_csv

    def stopped(frame, path, *args, **kwargs):
        if str(path).endswith("val.csv"):
            raise KeyboardInterrupt
        return written(frame, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", stopped)
    with pytest.raises(KeyboardInterrupt):
        ws.write_split(tables(2), {"seed": 2})
    monkeypatch.undo()
    for name in ("train", "test"):
        with pytest.raises(FileNotFoundError, match=r"split/report\.json not found: the split stage that wrote .*"
                                                    rf"{name}\.csv did not finish .* run the split stage again"):
            ws.read_split_table(name)
    # Tables that share an image, whatever made them so, are refused by name.
    mixed = tables(1)
    mixed["test"] = pd.concat([mixed["test"], mixed["train"].iloc[:2]])
    ws.write_split(mixed, {"seed": 1})
    shared = ", ".join(sorted(mixed["train"]["image_id"].iloc[:2]))
    with pytest.raises(SplitTablesMixed, match=rf"train\.csv and .*test\.csv share 2 images \({shared}\): an image "
                                              r"belongs to one split; run the split stage again"):
        ws.read_split_tables()


def test_a_missing_output_names_the_stage_to_run(tmp_path):
    ws = Workspace(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"run the train stage first \(dvc repro train\)"):
        ws.read_train()
    with pytest.raises(FileNotFoundError, match=r"dvc repro validate"):
        ws.read_validate()


def test_data_config_needs_the_timm_keys_and_names_the_missing_ones():
    with pytest.raises(ValueError, match=r"lacks \['std'\]"):
        DataConfig.from_dict({"input_size": [3, 8, 8], "interpolation": "bicubic", "mean": [0.5] * 3})
    # Models registered before aspect and enhance existed were squashed and not enhanced.
    old = DataConfig.from_dict({"input_size": [3, 8, 8], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3})
    assert (old.aspect, old.enhance) == ("squash", "none")
    with pytest.raises(ValueError, match="aspect must be one of"):
        DataConfig((3, 8, 8), "bicubic", (0.5,) * 3, (0.5,) * 3, aspect="stretch")  # type: ignore[arg-type]


def test_cli_help_lists_every_stage_in_plain_words(capsys):
    from fracture.cli import main

    main(["--help"])  # a successful command returns to the caller
    text = capsys.readouterr().out
    for command in ("ingest", "validate", "split", "prepare", "train", "evaluate", "register", "rollback"):
        assert command in text
    assert "``" not in text and ":func:" not in text and ":mod:" not in text


@pytest.mark.parametrize(
    "module", ["fracture.cli", "fracture.stages.ingest", "fracture.stages.validate", "fracture.stages.split"]
)
def test_the_cli_and_the_stages_that_only_read_images_start_without_the_networks_stack(module):
    # Each stage runs in its own process under dvc repro: importing torch and timm there costs
    # seconds a run pays once per stage, for nothing.
    code = f"import sys, {module}; print(sorted({{'torch', 'timm', 'torchvision', 'mlflow'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _git(root, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A committed project inside a git repository (in a folder of it, as a monorepo holds one)."""
    project = tmp_path / "repo" / "project"
    files = ("fracture/training.py", "flows/retrain.py", "tasks/pipeline.py", "dvc.yaml", "dvc.lock",
             "params.yaml", "data.dvc", "detect/dvc.lock", ".gitignore", "README.md", "split_assignments.csv")
    for name in files:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("1\n")
    _git(tmp_path / "repo", "init", "-q")
    _git(tmp_path / "repo", "add", "-A")
    _git(tmp_path / "repo", "commit", "-qm", "release")
    return project


def test_a_clean_tree_is_tagged_with_its_commit_alone(checkout, tmp_path):
    head = _git(checkout, "rev-parse", "HEAD")
    ws = Workspace(checkout)
    assert ws.git_commit() == head and ws.git_tags() == {"git_commit": head} and ws.git_dirty_files() == []
    # What the pipeline and the flow write themselves, and files git does not track, leave it clean.
    for name in ("dvc.lock", "params.yaml", "data.dvc", "detect/dvc.lock", ".gitignore", "split_assignments.csv"):
        with (checkout / name).open("a") as f:
            f.write("2\n")
    (checkout / "fracture" / "scratch.py").write_text("untracked\n")
    assert ws.git_commit() == head and ws.git_tags() == {"git_commit": head}
    # Outside git: no commit to name.
    assert Workspace(tmp_path / "nowhere").git_commit() is None and Workspace(tmp_path / "nowhere").git_tags() == {}


def test_uncommitted_code_marks_the_commit_dirty_and_names_the_files(checkout):
    head = _git(checkout, "rev-parse", "HEAD")
    with (checkout / "fracture" / "training.py").open("a") as f:
        f.write("# hot-fix: clip gradients at 0.5\n")
    (checkout / "dvc.yaml").write_text("2\n")
    _git(checkout, "add", "dvc.yaml")  # staged, not committed: still not in the commit
    (checkout / "dvc.lock").write_text("2\n")  # the flow's advice names it; it is no code
    ws = Workspace(checkout)
    assert ws.git_commit() == f"{head}-dirty"
    assert ws.git_dirty_files() == ["dvc.yaml", "fracture/training.py"]  # relative to the project, for `git add`
    assert ws.git_tags() == {"git_commit": f"{head}-dirty", "git_dirty_files": "dvc.yaml, fracture/training.py"}


def test_a_long_list_of_dirty_files_is_cut_short_with_a_count():
    from fracture.workspace import dirty_files_tag

    files = [f"fracture/module_{i:03d}.py" for i in range(200)]
    tag = dirty_files_tag(files, limit=100)
    assert tag.startswith("fracture/module_000.py, fracture/module_001.py, ")
    kept = tag.split(" and ")[0].split(", ")
    assert len(", ".join(kept)) <= 100 and tag.endswith(f" and {200 - len(kept)} more (git status in the project lists them)")
    assert dirty_files_tag(files[:2]) == "fracture/module_000.py, fracture/module_001.py"
    assert len(dirty_files_tag(files)) < 1100  # MLflow takes 8000 characters a tag


def test_a_table_reads_back_ids_spelt_as_pandas_missing_values(tmp_path):
    """pandas reads the text NA, None and null as missing: three images so named validated, then came
    back from the manifest as missing ids, and the split stopped on "Reindexing only valid with
    uniquely valued Index objects"."""
    written = pd.DataFrame({"image_id": ["NA", "None", "null", "IMG1.jpg"], "path": ["images/NA", "", "images/null",
                                                                                       "images/IMG1.jpg"],
                            "patient_id": ["NA", "n/a", "", "P1"], "label": [1, 0, 1, None],
                            # Groups are named by one of their images: a link through NA was lost, and the
                            # folds split a near-duplicate pair.
                            "near_duplicate_group": ["NA", "None", "NA", "IMG1.jpg"], "group": ["NA"] * 3 + ["IMG1.jpg"]})
    written.to_csv(tmp_path / "manifest.csv", index=False)
    read = read_table(tmp_path / "manifest.csv")
    assert read["image_id"].tolist() == ["NA", "None", "null", "IMG1.jpg"]
    assert read["patient_id"].tolist()[:2] == ["NA", "n/a"] and read["patient_id"].isna().tolist() == [False, False,
                                                                                                      True, False]
    assert read["path"].isna().tolist() == [False, True, False, False]  # an empty cell stays missing
    assert read["near_duplicate_group"].tolist() == ["NA", "None", "NA", "IMG1.jpg"]
    assert read["group"].tolist() == ["NA", "NA", "NA", "IMG1.jpg"]
    assert read["label"].isna().tolist() == [False, False, False, True]  # other columns as pandas reads them
