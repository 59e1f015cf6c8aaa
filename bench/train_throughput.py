"""Training throughput of CPU-profile variants, measured side by side in one run.

    .venv/bin/python bench/train_throughput.py [--steps 20] [--sizes 224 288]

Prints images per second for each variant and its ratio to the first one (Lite0 at the
first size, nothing frozen, no augmentation). Random images; the first step is a warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch import nn

from fracture.config import load_params
from fracture.model import create_classifier
from fracture.training import light_augmentation, train_step
from timm.utils.model import freeze

FROZEN = ("conv_stem", "bn1", "blocks.0", "blocks.1")


def measure(size: int, frozen: tuple[str, ...], augment: bool, steps: int, batch: int) -> float:
    profile = dataclasses.replace(load_params().profiles["cpu"], image_size=size)
    torch.manual_seed(0)
    model = create_classifier(profile)
    if frozen:
        freeze(model, list(frozen))
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    aug = light_augmentation() if augment else None
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 2, (batch,))
    criterion = nn.CrossEntropyLoss()
    elapsed = 0.0
    for step in range(steps + 1):
        t0 = time.perf_counter()
        batch_images = torch.stack([aug(i) for i in images]) if aug else images
        x = ((batch_images.float() / 255 - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)
        train_step(model, x, labels, criterion, opt, autocast=None, scaler=None)
        if step:  # the first step warms up allocators and kernels
            elapsed += time.perf_counter() - t0
    return steps * batch / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 288])
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    variants = [(s, f, a) for s in args.sizes for f in ((), FROZEN) for a in (False, True)]
    base = None
    print(f"{'size':>5} {'frozen':>7} {'augment':>8} {'img/s':>7} {'ratio':>6}")
    for size, frozen, augment in variants:
        rate = measure(size, frozen, augment, args.steps, args.batch)
        base = base or rate
        print(f"{size:>5} {'stem+2' if frozen else '-':>7} {'light' if augment else '-':>8} {rate:7.1f} {rate / base:6.2f}")


if __name__ == "__main__":
    main()
