"""What ``decode: draft`` changes for a trained model: its val scores with JPEGs decoded in full and at draft scale.

    .venv/bin/python -m bench.draft_decode --project <a project whose main job has run>

The project's trained model (``outputs/train``) scores its val split twice, through the
product's own decoding and resize (:class:`fracture.imaging.Preprocessor`): once with its data
config as trained, once with ``decode`` switched. Printed: each side's ROC AUC, DeLong's paired
test of the difference (over the val split's groups of linked images, as the promotion gate
counts them), how far the probabilities and the pixels moved, and each side's decode and resize
rate. The test split is not read.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fracture.config import load_params
from fracture.evaluation import delong_paired
from fracture.imaging import Preprocessor
from fracture.inference import load_network, probabilities
from fracture.split import split_groups
from fracture.workspace import Workspace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", type=Path, required=True, help="a project whose train stage has run")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    workspace, params = Workspace(args.project), load_params(args.project)
    trained = workspace.read_train().model
    val = workspace.read_split_table("val")
    paths = [args.project / params.ingest.dest / p for p in val["path"]]
    labels = val["label"].astype(int).to_numpy()
    allow_truncated = params.validate.on_truncated == "keep"
    network = load_network(workspace.weights, trained.architecture)
    other = "draft" if trained.data_config.decode == "full" else "full"
    configs = {f"{trained.data_config.decode} (as trained)": trained.data_config,
               other: dataclasses.replace(trained.data_config, decode=other)}
    print(f"{trained.architecture} at {trained.data_config.input_size[1]} px, val split: {len(val)} images, "
          f"{int(labels.sum())} fractured")
    scores, pixels = {}, {}
    for name, config in configs.items():
        pre = Preprocessor(config)
        started = time.perf_counter()
        pixels[name] = pre.load(paths, allow_truncated, args.workers)
        rate = len(paths) / (time.perf_counter() - started)
        scores[name] = probabilities(network, pixels[name], pre, torch.device("cpu"), 32, trained.tta)
        print(f"{name:>18}: ROC AUC {roc_auc_score(labels, scores[name]):.4f}, decode and resize {rate:.1f} images/s")
    (a, b), (pa, pb) = scores.values(), pixels.values()
    paired = delong_paired(labels, b, a, groups=split_groups(val))
    print(f"{other} minus as trained: {paired.difference:+.4f} (95% CI {paired.ci_low:+.4f} to {paired.ci_high:+.4f}, "
          f"p = {paired.p_value:.2f}, over {paired.n_groups} groups of linked images)")
    print(f"probabilities: largest change {np.abs(a - b).max():.4f}, correlation {np.corrcoef(a, b)[0, 1]:.5f}")
    diff = (pa.int() - pb.int()).abs().float()
    print(f"pixels: mean change {diff.mean():.3f} grey levels, largest {int(diff.max())}")


if __name__ == "__main__":
    main()
