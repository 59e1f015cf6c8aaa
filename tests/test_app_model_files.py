"""The page's copies of the versions it loads from a tracking server: as many as its cache holds,
none once it has ended.

From a tracking server MLflow downloads a version into a temporary folder it never removes; a
page that runs for months, loading each new champion, would fill its disk with them. Here a
page in a Python of its own (as ``streamlit run`` is), with a fresh temporary directory, serves
versions 1, 2, 3, 2 and 1 of a registered classifier in turn through a real ``mlflow server``;
its cache keeps two models, the last used, so two copies at most may be on the disk, theirs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import timm
from PIL import Image
from safetensors.torch import save_file

from fracture.inference import ServingConfig
from fracture.model import data_config
from fracture.packaging import log_pyfunc
from fracture.vocabulary import CLASSES
from tests.conftest import REPO
from tests.servers import child_env, free_port, mlflow_server_cmd, running

pytestmark = pytest.mark.integration

NAME = "page-model-files"

#: The page as its clinicians use it, in this Python: at each step the champion moves to the
#: version given, a new browser session opens the page (its alias look-up, kept 30 s, cleared so
#: as not to wait), and the versions whose copies are on the disk are noted. At the last step an
#: X-ray is uploaded: the model served from the page's copy answers.
PAGE_SESSIONS = r"""
import json, sys
from pathlib import Path
import streamlit as st
import yaml
from mlflow import MlflowClient
from streamlit.testing.v1 import AppTest

page, url, name, xray, temp = sys.argv[1:6]
client = MlflowClient(url)


def on_disk():
    # MLflow writes this file into every copy of a version it downloads: the name and version.
    metas = [yaml.safe_load(p.read_text()) for p in Path(temp).rglob("registered_model_meta")]
    return sorted(int(m["model_version"]) for m in metas if m["model_name"] == name)


steps = []
for version in sys.argv[6:]:
    client.set_registered_model_alias(name, "champion", version)
    st.cache_data.clear()
    at = AppTest.from_file(page, default_timeout=300).run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    shown = " ".join(m.value for m in at.markdown)
    assert f"version **{version}**" in shown, shown
    steps.append({"serves": version, "on_disk": on_disk()})
at = at.file_uploader[0].set_value(("xray.png", Path(xray).read_bytes(), "image/png")).run()
assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
print(json.dumps({"steps": steps, "metrics": {m.label: m.value for m in at.metric}}))
"""


@pytest.fixture()
def tracking_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on a free loopback port; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = mlflow_server_cmd(tmp_path / "server.db", tmp_path / "server-artifacts", port)
    with running(cmd, child_env(), f"{url}/health", tmp_path / "server.log"):
        yield url


def register_versions(url: str, folder: Path, count: int) -> None:
    """A tiny classifier (timm's test EfficientNet, untrained) logged as the pipeline logs one and
    registered ``count`` times: versions 1 .. count, each downloaded on its own."""
    network = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(CLASSES)).eval()
    weights = folder / "model.safetensors"
    save_file(network.state_dict(), str(weights))
    config = ServingConfig("test_efficientnet", data_config(network, 64), 0.5, {"classes": list(CLASSES)})
    mlflow.set_tracking_uri(url)
    try:
        mlflow.set_experiment("page-model-files")
        with mlflow.start_run() as run:
            pass
        model_uri = log_pyfunc(run.info.run_id, weights, config)
        for _ in range(count):
            mlflow.register_model(model_uri, NAME)
    finally:
        mlflow.set_tracking_uri(None)


def test_the_page_keeps_a_copy_of_the_versions_its_cache_holds_and_none_after_it_ends(tracking_server, tmp_path):
    register_versions(tracking_server, tmp_path, 3)
    xray = tmp_path / "xray.png"
    Image.effect_noise((128, 128), 40).save(xray)
    temp = tmp_path / "temp"  # the page's temporary directory, and nothing else's
    temp.mkdir()
    env = child_env(MLFLOW_TRACKING_URI=tracking_server, FRACTURE_MODEL_NAME=NAME, FRACTURE_DETECTOR_NAME="",
                    TMPDIR=str(temp), PYTHONPATH=str(REPO / "app"))  # `streamlit run` puts the page's folder there
    proc = subprocess.run(
        [sys.executable, "-c", PAGE_SESSIONS, str(REPO / "app" / "streamlit_app.py"), tracking_server, NAME,
         str(xray), str(temp), "1", "2", "3", "2", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    # The cache holds the two versions last used: a version it dropped leaves no copy, and one it
    # holds keeps its own (version 2, used again before 1 came back, is kept; 3 is dropped).
    assert [(s["serves"], s["on_disk"]) for s in out["steps"]] == [
        ("1", [1]), ("2", [1, 2]), ("3", [2, 3]), ("2", [2, 3]), ("1", [1, 2]),
    ]
    assert set(out["metrics"]) == {"Predicted class", "Fracture probability", "Threshold"}
    # The page's Python has ended: its copies went with it.
    assert list(temp.rglob("registered_model_meta")) == []
    assert [p.name for p in temp.iterdir() if p.name.startswith("fracture-page-")] == []
