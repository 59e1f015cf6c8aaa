"""Where a stage runs its network: ``train.device`` (auto, cpu or cuda) made a torch device.

The classifier's stages and the detector's read it alike, so the detector trains where the
classifier does.
"""

from __future__ import annotations

import torch

from fracture.vocabulary import Device


def select_device(preference: Device) -> torch.device:
    """CUDA when present (or required), else the CPU.

    Raises:
        RuntimeError: ``cuda`` was required but no CUDA device is visible.
    """
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; set it to 'auto' or 'cpu'")
    if preference in {"auto", "cuda"} and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
