"""Trains and evaluates one profile on an existing split, with the pipeline's own functions.

    .venv/bin/python bench/train_on_split.py --dataset ../shared/fracatlas \
        --split outputs/split [--profile cpu] [--set image_size=320 epochs=7] [--out result.json]

For a machine that has the accelerator but not the tracking stack (no DVC cache, MLflow or
Prefect): it decodes the split's images with the served transform
(:class:`fracture.imaging.Preprocessor`), trains with :func:`fracture.training.train` (the
same recipe, device selection, mixed precision and checkpointing code as the train stage)
and scores the test split as the evaluate stage does (threshold chosen on the validation
split, bootstrap intervals, calibration). Prints one JSON object: decode, training and
inference throughput, wall times and the test metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import TensorDataset

from fracture.config import load_params
from fracture.devices import select_device
from fracture.evaluation import (
    calibration,
    confidence_intervals,
    evaluate_probabilities,
    operating_threshold,
)
from fracture.imaging import Preprocessor
from fracture.inference import probabilities
from fracture.model import profile_data_config
from fracture.split import split_groups
from fracture.training import train


def _coerce(value: str) -> object:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, required=True, help="FracAtlas folder the split's paths are relative to")
    parser.add_argument("--split", type=Path, required=True, help="folder with train.csv, val.csv and test.csv")
    parser.add_argument("--profile", default=None, help="a profile of params.yaml (default: train.profile)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="profile fields to override")
    parser.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE", help="train params to override")
    parser.add_argument("--workers", type=int, default=8, help="decoding threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    params = load_params(Path("."))
    name = args.profile or params.train.profile
    overrides = dict(item.split("=", 1) for item in args.set)
    profile = dataclasses.replace(params.profiles[name], **{k: _coerce(v) for k, v in overrides.items()})
    train_params = dataclasses.replace(
        params.train, **{k: _coerce(v) for k, v in (item.split("=", 1) for item in args.train)}
    )
    config = profile_data_config(profile, params.prepare.aspect, params.prepare.enhance)
    pre = Preprocessor(config)
    allow_truncated = params.validate.on_truncated == "keep"

    started = time.perf_counter()
    frames = {s: pd.read_csv(args.split / f"{s}.csv", dtype={"image_id": str}) for s in ("train", "val", "test")}
    data = {
        s: TensorDataset(
            pre.load([args.dataset / p for p in f["path"]], allow_truncated, args.workers),
            torch.tensor(f["label"].astype(int).to_numpy()),
        )
        for s, f in frames.items()
    }
    decode_s = time.perf_counter() - started
    n_images = sum(len(f) for f in frames.values())

    started = time.perf_counter()
    result = train(data["train"], data["val"], config, profile, train_params)
    train_s = time.perf_counter() - started

    device = select_device(train_params.device)
    model = result.model.to(device, memory_format=torch.channels_last)
    # Scored as the evaluate stage and the served model score: with the profile's test-time augmentation.
    val_probs = probabilities(model, data["val"].tensors[0], pre, device, params.evaluate.batch_size, profile.tta)
    threshold = operating_threshold(params.evaluate, lambda: (data["val"].tensors[1].numpy(), val_probs))
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    probs = probabilities(model, data["test"].tensors[0], pre, device, params.evaluate.batch_size, profile.tta)
    infer_s = time.perf_counter() - started
    labels = data["test"].tensors[1].numpy()
    ev = evaluate_probabilities(labels, probs, threshold)
    intervals = confidence_intervals(labels, probs, threshold, params.evaluate.bootstrap_resamples, params.evaluate.seed,
                                     groups=split_groups(frames["test"]))  # as the evaluate stage
    calib = calibration(labels, probs, params.evaluate.calibration_bins)

    summary = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "profile": name,
        "model": profile.model,
        "image_size": profile.image_size,
        "epochs": profile.epochs,
        "overrides": args.set + args.train,
        "images": {s: len(f) for s, f in frames.items()},
        "decode_images_per_s": round(n_images / decode_s, 1),
        "train_seconds": round(train_s, 1),
        "train_images_per_s_by_epoch": [round(h["train_images_per_s"], 1) for h in result.history],
        "val_roc_auc_by_epoch": [round(h["val_roc_auc"], 4) for h in result.history],
        "best_epoch": result.best_epoch,
        "test_inference_images_per_s": round(len(labels) / infer_s, 1),
        "threshold": threshold,
        "test": {k: round(v, 4) for k, v in ev.metrics.items() if isinstance(v, float)},
        "test_ci95": {k: [round(lo, 4), round(hi, 4)] for k, (lo, hi) in intervals.items()},
        "ece": round(calib.ece, 4),
        "brier": round(calib.brier, 4),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
