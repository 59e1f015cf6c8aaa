"""Training options on tiny synthetic images: frozen layers stay put, augmentation never crops."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fracture.config import load_params
from fracture.model import create_classifier, profile_data_config
from fracture.prepare import StaleCacheError
from fracture.training import class_balance, light_augmentation, train
from tests.conftest import REPO
from tests.synthetic import make_dataset, training_frame
from tests.test_prepare import tensor_data


def test_frozen_layers_keep_imagenet_weights_and_the_rest_learns(tmp_path):
    make_dataset(tmp_path, 8, 8)
    params = load_params(REPO)
    profile = dataclasses.replace(
        params.profiles["cpu"], image_size=64, epochs=2, augment="light", frozen=("conv_stem", "bn1", "blocks.0")
    )
    config = profile_data_config(profile)
    data = tensor_data(tmp_path, training_frame(tmp_path), config)
    result = train(data, data, config, profile, dataclasses.replace(params.train, lr=1e-3))
    start = create_classifier(profile)
    assert torch.equal(result.model.conv_stem.weight, start.conv_stem.weight)
    assert torch.equal(result.model.blocks[0][0].conv_dw.weight, start.blocks[0][0].conv_dw.weight)
    assert not torch.equal(result.model.blocks[3][0].conv_pw.weight, start.blocks[3][0].conv_pw.weight)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert 1 <= result.best_epoch <= 2


def test_light_augmentation_keeps_size_and_dtype():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    out = light_augmentation()(image)
    assert out.shape == image.shape and out.dtype == torch.uint8


def test_images_prepared_for_another_model_are_refused(tmp_path):
    make_dataset(tmp_path, 2, 2)
    params = load_params(REPO)
    profile = dataclasses.replace(params.profiles["cpu"], image_size=64, epochs=1)
    config = dataclasses.replace(profile_data_config(profile), mean=(0.485, 0.456, 0.406))
    data = tensor_data(tmp_path, training_frame(tmp_path), config)
    with pytest.raises(StaleCacheError, match="dvc repro prepare"):
        train(data, data, config, profile, params.train)


def test_class_balance_options_follow_sklearn_weights_and_balance_the_draws():
    labels = torch.tensor([1] * 20 + [0] * 80)
    generator = torch.Generator().manual_seed(0)
    plain, none = class_balance("none", labels, generator)
    assert none is None and plain.weight is None
    weighted, sampler = class_balance("weighted_loss", labels, generator)
    assert sampler is None
    assert torch.allclose(weighted.weight, torch.tensor([100 / (2 * 80), 100 / (2 * 20)]))
    logits = torch.zeros(4, 2)
    target = torch.tensor([0, 0, 0, 1])
    logits[:, 1] = torch.tensor([0.5, 0.2, -0.3, -1.0])
    assert weighted(logits, target) > plain(logits, target)  # the missed fracture costs more
    _, sampler = class_balance("balanced_sampler", labels, generator)
    drawn = labels[torch.tensor(list(sampler))]
    assert len(drawn) == 100
    draws = torch.cat([labels[torch.tensor(list(sampler))] for _ in range(50)])
    assert abs(draws.float().mean().item() - 0.5) < 0.03  # 18%-like data drawn about 50/50


def test_the_val_pass_that_picks_the_epoch_scores_with_the_profiles_tta(tmp_path):
    from sklearn.metrics import roc_auc_score

    from fracture.imaging import Preprocessor
    from fracture.inference import probabilities

    make_dataset(tmp_path, 4, 4)
    params = load_params(REPO)
    profile = dataclasses.replace(params.profiles["cpu"], image_size=64, epochs=1, tta="hflip")
    config = profile_data_config(profile)
    data = tensor_data(tmp_path, training_frame(tmp_path), config)
    result = train(data, data, config, profile, params.train)
    images, labels = data.tensors
    pre = Preprocessor(config)
    batch = params.train.batch_size * 2
    hflip = probabilities(result.model, images, pre, torch.device("cpu"), batch, "hflip")
    plain = probabilities(result.model, images, pre, torch.device("cpu"), batch)
    assert result.best_val_roc_auc == pytest.approx(roc_auc_score(labels.numpy(), hflip), abs=1e-9)
    assert result.history[0]["val_roc_auc"] == result.best_val_roc_auc
    assert not np.allclose(hflip, plain)  # the mirror pass did change the scores


def test_an_epoch_that_would_end_on_a_batch_of_one_image_skips_it(tmp_path):
    # 17 images in batches of 16: batch norm cannot train on the 17th alone.
    make_dataset(tmp_path, 8, 9)
    params = load_params(REPO)
    profile = dataclasses.replace(params.profiles["cpu"], image_size=32, epochs=1, frozen=())
    config = profile_data_config(profile)
    data = tensor_data(tmp_path, training_frame(tmp_path), config)
    assert len(data) == 17
    result = train(data, data, config, profile, dataclasses.replace(params.train, batch_size=16))
    assert result.history[0]["epoch"] == 1
