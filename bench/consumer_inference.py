"""A consumer's batch predict through the pyfunc vs its two halves alone, side by side.

    .venv/bin/python -m bench.consumer_inference --data ../shared/fracatlas [--per-size 32] [--repeats 2]

The images are real FracAtlas X-rays, half at 373 x 454 and half large (2304 x 2880 as
published, 1152 x 1440 in a copy shrunk by half: :func:`bench.common.pick_large`), sent as file bytes in one DataFrame, as a batch job
does. The model is the CPU profile's network, as many members as the profile trains (ImageNet
weights, untrained head: speed does not depend on the weights), saved as the registry's pyfunc
(:func:`fracture.packaging.save_pyfunc`).

- ``pyfunc``: ``model.predict(frame)``: input checks, decoding, resizing and the forward pass;
- ``decode``: the same checks, decoding and resizing alone (:func:`fracture.intake.read_xray`
  and the model's resize, JPEGs at the scale the profile's ``decode`` says), image after image;
- ``forward``: the network alone on the already resized pixels, in the pyfunc's batches.

Both ways of decoding JPEGs are measured in the same run: ``full`` and ``draft`` (reduced-scale
decoding, the profile's ``decode``), each as its own saved pyfunc. The target: the pyfunc
reaches 0.9 of the slower of ``decode`` and ``forward``. The sides alternate and the medians
are compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import torch
from PIL import Image

from bench.args import fracatlas_folder
from bench.common import pick, pick_large, save_cpu_model
from fracture.config import load_params
from fracture.inference import probabilities
from fracture.intake import read_xray
from fracture.serving import BATCH_SIZE
from fracture.vocabulary import Decode, choices


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=fracatlas_folder, required=True, help="a FracAtlas-layout folder")
    parser.add_argument("--per-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    params = load_params()
    profile = params.profiles["cpu"]
    small, large = pick(args.data, (373, 454), args.per_size), pick_large(args.data, args.per_size)
    paths = small + large
    files = [p.read_bytes() for p in paths]
    n = len(files)

    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for decode in choices(Decode):
            models[decode] = mlflow.pyfunc.load_model(
                str(save_cpu_model(params, Path(tmp) / decode, decode, members=profile.members))
            )
    frame = pd.DataFrame({"image": files})
    with Image.open(large[0]) as img:
        big = f"{img.width} x {img.height}"
    print(f"{n} X-rays ({args.per_size} at 373 x 454, {args.per_size} at {big}), {profile.model} at "
          f"{profile.image_size} px, {profile.members} member(s), tta {profile.tta}, batches of {BATCH_SIZE}, {torch.get_num_threads()} threads; "
          f"JPEGs decoded in full and at draft scale (the profile: {profile.decode})")

    def run_pyfunc(decode: str) -> float:
        started = time.perf_counter()
        out = models[decode].predict(frame)
        assert out["error"].eq("").all(), out["error"].tolist()
        return n / (time.perf_counter() - started)

    def run_decode(decode: str) -> tuple[float, torch.Tensor]:
        served = models[decode].unwrap_python_model()
        draft = served.classifier.config.data_config.draft_size
        started = time.perf_counter()
        pixels = served.classifier.pixels([read_xray(data, served.policy, draft).image for data in files])
        return n / (time.perf_counter() - started), pixels

    classifier = models[profile.decode].unwrap_python_model().classifier

    def run_forward(pixels: torch.Tensor) -> float:
        started = time.perf_counter()
        for i in range(0, n, BATCH_SIZE):
            probabilities(classifier.network, pixels[i : i + BATCH_SIZE], classifier.preprocessor,
                          classifier.device, BATCH_SIZE, classifier.config.tta)
        return n / (time.perf_counter() - started)

    for decode in models:
        run_pyfunc(decode)  # warm-up: first-call allocations and kernel selection
    rates: dict[str, list[float]] = {"forward": []}
    for _ in range(args.repeats):
        for decode in models:
            rates.setdefault(f"pyfunc {decode}", []).append(run_pyfunc(decode))
            rate, pixels = run_decode(decode)
            rates.setdefault(f"decode {decode}", []).append(rate)
        rates["forward"].append(run_forward(pixels))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    for side, rate in medians.items():
        print(f"{side:>13} {rate:7.1f} images/s  (runs: {', '.join(f'{r:.1f}' for r in rates[side])})")
    for decode in models:
        slower = min(medians[f"decode {decode}"], medians["forward"])
        print(f"decode {decode}: pyfunc / slower of decode and forward: {medians[f'pyfunc {decode}'] / slower:.2f} "
              "(target 0.9)")


if __name__ == "__main__":
    main()
