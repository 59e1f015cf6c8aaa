"""Where the heat map points, for a model scored with its mirror: the image's map alone against the mean with the mirror's.

    .venv/bin/python -m bench.heat_map_mirror --project <a project whose main job has run>

Under ``tta: hflip`` the served score is the mean of an X-ray's and its mirror's probabilities,
and the page's heat map is the mean of their Grad-CAM maps, the mirror's flipped back
(:func:`fracture.explain.grad_cam`). Before, it was the X-ray's map alone. This plays the pointing
game of both maps (:func:`fracture.stages.evaluate.localise`, as the evaluate stage plays it) on
the same fractured images with boxes of the val split, and prints each map's pointing game and
mass inside the boxes, their paired difference with a bootstrap interval over images, and the
seconds each map takes. The test split is not read.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fracture.config import load_params
from fracture.explain import grad_cam
from fracture.imaging import Preprocessor
from fracture.inference import load_network
from fracture.stages.evaluate import localise
from fracture.stages.prepare import open_cache
from fracture.workspace import Workspace

SPLITS = ("val", "train")


def paired_interval(a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int) -> tuple[float, float, float]:
    """Mean of ``b - a`` over images, with a 95% percentile bootstrap interval over images."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(diff), size=(n_resamples, len(diff)))
    means = diff[draws].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", type=Path, required=True, help="a project whose train stage has run")
    parser.add_argument("--weights", type=Path, help="another network of the same architecture and data config "
                        "(a registered version's model.safetensors); default: the project's trained model")
    parser.add_argument("--split", choices=SPLITS, default="val")
    args = parser.parse_args()

    workspace, params = Workspace(args.project), load_params(args.project)
    if params.evaluate.boxes is None:
        raise SystemExit(f"{args.project / 'params.yaml'}: evaluate.boxes is null; there are no boxes to score a map on")
    model = workspace.read_train().model
    weights = args.weights or workspace.weights
    network = load_network(weights, model.architecture)
    pre = Preprocessor(model.data_config)
    cache = open_cache(params, workspace, model.data_config)
    frame = workspace.read_split_table(args.split)
    labels = frame["label"].astype(int).to_numpy()
    torch.set_grad_enabled(True)  # grad_cam needs it; nothing here trains
    print(f"{model.architecture} at {model.data_config.input_size[1]} px ({weights}; served with tta: {model.tta}), "
          f"{args.split} split: {int(labels.sum())} fractured images")
    grad_cam(network, pre(cache.dataset(frame.head(1)).tensors[0]), 1)  # warm-up, so neither side pays it
    sides, seconds_per_map = {}, {}
    for tta in ("none", "hflip"):
        started = time.perf_counter()
        result = localise(params, workspace, frame, labels, cache, network, pre, model.data_config.aspect, tta)
        seconds = time.perf_counter() - started
        if result is None or result.per_image.empty:
            raise SystemExit(f"no fractured {args.split} image has a box in {params.evaluate.boxes}")
        sides[tta] = result
        m = result.metrics
        seconds_per_map[tta] = seconds / m["localised_images"]
        print(f"  {'the X-ray alone' if tta == 'none' else 'with its mirror':>16}: pointing game {m['pointing_game']:.3f} "
              f"({m['pointing_game_ci_low']:.3f}-{m['pointing_game_ci_high']:.3f}), mass inside the boxes "
              f"{m['heat_mass_in_boxes']:.3f} ({m['heat_mass_in_boxes_ci_low']:.3f}-{m['heat_mass_in_boxes_ci_high']:.3f}), "
              f"{int(m['localised_images'])} images, {1000 * seconds_per_map[tta]:.0f} ms a map")
    alone, both = sides["none"].per_image, sides["hflip"].per_image
    assert list(alone["image_id"]) == list(both["image_id"])
    m = sides["none"].metrics
    print(f"  the image centre: pointing game {m['pointing_game_centre']:.3f}; a centre Gaussian's mass "
          f"{m['heat_mass_in_boxes_centre']:.3f}; the boxes' share of the image {m['box_area_share']:.3f}")
    resamples, seed = params.evaluate.bootstrap_resamples, params.evaluate.seed
    for name, column in (("pointing game", "hit"), ("mass inside the boxes", "mass")):
        diff, low, high = paired_interval(alone[column], both[column], resamples, seed)
        print(f"  with its mirror minus alone, {name}: {diff:+.3f} (95% CI {low:+.3f} to {high:+.3f}, paired over images)")
    moved = (alone["hit"] != both["hit"]).sum()
    print(f"  images whose hit changed: {moved} of {len(alone)}; time per map with its mirror / alone: "
          f"{seconds_per_map['hflip'] / seconds_per_map['none']:.2f}x")


if __name__ == "__main__":
    main()
