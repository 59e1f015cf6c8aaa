"""Training and inference throughput of each profile's network on this machine's device.

    .venv/bin/python -m bench.profile_throughput [--profiles paper cpu] [--steps 30] [--repeats 2] \
        [--data ../shared/fracatlas --limit 800]

Two sides per profile, measured in one run and alternated ``--repeats`` times (medians):

- ``mixed``: the training step exactly as ``fracture.training.train`` runs it: the network and
  its input channels_last, bf16 autocast on CUDA (fp16 with a gradient scaler where bf16 is not
  supported), Adam, cross-entropy, the batch size from params;
- ``fp32``: the same step in float32 with the default (NCHW) layout and no autocast.

On the CPU the pipeline has no autocast, so there the ``mixed`` side differs from ``fp32`` only in
layout; ``--cpu-bf16`` runs it under the CPU's bf16 autocast instead, to weigh that on CPUs with
AMX or AVX-512 BF16.

``--compile`` adds a third side, ``compiled``: the ``mixed`` step with the network under
``torch.compile`` (TorchInductor, default mode), which the pipeline does not use; it weighs that
against both. Its first training step and first inference call, where the compiling happens, are
timed apart and reported as the compile time a run would pay once per process.

Each side reports training and inference images/s (inference at the evaluate stage's batch
size) and, on CUDA, the peak memory the allocator held during its training steps. Weights are
random (``pretrained=False``): speed does not depend on them, and this runs without the hub.

With ``--data`` (a FracAtlas-layout folder), it also measures the training loader at each
profile's input size: one epoch of the first ``--limit`` images from a prepared cache, read as
the train stage reads it (one gather per batch from the memory-mapped cache, pinned memory) and
moved to the device as the network's normalised channels_last input. Its images/s against the
``mixed`` side's training images/s says whether the loader keeps the device busy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from bench.args import fracatlas_folder
from bench.cache_vs_decode import image_frame
from fracture.config import load_params
from fracture.data_config import DataConfig
from fracture.devices import select_device
from fracture.imaging import CLASSES, Preprocessor
from fracture.inference import autocast_for
from fracture.model import profile_data_config
from fracture.prepare import cache_key, open_prepared, prepare_images
from fracture.training import train_step

SIDES = ("mixed", "fp32")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, run: Callable[[], None], steps: int, warmup: int = 3) -> tuple[float, float]:
    """Seconds for ``steps`` calls of ``run`` after ``warmup`` untimed ones (allocator, cuDNN's choice,
    compiling), and the seconds of the first warm-up call alone."""
    t0 = time.perf_counter()
    run()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        run()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    return time.perf_counter() - t0, first


def measure(
    name: str, size: int, batch: int, eval_batch: int, steps: int, device: torch.device, side: str,
    cpu_bf16: bool = False,
) -> dict[str, float]:
    """One side's training and inference images/s (and peak CUDA memory of training, MiB), and the
    seconds of its first training step and first inference call (where ``compiled`` compiles).

    With ``cpu_bf16`` on the CPU, the ``mixed`` and ``compiled`` sides run under the CPU's bf16
    autocast, which the pipeline does not use (on CPUs with AMX or AVX-512 BF16 it is the candidate
    to weigh). The ``compiled`` side is the ``mixed`` one with the network under ``torch.compile``.
    """
    if device.type == "cuda":  # the previous side's network is gone; its cached blocks go too
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    pipeline = side in ("mixed", "compiled")
    layout = torch.channels_last if pipeline else torch.contiguous_format
    autocast, scaler = autocast_for(device) if pipeline else (None, None)
    if pipeline and cpu_bf16 and device.type == "cpu":
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    model = timm.create_model(name, pretrained=False, num_classes=len(CLASSES))
    model = model.to(device, memory_format=layout).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    if side == "compiled":
        model = torch.compile(model)  # the optimizer holds the same parameters
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        x = (images.float() / 255 - 0.5).contiguous(memory_format=layout)
        train_step(model, x, labels, criterion, opt, autocast, scaler)

    if device.type == "cuda":  # the peak of this side's steps, not an earlier side's
        torch.cuda.reset_peak_memory_stats(device)
    train_s, train_first_s = timed(device, step, steps)
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")

    model.eval()
    x = torch.randint(0, 256, (eval_batch, 3, size, size), dtype=torch.uint8, device=device)
    x = (x.float() / 255 - 0.5).contiguous(memory_format=layout)

    def infer() -> None:
        with torch.inference_mode():
            if autocast is not None:
                with autocast:
                    model(x)
            else:
                model(x)

    infer_s, infer_first_s = timed(device, infer, steps)
    return {"train": steps * batch / train_s, "infer": steps * eval_batch / infer_s, "peak_mb": peak_mb,
            "train_first_s": train_first_s, "infer_first_s": infer_first_s}


def loader_rate(data: Path, limit: int, config: DataConfig, batch: int, workers: int, device: torch.device) -> float:
    """Images/s of one training epoch read from a prepared cache and moved to ``device`` (median of 2)."""
    frame = image_frame(data, limit)
    pre = Preprocessor(config)
    with tempfile.TemporaryDirectory() as tmp:
        prepare_images(frame, data, pre, True, Path(tmp), workers)
        reader = open_prepared(Path(tmp), cache_key(config, allow_truncated=True)).reader(frame)
        rates = []
        for _ in range(2):
            loader = DataLoader(
                reader,
                sampler=BatchSampler(RandomSampler(reader), batch, drop_last=False),
                batch_size=None,
                pin_memory=device.type == "cuda",
            )
            sync(device)
            t0 = time.perf_counter()
            seen = 0
            for images, _labels in loader:
                pre.network_input(images, device)
                seen += len(images)
            sync(device)
            rates.append(seen / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profiles", nargs="+", default=["paper", "cpu"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="alternations of the two sides")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--data", type=fracatlas_folder, default=None, help="a FracAtlas-layout folder, to measure the loader")
    parser.add_argument("--limit", type=int, default=800, help="images the loader reads (first N by id)")
    parser.add_argument("--workers", type=int, default=None, help="threads preparing its cache (default: prepare.workers)")
    parser.add_argument("--cpu-bf16", action="store_true",
                        help="on the CPU, run the mixed side under bf16 autocast (not what the pipeline runs there)")
    parser.add_argument("--compile", action="store_true",
                        help="add a third side: the mixed step with the network under torch.compile")
    args = parser.parse_args()
    sides = (*SIDES, "compiled") if args.compile else SIDES
    params = load_params()
    device = select_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    else:
        print(f"device: cpu, {torch.get_num_threads()} threads (torch {torch.__version__}); mixed side: channels_last"
              + (", bf16 autocast" if args.cpu_bf16 else ", float32 (the pipeline has no autocast on the CPU)"))
    print(f"batch {params.train.batch_size} (training), {params.evaluate.batch_size} (inference); "
          f"{args.steps} timed steps per side, {args.repeats} alternations, medians")
    head = (f"{'profile':>8} {'model':>24} {'size':>5} {'side':>8} {'train img/s':>12} {'infer img/s':>12} "
            f"{'peak MiB':>9} {'1st step (s)':>15} {'1st infer (s)':>15}")
    print(head)
    for name in args.profiles:
        profile = params.profiles[name]
        model_name = profile.model.split(".")[0]
        runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        for r in range(args.repeats):
            for side in sides if r % 2 == 0 else sides[::-1]:  # neither side always first
                runs[side].append(measure(model_name, profile.image_size, params.train.batch_size,
                                          params.evaluate.batch_size, args.steps, device, side, args.cpu_bf16))
        med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
        for side in sides:
            m = med[side]
            print(f"{name:>8} {model_name:>24} {profile.image_size:>5} {side:>8} {m['train']:12.1f} "
                  f"{m['infer']:12.1f} {m['peak_mb']:9.0f} {m['train_first_s']:15.1f} {m['infer_first_s']:15.1f}")
        print(f"{name:>8}: mixed / fp32: training {med['mixed']['train'] / med['fp32']['train']:.2f}x, "
              f"inference {med['mixed']['infer'] / med['fp32']['infer']:.2f}x "
              f"(each repeat's training ratio: "
              + ", ".join(f"{a['train'] / b['train']:.2f}" for a, b in zip(runs['mixed'], runs['fp32'], strict=True))
              + ")")
        if args.compile:
            c, mx, f = med["compiled"], med["mixed"], med["fp32"]
            print(f"{name:>8}: compiled / mixed: training {c['train'] / mx['train']:.2f}x, inference "
                  f"{c['infer'] / mx['infer']:.2f}x; compiled / fp32: training {c['train'] / f['train']:.2f}x, "
                  f"inference {c['infer'] / f['infer']:.2f}x (each repeat's training ratio to mixed: "
                  + ", ".join(f"{a['train'] / b['train']:.2f}"
                              for a, b in zip(runs['compiled'], runs['mixed'], strict=True))
                  + f"); compiling: the first training step {c['train_first_s'] - mx['train_first_s']:.1f} s "
                  f"and the first inference call {c['infer_first_s'] - mx['infer_first_s']:.1f} s longer than mixed's")
        if args.data is not None:
            config = profile_data_config(profile, params.prepare.aspect, params.prepare.enhance)
            rate = loader_rate(args.data, args.limit, config, params.train.batch_size,
                               args.workers or params.prepare.workers, device)
            print(f"{name:>8}: loader {rate:.1f} images/s ({args.limit} images from the prepared cache to the "
                  f"network's input on {device.type}); loader / mixed training: {rate / med['mixed']['train']:.2f}x")


if __name__ == "__main__":
    main()
