"""What several benchmarks share: real FracAtlas X-rays by size, and the CPU profile's network as the registry's pyfunc."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from fracture.config import Params
from fracture.inference import ServingConfig
from fracture.model import create_classifier, data_config
from fracture.packaging import save_pyfunc
from fracture.stages.register import input_policy
from fracture.training import seed_ensemble
from fracture.vocabulary import Decode


def pick(root: Path, size: tuple[int, int], n: int) -> list[Path]:
    """The first ``n`` FracAtlas JPEGs of ``size`` (width, height), by name."""
    found = []
    for path in sorted((root / "images").rglob("*.jpg")):
        with Image.open(path) as img:
            if img.size == size:
                found.append(path)
        if len(found) == n:
            return found
    raise SystemExit(f"only {len(found)} images of {size[0]} x {size[1]} in {root}")


#: FracAtlas's large X-rays: 2304 x 2880 as published; copies shrunk by half hold 1152 x 1440.
LARGE_SIZES = ((2304, 2880), (1152, 1440))


def pick_large(root: Path, n: int) -> list[Path]:
    """``n`` of the large X-rays, at the first of :data:`LARGE_SIZES` the copy holds enough of."""
    for size in LARGE_SIZES:
        try:
            return pick(root, size, n)
        except SystemExit:
            continue
    raise SystemExit(f"fewer than {n} images of any of {LARGE_SIZES} in {root}")


#: glibc's own settings for what :mod:`fracture.allocator` sets (no mmap, never trim), from the
#: environment: how a process that only scores with the model (``mlflow models serve``, a batch job)
#: gets the same without code. 18446744073709551615 is ``M_TRIM_THRESHOLD``'s -1 as glibc reads it.
TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615"


def with_tunables(env: dict[str, str], tunables: bool) -> dict[str, str]:
    """``env`` with ``GLIBC_TUNABLES`` set to :data:`TUNABLES`, or without it (glibc's default)."""
    out = {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}
    return out | {"GLIBC_TUNABLES": TUNABLES} if tunables else out


def save_cpu_model(params: Params, folder: Path, decode: Decode | None = None, members: int = 1) -> Path:
    """The CPU profile's network (ImageNet weights, untrained head) saved as the registry's pyfunc.

    Speed does not depend on the weights' values, so no training is needed to measure it.
    ``decode`` overrides the profile's (how JPEGs are decoded), to compare the two. ``members``
    above 1 saves a :class:`~fracture.ensemble.SeedEnsemble` of that many copies of the network,
    sharing its frozen layers as trained members do (``profiles.cpu.members``).
    """
    profile = params.profiles["cpu"]
    network = create_classifier(profile)
    served: torch.nn.Module = network
    if members > 1:
        served = seed_ensemble([network, *(copy.deepcopy(network) for _ in range(members - 1))], profile.frozen)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.safetensors"
    save_file(served.state_dict(), str(weights))
    config = ServingConfig(
        profile.model,
        data_config(network, profile.image_size, params.prepare.aspect, params.prepare.enhance,
                    decode or profile.decode),
        0.5, tta=profile.tta, input=input_policy(params),
    )
    return save_pyfunc(folder / "pyfunc", weights, config)
