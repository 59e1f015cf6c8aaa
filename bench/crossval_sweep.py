"""Cross-validates several training recipes in one process: a fast screen on a GPU machine.

    python bench/crossval_sweep.py --project . --images data/fracatlas --out sweep \
        --variant base \
        --variant "e8 profiles.cpu.epochs=8" \
        --variant "e8-light profiles.cpu.epochs=8 profiles.cpu.augment=light"

Each variant is ``params.yaml`` with dotted ``key=value`` overrides (the keys of
``dvc exp run -S``; values are read as YAML). For each one it runs exactly what the crossval
stage runs (``fracture crossval``): the same pooled train + val images from
``outputs/split`` (never test), the same folds (:func:`fracture.crossval.draw_folds`),
:func:`fracture.crossval.fit_fold` per fold and :func:`fracture.crossval.summarise`. Caches are
prepared once per input size and aspect with :func:`fracture.prepare.prepare_images`.

Nothing is tracked: no MLflow run, no DVC experiment. It is a screen, for a machine that
holds the split tables and the images but not the project's tools. Record a recipe it picks
with ``dvc exp run crossval/dvc.yaml -S ...`` before it goes into params.yaml.

Writes ``<out>/results.json`` (per variant: overrides, the summary as in
``outputs/crossval/metrics.json``, each fold's record and timings) after every variant, and
``<out>/oof.csv`` (variant, image id, fold, label, probability) at the end, so a run stopped
by ``--deadline`` keeps what finished.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fracture.config import Params, parse_params, read_params_yaml
from fracture.crossval import draw_folds, fit_fold, oof_groups, pool_splits, summarise
from fracture.data_config import DataConfig
from fracture.imaging import Preprocessor
from fracture.prepare import PreparedImages, open_prepared, prepare_images
from fracture.stages.prepare import active_cache
from fracture.workspace import Workspace

log = logging.getLogger("crossval_sweep")


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"name key=value key=value"`` (a bare ``name``: params.yaml as it is) -> name, overrides."""
    name, *items = text.split()
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {name!r}: {item!r} is not key=value")
        overrides[key] = read_params_yaml(value)  # as params.yaml is read: 1e-05 is a number
    return name, overrides


def apply(raw: dict[str, Any], overrides: dict[str, Any]) -> Params:
    """params.yaml's mapping with the dotted overrides set (parse_params refuses unknown keys)."""
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise SystemExit(f"override {key}: params.yaml has no section {part!r}")
            node = node[part]
        node[leaf] = value
    return parse_params(raw)


def prepared(
    params: Params, pooled: pd.DataFrame, images: Path, work: Path, workers: int
) -> tuple[PreparedImages, DataConfig, float]:
    """The variant's cache under ``work`` (prepared unless a cache of the same key is there) and the seconds it took."""
    config, key = active_cache(params)
    cache_dir = work / ("cache-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12])
    prepare_seconds = 0.0
    if not (cache_dir / "meta.json").is_file():
        started = time.perf_counter()
        prepare_images(pooled, images, Preprocessor(config), key["allow_truncated"], cache_dir, workers)
        prepare_seconds = time.perf_counter() - started
    return open_prepared(cache_dir, key), config, prepare_seconds


def run_variant(
    name: str, params: Params, pooled: pd.DataFrame, images: Path, work: Path, workers: int
) -> tuple[dict[str, Any], pd.DataFrame]:
    cache, config, prepare_seconds = prepared(params, pooled, images, work, workers)
    fold_of = draw_folds(pooled, params.crossval.folds, params.crossval.seed)
    records, oofs, timings = [], [], []
    for number in range(1, params.crossval.folds + 1):
        started = time.perf_counter()
        record, oof, fit = fit_fold(cache, config, params.profile, params.train, pooled, fold_of, number)
        seconds = time.perf_counter() - started
        records.append(record)
        oofs.append(oof)
        timings.append(
            {
                "fold": number,
                "seconds": round(seconds, 1),
                "train_images_per_s": round(float(np.mean([h["train_images_per_s"] for h in fit.history])), 1),
                "device": fit.device,
            }
        )
        log.info("%s fold %d: ROC AUC %.4f in %.0f s", name, number, record.roc_auc, seconds)
    oof = pd.concat(oofs)
    summary = summarise(records, oof, params.evaluate, groups=oof_groups(pooled, oof))  # as the crossval stage
    result = {
        "variant": name,
        "summary": summary,
        "folds": [asdict(r) for r in records],
        "timings": timings,
        "prepare_seconds": round(prepare_seconds, 1),
        "profile": asdict(params.profile),
        "train": asdict(params.train),
    }
    return result, oof.assign(variant=name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path("."), help="holds params.yaml and outputs/split")
    parser.add_argument("--images", type=Path, required=True, help="the dataset root the split's paths are under")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="where caches go (default: <out>/work)")
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--set", action="append", default=[], help="key=value set in every variant (repeat)")
    parser.add_argument("--workers", type=int, default=8, help="decoding threads")
    parser.add_argument("--deadline", type=float, default=None, help="seconds; no variant starts after it")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="prepare each variant's cache under --work and stop: sweeps run side by side then share the caches",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    raw = read_params_yaml((args.project / "params.yaml").read_text())
    common = parse_variant(" ".join(["common", *args.set]))[1]
    workspace = Workspace(args.project)
    pooled = pool_splits(workspace.read_split_table("train"), workspace.read_split_table("val"))
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    results, oofs = [], []
    variants = [parse_variant(v) for v in args.variant]
    if args.prepare_only:
        for name, overrides in variants:
            _, config, seconds = prepared(apply(raw, common | overrides), pooled, args.images, work, args.workers)
            print(f"{name:<16} cache at {config.input_size[-1]} px ready ({seconds:.0f} s to prepare)", flush=True)
        return
    for name, overrides in variants:
        if args.deadline is not None and time.perf_counter() - started > args.deadline:
            log.warning("deadline reached: %s and later variants not run", name)
            break
        params = apply(raw, common | overrides)
        t0 = time.perf_counter()
        result, oof = run_variant(name, params, pooled, args.images, work, args.workers)
        result["overrides"] = common | overrides
        result["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(result)
        oofs.append(oof)
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        pd.concat(oofs).to_csv(args.out / "oof.csv", index=False)
        s = result["summary"]
        print(
            f"{name:<16} mean {s['mean_roc_auc']:.4f} ± {s['std_roc_auc']:.4f}  oof {s['oof_roc_auc']:.4f} "
            f"({s['oof_roc_auc_ci_low']:.3f}-{s['oof_roc_auc_ci_high']:.3f})  spec@sens {s['oof_specificity']:.3f}  "
            f"{result['seconds']:.0f} s",
            flush=True,
        )
    print(f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
