"""The training loop: the paper's recipe, CrossEntropyLoss, Adam, CosineAnnealingWarmRestarts.

The best epoch by validation ROC AUC is the result; the train stage
(:mod:`fracture.stages.train`) writes it and logs to MLflow.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import torch
from sklearn.metrics import roc_auc_score
from sklearn.utils.class_weight import compute_class_weight
from timm.layers import convert_sync_batchnorm
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from timm.utils.model import freeze
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torchvision import transforms
from tqdm import tqdm

from fracture import checkpoint, distributed
from fracture.config import Profile, TrainParams
from fracture.data_config import DataConfig
from fracture.devices import select_device
from fracture.ensemble import SeedEnsemble
from fracture.imaging import Preprocessor
from fracture.inference import autocast_for, mirror, probabilities, softmax
from fracture.model import check_frozen, create_classifier, data_config
from fracture.prepare import CachedImages, StaleCacheError
from fracture.recipe import cycle_epochs, learning_rate
from fracture.vocabulary import CLASSES, Augment, ClassBalance, choices

log = logging.getLogger(__name__)

LOG_EVERY = 20  # batches between progress lines when no terminal shows the bar
# timm's decay warm-up for runs under about 10k steps: the average's decay at step t is
# 1 - (1 + t) ** -3/4 (0.97 after 100 steps, 0.99 after 460), capped at the profile's ema_decay,
# so the new head's random start is forgotten within the first epoch.
EMA_WARMUP_POWER = 3 / 4

EpochCallback = Callable[[int, dict[str, float]], None]


class TrainingDivergedError(RuntimeError):
    """The training loss stopped being a number (NaN or infinite): the learning rate is too high."""


@dataclass(frozen=True)
class FitResult:
    """The best epoch's network and how training went."""

    model: nn.Module
    data_config: DataConfig
    best_epoch: int
    best_val_roc_auc: float
    history: list[dict[str, float]]
    device: str
    resumed_from: int = 0  # completed epochs restored from a checkpoint (0: a fresh run)
    # The last epoch's fracture probabilities of the val images, in their order: scores with no
    # selection on val (cross-validation's out-of-fold predictions). None when a resumed run
    # found every epoch already done, so no epoch ran in this call.
    final_val_probabilities: np.ndarray | None = None
    # The best epoch's fracture probabilities of the val images (None as above, after a resume).
    best_val_probabilities: np.ndarray | None = None
    # An ensemble's (profile.members > 1): each member's best epoch, in seed order; a snapshot
    # ensemble's (profile.snapshots > 1): the epochs its snapshots were taken after; empty for one network.
    member_best_epochs: tuple[int, ...] = ()
    # And each member's last-epoch val probabilities (``final_val_probabilities`` is their mean).
    member_final_val_probabilities: tuple[np.ndarray, ...] = ()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one process's random draws in one epoch of a data-parallel run.

    Mixed by NumPy's ``SeedSequence``, so nearby seeds, epochs and ranks give unrelated streams.
    """
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def light_augmentation() -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image flips, small rotations and shifts, and brightness/contrast changes.

    Works on one uint8 CHW tensor and never crops: a shift of at most 5% and a zoom of at most 5%
    move only the border, and the X-ray stays in view at its size, as the paper's preprocessing
    (no centre crop) requires.
    """
    return transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            transforms.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.95, 1.05)),
            transforms.ColorJitter(brightness=0.2, contrast=0.2),
        ]
    )


class RandomCentralCrop:
    """The paper's crop ablation: a centred crop of a random share of each side, resized back.

    The share is drawn uniformly from ``[min_scale, 1]`` per image with torch's generator (so
    seeding and checkpoints cover it); the crop keeps the image centre and its aspect ratio.
    Works on one uint8 CHW tensor and returns the input's size.
    """

    def __init__(self, min_scale: float = 0.7) -> None:
        self.min_scale = min_scale

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        scale = self.min_scale + (1 - self.min_scale) * float(torch.rand(()))
        crop = transforms.functional.center_crop(image, [max(1, round(height * scale)), max(1, round(width * scale))])
        return transforms.functional.resize(crop, [height, width], antialias=True)


def augmentation(name: Augment) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The training augmentation named by a profile's ``augment`` (``None`` for ``none``)."""
    if name == "none":
        return None
    if name == "light":
        return light_augmentation()
    if name == "central_crop":
        return RandomCentralCrop()
    raise ValueError(f"augment must be one of {choices(Augment)}, got {name!r}")


def train_mode(net: nn.Module, model: nn.Module, frozen: Sequence[str]) -> None:
    """``net`` (the model, or DDP around it) in training mode, but the ``frozen`` modules of
    ``model`` as at inference: no stochastic depth or dropout in the layers kept at their
    pretrained weights (their batch norm is frozen by timm's ``freeze`` anyway)."""
    net.train()
    for name in frozen:
        model.get_submodule(name).eval()


def moving_average(model: nn.Module, decay: float) -> ModelEmaV3 | None:
    """timm's exponential moving average of ``model``'s weights and batch-norm statistics.

    Args:
        model: the network being trained, already on its device.
        decay: the profile's ``ema_decay``, the most the warmed-up decay reaches
            (:data:`EMA_WARMUP_POWER`); 0 turns the average off.

    Returns:
        The average, updated after every optimisation step, or ``None`` when off.
    """
    if decay == 0:
        return None
    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=EMA_WARMUP_POWER)


def class_balance(
    mode: ClassBalance, labels: torch.Tensor, generator: torch.Generator, label_smoothing: float = 0.0
) -> tuple[nn.CrossEntropyLoss, WeightedRandomSampler | None]:
    """The loss and sampler for ``train.class_balance``.

    About 18% of FracAtlas is fractured. ``none`` is the paper's plain cross-entropy with
    shuffling. ``weighted_loss`` weights each class by scikit-learn's ``balanced`` class
    weights (n_images / (n_classes * n_class_images)). ``balanced_sampler`` draws each epoch's
    images with replacement so both classes appear equally often on average.

    Args:
        mode: ``none``, ``weighted_loss`` or ``balanced_sampler``.
        labels: the training labels.
        generator: seeds the sampler.
        label_smoothing: the profile's ``label_smoothing``, passed to the cross-entropy (0: none).

    Returns:
        The criterion and the sampler (``None``: shuffle every image once per epoch).
    """
    if mode == "none":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing), None
    y = labels.numpy()
    weights = torch.tensor(compute_class_weight("balanced", classes=np.arange(len(CLASSES)), y=y), dtype=torch.float32)
    if mode == "weighted_loss":
        return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing), None
    if mode == "balanced_sampler":
        per_image = weights[labels].double()
        sampler = WeightedRandomSampler(per_image, len(y), replacement=True, generator=generator)
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing), sampler
    raise ValueError(f"train.class_balance must be one of {choices(ClassBalance)}, got {mode!r}")


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """The trainable parameters as the optimiser's groups, each holding its own learning rate.

    ``layer_decay`` 1 is one group at ``lr``, the paper's recipe. Below 1, timm's layer-wise
    decay (``param_groups_layer_decay``, over the model's fine ``group_matcher``) gives the
    classifier ``lr`` and every layer group below it ``layer_decay`` times the rate of the one
    above, so the ImageNet features near the input move least. On an EfficientNet a layer group
    is one sub-block (``blocks.4.1``), not a stage (``blocks.4``), so the rate falls by
    ``layer_decay`` once per sub-block: Lite0's 7 stages hold 16. Its groups, from the top: the
    classifier; ``conv_head`` and ``bn2`` together with the last sub-block, ``blocks.6.0``; then
    ``blocks.5.3`` down to ``blocks.0.0``, one each; the stem last (``conv_stem``, ``bn1``), 17
    groups below the classifier. Each group's rate is set here: timm's own schedulers read the
    ``lr_scale`` it returns, PyTorch's do not, and PyTorch's cosine schedule then scales every
    group's rate alike. Frozen parameters are in no group.
    """
    if layer_decay >= 1:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    groups = param_groups_layer_decay(
        model, weight_decay=weight_decay, weight_decay_exclude_1d=False, layer_decay=layer_decay
    )
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale")
    return groups


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    autocast: torch.autocast | None,
    scaler: torch.amp.GradScaler | None,
) -> torch.Tensor:
    """One optimisation step, under mixed precision when ``autocast`` is given; returns the loss."""
    if autocast is not None:
        with autocast:
            loss = criterion(model(x), y)
    else:
        loss = criterion(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss


def _stop_if_diverged(step_loss: float, context: distributed.Context, where: str) -> None:
    """Raises :class:`TrainingDivergedError` when a step's loss is not finite, on every rank alike.

    Under data parallelism each rank's loss is of its own share of the batch, so one rank's may be
    NaN while the others' are not. Every rank therefore decides on all the ranks' losses (one
    all-reduce of a number per rank; none in one process) and all stop at the same step: a rank
    that stopped alone would leave the others waiting in their next collective until the process
    group's timeout, and the run would fail with no word of the divergence.

    Args:
        step_loss: this rank's loss of the step.
        context: this process's place in the run.
        where: the step, as the message names it (``at epoch 1/3, batch 2/3, learning rate 0.001``).
    """
    losses = distributed.each_rank(step_loss, context)
    diverged = [rank for rank, value in enumerate(losses) if not math.isfinite(value)]
    if not diverged:
        return
    what = (
        ", ".join(f"{losses[rank]} on rank {rank}" for rank in diverged) + f" (of {context.world_size} ranks)"
        if context.distributed
        else str(step_loss)
    )
    raise TrainingDivergedError(
        f"the training loss is {what} {where}: training diverged. Lower the learning rate (the profile's lr, or "
        "train.lr when it has none; a tenth is a start) and train again"
    )


def labels_of(data: TensorDataset | CachedImages) -> torch.Tensor:
    """A training set's labels, without reading its images."""
    return data.labels if isinstance(data, CachedImages) else data.tensors[1]


def frozen_prefix_depth(model: nn.Module, frozen: tuple[str, ...]) -> int | None:
    """How many blocks the frozen layers cover when they are the model's leading layers, else ``None``.

    For an EfficientNet-style timm model (``conv_stem``, ``bn1``, ``blocks``, ``conv_head``,
    ``bn2``, ``forward_head``), ``frozen`` naming exactly ``conv_stem``, ``bn1`` and the first
    ``k`` blocks, in any order, gives ``k``: those layers are all the network computes before
    the first layer that trains.
    """
    if not all(hasattr(model, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
        return None
    names = set(frozen)
    depth = sum(1 for i in range(len(model.blocks)) if f"blocks.{i}" in names)
    leading = {"conv_stem", "bn1"} | {f"blocks.{i}" for i in range(depth)}
    return depth if names == leading and len(frozen) == len(names) else None


def seed_ensemble(networks: list[nn.Module], frozen: tuple[str, ...]) -> SeedEnsemble:
    """``networks`` as one :class:`~fracture.ensemble.SeedEnsemble` in eval mode, running the
    leading layers the profile froze (``frozen``, :func:`frozen_prefix_depth`) once for all of them."""
    return SeedEnsemble(networks, frozen_prefix_depth(networks[0], frozen) or 0).eval()


class FrozenPrefix(nn.Module):
    """The frozen leading layers of an EfficientNet-style timm model (see :func:`frozen_prefix_depth`)."""

    def __init__(self, model: nn.Module, depth: int) -> None:
        super().__init__()
        self.model, self.depth = model, depth

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.blocks[: self.depth](m.bn1(m.conv_stem(x)))


class TrainedRest(nn.Module):
    """The rest of the network after :class:`FrozenPrefix`: timm's forward from that point on."""

    def __init__(self, model: nn.Module, depth: int) -> None:
        super().__init__()
        self.model, self.depth = model, depth

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.forward_head(m.bn2(m.conv_head(m.blocks[self.depth :](features))))


class FrozenOutputs:
    """Each image's output of the frozen leading layers, computed when first needed and kept.

    The frozen layers' weights and batch-norm statistics never change (timm's ``freeze`` makes
    their batch norms ``FrozenBatchNorm2d``), and without augmentation or stochastic depth an
    image's pixels are the same in every epoch, so their output is too: on the CPU the same
    bits whichever batch the image comes in (a GPU's kernels, chosen per batch size, may differ
    in the last bits, as they may between two runs anyway). Later epochs run only the layers
    that train, which skips the frozen layers' forward pass: at the CPU profile's 448 px with
    blocks 0-3 frozen, epochs 2 and 3 train about 2x as fast on two cores (bench/RESULTS.md).
    Training keeps one for the training set and one for val, whose later passes score only the
    layers that train too (under ``tta: hflip`` one more, for the val images' mirrors). The
    outputs stay on the CPU in the dtype and channels-last layout they were computed in.
    """

    def __init__(
        self, prefix: FrozenPrefix, size: int, autocast: torch.autocast | None = None, what: str = "training"
    ) -> None:
        self.prefix, self.size, self.autocast, self.what = prefix, size, autocast, what
        self.store: torch.Tensor | None = None
        self.have = torch.zeros(size, dtype=torch.bool)

    def __call__(self, indices: torch.Tensor, pixels: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The frozen layers' output for the images at ``indices`` of the set.

        ``pixels`` gives those images' network input (normalised, channels-last, on the
        device); it is called only when one of them has no kept output yet.
        """
        missing = ~self.have[indices]
        if missing.any():
            x = pixels()
            # Under the same mixed precision and memory layout as the whole network's forward pass.
            new = x if missing.all() else x[missing.to(x.device)].contiguous(memory_format=torch.channels_last)
            with self.autocast if self.autocast is not None else contextlib.nullcontext():
                computed = self.prefix(new).cpu()
            if self.store is None:
                self.store = torch.empty(
                    (self.size, *computed.shape[1:]), dtype=computed.dtype
                ).contiguous(memory_format=torch.channels_last)
                log.info(
                    "the frozen layers' output is kept from each %s image's first pass: %.2f GB for %d images",
                    self.what,
                    self.store.element_size() * self.store.nelement() / 1e9,
                    self.size,
                )
            self.store[indices[missing]] = computed
            self.have[indices[missing]] = True
        assert self.store is not None
        device = next(self.prefix.parameters()).device
        return self.store[indices].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def kept_probabilities(
    rest: TrainedRest, kept: FrozenOutputs, pixels: torch.Tensor, pre: Preprocessor, device: torch.device,
    batch_size: int, mirrored: FrozenOutputs | None = None,
) -> np.ndarray:
    """:func:`fracture.inference.probabilities` from kept frozen outputs.

    The frozen layers run on an image the first time it is scored; later passes run only the
    layers after them. ``pixels`` are the same images, in the same order, at every call. With
    ``mirrored`` (the kept outputs of each image's horizontal mirror) it scores as ``tta: hflip``
    does: the mean of the softmax probabilities of the image and its mirror.
    """
    rest.eval()
    autocast, _ = autocast_for(device)
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size]
        indices = torch.arange(start, start + len(batch))
        probs = softmax(rest, kept(indices, partial(pre.network_input, batch, device)), autocast)
        if mirrored is not None:
            flipped = mirrored(indices, partial(_mirrored_input, pre, batch, device))
            probs = (probs + softmax(rest, flipped, autocast)) / 2
        out.append(probs[:, 1].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def _mirrored_input(pre: Preprocessor, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The network input of the images' horizontal mirrors, as :func:`fracture.inference.probabilities` makes it."""
    return mirror(pre.network_input(pixels, device))


class _WithIndices(torch.utils.data.Dataset):
    """A training set whose batches also carry their indices (for :class:`FrozenOutputs`)."""

    def __init__(self, data: TensorDataset | CachedImages) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = self.data[indices]
        return torch.as_tensor(indices), images, labels


def train(
    train_data: TensorDataset | CachedImages,
    val_data: TensorDataset,
    config: DataConfig,
    profile: Profile,
    params: TrainParams,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_key: str = "",
    run_id: str | None = None,
    reuse_frozen_outputs: bool = True,
    kept_outputs: dict[str, FrozenOutputs] | None = None,
) -> FitResult:
    """Fine-tunes the profile's ImageNet model and keeps the epoch with the best val ROC AUC.

    With a profile's ``snapshots`` above 1, the cosine schedule restarts so that the epochs fall into
    that many cycles of equal length, and the model returned is the networks at the cycles' ends
    as one :class:`~fracture.ensemble.SeedEnsemble` (a snapshot ensemble): no epoch is chosen on val,
    its val figures are the mean of the snapshots' probabilities, and ``member_best_epochs`` holds
    the epochs they were taken after.

    With a profile's ``ema_decay`` above 0, the network scored, chosen and returned is the
    moving average of the weights (:func:`moving_average`), and each epoch's metrics also hold
    the trained weights' own val ROC AUC (``val_roc_auc_raw``), so a run shows what the average
    added.

    With ``checkpoint_dir``, the full training state is saved after every epoch
    (:mod:`fracture.checkpoint`), and a checkpoint left there by a killed run with the same
    ``checkpoint_key`` is resumed: the run continues after its last completed epoch with the
    model, optimiser, scheduler, scaler, best score and every random generator as they were,
    so it ends exactly where an uninterrupted run would.

    In a process launched as one of several (torchrun, or ``train.processes`` through
    :func:`fracture.distributed.launch`), the model is wrapped in DistributedDataParallel, each
    process trains on its share of every global batch of ``params.batch_size`` images and scores
    its share of val; every process gathers all val scores and computes the same metrics, so
    all end with the same best epoch and weights. Only rank 0 calls ``on_epoch`` and writes
    checkpoints; a resumed run reads rank 0's checkpoint on every rank.

    Args:
        train_data: training images (uint8 NCHW at the input size) and labels: the prepared
            cache's reader (:meth:`fracture.prepare.PreparedImages.reader`), which reads each
            batch when it is due, or tensors in memory.
        val_data: validation images and labels.
        config: the data config the images were prepared with
            (:func:`fracture.model.profile_data_config`).
        profile: architecture, weights, input size, epochs and the val pass's test-time
            augmentation (``tta``).
        params: optimiser, scheduler, batch size, seed and device.
        on_epoch: called after each epoch with its metrics (e.g. to log them to MLflow), once the
            epoch's checkpoint is written.
        checkpoint_dir: where the per-epoch checkpoint lives (``None``: no checkpoints).
        checkpoint_key: fingerprint of the run (:func:`fracture.checkpoint.fingerprint`); a
            checkpoint with another key is ignored.
        run_id: the MLflow run, stored in the checkpoint so a resumed run logs to the same run.
        reuse_frozen_outputs: when the profile freezes the network's leading layers and nothing
            changes their output from epoch to epoch (no augmentation, no stochastic depth, one
            process), keep each training image's output of those layers from its first pass
            (:class:`FrozenOutputs`), and each val image's from the first val pass (without
            test-time augmentation, and for the trained weights, not their moving average); on
            the CPU the trained weights and val scores are the same, bit for bit, as without.
        kept_outputs: where the kept outputs live between calls (keys ``train`` and ``val``):
            filled by this call, or taken from an earlier one that trained a network with the same
            frozen layers on the same images (an ensemble's members, :func:`fit_members`).

    Returns:
        The best model (on the CPU), its data config, the per-epoch history and the last
        epoch's val probabilities.

    Raises:
        StaleCacheError: the images were prepared for another input size or normalisation
            than the model's.
        ConfigError: the profile's ``frozen`` names a module the model lacks.
        TrainingDivergedError: a step's loss was not finite (without a gradient scaler, which
            skips such a step itself); raised at that step, naming the epoch, batch and rate, and
            in a data-parallel run on every rank, naming the ranks whose loss it was.
    """
    # Every rank is seeded alike: each draws the same image order and deals itself a share
    # (distributed.ShardedSampler); DDP copies rank 0's initial weights to the others. Each
    # epoch's augmentation and masks are drawn per rank (rank_epoch_seed).
    seed_everything(params.seed)
    device = select_device(params.device)
    context = distributed.setup(use_cuda=device.type == "cuda")
    if context.distributed and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    batch_size = distributed.per_process_batch(params.batch_size, context.world_size)
    model = create_classifier(profile)
    expected = data_config(model, profile.image_size, config.aspect, config.enhance, profile.decode)
    if expected != config:
        raise StaleCacheError(
            f"images were prepared for {config}, but {profile.model} needs {expected}: "
            "run `dvc repro prepare` to rebuild the prepared cache"
        )
    if profile.frozen:
        # The train stage checked the names already (check_profile_frozen); other callers meet a
        # typo here, before any epoch, rather than as timm's bare AttributeError.
        check_frozen(model, profile.frozen, "profiles.<train.profile>.frozen")
        # Freezing the high-resolution early layers skips most of their backward pass; their
        # ImageNet edge and texture filters transfer to X-rays as they are.
        freeze(model, list(profile.frozen))
    augment = augmentation(profile.augment)
    pre = Preprocessor(config)

    model = model.to(device, memory_format=torch.channels_last)
    synced_batch_norm = context.distributed and device.type == "cuda"
    if synced_batch_norm:
        # Statistics over the global batch, as one GPU computes them. timm's conversion keeps
        # the activation of its fused BatchNormAct layers; PyTorch's SyncBatchNorm is CUDA only.
        model = convert_sync_batchnorm(model)
    net = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if context.distributed
        else model
    )
    # The average is made from the model every rank holds alike (DDP keeps the ranks' weights
    # equal), so every rank's average is the same too.
    ema = moving_average(model, profile.ema_decay)
    generator = torch.Generator().manual_seed(params.seed)
    criterion, sampler = class_balance(params.class_balance, labels_of(train_data), generator, profile.label_smoothing)
    criterion = criterion.to(device)
    if context.distributed and getattr(criterion, "weight", None) is not None:
        criterion = distributed.GlobalBatchLoss(criterion, context)
    lr = learning_rate(profile, params)
    optimizer = torch.optim.Adam(
        parameter_groups(model, lr, params.weight_decay, profile.layer_decay), lr=lr, weight_decay=params.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=cycle_epochs(profile, params), T_mult=params.t_mult
    )
    autocast, scaler = autocast_for(device)
    # Frozen leading layers whose output cannot change between epochs run once per image.
    depth = frozen_prefix_depth(model, profile.frozen) if reuse_frozen_outputs else None
    kept: FrozenOutputs | None = None
    kept_val: FrozenOutputs | None = None
    kept_val_mirrored: FrozenOutputs | None = None  # under tta: hflip, each val image's mirror
    rest: nn.Module = net
    if depth is not None and augment is None and profile.drop_path_rate == 0 and not context.distributed:
        prefix, rest = FrozenPrefix(model, depth), TrainedRest(model, depth)
        shared = kept_outputs if kept_outputs is not None else {}
        kept = shared.setdefault("train", FrozenOutputs(prefix, len(train_data), autocast))
        kept_val = shared.setdefault("val", FrozenOutputs(prefix, len(val_data), autocast, what="val"))
        if profile.tta == "hflip":  # a mirrored image's output is another one to keep
            kept_val_mirrored = shared.setdefault(
                "val_mirrored", FrozenOutputs(prefix, len(val_data), autocast, what="mirrored val")
            )
        for outputs in (kept, kept_val, kept_val_mirrored):
            if outputs is not None:  # an earlier member's: its frozen layers are this network's, on this device
                outputs.prefix = prefix
    shard = distributed.ShardedSampler(
        sampler if sampler is not None else RandomSampler(train_data, generator=generator),
        context.rank,
        context.world_size,
    )
    # Batch norm cannot train on a batch of one image: when an epoch would end on one, that
    # image sits this epoch out (the order is redrawn every epoch, so it is a different one).
    # The batch is the global one, as one process trains it; with batch norm per process (DDP on
    # CPUs, without synchronised statistics) a last share of one image per process sits out too.
    lone_last = distributed.drops_lone_last(
        len(sampler if sampler is not None else train_data), params.batch_size, context.world_size, synced_batch_norm
    )
    if lone_last and context.is_main:
        left = len(shard) % batch_size
        log.info("%d images per epoch and process in batches of %d: each process's last batch, of %d image(s), is "
                 "skipped each epoch (%d of the epoch's %d draws)", len(shard), batch_size, left,
                 left * context.world_size, len(shard) * context.world_size)
    # Each batch is fetched with one indexing call (a gather from the memory-mapped cache),
    # not image by image and stacked.
    loader = DataLoader(
        train_data if kept is None else _WithIndices(train_data),
        sampler=BatchSampler(shard, batch_size, drop_last=lone_last),
        batch_size=None,
        generator=generator,
        pin_memory=device.type == "cuda",
    )

    # Each process scores its share of val; every process then holds all the scores.
    val_share, val_labels = val_data.tensors[0][context.rank :: context.world_size], val_data.tensors[1].numpy()

    def val_scores(network: nn.Module) -> np.ndarray:
        if kept_val is not None and network is model:  # one process; the moving average is another network
            assert isinstance(rest, TrainedRest)
            return kept_probabilities(rest, kept_val, val_share, pre, device, batch_size * 2, kept_val_mirrored)
        return distributed.gather_scores(
            probabilities(network, val_share, pre, device, batch_size * 2, profile.tta), len(val_data), context
        )

    scored = ema.module if ema is not None else model  # the network val scores, picks and returns
    best_auc, best_epoch, best_state = -1.0, -1, None
    history: list[dict[str, float]] = []
    val_probs: np.ndarray | None = None
    best_probs: np.ndarray | None = None
    # A snapshot ensemble's (profile.snapshots > 1) networks at each cosine cycle's end, and their val scores.
    cycle = cycle_epochs(profile, params)
    snapshot_states: list[dict[str, torch.Tensor]] = []
    snapshot_probs: list[np.ndarray | None] = []
    start = 0
    saved = checkpoint.load(checkpoint_dir, checkpoint_key) if checkpoint_dir is not None and context.is_main else None
    saved = distributed.from_main(saved, context)  # other machines need not see rank 0's disk
    if saved is not None:
        model.load_state_dict(saved.model_state)
        optimizer.load_state_dict(saved.optimizer_state)
        scheduler.load_state_dict(saved.scheduler_state)
        if scaler is not None and saved.scaler_state is not None:
            scaler.load_state_dict(saved.scaler_state)
        if ema is not None:
            ema.module.load_state_dict(saved.ema_state)
        checkpoint.restore_rng(saved.rng["tensors"], saved.rng["plain"], generator)
        start, history = saved.epoch, list(saved.history)
        best_auc, best_epoch, best_state = saved.best_score, saved.best_epoch - 1, saved.best_state
        snapshot_states = list(saved.snapshot_states)
        snapshot_probs = [None] * len(snapshot_states)  # scored again below, with the others
        log.info("resuming from the checkpoint in %s after epoch %d of %d", checkpoint_dir, start, profile.epochs)
    for epoch in range(start, profile.epochs):
        if context.distributed:
            # Augmentation, dropout and stochastic depth draw from the global generators: one
            # stream per process, or every rank's k-th image would get the same flip, rotation
            # and masks. Seeded per epoch, so a resumed run draws as an uninterrupted one.
            seed_everything(rank_epoch_seed(params.seed, epoch, context.rank))
        train_mode(net, model, profile.frozen)
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        # The bar draws on a terminal only; under DVC or Prefect progress goes to the log.
        # Other ranks stay quiet: rank 0's rate times the number of processes is the run's.
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{profile.epochs}", unit="batch", mininterval=5,
                   disable=None if context.is_main else True)
        for i, batch in enumerate(bar):
            indices, images, labels = batch if kept is not None else (None, *batch)
            if augment is not None:
                images = torch.stack([augment(img) for img in images])

            # With the frozen layers' output kept, only the rest runs and trains.
            to_network = partial(pre.network_input, images, device)
            x = to_network() if kept is None else kept(indices, to_network)
            y = labels.to(device, non_blocking=True)
            loss = train_step(rest, x, y, criterion, optimizer, autocast, scaler)
            if ema is not None:
                ema.update(model, step=epoch * len(loader) + i + 1)
            # This step's rate (the head's, under layer_decay); the scheduler then sets the next one's.
            step_lr = max(group["lr"] for group in optimizer.param_groups)
            scheduler.step(epoch + (i + 1) / len(loader))
            seen += len(labels)
            # Read here once a step for the epoch's sum and the bar anyway, so checking it adds no device sync.
            step_loss = loss.item()
            if scaler is None:  # a gradient scaler skips such a step instead (on every rank: DDP averages the gradients)
                _stop_if_diverged(step_loss, context, f"at epoch {epoch + 1}/{profile.epochs}, batch {i + 1}/"
                                  f"{len(loader)}, learning rate {step_lr:.3g}")
            loss_sum += step_loss * len(labels)
            rate = seen / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{rate:.1f}")
            if context.is_main and bar.disable and ((i + 1) % LOG_EVERY == 0 or i + 1 == len(loader)):
                log.info("epoch %d/%d batch %d/%d loss %.4f %.1f images/s",
                         epoch + 1, profile.epochs, i + 1, len(loader), step_loss, rate)
        loss_sum, seen = distributed.sum_over_ranks(loss_sum, seen, context=context)
        train_time = time.perf_counter() - started
        if not synced_batch_norm:
            # Every rank scores its share of val with the statistics of the model rank 0 saves.
            distributed.share_buffers(model, context)
            if ema is not None:
                distributed.share_buffers(ema.module, context)
        val_probs = val_scores(scored)
        val_auc = float(roc_auc_score(val_labels, val_probs))
        val_loss = float(
            nn.functional.binary_cross_entropy(
                torch.as_tensor(val_probs).clamp(1e-7, 1 - 1e-7), torch.as_tensor(val_labels).float()
            )
        )
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "val_loss": val_loss,
            "val_roc_auc": val_auc,
            # The epoch's last step's rate: after the last epoch of a cosine cycle the scheduler has
            # already moved on to the restart's rate, which no step of this run used.
            "lr": step_lr,
            "train_images_per_s": seen / train_time,
            "epoch_seconds": time.perf_counter() - started,
            # Memory after the epoch, to see that it does not grow from epoch to epoch.
            "rss_mb": psutil.Process().memory_info().rss / 2**20,
        }
        if ema is not None:
            metrics["val_roc_auc_raw"] = float(roc_auc_score(val_labels, val_scores(model)))
        if device.type == "cuda":
            metrics["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
        history.append(metrics)
        if context.is_main:
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
        if val_auc > best_auc:
            best_auc, best_epoch, best_probs = val_auc, epoch, val_probs
            best_state = _cpu_state(scored)
        if profile.snapshots > 1 and (epoch + 1) % cycle == 0:  # the end of a cosine cycle: a snapshot
            snapshot_states.append(_cpu_state(scored))
            snapshot_probs.append(val_probs)
        if checkpoint_dir is not None and context.is_main:
            checkpoint.save(
                checkpoint_dir,
                checkpoint_key,
                epoch=epoch + 1,
                best_epoch=best_epoch + 1,
                best_score=best_auc,
                history=history,
                model=model,
                best_state=best_state,
                ema_state=ema.module.state_dict() if ema is not None else None,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                generator=generator,
                run_id=run_id,
                snapshot_states=snapshot_states,
            )
        # Only once the epoch is in the checkpoint: a run killed before then trains it again, and one
        # killed between the two finds it in the checkpoint's history (the train stage logs it then).
        if context.is_main and on_epoch is not None:
            on_epoch(epoch, metrics)

    assert best_state is not None  # epochs >= 1 is enforced by the loop producing a state
    model = model.cpu().to(memory_format=torch.contiguous_format)
    if profile.snapshots > 1:
        return _snapshot_ensemble(model, snapshot_states, snapshot_probs, val_data, config, profile, params,
                                  history=history, device=str(device), resumed_from=start)
    model.load_state_dict(best_state)
    return FitResult(
        model=model.eval(),
        data_config=config,
        best_epoch=best_epoch + 1,
        best_val_roc_auc=best_auc,
        history=history,
        device=str(device),
        resumed_from=start,
        final_val_probabilities=val_probs,
        best_val_probabilities=best_probs,
    )


def _cpu_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the network's weights on the CPU, kept apart from the training that goes on."""
    return copy.deepcopy({k: v.detach().cpu() for k, v in network.state_dict().items()})


def _val_probabilities(
    model: nn.Module, val_data: TensorDataset, config: DataConfig, profile: Profile, params: TrainParams
) -> np.ndarray:
    """The model's fracture probabilities of the val images on the CPU, for val scores a checkpoint did not keep."""
    return probabilities(model, val_data.tensors[0], Preprocessor(config), torch.device("cpu"), params.batch_size * 2,
                         profile.tta)


def _snapshot_ensemble(
    model: nn.Module,
    states: list[dict[str, torch.Tensor]],
    probs: list[np.ndarray | None],
    val_data: TensorDataset,
    config: DataConfig,
    profile: Profile,
    params: TrainParams,
    **fit: object,
) -> FitResult:
    """The snapshots' networks as one model, with its val figures (the mean of their probabilities).

    A snapshot taken before a resume has no val scores kept: the ensemble is then scored on val once.
    """
    networks = []
    for state in states:
        network = copy.deepcopy(model)
        network.load_state_dict(state)
        networks.append(network.eval())
    ensemble = seed_ensemble(networks, profile.frozen)
    complete = all(p is not None for p in probs)
    mean = np.mean(np.stack(probs), axis=0) if complete else _val_probabilities(ensemble, val_data, config, profile, params)
    cycle = cycle_epochs(profile, params)
    return FitResult(
        model=ensemble,
        data_config=config,
        best_epoch=profile.epochs,
        best_val_roc_auc=float(roc_auc_score(val_data.tensors[1].numpy(), mean)),
        final_val_probabilities=mean,
        best_val_probabilities=mean,
        member_best_epochs=tuple(cycle * (k + 1) for k in range(len(states))),
        member_final_val_probabilities=tuple(probs) if complete else (),
        **fit,  # type: ignore[arg-type]
    )


def member_checkpoint(checkpoint_dir: Path, checkpoint_key: str, profile: Profile, member: int) -> tuple[Path, str]:
    """Where member ``member`` (from 1) of the profile's networks checkpoints, and under which key.

    One network checkpoints in ``checkpoint_dir`` itself; an ensemble's members each in a folder of
    their own, so a killed run resumes in the member it stopped in.
    """
    if profile.members == 1:
        return checkpoint_dir, checkpoint_key
    return checkpoint_dir / f"member-{member}", f"{checkpoint_key}/member-{member}"


def fit_members(
    train_data: TensorDataset | CachedImages,
    val_data: TensorDataset,
    config: DataConfig,
    profile: Profile,
    params: TrainParams,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_key: str = "",
    run_id: str | None = None,
) -> FitResult:
    """Trains the profile's ``members`` networks and returns them as one model.

    With one member this is :func:`train`. With several, member ``k`` (from 1) trains exactly
    as one network does under ``train.seed + k - 1`` and picks its own epoch on val, so member 1
    is the network ``members: 1`` trains. The frozen layers' output that the first member keeps
    serves the others (:class:`FrozenOutputs`): each later member runs only the layers that
    train, in every epoch. The model returned is their :class:`~fracture.ensemble.SeedEnsemble`.

    Its val figures are the mean of the members' probabilities: at their best epochs for
    ``best_val_roc_auc`` and ``best_val_probabilities``, at their last for
    ``final_val_probabilities``; ``best_epoch`` is member 1's, ``member_best_epochs`` all of
    theirs. Its history holds every member's epochs, each marked with its ``member``, and
    ``on_epoch`` sees them numbered on across the members (member 2's first epoch follows
    member 1's last). Each member checkpoints in a folder of its own (:func:`member_checkpoint`).

    Args: as :func:`train`.
    """
    if profile.members == 1:
        return train(train_data, val_data, config, profile, params, on_epoch, checkpoint_dir, checkpoint_key, run_id)
    kept: dict[str, FrozenOutputs] = {}
    fits: list[FitResult] = []
    for index in range(profile.members):
        member = index + 1

        def numbered(epoch: int, metrics: dict[str, float], before: int = index * profile.epochs,
                     member: int = member) -> None:
            assert on_epoch is not None
            on_epoch(before + epoch, {**metrics, "member": member})

        folder, key = (
            member_checkpoint(checkpoint_dir, checkpoint_key, profile, member) if checkpoint_dir is not None
            else (None, checkpoint_key)
        )
        log.info("training member %d of %d (seed %d)", member, profile.members, params.seed + index)
        fits.append(train(
            train_data, val_data, config, profile, dataclasses.replace(params, seed=params.seed + index),
            on_epoch=numbered if on_epoch is not None else None, checkpoint_dir=folder, checkpoint_key=key,
            run_id=run_id, kept_outputs=kept,
        ))
    ensemble = seed_ensemble([fit.model for fit in fits], profile.frozen)
    labels = val_data.tensors[1].numpy()
    best = [fit.best_val_probabilities for fit in fits]
    if any(p is None for p in best):  # a member restored whole from its checkpoint: score the ensemble once
        best_probs = _val_probabilities(ensemble, val_data, config, profile, params)
    else:
        best_probs = np.mean(np.stack(best), axis=0)
    final = [fit.final_val_probabilities for fit in fits]
    finals = None if any(p is None for p in final) else tuple(final)  # None: a member restored whole
    return FitResult(
        model=ensemble,
        data_config=config,
        best_epoch=fits[0].best_epoch,
        best_val_roc_auc=float(roc_auc_score(labels, best_probs)),
        history=[{**epoch, "member": number} for number, fit in enumerate(fits, start=1) for epoch in fit.history],
        device=fits[0].device,
        resumed_from=sum(fit.resumed_from for fit in fits),
        final_val_probabilities=None if finals is None else np.mean(np.stack(finals), axis=0),
        best_val_probabilities=best_probs,
        member_best_epochs=tuple(fit.best_epoch for fit in fits),
        member_final_val_probabilities=finals or (),
    )
