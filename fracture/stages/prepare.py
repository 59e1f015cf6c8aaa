"""The prepare stage: every included image decoded once at the active profile's input size."""

from __future__ import annotations

from typing import Any

import torch

from fracture.config import ConfigError, Params
from fracture.data_config import DataConfig
from fracture.imaging import Preprocessor
from fracture.model import check_profile_model, profile_data_config
from fracture.prepare import PreparedImages, cache_key, open_prepared, prepare_images
from fracture.workspace import PrepareResult, Workspace


def require_a_device_for_the_profile(params: Params) -> None:
    """Refuses the paper's profile with ``train.device: auto`` on a machine without CUDA, before
    its cache is built: what a checkout names until the main job or the flow has chosen for this
    machine, and B6 at 528 px would take days on a few CPU cores. The train stage asks it too.

    Raises:
        ConfigError: saying what to set instead.
    """
    if params.train.profile == "paper" and params.train.device == "auto" and not torch.cuda.is_available():
        raise ConfigError(
            "params.yaml: train.profile is 'paper' (EfficientNet-B6 at 528 px, the paper's GPU recipe) and this "
            "machine has no CUDA device: set train.profile: cpu (`make main` and `python -m flows.retrain` choose "
            "it themselves; `dvc exp run -S train.profile=cpu` for one experiment), or train.device: cpu to train "
            "the paper's profile on the CPU anyway"
        )


def active_cache(params: Params) -> tuple[DataConfig, dict[str, Any]]:
    """The active profile's data config and the key of the prepared cache it needs."""
    check_profile_model(params.profile, params.train.profile)
    config = profile_data_config(params.profile, params.prepare.aspect, params.prepare.enhance)
    return config, cache_key(config, params.validate.on_truncated == "keep")


def open_cache(params: Params, workspace: Workspace, config: DataConfig) -> PreparedImages:
    """The prepared cache, checked to hold exactly the pixels ``config``'s transform produces."""
    return open_prepared(workspace.prepare_dir, cache_key(config, params.validate.on_truncated == "keep"))


def run_prepare(params: Params, workspace: Workspace) -> PrepareResult:
    """Decodes and resizes each included image into ``outputs/prepare``.

    Returns:
        How many images, at what size, and the decode rate.

    Raises:
        ConfigError: the paper's profile on a machine without CUDA
            (:func:`require_a_device_for_the_profile`), before any image is decoded.
    """
    require_a_device_for_the_profile(params)
    manifest = workspace.read_manifest()
    config, key = active_cache(params)
    meta = prepare_images(
        manifest[manifest["included"]],
        workspace.root / params.ingest.dest,
        Preprocessor(config),
        key["allow_truncated"],
        workspace.prepare_dir,
        params.prepare.workers,
    )
    workspace.write_prepare_timing(meta["decode_seconds"], meta["images_per_s"])
    return workspace.read_prepare()
