"""The CUDA path: mixed precision and channels_last training. Skips without a CUDA device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fracture import checkpoint
from fracture.config import load_params
from fracture.model import profile_data_config
from fracture.training import train
from tests.conftest import REPO
from tests.synthetic import make_dataset, training_frame
from tests.test_prepare import tensor_data
from tests.test_training import watching_head

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_training_runs_on_cuda_with_mixed_precision(tmp_path):
    make_dataset(tmp_path, 8, 8)
    params = load_params(REPO)
    frame = training_frame(tmp_path)
    profile = dataclasses.replace(params.profiles["cpu"], image_size=64, epochs=1)
    config = profile_data_config(profile)
    data = tensor_data(tmp_path, frame, config)
    from fracture import training  # noqa: PLC0415 - the model factory is wrapped in this test only

    seen: list[tuple[torch.dtype, bool, bool]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "create_classifier", watching_head(seen))
        result = train(data, data, config, profile, dataclasses.replace(params.train, device="cuda"))
    assert result.device == "cuda"
    assert 0.0 <= result.best_val_roc_auc <= 1.0
    trained = [(dtype, last) for dtype, last, in_training in seen if in_training]
    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert trained and all(step == (half, True) for step in trained), set(trained)  # autocast, channels_last


class Killed(Exception):
    pass


def test_a_cuda_run_killed_in_its_second_epoch_resumes_with_its_rng_and_optimiser(tmp_path, monkeypatch):
    make_dataset(tmp_path, 8, 8)
    params = load_params(REPO)
    profile = dataclasses.replace(params.profiles["cpu"], image_size=64, epochs=3)
    config = profile_data_config(profile)
    data = tensor_data(tmp_path, training_frame(tmp_path), config)
    train_params = dataclasses.replace(params.train, device="cuda", batch_size=4, lr=1e-3)

    save = checkpoint.save

    def die(*args, **kwargs) -> None:  # killed while epoch 2's checkpoint is written
        if kwargs["epoch"] == 2:
            raise Killed
        save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", die)
    with pytest.raises(Killed):
        train(data, data, config, profile, train_params, checkpoint_dir=tmp_path / "ck", checkpoint_key="k")
    monkeypatch.setattr(checkpoint, "save", save)
    resumed = train(data, data, config, profile, train_params, checkpoint_dir=tmp_path / "ck", checkpoint_key="k")
    assert resumed.device == "cuda" and resumed.resumed_from == 1
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


def test_the_detector_trains_and_scores_on_cuda_and_keeps_its_weights_on_the_cpu(tmp_path):
    """The detector trained and scored on the CPU wherever it ran: detect.enabled on a GPU machine
    trained for over an hour on its CPU."""
    import timm

    from fracture.detection import BoxedImages, build_detector, detect, train_detector
    from tests.test_detection import CONFIG, squares

    paths, truth = squares(tmp_path, 9)
    train = BoxedImages(paths[:6], truth[:6], 128, flip=True)
    val = BoxedImages(paths[6:], truth[6:], 128)
    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).state_dict()
    model = build_detector(CONFIG, classifier, seed=0)
    result = train_detector(model, train, val, truth[6:], epochs=1, batch_size=3, lr=1e-3, weight_decay=0,
                            negatives_per_positive=1, seed=0, device="cuda")
    assert all(p.is_cuda for p in model.parameters())
    assert all(t.device.type == "cpu" for t in result.state.values())
    found = detect(model, val)  # the images go to the detector's device; the boxes come back as arrays
    assert len(found.boxes) == 3 and all(b.shape[1:] == (4,) for b in found.boxes)
