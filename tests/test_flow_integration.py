"""The real retrain flow end to end on a small real FracAtlas subset.

Real DVC, Prefect (a temporary local server on 127.0.0.1) and MLflow (sqlite in the project);
a tiny profile: Lite0 at 64 px, one epoch.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from prefect.artifacts import Artifact

from flows.report import REPORT_KEY
from fracture.config import tracking_uri
from fracture.gate import EvaluatedSplit
from fracture.suite import FRACATLAS_ONLY
from tests.conftest import pick_ids
from tests.dicom_files import hospital_export

pytestmark = pytest.mark.integration

CONSUMER = """
import base64, json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/fracture-classifier@champion")
path = sys.argv[1]
image = base64.b64encode(open(path, "rb").read()).decode()
out = model.predict(pd.DataFrame({"image": [image, None], "path": [None, path]}))
print(json.dumps(out.to_dict(orient="list")))
"""


def test_a_run_whose_project_dir_holds_no_params_fails_naming_it_and_makes_nothing_there(tmp_path, monkeypatch):
    """A deployment made without PROJECT_DIR names the deploying machine's checkout, absent where the
    run lands (in an image): the run names the parameter to fix, before it takes the project's lock."""
    import flows.retrain
    from flows.retrain import retrain

    reports = []  # the failed run's report, which names the parameter too
    monkeypatch.setattr(flows.retrain, "create_markdown_artifact", lambda **kw: reports.append(kw["markdown"]))
    absent = tmp_path / "home" / "alice" / "fracture"
    empty = tmp_path / "opt" / "fracture"
    empty.mkdir(parents=True)
    for folder in (absent, empty):
        named = re.escape(f"project_dir parameter is '{folder}', and {folder / 'params.yaml'} does not exist")
        with pytest.raises(FileNotFoundError, match=rf"{named}.*`make deploy-schedule PROJECT_DIR=/opt/fracture`"):
            retrain.fn(project_dir=str(folder))
    assert not absent.exists() and not any(empty.iterdir())  # no outputs/retrain.lock left there
    assert len(reports) == 2 and all("**Failed** at stage checks before the run: FileNotFoundError: the retrain "
                                     "flow's project_dir parameter" in r for r in reports)


def test_flow_registers_a_champion_then_reruns_nothing(project, subset_source, fracatlas, monkeypatch):
    import fracture.allocator
    from flows.retrain import retrain

    # The stages reuse each other's freed memory; the run hands it back once, as it ends.
    given_back = []
    monkeypatch.setattr(fracture.allocator, "give_back_freed_memory", lambda: given_back.append(1))

    # A one-epoch 64 px model cannot reach clinical floors; the gate's rules are tested with the
    # registry. Here the first version must become champion.
    raw = yaml.safe_load((project / "params.yaml").read_text())
    if "floors" in raw["register"]:
        raw["register"]["floors"] = {}
        (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    first = retrain(project_dir=str(project), source=str(subset_source))

    assert (project / "dvc.lock").is_file() and (project / "data.dvc").is_file()
    assert first.stages_ran == ["validate", "split", "prepare", "train", "evaluate"]
    assert given_back == [1], "the run handed its memory back after each stage, not once at its end"
    assert sum(first.split.sizes.values()) == 60
    assert first.prepare.images == 60 and first.prepare.input_size == [3, 64, 64]
    assert first.train.model.data_config.input_size == (3, 64, 64)
    reg = first.registration
    assert (reg.version, reg.created, reg.champion) == ("1", True, True)
    metrics = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    assert metrics == first.evaluate.to_dict()  # the task read back what the stage wrote
    assert 0.0 <= metrics["roc_auc"] <= 1.0 and metrics["n_images"] == first.split.sizes["test"]

    client = MlflowClient(tracking_uri(project))
    champion = client.get_model_version_by_alias("fracture-classifier", "champion")
    assert str(champion.version) == "1" and champion.run_id == first.train.run_id
    run = client.get_run(first.train.run_id)
    assert run.data.params["profile"] == "cpu"
    # The machine it trained on, whose CPU kernels a bit-for-bit rerun needs (tracking.hardware_tags).
    assert run.data.tags["device"] and run.data.tags["cpu_capability"] and run.data.tags["cpu_model"]
    assert run.data.metrics["test_roc_auc"] == pytest.approx(metrics["roc_auc"])
    # The split those figures are on, which registration checks against the workspace's.
    test_split = EvaluatedSplit.from_csv(project / "outputs/split/test.csv", project / "data/fracatlas")
    assert run.data.tags["split_fingerprint"] == test_split.fingerprint == champion.tags["split_fingerprint"]
    assert metrics["roc_auc_ci_low"] <= metrics["roc_auc"] <= metrics["roc_auc_ci_high"]
    assert 0.0 <= metrics["ece"] <= 1.0 and run.data.metrics["test_ece"] == pytest.approx(metrics["ece"])
    parts = json.loads((project / "outputs/evaluate/body_parts.json").read_text())
    assert sum(p["n_images"] for p in parts.values()) == metrics["n_images"]
    card = (project / "outputs/evaluate/model_card.md").read_text()
    assert card.startswith("# Model card") and f"`{first.train.run_id}`" in card
    # The page's heat map, scored against the boxes of every fractured test image (all real ones have boxes).
    located = pd.read_csv(project / "outputs/evaluate/localisation.csv")
    assert len(located) == metrics["localised_images"] == metrics["n_fractured"] > 0
    assert located["mass"].between(0, 1).all() and located["box_share"].between(0, 0.5).all()
    assert metrics["pointing_game"] == pytest.approx(located["hit"].mean())
    assert "## Where the heat map points" in card and run.data.metrics["test_pointing_game"] == metrics["pointing_game"]
    assert "evaluation/model_card.md" in {a.path for a in client.list_artifacts(first.train.run_id, "evaluation")}
    plots = {a.path for a in client.list_artifacts(first.train.run_id, "evaluation/plots")}
    assert plots == {f"evaluation/plots/{n}.png" for n in ("roc", "pr", "calibration", "confusion")}

    # A consumer in a separate process, importing nothing of this project, loads @champion.
    image = fracatlas / "images/Fractured/IMG0000019.jpg"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "MLFLOW_TRACKING_URI": tracking_uri(project),
        "FRACTURE_INPUT_ROOT": str(fracatlas / "images"),  # the folder 'path' rows may be read from
    }
    proc = subprocess.run(
        [sys.executable, "-c", CONSUMER, str(image)], cwd=project.parent, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["label"][0] in {"fractured", "not_fractured"}
    assert 0.0 <= out["fracture_probability"][0] <= 1.0
    assert out["fracture_probability"][0] == pytest.approx(out["fracture_probability"][1])  # bytes == path
    assert out["threshold"] == [metrics["threshold"]] * 2  # the threshold evaluate chose on val

    # An undecodable row is reported in its own row; the others are scored. on_error=raise refuses the request.
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(project))
    model = mlflow.pyfunc.load_model("models:/fracture-classifier@champion")
    frame = pd.DataFrame({"image": [image.read_bytes(), base64.b64encode(b"not an image").decode()]})
    rows = model.predict(frame)
    # Another process may sum in another order: equal to float32 precision.
    assert rows["error"][0] == "" and rows["fracture_probability"][0] == pytest.approx(out["fracture_probability"][0], abs=1e-6)
    assert rows["error"][1].startswith("row 1: the image is not an image file that can be read")
    with pytest.raises(Exception, match="row 1"):
        model.predict(frame, params={"on_error": "raise"})

    # Nothing changed: DVC is up to date and a second flow run registers nothing new.
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    started = time.perf_counter()
    second = retrain(project_dir=str(project), source=str(subset_source))
    noop_seconds = time.perf_counter() - started
    assert second.stages_ran == [] and list(second.runs) == ["validate", "split", "prepare", "train", "evaluate"]
    assert second.ingest.data_version == first.ingest.data_version and not second.ingest.changed
    assert second.registration.version == "1" and not second.registration.created
    assert second.registration.champion
    assert len(client.search_model_versions("name = 'fracture-classifier'")) == 1
    assert str(client.get_model_version_by_alias("fracture-classifier", "champion").version) == "1"
    assert second.nothing_changed and not first.nothing_changed
    report = Artifact.get(REPORT_KEY)  # the latest version: the second run's
    assert report is not None and "**Nothing changed**" in report.data
    assert "source unchanged since the last ingest: nothing copied" in report.data
    # Ingest compared the source's listing instead of copying it; DVC's status started no repro.
    assert second.ingest.unchanged is not None and "nothing copied" in second.ingest.unchanged
    assert first.ingest.unchanged is None
    print(f"\nretrain flow with nothing changed: {noop_seconds:.1f} s (first run trained and registered)")

    # The check is sound: a source file rewritten (a new modification time) is copied again...
    rewritten = next((subset_source / "images" / "Fractured").iterdir())
    stat = rewritten.stat()
    os.utime(rewritten, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    # (The Prefect API gone as this run ends: its work is done and recorded, so the report it cannot
    # publish goes to its log and the run does not fail.)
    import httpx  # noqa: PLC0415

    import flows.retrain  # noqa: PLC0415

    publish = flows.retrain.create_markdown_artifact

    def api_gone(**kwargs):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(flows.retrain, "create_markdown_artifact", api_gone)
    third = retrain(project_dir=str(project), source=str(subset_source))
    monkeypatch.setattr(flows.retrain, "create_markdown_artifact", publish)
    assert third.ingest.unchanged is None and third.ingest.data_version == first.ingest.data_version
    assert third.nothing_changed  # same bytes: the same data version, nothing retrained
    # ...and a data folder changed by hand is restored from the source, though the source is as it was.
    dest = project / yaml.safe_load((project / "params.yaml").read_text())["ingest"]["dest"]
    edited = dest / "images" / "Fractured" / rewritten.name
    edited.unlink()
    # Given relative to where the run starts (not the project, where ingest runs): read from there.
    assert not (project / os.path.relpath(subset_source)).exists()
    fourth = retrain(project_dir=str(project), source=os.path.relpath(subset_source))
    assert fourth.ingest.unchanged is None and edited.is_file() and fourth.nothing_changed

    # A run that fails after its ingest (a stage's command failing on the new data) leaves data.dvc at the
    # new version. The run after it reported "same data version", its report "Data changed: no", for a
    # model that was the first trained on that data; now the data is compared with the last completed run's.
    from tasks.pipeline import ingest_task

    rewritten.unlink()
    failed = ingest_task.fn(project, str(subset_source))  # the failed run's ingest; no run completes
    assert failed.changed and failed.previous_version == first.ingest.data_version
    rerun = ingest_task.fn(project, str(subset_source))
    assert rerun.unchanged is not None  # the source as that ingest left it: nothing copied again
    assert rerun.data_version == failed.data_version != first.ingest.data_version
    assert rerun.previous_version == first.ingest.data_version and rerun.changed
    # A project with no completed run on record (its runs made before the record existed) takes data.dvc's
    # version as the last completed run's only where dvc.lock has the pipeline evaluated on it: not here.
    from fracture.workspace import Workspace  # noqa: PLC0415

    Workspace(project).completed_run_record.unlink()
    unrecorded = ingest_task.fn(project, str(subset_source))
    assert unrecorded.previous_version is None and unrecorded.changed



def test_flow_trains_and_registers_on_a_hospital_export_of_dicom_files(project, fracatlas, tmp_path):
    """A hospital's export (ingest.layout: csv): DICOM files in patient folders and labels.csv."""
    import mlflow

    from flows.retrain import retrain

    labels = hospital_export(fracatlas, tmp_path / "export", pick_ids(fracatlas, 30, 30))
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["ingest"].update(layout="csv", dest="data/hospital")
    raw["register"]["floors"] = {}  # a one-epoch 64 px model; the gate's rules are tested with the registry
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    result = retrain(project_dir=str(project), source=str(tmp_path / "export"))

    assert result.stages_ran == ["validate", "split", "prepare", "train", "evaluate"]
    assert (project / "data" / "hospital" / "labels.csv").is_file()
    report = json.loads((project / "outputs/validate/report.json").read_text())
    assert report["success"] and not report["excluded"]
    assert {f["rule"]: f["skipped"] for f in report["findings"] if f["skipped"]} == FRACATLAS_ONLY
    assert report["comparison"]["status"] == "skipped"
    manifest = pd.read_csv(project / "outputs/validate/manifest.csv").set_index("image_id")
    assert manifest.loc[labels["path"], "label"].tolist() == labels["label"].tolist()
    assert (manifest["mode"] == "L").all() and manifest["included"].all()
    assert sum(result.split.sizes.values()) == 60 and result.prepare.images == 60
    parts = json.loads((project / "outputs/evaluate/body_parts.json").read_text())
    assert set(parts) <= {"hand", "leg", "hip", "shoulder", "mixed", "unknown"} and "unknown" not in parts
    assert (result.registration.version, result.registration.champion) == ("1", True)

    # The champion scores a file of the export as it arrived, DICOM bytes.
    mlflow.set_tracking_uri(tracking_uri(project))
    model = mlflow.pyfunc.load_model("models:/fracture-classifier@champion")
    dicom = (tmp_path / "export" / labels["path"][0]).read_bytes()
    rows = model.predict(pd.DataFrame({"image": [dicom]}))
    assert rows["error"][0] == "" and 0.0 <= rows["fracture_probability"][0] <= 1.0
