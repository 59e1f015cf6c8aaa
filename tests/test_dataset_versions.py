"""A new dataset version: seen by DVC, reruns validate onward, recorded as MLflow dataset inputs."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from fracture.versions import STATUS_COMPARED, compare_with_previous
from fracture.workspace import ASSIGNMENTS_FILE, SPLITS
from tests.conftest import REPO, dvc, make_subset, pick_ids, run
from tests.synthetic import write_image
from tests.test_versions import dataset, first_version, isolate, manifest  # noqa: F401 - a committed tiny DVC dataset

pytestmark = pytest.mark.integration

GIT = ["git", "-c", "user.name=fracture test", "-c", "user.email=test@fracture.invalid"]


def fracture(project: Path, *args: str) -> str:
    return run(project, sys.executable, "-m", "fracture.cli", *args)


def data_md5(project: Path) -> str:
    return yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]


def dataset_inputs(project: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """name -> (digest, tags) of the dataset inputs of the run the train stage recorded."""
    run_id = json.loads((project / "outputs" / "train" / "run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    inputs = mlflow.get_run(run_id).inputs.dataset_inputs
    return {i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}) for i in inputs}


@pytest.mark.slow  # about 100 s on two cores: the pipeline on two dataset versions
def test_added_images_are_a_new_version_that_reruns_validate_onward(project, fracatlas, tmp_path):
    source = make_subset(fracatlas, tmp_path / "v1", pick_ids(fracatlas, 12, 28))
    fracture(project, "ingest", "--source", str(source))
    dvc(project, "add", "data")
    run(project, *GIT, "add", "-A")
    run(project, *GIT, "commit", "-qm", "dataset v1")
    dvc(project, "repro", "train")
    v1 = data_md5(project)
    assert dataset_inputs(project)["fracatlas"] == (v1, {"data_version": v1, "mlflow.data.context": "dataset"})
    assert "Data and pipelines are up to date" in dvc(project, "status", "--with-deps", "train")

    # A new version of the source: four more images, as a hospital's next export would add.
    added = pick_ids(fracatlas, 14, 30)[12:14] + pick_ids(fracatlas, 14, 30)[-2:]
    v2 = make_subset(fracatlas, tmp_path / "v2", pick_ids(fracatlas, 14, 30))
    v1_split = {name: set(pd.read_csv(project / "outputs" / "split" / f"{name}.csv")["image_id"]) for name in SPLITS}
    # The split stage recorded the split v1's model was trained and tested on, and dvc.lock the record.
    record = pd.read_csv(project / ASSIGNMENTS_FILE).groupby("split")["image_id"].apply(set).to_dict()
    assert record == v1_split
    fracture(project, "ingest", "--source", str(v2))
    status = dvc(project, "status", "data.dvc")
    assert "modified:" in status and "data" in status

    dvc(project, "add", "data")
    assert data_md5(project) != v1
    stale = dvc(project, "status", "--with-deps", "train")
    assert "validate:" in stale and "changed deps" in stale
    repro = dvc(project, "repro", "train")
    for stage in ("validate", "split", "prepare", "train"):
        assert f"Running stage '{stage}'" in repro
    # Every v1 image stays where it was; only the added ones are drawn, and recorded with them.
    v2_split = {name: set(pd.read_csv(project / "outputs" / "split" / f"{name}.csv")["image_id"]) for name in SPLITS}
    assert all(v1_split[name] <= v2_split[name] for name in SPLITS)
    assert pd.read_csv(project / ASSIGNMENTS_FILE).groupby("split")["image_id"].apply(set).to_dict() == v2_split
    assert "Data and pipelines are up to date" in dvc(project, "status", "--with-deps", "train")

    v2_md5 = data_md5(project)
    inputs = dataset_inputs(project)
    assert inputs["fracatlas"][0] == v2_md5
    assert {"fracatlas-train", "fracatlas-val", "fracatlas-test"} <= set(inputs)
    assert all(tags["data_version"] == v2_md5 for _, tags in inputs.values())

    report = json.loads((project / "outputs" / "validate" / "report.json").read_text())
    comparison = report["comparison"]
    assert comparison["previous"]["md5"] == v1
    assert sorted(comparison["new_ids"]) == sorted(added)
    assert comparison["removed_ids"] == []

    # The prepared cache is keyed by its params: another aspect policy or size rebuilds it.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["aspect"] = "pad"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = dvc(project, "status", "prepare")
    assert "params.yaml" in stale and re.search(r"modified:\s+prepare\.aspect", stale), stale


def _as_dvc2_version(root: Path) -> None:
    """Rewrites the committed data version as DVC 2 recorded it: no ``hash: md5`` in data.dvc, and
    the cache in DVC 2's layout, where DVC 3 lists each file's md5 as ``md5-dos2unix``."""
    data_dvc = root / "data.dvc"
    data_dvc.write_text("".join(line for line in data_dvc.read_text().splitlines(keepends=True) if "hash: md5" not in line))
    cache = root / ".dvc" / "cache"
    for f in (cache / "files" / "md5").rglob("*"):
        if f.is_file():
            target = cache / f.relative_to(cache / "files" / "md5")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
    shutil.rmtree(cache / "files")
    run(root, "git", "commit", "-qam", "dataset v1 as DVC 2 recorded it")


@pytest.mark.parametrize("recorded_by", ["DVC 3", "DVC 2"])
def test_an_image_replaced_under_its_id_is_reported_as_changed_content(first_version, tmp_path, monkeypatch, recorded_by):  # noqa: F811
    """A re-export replaces an X-ray's pixels under the same id, folder and csv row: data.dvc's md5
    changes, and the comparison names the id whose file changed, from DVC's per-file md5s (which
    DVC 3 lists as ``md5-dos2unix`` for a version DVC 2 recorded)."""
    isolate(monkeypatch, tmp_path)
    root = tmp_path / "project"
    shutil.copytree(first_version, root, symlinks=True)
    if recorded_by == "DVC 2":
        _as_dvc2_version(root)
    image = dataset(root) / "images" / "Fractured" / "IMG0000001.jpg"
    previous = hashlib.md5(image.read_bytes()).hexdigest()
    image.unlink()  # not written through: DVC may have linked it to its cache
    write_image(image, seed=101)  # another patient's X-ray under the same id
    current = hashlib.md5(image.read_bytes()).hexdigest()
    dvc(root, "add", "-q", "data")

    result = compare_with_previous(manifest(root), root)

    assert result["status"] == STATUS_COMPARED
    assert (result["n_new"], result["n_removed"], result["n_class_changed"], result["n_csv_label_changed"]) == (
        0, 0, 0, 0,
    )
    assert result["content_changed"] == [{"image_id": "IMG0000001.jpg", "previous": previous, "current": current}]
    assert result["n_content_changed"] == 1
    assert result["message"].endswith(", 0 changed label in the csv, 1 changed image content"), result["message"]


def test_a_hospitals_export_is_logged_under_its_own_name_not_fracatlas(tmp_path, monkeypatch):
    """The train run's dataset inputs name the folder the data was ingested into (ingest.dest), so a
    hospital's export is not recorded in MLflow as FracAtlas."""
    import dataclasses

    from fracture.config import load_params
    from fracture.stages.train import log_dataset_inputs
    from fracture.workspace import Workspace

    params = load_params(REPO)
    params = dataclasses.replace(params, ingest=dataclasses.replace(params.ingest, dest="data/north", layout="csv"))
    frame = pd.DataFrame({"image_id": ["a", "b"], "path": ["images/a.png", "images/b.png"], "label": [1, 0],
                          "sha256": ["11", "22"]})
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # an earlier test's, in this process
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("inputs", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        log_dataset_inputs(params, Workspace(tmp_path), {"train": frame, "val": frame.iloc[:1]})
    names = {i.dataset.name for i in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}
    assert names == {"north", "north-train", "north-val"}
