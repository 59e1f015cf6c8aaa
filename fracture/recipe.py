"""What a profile's recipe trains with, worked out from params.yaml.

Here, not in :mod:`fracture.config`, which no stage depends on (dvc.yaml): the stages that train
a model or quote its recipe list this module, so a change to it reruns them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fracture.config import Profile, TrainParams


def learning_rate(profile: Profile, train: TrainParams) -> float:
    """The Adam learning rate ``profile`` trains with: its own ``lr``, else ``train.lr``."""
    return profile.lr if profile.lr is not None else train.lr


def cycle_epochs(profile: Profile, train: TrainParams) -> int:
    """Epochs until the cosine schedule's first restart (CosineAnnealingWarmRestarts' T_0):
    ``train.t_0``, else the profile's epochs over its snapshots."""
    return train.t_0 or profile.epochs // profile.snapshots
