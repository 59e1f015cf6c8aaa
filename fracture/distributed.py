"""Data-parallel training on PyTorch's own engines: torchrun's launcher and DistributedDataParallel.

``train.processes`` above 1 makes the train stage start that many processes on this machine
through torchrun's launcher (:func:`launch`, ``torch.distributed.launcher``), one per GPU, or
CPU workers with the gloo backend. A stage started by ``torchrun`` itself (for several
machines: ``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint host:29400 -m fracture.cli
train``) finds the process group in torchrun's environment and does not launch again.

The recipe stays the recipe: ``train.batch_size`` is the global batch, split evenly over the
processes, and each epoch's images are the single-process run's order dealt out rank by rank
(:class:`ShardedSampler`), so DDP's averaged gradient is the single-process gradient. On CUDA
batch norm is synchronised over the processes (timm's ``convert_sync_batchnorm``); PyTorch's
SyncBatchNorm needs CUDA, so on CPU workers each process normalises its own share of the batch
and the run equals the single-process run only for models without batch norm in training
mode (group or layer norm, or frozen batch norm). There every rank takes rank 0's running
statistics before the ranks score their shares of val (:func:`share_buffers`), so the scores that
pick the epoch are those of the model rank 0 saves, and an epoch's last batch sits out when each
process's share of it would be one image (:func:`drops_lone_last`).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """This process's place in the run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    machines: int = 1  # torchrun's launchers in the group (its --nnodes): one per machine

    @property
    def is_main(self) -> bool:
        """Rank 0 logs to MLflow, writes checkpoints and the stage's outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """Whether torchrun (or :func:`launch`) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(use_cuda: bool) -> Context:
    """Joins torchrun's process group when this process was launched as one of several.

    NCCL on CUDA, gloo on the CPU. On the CPU, each process gets its share of the cores, so
    the processes do not fight over them.

    Args:
        use_cuda: whether training runs on CUDA (one GPU per process, by local rank).

    Returns:
        The process's rank and the group's size (rank 0 of 1 when not launched).
    """
    if not launched():
        return Context()
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    else:
        # The cores this process may run on (a container's or taskset's share), not the machine's.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    machines = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, local_world_size, machines)


def teardown() -> None:
    """Leaves the process group (a no-op when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(entrypoint: Callable[..., T], processes: int, *args: Any) -> dict[int, T]:
    """Runs ``entrypoint(*args)`` in ``processes`` processes on this machine, as torchrun would.

    Uses torchrun's launcher (``torch.distributed.launcher.api.elastic_launch``) with a c10d
    rendezvous on the loopback address and no restarts: a failed process fails the run, with
    its traceback in the error.

    Args:
        entrypoint: a module-level function (it is pickled into each process).
        processes: how many processes.
        *args: its arguments, pickled.

    Returns:
        Each rank's return value.

    Raises:
        torch.distributed.elastic.multiprocessing.errors.ChildFailedError: a process failed.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=f"fracture-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port on loopback, chosen by the rendezvous
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    return elastic_launch(config, entrypoint)(*args)


class ShardedSampler(Sampler[int]):
    """Deals a sampler's indices out to the ranks: rank ``r`` of ``n`` takes ``r, r + n, ...``.

    Every rank draws the same order from ``base`` (its generator is seeded alike on every
    rank), so the ranks' batches together are the single-process run's batch. The order is
    padded with its own first indices to a multiple of ``n``, as ``DistributedSampler`` does,
    so every rank runs the same number of steps. Unlike ``DistributedSampler`` it wraps any
    sampler (the balanced sampler included) and leaves a single-process run's order as it was.

    Args:
        base: the single-process sampler (shuffling or class-balanced draws).
        rank: this process's rank.
        world_size: the number of processes.
    """

    def __init__(self, base: Sampler[int], rank: int = 0, world_size: int = 1) -> None:
        self.base, self.rank, self.world_size = base, rank, world_size

    def __len__(self) -> int:
        assert isinstance(self.base, Sized)
        return math.ceil(len(self.base) / self.world_size)

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        if self.world_size == 1:
            return iter(order)
        padding = -len(order) % self.world_size
        order += (order * math.ceil(padding / max(len(order), 1)))[:padding]
        return iter(order[self.rank :: self.world_size])


def per_process_batch(batch_size: int, world_size: int) -> int:
    """The share of ``train.batch_size`` (the global batch) one process trains on.

    Raises:
        ValueError: the batch does not divide evenly over the processes.
    """
    if batch_size % world_size:
        raise ValueError(
            f"train.batch_size {batch_size} does not divide over {world_size} processes "
            f"(train.processes or torchrun's --nproc-per-node x --nnodes): it is the global batch, "
            f"so make it a multiple of {world_size}"
        )
    return batch_size // world_size


def gather_scores(scores: np.ndarray, n: int, context: Context) -> np.ndarray:
    """Puts every rank's scores of its share ``rank::world_size`` of ``n`` items back in order.

    Every rank receives the whole array, so each computes the same epoch metrics.
    """
    if not context.distributed:
        return scores
    shares: list[Any] = [None] * context.world_size
    dist.all_gather_object(shares, scores)
    whole = np.empty(n, dtype=np.asarray(shares[0]).dtype)
    for rank, share in enumerate(shares):
        whole[rank :: context.world_size] = share
    return whole


def drops_lone_last(images: int, batch_size: int, world_size: int, synced_batch_norm: bool) -> bool:
    """Whether an epoch's last batch sits out because batch norm would train on one image.

    The batch is the global one, as one process trains it: ``images`` in batches of
    ``batch_size`` ending on one image. With batch norm per process (DDP on CPUs, without
    synchronised statistics), also when each process's last share would hold one image.

    Args:
        images: the images an epoch draws.
        batch_size: the global batch (``train.batch_size``).
        world_size: the number of processes.
        synced_batch_norm: batch norm's statistics are over the global batch (SyncBatchNorm).
    """
    lone = images % batch_size == 1 and images > 1
    if world_size > 1 and not synced_batch_norm:
        share = math.ceil(images / world_size)
        lone = lone or (share % per_process_batch(batch_size, world_size) == 1 and share > 1)
    return lone


def share_buffers(module: torch.nn.Module, context: Context) -> None:
    """Rank 0's buffers (batch norm's running statistics) on every rank.

    Without synchronised batch norm (PyTorch's SyncBatchNorm is CUDA only) each rank updates its
    running statistics from its own share of the batches; DDP copies rank 0's to the others only
    at the next forward pass in training. Called before the ranks score their shares of val, it
    makes every rank score with the statistics of the model rank 0 saves. Training is unchanged.
    """
    if not context.distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, 0)


def _collective_device() -> torch.device:
    """Where a small tensor for a collective lives: NCCL reduces CUDA tensors only, on this process's device."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(*values: float, context: Context) -> list[float]:
    """Each value summed over the ranks (unchanged when not distributed)."""
    if not context.distributed:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return total.cpu().tolist()


def each_rank(value: float, context: Context) -> list[float]:
    """Every rank's ``value``, in rank order, on every rank (``[value]`` when not distributed).

    For decisions every rank must take alike at the same point, such as stopping on a loss that
    is not a number: a rank that stopped alone would leave the others waiting in their next
    collective. One all-reduce of ``world_size`` float64 numbers: each rank fills its own slot
    and leaves the others 0, so each value, NaN and infinity included, arrives exactly as sent.
    """
    if not context.distributed:
        return [value]
    slots = torch.zeros(context.world_size, dtype=torch.float64, device=_collective_device())
    slots[context.rank] = value
    dist.all_reduce(slots)
    return slots.cpu().tolist()


class GlobalBatchLoss(torch.nn.Module):
    """A class-weighted cross-entropy whose gradient, averaged over the ranks by DDP, is the
    single-process gradient of the whole batch.

    PyTorch's weighted mean divides by the weights of the batch it sees. Each rank sees its
    share, so the ranks' means, averaged, weigh a share rich in the rare class differently from
    one process over the whole batch. Here each rank sums its weighted losses and divides by the
    whole batch's weight (one scalar summed over the ranks per step), times the number of ranks
    that DDP's average divides by again. Unweighted cross-entropy needs none of this: the ranks'
    shares are equal in size.
    """

    def __init__(self, criterion: torch.nn.CrossEntropyLoss, context: Context) -> None:
        super().__init__()
        if criterion.weight is None:
            raise ValueError("GlobalBatchLoss is for a class-weighted cross-entropy; an unweighted one needs no wrapper")
        self.summed = torch.nn.CrossEntropyLoss(
            weight=criterion.weight, label_smoothing=criterion.label_smoothing, reduction="sum"
        )
        self.context = context

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        assert self.summed.weight is not None
        batch_weight = self.summed.weight[target].sum().detach().to(torch.float64)
        if self.context.distributed:
            dist.all_reduce(batch_weight)
        total = self.summed(logits, target)  # float32 under autocast too: PyTorch runs cross-entropy so
        return total * (self.context.world_size / batch_weight).to(total.dtype)


def ranks_unlike_main(value: str, context: Context) -> list[int]:
    """The ranks whose ``value`` differs from rank 0's, known alike on every rank (``[]`` when not
    distributed): every rank can then stop at the same point, none left waiting in a collective."""
    same = from_main(value, context) == value
    return [rank for rank, agreed in enumerate(each_rank(float(same), context)) if not agreed]


def from_main(value: T, context: Context) -> T:
    """Rank 0's ``value`` on every rank (pickled; for checkpoints and decisions, not batches)."""
    if not context.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
