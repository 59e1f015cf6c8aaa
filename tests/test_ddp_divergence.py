"""A loss that stops being a number on one rank of a data-parallel run stops every rank at that step.

Each rank is its own process, started with torchrun's environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...) but without torchrun's agent, as on two machines: no launcher stops the rank
that did not diverge, so before every rank made the same decision it waited in its next
collective until the process group's timeout.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from tests.conftest import REPO
from tests.servers import child_env, free_port
from tests.test_distributed import _setup

# A child process imports torch and timm (a few seconds each on two busy cores) and trains 6 steps
# of a 32 px model; a rank left waiting in a collective waits the process group's timeout (minutes).
PROMPTLY_S = 120
POISONED_STEP = 6  # epoch 2 of 2, batch 2 of 4: epoch 1 completed and was checkpointed


class _PoisonedLoss(nn.CrossEntropyLoss):
    """Cross-entropy that is NaN at one step on one rank, as when one rank's share of a batch overflows."""

    def __init__(self, rank: int, poisoned_rank: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step, self.poisoned = 0, rank == poisoned_rank

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.step += 1
        loss = super().forward(logits, target)
        return loss * math.nan if self.poisoned and self.step == POISONED_STEP else loss


def _rank_main(inputs: str, out: str) -> None:
    """One rank's run (a child process): train, poisoned on rank 1, and write what happened to ``out``."""
    from fracture import checkpoint, distributed, training  # noqa: PLC0415 - patched in this process only

    rank = int(os.environ["RANK"])
    original = training.class_balance

    def poisoned(mode, labels, generator, label_smoothing=0.0):
        _, sampler = original(mode, labels, generator, label_smoothing)
        return _PoisonedLoss(rank, 1, label_smoothing=label_smoothing), sampler

    training.class_balance = poisoned
    data, config, profile, train_params = torch.load(inputs, weights_only=False)
    folder = Path(out).parent / f"checkpoint-{rank}"
    epochs: list[int] = []
    try:
        training.train(data, data, config, profile, train_params, on_epoch=lambda epoch, _: epochs.append(epoch + 1),
                       checkpoint_dir=folder, checkpoint_key="diverging")
    except Exception as err:
        saved = checkpoint.load(folder, "diverging")
        Path(out).write_text(json.dumps({"type": type(err).__name__, "error": str(err), "epochs_logged": epochs,
                                         "checkpointed": saved.epoch if saved is not None else None}))
        raise
    finally:
        distributed.teardown()


def test_a_loss_that_is_not_a_number_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    data, config, profile, train_params = _setup(tmp_path)
    inputs = tmp_path / "inputs.pt"
    torch.save((data, config, profile, train_params), inputs)
    port = str(free_port())
    procs = []
    started = time.monotonic()
    for rank in (0, 1):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONPATH=str(REPO))
        code = f"from tests.test_ddp_divergence import _rank_main; _rank_main({str(inputs)!r}, {str(tmp_path / f'rank{rank}.json')!r})"
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, PROMPTLY_S - (time.monotonic() - started)))[0])
    finally:  # a rank still waiting in a collective is stopped with the test
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    elapsed = time.monotonic() - started
    print(f"both ranks exited after {elapsed:.1f} s")

    assert [proc.returncode for proc in procs] == [1, 1], outputs
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # Every rank raised at the same step, naming the rank whose loss was not a number.
        assert report["type"] == "TrainingDivergedError", report
        assert report["error"].startswith(
            "the training loss is nan on rank 1 (of 2 ranks) at epoch 2/2, batch 2/4, learning rate "
        ), report["error"]
        assert "training diverged" in report["error"]
        # Nothing of the diverged epoch reached the checkpoint or the epoch log (rank 0's; the others write none).
        assert report["epochs_logged"] == ([1] if rank == 0 else [])
        assert report["checkpointed"] == (1 if rank == 0 else None)
