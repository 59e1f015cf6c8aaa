"""The model consumers get: the registered pyfunc in process and behind `mlflow models serve`.

One real model (ImageNet-initialised Lite0 at 64 px) is registered as champion in a sqlite
store; predictions on real FracAtlas X-rays are compared with the project's own preprocessing
and with what the scoring server answers over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient

from fracture.config import RegisterParams
from fracture.gate import EvaluatedSplit
from fracture.imaging import open_xray
from fracture.inference import Classifier
from fracture.registry import register
from tests.conftest import require_fracatlas, untrained_model_files

pytestmark = pytest.mark.integration

NAME = "fracture-classifier"
THRESHOLD = 0.42


def free_port() -> int:
    """A port nothing listens on at the moment, on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This environment, with the venv's scripts first on PATH (the servers start `uvicorn` from it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | extra


@contextmanager
def running(cmd: list[str], env: dict[str, str], ready_url: str, log: Path, timeout: float = 300) -> Iterator[None]:
    """Starts a server in its own process group, waits for ``ready_url`` to answer, stops it afterwards."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(ready_url, timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{ready_url} did not answer within {timeout:.0f}s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def xray_paths() -> list[Path]:
    root = require_fracatlas()
    return [root / "images/Fractured/IMG0000019.jpg", root / "images/Non_fractured/IMG0000000.jpg"]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def champion(tmp_path_factory) -> Iterator[dict]:
    """A sqlite registry holding one real model as ``champion``; yields its URI and files."""
    xrays = xray_paths()
    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", artifact_location=(tmp / "art").as_uri()))
        weights, config = untrained_model_files(tmp, THRESHOLD)
        with mlflow.start_run(tags={"data_version": "d" * 32 + ".dir"}) as run:
            mlflow.log_metrics({"test_roc_auc": 0.9})
        params = RegisterParams(NAME, "t")
        reg = register(params, run.info.run_id, weights, config, EvaluatedSplit("s" * 64, 1, xrays[0]), MlflowClient(uri))
        assert reg.champion
        yield {"uri": uri, "weights": weights, "config": config, "tmp": tmp}
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def model(champion):
    return mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


def test_bytes_base64_and_paths_predict_as_the_project_preprocesses(model, champion):
    paths = xray_paths()
    by_path = model.predict(pd.DataFrame({"path": [str(p) for p in paths]}))
    by_b64 = model.predict(pd.DataFrame({"image": [b64(p) for p in paths]}))
    by_bytes = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))
    mixed = model.predict(pd.DataFrame({"image": [b64(paths[0]), None], "path": [None, str(paths[1])]}))

    assert list(by_path.columns) == ["fracture_probability", "label", "threshold"]
    for other in (by_b64, by_bytes, mixed):
        np.testing.assert_allclose(other["fracture_probability"], by_path["fracture_probability"], rtol=0, atol=1e-6)
    assert (by_path["threshold"] == THRESHOLD).all()
    expected_labels = np.where(by_path["fracture_probability"] >= THRESHOLD, "fractured", "not_fractured")
    assert list(by_path["label"]) == list(expected_labels)

    # The logged model scores exactly as the project's own weights and config do in this process.
    direct = Classifier.load(champion["weights"], champion["config"]).probabilities([open_xray(p) for p in paths])
    np.testing.assert_allclose(by_path["fracture_probability"], direct, rtol=0, atol=1e-6)


def test_an_empty_frame_gives_an_empty_answer(model):
    out = model.predict(pd.DataFrame({"path": pd.Series([], dtype=object)}))
    assert out.empty and list(out.columns) == ["fracture_probability", "label", "threshold"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": base64.b64encode(b"not an image").decode()}, r"row 1: <bytes>: not a decodable image"),
        ({"image": b"\xff\xd8\xff\xe0 cut short"}, r"row 1: <bytes>: not a decodable image"),
        ({"image": "this is not base64!"}, r"row 1: 'image' is not base64 text"),
        ({"path": "/nonexistent/xray.jpg"}, r"row 1: /nonexistent/xray.jpg: file not found"),
        ({"image": "", "path": ""}, r"row 1: give exactly one of 'image'"),
    ],
)
def test_a_bad_row_fails_naming_the_row(model, row, message):
    good = {"image": None, "path": str(xray_paths()[0])}
    frame = pd.DataFrame([good, {"image": None, "path": None} | row])
    with pytest.raises(ValueError, match=message):
        model.predict(frame)


def test_input_without_an_image_column_is_refused(model):
    with pytest.raises(Exception, match="'image'"):
        model.predict(pd.DataFrame({"file": ["x.jpg"]}))


def test_models_serve_answers_as_in_process_prediction(model, champion):
    """`mlflow models serve -m models:/<name>@champion` on 127.0.0.1 answers a real X-ray."""
    paths = xray_paths()
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]
    env = child_env(MLFLOW_TRACKING_URI=champion["uri"])
    url = f"http://127.0.0.1:{port}"
    with running(cmd, env, f"{url}/ping", champion["tmp"] / "serve.log"):
        split = {"dataframe_split": {"columns": ["image"], "data": [[b64(p)] for p in paths]}}
        answer = requests.post(f"{url}/invocations", json=split, timeout=120)
        assert answer.status_code == 200, answer.text
        print("POST /invocations ->", json.dumps(answer.json()))
        served = pd.DataFrame(answer.json()["predictions"])

        records = {"dataframe_records": [{"image": b64(paths[1])}]}
        one = requests.post(f"{url}/invocations", json=records, timeout=120)
        assert one.status_code == 200, one.text

        bad = {"dataframe_records": [{"image": base64.b64encode(b"not an image").decode()}]}
        refused = requests.post(f"{url}/invocations", json=bad, timeout=120)

    local = model.predict(pd.DataFrame({"image": [b64(p) for p in paths]}))
    np.testing.assert_allclose(served["fracture_probability"], local["fracture_probability"], rtol=0, atol=1e-6)
    assert list(served["label"]) == list(local["label"])
    assert list(served["threshold"]) == [THRESHOLD] * 2
    assert one.json()["predictions"][0]["fracture_probability"] == pytest.approx(
        local["fracture_probability"][1], abs=1e-6
    )
    assert refused.status_code == 400
    assert "row 0: <bytes>: not a decodable image" in refused.json()["stack_trace"]
