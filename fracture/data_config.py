"""How an image becomes the model's input (:class:`DataConfig`), as ``model.json`` records it.

Torch-free, so the stages and commands that only read or write a model's record (the
workspace, the split, validation, the CLI) start without importing the network's stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, get_args

from fracture.vocabulary import ENHANCEMENTS, Aspect, Decode, Enhancement


@dataclass(frozen=True)
class DataConfig:
    """How an image becomes the model's input: timm's data config plus aspect and enhancement.

    Every key is always present, so no consumer guesses a default. Training writes it into
    ``model.json``; evaluation, the prepared cache, the served model and the page read it back.

    Attributes:
        input_size: (channels, height, width) of the model's input.
        interpolation: the resize filter timm names (``bicubic``, ``bilinear``, ...).
        mean: per-channel mean the pixels are normalised with.
        std: per-channel standard deviation.
        aspect: ``squash`` (resize to the square, the paper) or ``pad`` (pad to a square first).
        enhance: ``none`` (the paper) or one of the ablation's enhancements.
        decode: ``full`` (the paper) or ``draft``: JPEGs decoded at a reduced scale that still
            covers the input size (:data:`fracture.vocabulary.Decode`, :attr:`draft_size`).
    """

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    aspect: Aspect = "squash"
    enhance: Enhancement = "none"
    decode: Decode = "full"

    def __post_init__(self) -> None:
        if self.aspect not in get_args(Aspect):
            raise ValueError(f"data config aspect must be one of {get_args(Aspect)}, got {self.aspect!r}")
        if self.enhance not in ENHANCEMENTS:
            raise ValueError(f"data config enhance must be one of {ENHANCEMENTS}, got {self.enhance!r}")
        if self.decode not in get_args(Decode):
            raise ValueError(f"data config decode must be one of {get_args(Decode)}, got {self.decode!r}")

    @property
    def draft_size(self) -> tuple[int, int] | None:
        """``(width, height)`` a JPEG is decoded to at least (:func:`fracture.decoding.decode`), or ``None``: in full.

        Both sides of the input: the image then covers it whether it is squashed or padded, and
        the resize that follows does all of the remaining downscaling.
        """
        return (self.input_size[2], self.input_size[1]) if self.decode == "draft" else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        """Reads the ``data_config`` of a ``model.json``.

        ``aspect``, ``enhance`` and ``decode`` may be absent: models registered before those
        settings existed were all squashed, not enhanced and decoded in full, which is what their
        defaults say.

        Raises:
            ValueError: a timm key is missing or a value is not allowed.
        """
        missing = [k for k in ("input_size", "interpolation", "mean", "std") if k not in data]
        if missing:
            raise ValueError(f"data config lacks {missing}; it holds {sorted(data)}: retrain, or fix model.json")
        return cls(
            input_size=tuple(int(v) for v in data["input_size"]),  # type: ignore[arg-type]
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            aspect=data.get("aspect", "squash"),
            enhance=data.get("enhance", "none"),
            decode=data.get("decode", "full"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as ``model.json`` stores it (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
