"""``fracture`` command line: one command per pipeline stage, run by ``dvc.yaml``.

Each command reads ``params.yaml`` once, calls the core functions and writes the stage's
outputs under ``outputs/<stage>/``. Commands run from the project root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
import yaml
from safetensors.torch import save_file

from fracture.config import ConfigError, Params, artifact_location, load_params, tracking_uri
from fracture.imaging import CLASSES, ImageLoadError
from fracture.ingest import IngestError
from fracture.model import PretrainedWeightsError
from fracture.prepare import StaleCacheError
from fracture.split import SplitError

log = logging.getLogger("fracture")

OUT = Path("outputs")
MANIFEST = OUT / "validate" / "manifest.csv"
REPORT = OUT / "validate" / "report.json"
GX_DIR = OUT / "validate" / "gx"
SPLIT_DIR = OUT / "split"
PREP_DIR = OUT / "prepare"
TRAIN_DIR = OUT / "train"
#: The per-epoch checkpoint of a train stage in progress; removed once its model is written.
CHECKPOINT_DIR = TRAIN_DIR / "checkpoint"
EVAL_DIR = OUT / "evaluate"


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)")
    return json.loads(path.read_text())


def _read_frame(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)")
    return pd.read_csv(path, dtype={"image_id": str, "path": str, "sha256": str})


def data_version(root: Path = Path(".")) -> str | None:
    """The md5 that ``data.dvc`` records for the dataset directory, if the file exists."""
    path = root / "data.dvc"
    if not path.is_file():
        return None
    outs = yaml.safe_load(path.read_text()).get("outs") or [{}]
    return outs[0].get("md5")


def git_commit(root: Path = Path(".")) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def setup_mlflow(params: Params, root: Path = Path(".")) -> None:
    """Points MLflow at the tracking URI and makes sure the experiment exists.

    Args:
        params: names the experiment.
        root: the project directory, where the default sqlite store and artifacts live.
    """
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(params.register.experiment) is None:
        location = artifact_location(root) if uri.startswith("sqlite:") else None
        mlflow.create_experiment(params.register.experiment, artifact_location=location)
    mlflow.set_experiment(params.register.experiment)


def serving_config(root: Path = Path(".")) -> dict[str, Any]:
    """The trained model's config with the decision threshold the evaluate stage chose."""
    config = _read_json(root / TRAIN_DIR / "model.json")
    config["threshold"] = _read_json(root / EVAL_DIR / "metrics.json")["threshold"]
    return config


# --- commands ---------------------------------------------------------------------------------


def cmd_ingest(params: Params, args: argparse.Namespace) -> None:
    # Imported here, not at the top, to keep other commands' start fast.
    from fracture.ingest import EX_TEMPFAIL, SOURCE_ENV, DownloadError, ingest  # noqa: PLC0415

    source = args.source or os.environ.get(SOURCE_ENV) or None
    try:
        result = ingest(params.ingest, Path(params.ingest.dest), source)
    except DownloadError as exc:
        # A distinct exit status, so schedulers retry this and only this (see tasks/pipeline.py).
        print(f"fracture ingest: {exc}", file=sys.stderr)
        raise SystemExit(EX_TEMPFAIL) from exc
    print(
        f"ingested {result.files} files ({result.bytes / 1e6:.1f} MB) from {result.source} into "
        f"{result.dest}; {result.checksums_verified} verified against SHA256SUMS"
    )


def _data_dirs(params: Params) -> tuple[str, str]:
    """``ingest.dest`` as (the folder data.dvc tracks, the dataset folder inside it)."""
    parts = Path(params.ingest.dest).parts
    return parts[0], "/".join(parts[1:])


def cmd_validate(params: Params, args: argparse.Namespace) -> None:
    from fracture.manifest import build_manifest
    from fracture.validation import failure_message, rule_severities, validate
    from fracture.versions import compare_with_previous

    rule_severities(params.validate)  # a params mistake fails before the manifest is built
    manifest = build_manifest(Path(params.ingest.dest))
    resolved, report = validate(manifest, params.validate, GX_DIR)
    version = data_version()
    comparison = (
        compare_with_previous(manifest, Path("."), *_data_dirs(params), current_md5=version)
        if params.validate.compare_previous
        else {"status": "disabled", "message": "validate.compare_previous is false"}
    )
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    resolved.to_csv(MANIFEST, index=False)
    _write_json(REPORT, dataclasses.asdict(report) | {"data_version": version, "comparison": comparison})
    for f in report.findings:
        if not f.success:
            print(f"[{f.severity}] {f.rule}: {f.unexpected_count} images, e.g. {f.unexpected_ids[:5]}")
    print(f"{len(report.duplicate_groups)} groups of byte-identical files; {len(report.excluded)} images excluded")
    print(f"dataset version {version}: {comparison['status']}; {comparison.get('message', '')}")
    print(f"Great Expectations Data Docs: {report.gx_outputs['data_docs']}")
    if not report.success:
        raise SystemExit(failure_message(report) + f"\nfull report: {REPORT}")


def cmd_split(params: Params, args: argparse.Namespace) -> None:
    from fracture.split import published_dir_of, split_manifest

    manifest = _read_frame(MANIFEST)
    published = published_dir_of(Path(params.ingest.dest)) if params.split.strategy == "published" else None
    splits = split_manifest(manifest, params.split, published)
    SPLIT_DIR.mkdir(parents=True, exist_ok=True)
    for name, frame in splits.items():
        frame.to_csv(SPLIT_DIR / f"{name}.csv", index=False)
        print(f"{name}: {len(frame)} images, {int(frame['label'].sum())} fractured")
    for line in splits.report.summary():
        print(line)
    _write_json(SPLIT_DIR / "report.json", splits.report.to_dict())


def _cache_config(params: Params) -> tuple[dict[str, Any], dict[str, Any]]:
    """The active profile's data config and the prepared-cache key it needs."""
    from fracture.model import profile_data_config
    from fracture.prepare import cache_key

    config = profile_data_config(params.profile, params.prepare.aspect, params.prepare.enhance)
    return config, cache_key(config, params.validate.on_truncated == "keep")


def _prepared(params: Params) -> tuple[dict[str, Any], Any]:
    """The active profile's data config and the prepared cache built for it."""
    from fracture.prepare import open_prepared

    config, key = _cache_config(params)
    return config, open_prepared(PREP_DIR, key)


def cmd_prepare(params: Params, args: argparse.Namespace) -> None:
    from fracture.imaging import Preprocessor
    from fracture.prepare import prepare_images

    manifest = _read_frame(MANIFEST)
    used = manifest[manifest["included"]]
    config, key = _cache_config(params)
    meta = prepare_images(used, Path(params.ingest.dest), Preprocessor(config).resize, key, PREP_DIR, params.prepare.workers)
    _write_json(PREP_DIR / "timing.json", {k: meta[k] for k in ("decode_seconds", "images_per_s")})
    print(f"prepared {meta['images']} images at {key['input_size'][1:]} ({key['aspect']}) in {meta['decode_seconds']:.1f}s (enhance: {key['enhance']})")


def log_dataset_inputs(params: Params, frames: dict[str, pd.DataFrame]) -> None:
    """Records the dataset version and the split tables as MLflow dataset inputs of the run.

    The whole dataset is one input named ``fracatlas`` whose digest is DVC's md5 of ``data``
    (the version in ``data.dvc``); each split is an input with its own content digest.
    """
    version = data_version() or "unversioned"
    source = Path(params.ingest.dest).resolve().as_uri()
    columns = ["image_id", "path", "label", "sha256"]
    everything = pd.concat(frames.values())[columns]
    with warnings.catch_warnings():
        # MLflow's schema inference warns that integer columns cannot hold missing values;
        # these tables describe the data, they are no model signature.
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        mlflow.log_input(
            # DVC's directory md5 ("<32 hex>.dir") fits MLflow's 36-character digest column.
            mlflow.data.from_pandas(everything, source=source, targets="label", name="fracatlas", digest=version),
            context="dataset",
            tags={"data_version": version},
        )
        for split, frame in frames.items():
            mlflow.log_input(
                mlflow.data.from_pandas(frame[columns], source=source, targets="label", name=f"fracatlas-{split}"),
                context=split,
                tags={"data_version": version},
            )


def cmd_train(params: Params, args: argparse.Namespace) -> None:
    from fracture import checkpoint
    from fracture.training import train

    profile = params.profile
    train_frame = _read_frame(SPLIT_DIR / "train.csv")
    val_frame = _read_frame(SPLIT_DIR / "val.csv")
    test_frame = _read_frame(SPLIT_DIR / "test.csv")
    config, cache = _prepared(params)
    train_data, val_data = cache.dataset(train_frame), cache.dataset(val_frame)
    # Everything that makes the run what it is: a checkpoint of any other run is not resumed.
    key = checkpoint.fingerprint(
        {
            "profile": dataclasses.asdict(profile),
            "train": dataclasses.asdict(params.train),
            "data_config": config,
            "cache": cache.meta,
            "train_images": train_frame[["image_id", "label"]].values.tolist(),
            "val_images": val_frame[["image_id", "label"]].values.tolist(),
        }
    )
    resumable = checkpoint.load(CHECKPOINT_DIR, key)
    setup_mlflow(params)
    tags = {"profile": params.train.profile, "data_version": data_version() or "", "git_commit": git_commit() or ""}
    if resumable is not None and resumable.run_id:
        print(f"resuming after epoch {resumable.epoch} of {profile.epochs} (MLflow run {resumable.run_id})")
        run_context = mlflow.start_run(run_id=resumable.run_id, log_system_metrics=True)
    else:
        run_context = mlflow.start_run(tags=tags, log_system_metrics=True)
    with run_context as run:
        if resumable is None:
            log_dataset_inputs(params, {"train": train_frame, "val": val_frame, "test": test_frame})
            mlflow.log_params(
                {"profile": params.train.profile, **{f"profile.{k}": v for k, v in dataclasses.asdict(profile).items()}}
                | {f"train.{k}": v for k, v in dataclasses.asdict(params.train).items()}
                | {f"split.{k}": v for k, v in dataclasses.asdict(params.split).items()}
                | {f"prepare.{k}": v for k, v in dataclasses.asdict(params.prepare).items()}
                | {"n_train": len(train_frame), "n_val": len(val_frame)}
            )
        result = train(
            train_data,
            val_data,
            config,
            profile,
            params.train,
            on_epoch=lambda epoch, metrics: mlflow.log_metrics(metrics, step=epoch + 1),
            checkpoint_dir=CHECKPOINT_DIR,
            checkpoint_key=key,
            run_id=run.info.run_id,
        )
        mlflow.log_metrics({"best_epoch": result.best_epoch, "best_val_roc_auc": result.best_val_roc_auc})
        mlflow.set_tags({"device": result.device, "resumed_from_epoch": result.resumed_from})
        TRAIN_DIR.mkdir(parents=True, exist_ok=True)
        save_file(result.model.state_dict(), str(TRAIN_DIR / "model.safetensors"))
        _write_json(
            TRAIN_DIR / "model.json",
            {
                "architecture": profile.model,
                "profile": params.train.profile,
                "classes": list(CLASSES),
                "data_config": result.data_config,
                "best_epoch": result.best_epoch,
                "best_val_roc_auc": result.best_val_roc_auc,
            },
        )
        _write_json(TRAIN_DIR / "history.json", result.history)
        _write_json(TRAIN_DIR / "run.json", {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})
    checkpoint.clear(CHECKPOINT_DIR)
    resumed = f", resumed after epoch {result.resumed_from}" if result.resumed_from else ""
    print(
        f"best epoch {result.best_epoch}: val ROC AUC {result.best_val_roc_auc:.4f} "
        f"(MLflow run {run.info.run_id}{resumed})"
    )


def cmd_evaluate(params: Params, args: argparse.Namespace) -> None:
    from fracture.evaluation import bootstrap_intervals, by_group, calibration, choose_threshold, evaluate_probabilities
    from fracture.imaging import Preprocessor
    from fracture.model_card import render_model_card
    from fracture.plots import save_evaluation_plots
    from fracture.prepare import cache_key, open_prepared
    from fracture.serving import load_classifier
    from fracture.split import body_part
    from fracture.training import predict_proba

    config = _read_json(TRAIN_DIR / "model.json")
    run_id = _read_json(TRAIN_DIR / "run.json")["run_id"]
    model = load_classifier(str(TRAIN_DIR / "model.safetensors"), config)
    pre = Preprocessor(config["data_config"])
    # The cache must hold exactly the pixels the trained model's own transform produces.
    cache = open_prepared(PREP_DIR, cache_key(config["data_config"], params.validate.on_truncated == "keep"))

    def score(split: str) -> tuple[pd.DataFrame, Any, Any]:
        frame = _read_frame(SPLIT_DIR / f"{split}.csv")
        data = cache.dataset(frame)
        probs = predict_proba(model, data, pre, torch.device("cpu"), params.evaluate.batch_size)
        return frame, data.tensors[1].numpy(), probs

    threshold = params.evaluate.threshold
    if params.evaluate.target_sensitivity is not None:
        _, val_labels, val_probs = score("val")
        threshold = choose_threshold(val_labels, val_probs, params.evaluate.target_sensitivity)
    test_frame, labels, probs = score("test")
    ev = params.evaluate
    result = evaluate_probabilities(labels, probs, threshold)
    intervals = bootstrap_intervals(labels, probs, threshold, ev.bootstrap_resamples, ev.seed)
    calib = calibration(labels, probs, ev.calibration_bins)
    parts = body_part(test_frame).to_numpy()
    metrics = (
        result.metrics
        | {f"{name}_ci_low": low for name, (low, _) in intervals.items()}
        | {f"{name}_ci_high": high for name, (_, high) in intervals.items()}
        | {"ece": calib.ece, "brier": calib.brier}
    )
    EVAL_DIR.mkdir(parents=True, exist_ok=True)
    _write_json(EVAL_DIR / "metrics.json", metrics | {"confusion": result.confusion})
    per_part = by_group(labels, probs, parts, threshold)
    _write_json(EVAL_DIR / "body_parts.json", per_part)
    result.roc.to_csv(EVAL_DIR / "roc.csv", index=False)
    result.pr.to_csv(EVAL_DIR / "pr.csv", index=False)
    calib.curve.to_csv(EVAL_DIR / "calibration.csv", index=False)
    test_frame.assign(
        body_part=parts,
        fracture_probability=probs,
        predicted=(probs >= threshold).astype(int),
    )[["image_id", "body_part", "label", "predicted", "fracture_probability"]].to_csv(
        EVAL_DIR / "predictions.csv", index=False
    )
    pngs = save_evaluation_plots(labels, probs, threshold, ev.calibration_bins, EVAL_DIR / "plots")
    threshold_source = (
        f"fixed at evaluate.threshold {ev.threshold}"
        if ev.target_sensitivity is None
        else f"the highest reaching sensitivity {ev.target_sensitivity} on the validation split"
    )
    profile = params.profiles[config["profile"]]
    recipe = {
        "weights": f"ImageNet ({profile.weights})",
        "loss": "cross-entropy",
        "optimiser": f"Adam, lr {profile.learning_rate(params.train)}, weight decay {params.train.weight_decay}",
        "scheduler": f"CosineAnnealingWarmRestarts, T_0 {params.train.t_0 or profile.epochs}, T_mult {params.train.t_mult}",
        "batch size": params.train.batch_size,
        "class balance": params.train.class_balance,
        "epochs": profile.epochs,
        "augmentation": profile.augment,
        "frozen layers": ", ".join(profile.frozen) or "none",
        "seed": params.train.seed,
    }
    splits = {name: len(_read_frame(SPLIT_DIR / f"{name}.csv")) for name in ("train", "val", "test")}
    setup_mlflow(params)
    # The card names the code and data the model was trained from, as the training run recorded them.
    trained = mlflow.get_run(run_id).data.tags
    card = render_model_card(
        config,
        recipe,
        {"version": trained.get("data_version"), "git_commit": trained.get("git_commit"), "splits": splits},
        metrics,
        per_part,
        threshold_source,
        run_id,
    )
    (EVAL_DIR / "model_card.md").write_text(card)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
        mlflow.log_metrics({f"test_{k}": v for k, v in result.confusion.items()})
        mlflow.set_tag("threshold_source", threshold_source)
        for path in (EVAL_DIR / "metrics.json", EVAL_DIR / "body_parts.json", EVAL_DIR / "model_card.md"):
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        for path in pngs:
            mlflow.log_artifact(str(path), artifact_path="evaluation/plots")
    print(json.dumps(metrics | {"confusion": result.confusion}, indent=2))


def cmd_register(params: Params, args: argparse.Namespace) -> None:
    from fracture.registry import EvaluatedSplit, RegistryError, register

    run_id = _read_json(TRAIN_DIR / "run.json")["run_id"]
    setup_mlflow(params)
    try:
        reg = register(
            params.register,
            run_id,
            TRAIN_DIR / "model.safetensors",
            serving_config(),
            EvaluatedSplit.from_csv(
                SPLIT_DIR / "test.csv", Path(params.ingest.dest), params.validate.on_truncated == "keep"
            ),
        )
    except RegistryError as exc:
        sys.exit(f"fracture register: {exc}")
    print(reg.summary())


def cmd_rollback(params: Params, args: argparse.Namespace) -> None:
    from fracture.registry import RegistryError, rollback

    setup_mlflow(params)
    try:
        done = rollback(params.register.model_name)
    except RegistryError as exc:
        sys.exit(f"fracture rollback: {exc}")
    print(
        f"{done.name}: champion rolled back from version {done.demoted} to version {done.champion}; "
        f"previous-champion: {'version ' + done.previous_champion if done.previous_champion else 'none'}; "
        f"version {done.demoted} holds no alias now and is tagged rolled_back_at"
    )


COMMANDS = {
    "ingest": (cmd_ingest, "bring FracAtlas into the project (from --source, $FRACATLAS_SOURCE or figshare)"),
    "validate": (cmd_validate, "build the manifest and run the data-quality suite"),
    "split": (cmd_split, "stratified, duplicate-aware train/val/test split"),
    "prepare": (cmd_prepare, "decode and resize each image once into the prepared cache"),
    "train": (cmd_train, "fine-tune the profile's model, logging to MLflow"),
    "evaluate": (cmd_evaluate, "score the model on the test split"),
    "register": (cmd_register, "register the model; champion only if it passes the promotion gate"),
    "rollback": (cmd_rollback, "move the champion alias back to the previous-champion version"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fracture", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == "ingest":
            p.add_argument("--source", help="FracAtlas folder or zip (default: $FRACATLAS_SOURCE, else figshare)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    try:
        params = load_params()
        COMMANDS[args.command][0](params, args)
    except (
        ConfigError, FileNotFoundError, ImageLoadError, IngestError, PretrainedWeightsError, SplitError, StaleCacheError
    ) as exc:
        sys.exit(f"fracture {args.command}: {exc}")


if __name__ == "__main__":
    main()
