"""Test-time augmentation in the one inference path: what ``hflip`` computes, and where the setting travels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from fracture.data_config import DataConfig
from fracture.imaging import Preprocessor
from fracture.inference import Classifier, ServingConfig, probabilities
from fracture.workspace import EvaluateResult, TrainedModel, Workspace

SIZE = 32
CONFIG = DataConfig((3, SIZE, SIZE), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def network() -> nn.Module:
    """timm's smallest EfficientNet, randomly initialised: its output changes when the image is mirrored."""
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=2).eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (7, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)


class MirrorSymmetric(nn.Module):
    """Scores an image as the sum of the network's logits on it and on its mirror: flip-invariant exactly."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x) + self.network(x.flip(-1))


def test_hflip_is_the_mean_of_the_image_and_its_mirror(network, pixels):
    pre = Preprocessor(CONFIG)
    plain = probabilities(network, pixels, pre, CPU, 3)
    mirrored = probabilities(network, pixels.flip(-1), pre, CPU, 3)  # flipped along the width
    hflip = probabilities(network, pixels, pre, CPU, 3, tta="hflip")
    assert hflip.shape == (7,) and hflip.dtype == np.float32
    np.testing.assert_allclose(hflip, (plain + mirrored) / 2, rtol=0, atol=1e-6)
    # Not vacuous: this network does tell an image from its mirror.
    assert np.abs(plain - mirrored).max() > 1e-3
    # Batching does not change the result.
    np.testing.assert_allclose(probabilities(network, pixels, pre, CPU, 7, tta="hflip"), hflip, rtol=0, atol=1e-6)


def test_a_flip_invariant_model_scores_the_same_with_and_without_hflip(network, pixels):
    pre = Preprocessor(CONFIG)
    symmetric = MirrorSymmetric(network).eval()
    np.testing.assert_array_equal(
        probabilities(symmetric, pixels, pre, CPU, 4, tta="hflip"), probabilities(symmetric, pixels, pre, CPU, 4)
    )


def test_an_unknown_tta_is_refused_naming_the_choices(network, pixels):
    with pytest.raises(ValueError, match=r"tta must be one of 'none', 'hflip'; got 'vflip'"):
        probabilities(network, pixels, Preprocessor(CONFIG), CPU, 4, tta="vflip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model config tta must be one of"):
        ServingConfig("test_efficientnet", CONFIG, 0.5, tta="vflip")  # type: ignore[arg-type]


def test_the_classifier_scores_with_its_configs_tta(network, pixels):
    images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    plain = Classifier(network, ServingConfig("test_efficientnet", CONFIG, 0.5))
    hflip = Classifier(network, ServingConfig("test_efficientnet", CONFIG, 0.5, tta="hflip"))
    resized = plain.pixels(images)
    pre = Preprocessor(CONFIG)
    np.testing.assert_allclose(plain.probabilities(images, 4), probabilities(network, resized, pre, CPU, 4), atol=1e-6)
    np.testing.assert_allclose(
        hflip.probabilities(images, 4), probabilities(network, resized, pre, CPU, 4, tta="hflip"), atol=1e-6
    )
    assert np.abs(hflip.probabilities(images) - plain.probabilities(images)).max() > 1e-4


def test_serving_config_round_trip_keeps_tta_and_old_configs_read_as_none():
    config = ServingConfig("tf_efficientnet_lite0", CONFIG, 0.3, {"profile": "cpu", "best_epoch": 2}, tta="hflip")
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["tta"] == "hflip"
    back = ServingConfig.from_dict(stored)
    assert back == config and "tta" not in back.extra
    # A model logged before tta existed carries no such key: it scored each image once.
    del stored["tta"]
    old = ServingConfig.from_dict(stored)
    assert old.tta == "none" and old.extra == {"profile": "cpu", "best_epoch": 2}


def test_the_trained_model_carries_tta_into_the_serving_config(tmp_path):
    ws = Workspace(tmp_path)
    trained = TrainedModel("tf_efficientnet_lite0", "cpu", ["n", "f"], CONFIG, 2, 0.8, tta="hflip")
    ws.write_train(trained, "r", "1", [])
    ws.write_evaluate(EvaluateResult({"threshold": 0.25}, {"tn": 1, "fp": 0, "fn": 0, "tp": 1}), {})
    assert ws.read_train().model == trained
    served = ws.serving_config()
    assert served.tta == "hflip" and "tta" not in served.extra
    assert ServingConfig.from_dict(served.to_dict()) == served
    # A model.json written before tta existed reads as none, and so does its serving config.
    raw = json.loads(ws.model_json.read_text())
    del raw["tta"]
    ws.model_json.write_text(json.dumps(raw))
    assert ws.read_train().model.tta == "none" and ws.serving_config().tta == "none"


def test_the_logged_pyfunc_scores_with_the_tta_it_was_logged_with(client, tmp_path):
    """The served model (the MLflow pyfunc, also what the gate re-scores) applies the model's tta;
    a model logged without the key scores each image once."""
    import base64
    import dataclasses
    import io
    from types import SimpleNamespace

    import mlflow
    import pandas as pd

    from fracture.packaging import log_pyfunc
    from fracture.serving import FracturePyfunc
    from tests.conftest import untrained_model_files

    weights, plain = untrained_model_files(tmp_path, 0.5)
    hflip = dataclasses.replace(plain, tta="hflip")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (90, 70), dtype=np.uint8), mode="L").convert("RGB") for _ in range(3)]
    encoded = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")  # lossless: the pyfunc decodes exactly these pixels
        encoded.append(base64.b64encode(buf.getvalue()).decode())
    with mlflow.start_run() as run:
        pass
    served = mlflow.pyfunc.load_model(log_pyfunc(run.info.run_id, weights, hflip))
    assert json.loads(next((tmp_path / "art").rglob("model.json")).read_text())["tta"] == "hflip"
    assert served.unwrap_python_model().config.tta == "hflip"
    # A model logged before tta existed: its config artifact has no such key.
    old_json = tmp_path / "old_model.json"
    old_json.write_text(json.dumps({k: v for k, v in plain.to_dict().items() if k != "tta"}))
    old = FracturePyfunc()
    old.load_context(SimpleNamespace(artifacts={"config": str(old_json), "weights": str(weights)}))
    assert old.config.tta == "none"
    frame = pd.DataFrame({"image": encoded})
    direct_hflip = Classifier.load(weights, hflip).probabilities(images)
    direct_plain = Classifier.load(weights, plain).probabilities(images)
    np.testing.assert_allclose(served.predict(frame)["fracture_probability"], direct_hflip, rtol=0, atol=1e-6)
    np.testing.assert_allclose(old.predict(None, frame)["fracture_probability"], direct_plain, rtol=0, atol=1e-6)
    assert np.abs(direct_hflip - direct_plain).max() > 1e-4
