"""The one inference path: preprocess, batch, probabilities.

Training's validation pass and the evaluate stage (on prepared uint8 pixels), the served
pyfunc, the promotion gate's re-scoring of a champion and the clinician's page (on decoded
images) all score through :func:`probabilities`, so a model gives an image the same
probability wherever it runs. Decoded images are resized with the same timm transform the
prepared cache was built with (:class:`fracture.imaging.Preprocessor`). Test-time augmentation
(a profile's ``tta``) travels with the model in :class:`ServingConfig`, so every pass applies it.

Only third-party packages and this package's own imaging modules are imported: the logged
MLflow model carries this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from fracture.data_config import DataConfig
from fracture.ensemble import SeedEnsemble, ensemble_size
from fracture.imaging import Preprocessor, nchw
from fracture.intake import InputPolicy
from fracture.vocabulary import CLASSES, Tta, choices


def autocast_for(device: torch.device) -> tuple[torch.autocast | None, torch.amp.GradScaler | None]:
    """Mixed precision on CUDA (bf16 where supported, else fp16 with a gradient scaler); none on the CPU."""
    if device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def check_tta(tta: str, where: str = "tta") -> Tta:
    """Returns ``tta`` if it is one of :data:`fracture.vocabulary.Tta`.

    Raises:
        ValueError: it is not; the message names ``where`` it came from and the allowed values.
    """
    if tta not in choices(Tta):
        raise ValueError(f"{where} must be one of {', '.join(map(repr, choices(Tta)))}; got {tta!r}")
    return tta  # type: ignore[return-value]


def softmax(network: nn.Module, x: torch.Tensor, autocast: torch.autocast | None) -> torch.Tensor:
    """The network's class probabilities for the batch ``x`` (under ``autocast`` when given), in float32."""
    if autocast is not None:
        with autocast:
            logits = network(x)
    else:
        logits = network(x)
    return logits.float().softmax(dim=-1)


@torch.inference_mode()
def probabilities(
    network: nn.Module,
    pixels: torch.Tensor,
    pre: Preprocessor,
    device: torch.device,
    batch_size: int,
    tta: Tta = "none",
) -> np.ndarray:
    """Probability of the fractured class for each image.

    Args:
        network: the classifier; it is put in eval mode.
        pixels: uint8 NCHW images at the model's input size (the prepared cache's, or
            :meth:`Classifier.pixels` of decoded images).
        pre: normalises a uint8 batch as the model was trained.
        device: where to run; CUDA runs under mixed precision.
        batch_size: images per forward pass.
        tta: ``none``; or ``hflip``: the mean of the softmax probabilities of each image and
            its horizontal mirror (two forward passes per batch).

    Returns:
        One float32 probability per image, in order.

    Raises:
        ValueError: ``tta`` is not one of :data:`fracture.vocabulary.Tta`.
    """
    check_tta(tta)
    network.eval()
    autocast, _ = autocast_for(device)
    out = []
    for start in range(0, len(pixels), batch_size):
        x = pre.network_input(pixels[start : start + batch_size], device)
        probs = softmax(network, x, autocast)
        if tta == "hflip":
            probs = (probs + softmax(network, mirror(x), autocast)) / 2
        out.append(probs[:, 1].cpu())
    if not out:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(out).numpy()


def mirror(x: torch.Tensor) -> torch.Tensor:
    """The horizontal mirror of a batch of network inputs (NCHW), as ``tta: hflip`` scores it."""
    return x.flip(-1).contiguous(memory_format=torch.channels_last)


def load_network(weights: Path | str, architecture: str) -> nn.Module:
    """Builds the timm architecture and loads fine-tuned weights (safetensors) into it, on the CPU.

    Weights saved from a :class:`~fracture.model.SeedEnsemble` (keys ``members.<k>.…``) load as
    one, with as many members as they hold.
    """
    state = load_file(str(weights))
    members = [timm.create_model(architecture, pretrained=False, num_classes=len(CLASSES))
               for _ in range(ensemble_size(state) or 1)]
    network = SeedEnsemble(members, 0) if len(members) > 1 else members[0]
    network.load_state_dict(state)
    if isinstance(network, SeedEnsemble):
        network.check_shared()  # against the loaded weights, now that they and the shared depth are in
    return network.eval()


@dataclass(frozen=True)
class ServingConfig:
    """What a served model needs besides its weights: ``model.json`` plus the decision threshold.

    Attributes:
        architecture: the timm model name.
        data_config: how an image becomes the model's input.
        threshold: the decision threshold the evaluate stage chose; ``probability >= threshold``
            is ``fractured``.
        extra: the other keys of ``model.json`` (profile, classes, best epoch), kept as they are.
        tta: the test-time augmentation the model was trained, selected and evaluated with
            (its profile's ``tta``); every scoring pass applies it.
        input: the checks every input to the served model passes (:mod:`fracture.intake`).
    """

    architecture: str
    data_config: DataConfig
    threshold: float
    extra: dict[str, Any] = field(default_factory=dict)
    tta: Tta = "none"
    input: InputPolicy = field(default_factory=InputPolicy)

    def __post_init__(self) -> None:
        check_tta(self.tta, "model config tta")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServingConfig:
        """Reads the config file a registered model carries.

        ``tta`` may be absent: models registered before the setting existed scored without
        test-time augmentation, which is what its default says. So may ``input``: such models
        get :class:`~fracture.intake.InputPolicy`'s defaults.

        Raises:
            ValueError: ``architecture``, ``data_config`` or ``threshold`` is missing, or ``tta``
                is not an allowed value.
        """
        missing = [k for k in ("architecture", "data_config", "threshold") if k not in data]
        if missing:
            raise ValueError(f"model config lacks {missing}; it holds {sorted(data)}")
        known = {"architecture", "data_config", "threshold", "tta", "input"}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(
            data["architecture"],
            DataConfig.from_dict(data["data_config"]),
            float(data["threshold"]),
            extra,
            data.get("tta", "none"),
            InputPolicy.from_dict(data.get("input")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as the registered model stores it."""
        return {"architecture": self.architecture, **self.extra, "data_config": self.data_config.to_dict(),
                "threshold": self.threshold, "tta": self.tta, "input": self.input.to_dict()}


class Classifier:
    """A fine-tuned network with its preprocessing, test-time augmentation and decision threshold.

    Args:
        network: the timm model.
        config: architecture, data config, threshold and test-time augmentation.
        device: where to score (the CPU by default).
    """

    def __init__(self, network: nn.Module, config: ServingConfig, device: torch.device | None = None) -> None:
        self.network = network.eval()
        self.config = config
        self.device = device or torch.device("cpu")
        self.preprocessor = Preprocessor(config.data_config)

    @classmethod
    def load(cls, weights: Path | str, config: ServingConfig) -> Classifier:
        """Loads the weights into the config's architecture."""
        return cls(load_network(weights, config.architecture), config)

    @property
    def threshold(self) -> float:
        return self.config.threshold

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resizes decoded images (RGB, or greyscale L) to the input size: one uint8 NCHW tensor, RGB."""
        return nchw(np.stack([np.asarray(self.preprocessor.resize(image)) for image in images]))

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The normalised float batch the network sees (e.g. for a Grad-CAM heat map)."""
        return self.preprocessor(self.pixels(images))

    def probabilities(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Probability of the fractured class for each decoded image, resized a batch at a time."""
        out = [
            probabilities(self.network, self.pixels(images[i : i + batch_size]), self.preprocessor, self.device,
                          batch_size, self.config.tta)
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def labels(self, probs: np.ndarray) -> np.ndarray:
        """``fractured`` where ``probability >= threshold``, else ``not_fractured``."""
        return np.where(probs >= self.threshold, CLASSES[1], CLASSES[0])
