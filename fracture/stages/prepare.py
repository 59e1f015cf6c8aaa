"""The prepare stage: every included image decoded once at the active profile's input size."""

from __future__ import annotations

from typing import Any

from fracture.config import Params
from fracture.data_config import DataConfig
from fracture.imaging import Preprocessor
from fracture.model import check_profile_model, profile_data_config
from fracture.prepare import PreparedImages, cache_key, open_prepared, prepare_images
from fracture.workspace import PrepareResult, Workspace


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
    """
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
