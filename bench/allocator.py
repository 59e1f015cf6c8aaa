"""The product's training with freed memory kept for the next tensors vs glibc's default, side by side.

    .venv/bin/python -m bench.allocator [--images 160] [--val 35] [--epochs 2] [--repeats 2]

Each side is a process of its own (the allocator's settings are per process and hold from the
first allocation they apply to): one calls :func:`fracture.allocator.keep_freed_memory`, as every
pipeline command does, the other runs with ``FRACTURE_KEEP_FREED_MEMORY=0``, glibc's malloc as it
comes. Both train the CPU profile (its network, input size, frozen layers and test-time
augmentation) with :func:`fracture.training.train` on the same random uint8 images, the last
``--val`` as val, for ``--epochs`` epochs. The runs alternate (kept, default, default, kept, ...) so drift
in the machine's speed hits both. Each run prints its training images per second by epoch, the
process's CPU time in user space and in the kernel, its minor page faults (pages the kernel
mapped in), its peak resident memory and a hash of the trained weights; the summary prints the
ratios of the medians and whether every run trained the same weights, bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys


def child(images: int, val: int, epochs: int) -> dict:
    """One run in this process; the parent sets the switch in its environment."""
    from fracture.allocator import keep_freed_memory

    kept = keep_freed_memory()
    import torch
    from torch.utils.data import TensorDataset

    from fracture.config import load_params
    from fracture.model import profile_data_config
    from fracture.training import train

    params = load_params()
    profile = dataclasses.replace(params.profiles["cpu"], epochs=epochs)
    config = profile_data_config(profile, params.prepare.aspect)
    generator = torch.Generator().manual_seed(0)
    size = profile.image_size
    pixels = torch.randint(0, 256, (images + val, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = (torch.rand(images + val, generator=generator) < 0.2).long()
    labels[:2] = torch.tensor([0, 1])
    labels[-2:] = torch.tensor([0, 1])
    before = resource.getrusage(resource.RUSAGE_SELF)
    fit = train(TensorDataset(pixels[:images], labels[:images]), TensorDataset(pixels[images:], labels[images:]),
                config, profile, params.train)
    after = resource.getrusage(resource.RUSAGE_SELF)
    digest = hashlib.sha256()
    for name, tensor in sorted(fit.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {
        "kept": kept,
        "images_per_s": [h["train_images_per_s"] for h in fit.history],
        "epoch_seconds": [h["epoch_seconds"] for h in fit.history],
        "user_s": after.ru_utime - before.ru_utime,
        "kernel_s": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "peak_rss_mib": after.ru_maxrss / 1024,
        "weights_sha256": digest.hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--val", type=int, default=35)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.images, args.val, args.epochs)))
        return

    runs: dict[bool, list[dict]] = {True: [], False: []}
    command = [sys.executable, "-m", "bench.allocator", "--child", "--images", str(args.images),
               "--val", str(args.val), "--epochs", str(args.epochs)]
    for r in range(args.repeats):
        for keep in (True, False) if r % 2 == 0 else (False, True):  # neither side always first
            env = os.environ | {"FRACTURE_KEEP_FREED_MEMORY": "1" if keep else "0"}
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            if run["kept"] != keep:
                raise SystemExit(f"the allocator's setting did not take in this process: {run}")
            runs[keep].append(run)
            print(f"repeat {r + 1}, freed memory {'kept' if keep else 'returned (glibc default)'}: "
                  + ", ".join(f"{v:.2f}" for v in run["images_per_s"]) + " training images/s by epoch; "
                  f"epochs {', '.join(f'{v:.1f}' for v in run['epoch_seconds'])} s; CPU {run['user_s']:.1f} s user, "
                  f"{run['kernel_s']:.1f} s kernel; {run['minor_faults']:,} minor faults; peak resident "
                  f"{run['peak_rss_mib']:,.0f} MiB; weights {run['weights_sha256'][:12]}", flush=True)

    def fit_rate(run: dict) -> float:
        """Training images per second over the whole fit (the epochs' training time summed)."""
        return args.images * args.epochs / sum(args.images / v for v in run["images_per_s"])

    def median(keep: bool, key: str) -> float:
        return statistics.median(sum(r[key]) if isinstance(r[key], list) else r[key] for r in runs[keep])

    kept_rate = statistics.median(fit_rate(r) for r in runs[True])
    default_rate = statistics.median(fit_rate(r) for r in runs[False])
    same = len({r["weights_sha256"] for r in runs[True] + runs[False]}) == 1
    print(f"{args.images} images at the CPU profile's size, {args.epochs} epochs, {args.val} val (medians of "
          f"{args.repeats}): training {kept_rate:.2f} vs {default_rate:.2f} images/s, ratio "
          f"{kept_rate / default_rate:.2f}x; the fit {median(True, 'epoch_seconds'):.1f} vs "
          f"{median(False, 'epoch_seconds'):.1f} s ({median(False, 'epoch_seconds') / median(True, 'epoch_seconds'):.2f}x); "
          f"kernel CPU {median(True, 'kernel_s'):.1f} vs {median(False, 'kernel_s'):.1f} s; minor faults "
          f"{median(True, 'minor_faults'):,.0f} vs {median(False, 'minor_faults'):,.0f}; peak resident "
          f"{median(True, 'peak_rss_mib'):,.0f} vs {median(False, 'peak_rss_mib'):,.0f} MiB; "
          f"same weights bit for bit in every run: {same}")


if __name__ == "__main__":
    main()
