"""Training and inference throughput of each profile's network on this machine's device.

    .venv/bin/python bench/profile_throughput.py [--profiles paper cpu] [--steps 30]

Runs the training step exactly as ``fracture.training.train`` does (channels_last, bf16 or
fp16 autocast on CUDA, Adam, cross-entropy, batch size from params) on random uint8 images
at each profile's input size, and inference at the evaluate stage's batch size. Weights are
random (``pretrained=False``): speed does not depend on them, and this runs without the hub.
Prints images per second and the ratio to the first profile, measured in one run.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
from torch import nn

from fracture.config import load_params
from fracture.imaging import CLASSES
from fracture.inference import autocast_for
from fracture.training import select_device, train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, size: int, batch: int, eval_batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=len(CLASSES))
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    autocast, scaler = autocast_for(device)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (batch,), device=device)

    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        x = (images.float() / 255 - 0.5).contiguous(memory_format=torch.channels_last)
        train_step(model, x, labels, criterion, opt, autocast, scaler)

    for _ in range(3):  # warm-up: allocator, cuDNN algorithm choice
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    train_rate = steps * batch / (time.perf_counter() - t0)

    model.eval()
    x = torch.randint(0, 256, (eval_batch, 3, size, size), dtype=torch.uint8, device=device)
    x = (x.float() / 255 - 0.5).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for i in range(steps + 3):
            if i == 3:
                sync(device)
                t0 = time.perf_counter()
            if autocast is not None:
                with autocast:
                    model(x)
            else:
                model(x)
    sync(device)
    return train_rate, steps * eval_batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profiles", nargs="+", default=["paper", "cpu"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    params = load_params()
    device = select_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    else:
        print(f"device: cpu, {torch.get_num_threads()} threads (torch {torch.__version__})")
    print(f"{'profile':>8} {'model':>28} {'size':>5} {'train img/s':>12} {'infer img/s':>12} {'train ratio':>12}")
    base = None
    for name in args.profiles:
        profile = params.profiles[name]
        model_name = profile.model.split(".")[0]
        train_rate, infer_rate = measure(
            model_name, profile.image_size, params.train.batch_size, params.evaluate.batch_size, args.steps, device
        )
        base = base or train_rate
        print(f"{name:>8} {model_name:>28} {profile.image_size:>5} {train_rate:12.1f} {infer_rate:12.1f} {train_rate / base:12.2f}")


if __name__ == "__main__":
    main()
