"""What an ensemble of seeds (``profiles.<p>.members``) costs against one network, side by side.

    .venv/bin/python -m bench.ensemble_cost [--profile cpu] [--batches 3] [--repeats 3]

On the profile's architecture, input size and frozen layers (random input; the arithmetic is the
same as on X-rays), it times, alternating so that drift in the machine's speed hits every side:

- scoring a batch of ``evaluate.batch_size`` images in eval mode: one network, then the
  :class:`~fracture.ensemble.SeedEnsemble` of 2 and of 3 members, whose frozen layers run once;
- the parts of that: the frozen layers alone and the layers above them alone;
- a training step of ``train.batch_size`` images as the first epoch runs it (frozen layers
  forward, then the rest forward and backward) and as every later step, and every later
  member's, runs it on the kept output of the frozen layers (:class:`fracture.training.FrozenOutputs`).

It prints each side's median seconds per image, images per second, and the ratios to one network.
A member's training costs its epochs at the kept-output rate, the first member's first epoch
aside; the main job's figure is its own (bench/RESULTS.md, "The main job, run by run").
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from timm.utils.model import freeze
from torch import nn

from fracture.config import load_params
from fracture.ensemble import SeedEnsemble
from fracture.model import create_classifier
from fracture.training import FrozenPrefix, TrainedRest, frozen_prefix_depth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--batches", type=int, default=3, help="batches per timed side and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params = load_params(".")
    profile = params.profiles[args.profile]
    torch.manual_seed(0)
    network = create_classifier(profile)
    freeze(network, list(profile.frozen))
    depth = frozen_prefix_depth(network, profile.frozen)
    if not depth:
        raise SystemExit(f"profiles.{args.profile}.frozen is not the network's leading layers: every member runs in full")
    members = [network, *(copy.deepcopy(network) for _ in range(2))]
    for member in members[1:]:  # another seed's head and upper layers; the frozen ones stay shared
        for module in member.blocks[depth:]:
            for p in module.parameters():
                p.data.add_(torch.randn_like(p) * 1e-3)
    networks = {
        "one network": network.eval(),
        "ensemble of 2": SeedEnsemble(members[:2], depth).eval(),
        "ensemble of 3": SeedEnsemble(members, depth).eval(),
    }
    size = profile.image_size
    scoring = torch.randn(params.evaluate.batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    training = scoring[: params.train.batch_size]
    labels = torch.randint(0, 2, (len(training),))
    prefix, rest = FrozenPrefix(network, depth), TrainedRest(network, depth)
    with torch.no_grad():
        kept = prefix(training)
        kept_scoring = prefix(scoring)
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=1e-4)
    criterion = nn.CrossEntropyLoss()

    def score(model: nn.Module) -> None:
        with torch.no_grad():
            model(scoring)

    def frozen_only() -> None:
        prefix(scoring)

    def above_only() -> None:
        with torch.no_grad():
            rest(kept_scoring)

    def step(x: torch.Tensor, first: bool) -> None:
        network.train()
        optimizer.zero_grad()
        criterion(rest(prefix(x) if first else x), labels).backward()
        optimizer.step()
        network.eval()

    sides = {
        **{f"score: {name}": (lambda m=m: score(m), len(scoring)) for name, m in networks.items()},
        "score: frozen layers alone": (frozen_only, len(scoring)),
        "score: the layers above them alone": (above_only, len(scoring)),
        "train step: first epoch (frozen layers forward, the rest forward and backward)": (
            lambda: step(training, True), len(training)),
        "train step: on the kept output (later epochs, later members)": (lambda: step(kept, False), len(training)),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.repeats):
        for name, (fn, images) in list(sides.items())[:: 1 if r % 2 == 0 else -1]:  # neither side always first
            fn()  # untimed: whatever the side before left in the allocator and caches is not this side's cost
            started = time.perf_counter()
            for _ in range(args.batches):
                fn()
            times[name].append((time.perf_counter() - started) / (args.batches * images))
    print(f"profile {args.profile}: {profile.model}, {size} px, frozen {list(profile.frozen)}; "
          f"{torch.get_num_threads()} threads, median of {args.repeats} alternating repeats of {args.batches} batches "
          "(each after one untimed batch)")
    one = statistics.median(times["score: one network"])
    first = statistics.median(times[next(k for k in sides if k.startswith("train step: first"))])
    for name, values in times.items():
        median = statistics.median(values)
        base = first if name.startswith("train") else one
        runs = ", ".join(f"{v * 1000:.1f}" for v in values)
        print(f"{name}: {median * 1000:.1f} ms per image ({runs}), {1 / median:.1f} images/s, {median / base:.2f}x")


if __name__ == "__main__":
    main()
