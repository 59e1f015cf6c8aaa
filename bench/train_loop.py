"""The product's training loop vs a bare timm + PyTorch loop on identical tensors, side by side.

    .venv/bin/python -m bench.train_loop [--images 320] [--repeats 2] [--warmup 32] [--memory-epochs 3]

Both train the CPU profile's network (its architecture, input size and frozen layers) for one
epoch over the same uint8 images in batches of ``train.batch_size`` with Adam and
CosineAnnealingWarmRestarts. The product's loop is :func:`fracture.training.train` (sampler,
preprocessing, progress, per-epoch validation on 16 images, checkpoint-free); its images per
second are the training part of the epoch, as it logs them. The bare loop is the textbook one:
a ``DataLoader`` with ``shuffle=True``, normalise, forward, loss, backward, step. The process
keeps freed memory as the train stage's does (:mod:`fracture.allocator`; each run prints the
pages the kernel mapped in for it and the kernel's CPU time, which were the gap between the two
while the heap's top was still trimmed), and first runs one
uncounted epoch of each side on ``--warmup`` images: a process's first fits grow its heap and
oneDNN's caches, which would otherwise fall on whichever side ran first. The runs then
alternate, each pair in the other order from the last (product, bare, bare, product, ...) so
drift in the machine's speed hits both; the ratio is of the medians.

Then the product's loop trains ``--memory-epochs`` epochs and prints the process's resident
memory after each (the ``rss_mb`` it logs to MLflow): it must not grow from epoch to epoch.

Last, ``--frozen-epochs`` epochs of the product's loop on the first ``--frozen-images`` images,
with the last ``--frozen-val`` images as val (the main job's val is 0.22 of its training set),
alternating: keeping each image's output of the profile's frozen leading layers from its first
pass (``reuse_frozen_outputs``, the default) against computing it again every epoch. It prints the
training images per second of each epoch and of the whole fit, the val pass's seconds in each
epoch, the ratios of the medians, and whether the two fits ended with the same weights and val
scores, bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time

import numpy as np
import psutil
import timm
import torch
from timm.utils.model import freeze
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fracture.allocator import keep_freed_memory
from fracture.config import load_params
from fracture.model import profile_data_config
from fracture.recipe import learning_rate
from fracture.training import FitResult, train


def bare_epoch(data: TensorDataset, arch: str, frozen: tuple[str, ...], mean, std, batch: int, lr: float) -> float:
    """Images per second of one epoch of the textbook loop."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=2)
    if frozen:
        freeze(model, list(frozen))
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loader = DataLoader(data, batch_size=batch, shuffle=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=1)
    criterion = nn.CrossEntropyLoss()
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    started, seen = time.perf_counter(), 0
    for i, (images, labels) in enumerate(loader):
        x = ((images.float() / 255 - m) / s).contiguous(memory_format=torch.channels_last)
        loss = criterion(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step(i / len(loader))
        seen += len(labels)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=32, help="images of the uncounted first epoch of each side")
    parser.add_argument("--memory-epochs", type=int, default=3)
    parser.add_argument("--frozen-epochs", type=int, default=3)
    parser.add_argument("--frozen-images", type=int, default=160)
    parser.add_argument("--frozen-val", type=int, default=35)
    args = parser.parse_args()

    keep_freed_memory()  # as the train stage's process does (both loops run in this process)
    params = load_params()
    profile = dataclasses.replace(params.profiles["cpu"], epochs=1)
    config = profile_data_config(profile, params.prepare.aspect)
    size = profile.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = (torch.rand(args.images, generator=generator) < 0.2).long()
    labels[:2] = torch.tensor([0, 1])
    data = TensorDataset(images, labels)
    val = TensorDataset(images[:16], labels[:16])
    print(f"{args.images} random images at {size} px, {profile.model}, frozen {list(profile.frozen)}, "
          f"batch {params.train.batch_size}, {torch.get_num_threads()} threads")

    def product_epoch(on: TensorDataset) -> float:
        return train(on, val, config, profile, params.train).history[0]["train_images_per_s"]

    def bare(on: TensorDataset) -> float:
        return bare_epoch(on, profile.model, profile.frozen, config.mean, config.std, params.train.batch_size,
                          learning_rate(profile, params.train))

    # One short epoch of each, not counted: the process's first fits grow the heap and oneDNN's
    # caches, a cost that would fall on whichever side ran first.
    warm = TensorDataset(images[: args.warmup], labels[: args.warmup])
    if args.warmup:
        product_epoch(warm), bare(warm)
    rates: dict[str, list[float]] = {"product": [], "bare": []}
    sides = {"product": product_epoch, "bare": bare}
    for r in range(args.repeats):
        order = ("product", "bare") if r % 2 == 0 else ("bare", "product")  # each pair in the other order
        kernel = {}
        for side in order:
            before = resource.getrusage(resource.RUSAGE_SELF)
            rates[side].append(sides[side](data))
            after = resource.getrusage(resource.RUSAGE_SELF)
            kernel[side] = (after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime)
        print(f"repeat {r + 1} ({order[0]} first): product {rates['product'][-1]:.2f} images/s, "
              f"bare {rates['bare'][-1]:.2f} images/s; pages the kernel mapped in (minor faults) and its CPU: "
              + ", ".join(f"{side} {faults:,} in {stime:.1f} s" for side, (faults, stime) in kernel.items()))
    product, bare_rates = rates["product"], rates["bare"]
    ratio = statistics.median(product) / statistics.median(bare_rates)
    print(f"training loop: product {statistics.median(product):.2f} vs bare {statistics.median(bare_rates):.2f} "
          f"images/s (medians): ratio {ratio:.3f}")

    if args.memory_epochs:
        before = psutil.Process().memory_info().rss / 2**20
        fit = train(data, val, config, dataclasses.replace(profile, epochs=args.memory_epochs), params.train)
        rss = [h["rss_mb"] for h in fit.history]
        print(f"resident memory before training {before:.0f} MiB; after each epoch: "
              + ", ".join(f"{v:.0f}" for v in rss) + f" MiB; growth epoch 2 -> {len(rss)}: {rss[-1] - rss[min(1, len(rss) - 1)]:+.0f} MiB")

    if args.frozen_epochs:
        subset = TensorDataset(images[: args.frozen_images], labels[: args.frozen_images])
        held_out = TensorDataset(images[-args.frozen_val :], labels[-args.frozen_val :])
        several = dataclasses.replace(profile, epochs=args.frozen_epochs)
        rates: dict[bool, list[float]] = {True: [], False: []}
        val_seconds: dict[bool, list[float]] = {True: [], False: []}  # the val passes after the first
        fits: dict[bool, FitResult] = {}
        for r in range(args.repeats):
            for reuse in (True, False) if r % 2 == 0 else (False, True):  # alternating: neither side always first
                fit = train(subset, held_out, config, several, params.train, reuse_frozen_outputs=reuse)
                trained = [len(subset) / h["train_images_per_s"] for h in fit.history]
                scored = [h["epoch_seconds"] - t for h, t in zip(fit.history, trained, strict=True)]
                rates[reuse].append(len(subset) * len(fit.history) / sum(trained))
                val_seconds[reuse].append(sum(scored[1:]))
                fits[reuse] = fit
                print(f"repeat {r + 1}, frozen layers' output {'kept' if reuse else 'recomputed'}: "
                      + ", ".join(f"{h['train_images_per_s']:.2f}" for h in fit.history)
                      + f" training images/s by epoch, {rates[reuse][-1]:.2f} over the fit; val pass "
                      + ", ".join(f"{v:.2f}" for v in scored) + " s by epoch")
        kept_weights = fits[True].model.state_dict()
        same = all(torch.equal(kept_weights[k], v) for k, v in fits[False].model.state_dict().items())
        same_val = np.array_equal(fits[True].final_val_probabilities, fits[False].final_val_probabilities)
        kept, recomputed = statistics.median(rates[True]), statistics.median(rates[False])
        val_kept, val_recomputed = statistics.median(val_seconds[True]), statistics.median(val_seconds[False])
        print(f"{args.frozen_epochs} epochs on {len(subset)} images: frozen layers' output kept {kept:.2f} vs "
              f"recomputed {recomputed:.2f} training images/s (medians): ratio {kept / recomputed:.3f}; "
              f"val passes of epochs 2-{args.frozen_epochs} on {len(held_out)} images: {val_kept:.2f} vs "
              f"{val_recomputed:.2f} s (medians): ratio {val_recomputed / max(val_kept, 1e-9):.2f}x faster; "
              f"same weights bit for bit: {same}; same val scores: {same_val}")


if __name__ == "__main__":
    main()
