"""Loading one epoch from the prepared cache vs decoding the original JPEGs, side by side.

    .venv/bin/python -m bench.cache_vs_decode --data ../shared/fracatlas [--size 224] [--limit 0]

Both paths produce the same uint8 tensors at the input size (the script checks they are
equal): ``decode`` is JPEG decoding plus resizing with the stage's thread count, what
training did before the cache existed; ``cache`` is one training epoch as the train stage
reads it: the cache's reader over the memory-mapped ``images.npy``, shuffled batches through a
``DataLoader``, each batch one gather. Both read from the operating system's file cache after
the first pass, so the ratio is of the work, not of the disk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from bench.args import fracatlas_folder
from fracture.config import load_params
from fracture.imaging import Preprocessor
from fracture.model import profile_data_config
from fracture.prepare import cache_key, open_prepared, prepare_images


def image_frame(root: Path, limit: int) -> pd.DataFrame:
    rows = [
        {"image_id": p.name, "path": p.relative_to(root).as_posix(), "label": int(folder == "Fractured")}
        for folder in ("Fractured", "Non_fractured")
        for p in sorted((root / "images" / folder).glob("*.jpg"))
    ]
    frame = pd.DataFrame(rows).sort_values("image_id").reset_index(drop=True)
    return frame.head(limit) if limit else frame


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=fracatlas_folder, required=True, help="a FracAtlas-layout folder")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the cpu profile's)")
    parser.add_argument("--limit", type=int, default=0, help="first N images by id (0: all)")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: prepare.workers)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    params = load_params()
    profile = params.profiles["cpu"]
    if args.size:
        profile = type(profile)(**{**profile.__dict__, "image_size": args.size})
    workers = args.workers or params.prepare.workers
    config = profile_data_config(profile, params.prepare.aspect)
    pre = Preprocessor(config)
    frame = image_frame(args.data, args.limit)
    paths = [args.data / p for p in frame["path"]]
    print(f"{len(frame)} images at {profile.image_size} px, {workers} threads, batch {args.batch}")

    # Warm the file cache for the JPEGs, as the cache file is warm right after it is written.
    for p in paths:
        p.read_bytes()
    t0 = time.perf_counter()
    decoded = pre.load(paths, allow_truncated=True, workers=workers)
    decode_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        key = cache_key(config, allow_truncated=True)
        prepare_images(frame, args.data, pre, True, Path(tmp), workers)
        t0 = time.perf_counter()
        reader = open_prepared(Path(tmp), key).reader(frame)
        batches = BatchSampler(RandomSampler(reader), args.batch, drop_last=False)
        seen = sum(len(x) for x, _ in DataLoader(reader, sampler=batches, batch_size=None))
        cache_s = time.perf_counter() - t0
        assert seen == len(frame) and torch.equal(reader[list(range(len(frame)))][0], decoded), "cache and decode differ"

    n = len(frame)
    print(f"{'path':>8} {'seconds':>8} {'images/s':>9}")
    print(f"{'decode':>8} {decode_s:8.2f} {n / decode_s:9.1f}")
    print(f"{'cache':>8} {cache_s:8.2f} {n / cache_s:9.1f}")
    print(f"cache / decode throughput ratio: {decode_s / cache_s:.1f}x")


if __name__ == "__main__":
    main()
