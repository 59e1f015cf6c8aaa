"""The fracture command: one command per pipeline stage, run by dvc.yaml from the project root.

Each command reads params.yaml once, calls the stage's run_<stage> function
(fracture.stages) and prints what it did; nothing else happens here. ``fracture predict`` is
the consumers' command: it needs only a registry, not a project. ``fracture crossval-compare``
compares cross-validated recipes (``dvc exp`` runs of crossval/dvc.yaml) on the same images.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fracture.allocator import freed_memory_kept, keep_freed_memory
from fracture.config import EvaluateParams, Params, load_params
from fracture.project_lock import project_lock
from fracture.workspace import (
    ASSIGNMENTS_FILE,
    CrossvalResult,
    ValidateResult,
    Workspace,
)

if TYPE_CHECKING:
    from fracture.crossval import OofComparisons

log = logging.getLogger("fracture")

app = typer.Typer(
    name="fracture",
    help="Train, evaluate and register the fracture classifier, one pipeline stage per command. "
    "Run from the project root (where dvc.yaml is); `dvc repro` runs the stages in order.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


#: The errors a stage raises for a problem the user can fix, by the module that defines each.
_KNOWN_ERRORS = {
    "fracture.config": "ConfigError",
    "fracture.crossval": "CrossvalError",
    "fracture.decoding": "ImageLoadError",
    "fracture.detection": "DetectionError",
    "fracture.gate": "SplitTableError",
    "fracture.ingest": "IngestError",
    "fracture.localisation": "BoxesError",
    "fracture.manifest": "ManifestError",
    "fracture.model": "PretrainedWeightsError",
    "fracture.prepare": "StaleCacheError",
    "fracture.project_lock": "ProjectBusy",
    "fracture.registry": "RegistryError",
    "fracture.split": "SplitError",
    "fracture.tracking": "TrainingRunMissing",
    "fracture.validation": "ValidationFailed",
    "fracture.workspace": "SplitTablesMixed",
}


#: Failures to write a stage's outputs: disk full, a file over the size limit, no permission,
#: a read-only file system, a disk quota.
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT})


def known_errors() -> tuple[type[BaseException], ...]:
    """The user-fixable errors a failed command can have raised; anything else keeps its traceback.

    Also what ``python -m flows.retrain`` prints as one line rather than a traceback.

    Only modules the command imported can have raised one, so no other module (Great
    Expectations, MLflow) is loaded just to build this list.
    """
    loaded = [getattr(sys.modules[m], name) for m, name in _KNOWN_ERRORS.items() if m in sys.modules]
    return (FileNotFoundError, *loaded)


def _later_rank() -> bool:
    """Whether torchrun started this process as a rank other than 0 of a data-parallel run; rank 0
    holds the project for them all (the ranks write nothing else: distributed.py)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"


@contextmanager
def _stage(
    command: str, writes: bool = True, outputs: str | None = None, target: str | None = None
) -> Iterator[tuple[Params, Workspace]]:
    """Params and workspace for a command; a known error exits with a one-line message naming it.

    A command that ``writes`` the project holds it (:func:`fracture.project_lock.project_lock`)
    for its run, so it never works under a retrain run or another such command. ``outputs`` is
    the folder under ``outputs/`` it writes and ``target`` the DVC stage that checks them out
    (default: ``command`` for both). While it runs, freed memory serves its next tensors; when it
    ends, the process hands that memory back, unless the retrain flow runs it and hands it back
    after its last stage (fracture/allocator.py).
    """
    with freed_memory_kept():  # tensors reuse freed memory instead of the kernel mapping it again
        try:
            params = load_params()  # before the lock: outside a project this fails without writing anything
            with project_lock(Path("."), f"`fracture {command}`") if writes and not _later_rank() else nullcontext():
                yield params, Workspace(Path("."))
        except known_errors() as exc:
            sys.exit(f"fracture {command}: {exc}")
        except OSError as exc:
            if exc.errno not in _WRITE_ERRORS:
                raise
            # A failed write() names no file; the stage's outputs folder is where it was writing.
            where = exc.filename or f"its outputs in outputs/{outputs or command}/"
            stage = target or command
            lock = (Path(stage.partition(":")[0]).parent / "dvc.lock").as_posix() if ":" in stage else "dvc.lock"
            sys.exit(
                f"fracture {command}: could not write {where}: {exc.strerror}. Free disk space or fix the folder's "
                f"permissions, then run the stage again. Its previous outputs are in DVC's cache: "
                f"`dvc checkout --force {stage}` puts them back, and {lock} still describes them."
            )


@app.callback()
def _setup() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)


@app.command()
def ingest(
    source: Annotated[
        str | None,
        typer.Option(
            help="A FracAtlas folder or zip, or a hospital's export (ingest.layout: csv). "
            "Default: $FRACATLAS_SOURCE, else FracAtlas from figshare."
        ),
    ] = None,
) -> None:
    """Bring the dataset into the project (ingest.dest); `dvc add data` versions it afterwards."""
    from fracture.ingest import EX_TEMPFAIL, DownloadError
    from fracture.stages.ingest import run_ingest

    with _stage("ingest") as (params, workspace):
        try:
            result = run_ingest(params, workspace, source)
        except DownloadError as exc:
            # A distinct exit status, so schedulers retry this and only this (see tasks/pipeline.py).
            print(f"fracture ingest: {exc}", file=sys.stderr)
            raise SystemExit(EX_TEMPFAIL) from exc
    print(
        f"ingested {result.files} files ({result.bytes / 1e6:.1f} MB) from {result.source} into "
        f"{result.dest}; {result.checksums_verified} verified against SHA256SUMS"
    )


def _print_validation(result: ValidateResult, workspace: Workspace) -> None:
    # Why each file named below failed (the manifest's error: "is DICOM but has modality CT", a 16-bit
    # PNG, a corrupt file), so that a failed run says what to fix without opening manifest.csv.
    failing = any(not f["success"] and f["unexpected_ids"] for f in result.findings)
    errors: dict[str, str] = {}
    if failing and workspace.manifest.is_file():
        manifest = workspace.read_manifest()
        if "error" in manifest.columns:
            errors = {i: e for i, e in zip(manifest["image_id"], manifest["error"], strict=True) if isinstance(e, str) and e}
    for f in result.findings:
        if not f["success"]:
            found = (f"{f['unexpected_count']} images, e.g. {f['unexpected_ids'][:5]}" if f["unexpected_ids"]
                     else f"observed {f.get('observed')}")  # a whole-table rule: the fractured share
            print(f"[{f['severity']}] {f['rule']}: {found}")
            for image_id in f["unexpected_ids"][:5]:
                if image_id in errors:
                    print(f"    {image_id}: {errors[image_id]}")
    skipped = [f["rule"] for f in result.findings if f.get("skipped")]
    if skipped:
        print(f"skipped for this dataset's layout (ingest.layout), see the report: {', '.join(skipped)}")
    near = result.counts.get("near_duplicates", {})
    print(
        f"{len(result.duplicate_groups)} groups of byte-identical files; {near.get('groups', 0)} groups of "
        f"near-duplicate X-rays ({near.get('images_in_groups', 0)} images, {near.get('label_conflict_groups', 0)} "
        f"with labels that disagree); {len(result.excluded)} images excluded"
    )
    if near.get("not_compared"):
        unseen = near["not_compared"]
        print(
            f"{len(unseen)} included truncated images decode too little to be compared for near-duplicates, so a copy "
            f"of one in another split would go unnoticed: {', '.join(unseen[:10])}"
            + (f" and {len(unseen) - 10} more" if len(unseen) > 10 else "")
            + " (validate.on_truncated: exclude leaves them out)"
        )
    comparison = result.comparison
    print(f"dataset version {result.data_version}: {comparison['status']}; {comparison.get('message', '')}")
    print(f"Great Expectations Data Docs: {result.gx_outputs.get('data_docs', workspace.gx_dir)}")


@app.command()
def validate() -> None:
    """Build the manifest and run the data-quality suite (validate in params)."""
    from fracture.stages.validate import run_validate
    from fracture.validation import ValidationFailed

    with _stage("validate") as (params, workspace):
        try:
            result = run_validate(params, workspace)
        except ValidationFailed:
            _print_validation(workspace.read_validate(), workspace)
            raise
    _print_validation(result, workspace)


@app.command()
def split() -> None:
    """Split the included images into train, val and test, keeping duplicates together."""
    from fracture.stages.split import run_split

    with _stage("split") as (params, workspace):
        result, splits = run_split(params, workspace)
    for name, size in result.sizes.items():
        print(f"{name}: {size} images, {result.fractured[name]} fractured")
    for line in splits.report.summary():
        print(line)
    if splits.recorded is not None and any(splits.recorded[:2]):
        added, moved, total = splits.recorded
        print(
            f"recorded in {ASSIGNMENTS_FILE}: {added} images added" + (f", {moved} moved nearer test" if moved else "")
            + f" ({total} in all); they keep their split when the data grows: commit it with dvc.lock"
        )


@app.command()
def prepare() -> None:
    """Decode and resize each included image once into the prepared cache."""
    from fracture.stages.prepare import run_prepare

    with _stage("prepare") as (params, workspace):
        result = run_prepare(params, workspace)
    print(
        f"prepared {result.images} images at {result.input_size[1:]} ({result.aspect}) at "
        f"{result.images_per_s:.1f} images/s (enhance: {result.enhance})"
    )


@app.command()
def train() -> None:
    """Fine-tune the active profile's model (train.profile), logging to MLflow."""
    from fracture.stages.train import run_train

    with _stage("train") as (params, workspace):
        run_train(params, workspace)


@app.command()
def evaluate() -> None:
    """Choose the threshold on val, then score the model once on the test split."""
    from fracture.stages.evaluate import run_evaluate

    with _stage("evaluate") as (params, workspace):
        run_evaluate(params, workspace)


def _print_crossval(result: CrossvalResult) -> None:
    for f in result.folds:
        print(
            f"fold {f.fold}: trained on {f.n_train}, held out {f.n_val} ({f.n_fractured_val} fractured): "
            f"ROC AUC {f.roc_auc:.4f} after the last epoch (best {f.best_roc_auc:.4f} at epoch {f.best_epoch})"
        )
    s = result.summary
    print(
        f"{s['n_folds']} folds: ROC AUC {s['mean_roc_auc']:.4f} +/- {s['std_roc_auc']:.4f} (mean +/- sd of the "
        f"last epochs; best epochs {s['mean_best_roc_auc']:.4f} +/- {s['std_best_roc_auc']:.4f})"
    )
    print(
        f"out-of-fold, {s['n_images']} images ({s['n_fractured']} fractured): ROC AUC {s['oof_roc_auc']:.4f} "
        f"(95% CI {s['oof_roc_auc_ci_low']:.4f}-{s['oof_roc_auc_ci_high']:.4f}); at threshold "
        f"{s['oof_threshold']:.4g} sensitivity {s['oof_recall']:.3f}, specificity {s['oof_specificity']:.3f}"
    )


@app.command()
def crossval() -> None:
    """Cross-validate the recipe on train + val, never test (crossval/dvc.yaml, outside the main pipeline)."""
    from fracture.stages.crossval import run_crossval

    try:
        with _stage("crossval", target="crossval/dvc.yaml:crossval") as (params, workspace):
            result = run_crossval(params, workspace)
    except KeyboardInterrupt as exc:
        # Ctrl-C, or the SIGTERM the stage raises as one (a scheduler's time limit, `docker stop`): ended
        # 128 + the signal, as a shell reports a command a signal ended and `fracture predict` ends, not
        # Click's 130 for both, which read a scheduler's stop as a person's.
        name = "SIGTERM" if exc.args == ("signal SIGTERM",) else "SIGINT"
        print(f"fracture crossval: interrupted by {name}; its MLflow run is ended KILLED and no figures are "
              "written: run it again to cross-validate", file=sys.stderr)
        raise SystemExit(128 + signal.Signals[name].value) from None
    _print_crossval(result)


def _print_comparison(compared: OofComparisons, ev: EvaluateParams) -> None:
    rows = compared.rows
    paired = rows[1].versus_reference
    assert paired is not None
    rule = (
        f"the threshold reaching sensitivity {ev.target_sensitivity} on each run's own predictions"
        if ev.target_sensitivity is not None else f"threshold {ev.threshold}"
    )
    print(f"out-of-fold, {paired.n_images} images ({paired.n_fractured} fractured); sensitivity and specificity at {rule}")
    width = max(len(r.name) for r in rows)
    print(f"{'recipe':<{width}}  runs  ROC AUC (sd)     sensitivity  specificity  ROC AUC - {rows[0].name} (95% CI)")
    for r in rows:
        d = r.versus_reference
        # Where DeLong's variance gave no interval, why not: "(+0.0000 to +0.0000), p = 1" read as certainty.
        versus = "reference" if d is None else f"{d.difference:+.4f} ({d.evidence()})" if d.no_interval else (
            f"{d.difference:+.4f} ({d.ci_low:+.4f} to {d.ci_high:+.4f}), p = {d.p_value:.3g}"
        )
        sd = f"({r.roc_auc_sd:.4f})" if r.roc_auc_sd is not None else ""
        print(f"{r.name:<{width}}  {r.runs:4d}  {r.roc_auc:.4f} {sd:<8}  {r.recall:11.3f}  {r.specificity:11.3f}  {versus}")
    if compared.ungrouped:
        one = len(compared.ungrouped) == 1
        print(
            f"Each difference counts every image as independent evidence, because the predictions of "
            f"{', '.join(compared.ungrouped)} name no groups of linked images (re-run {'its' if one else 'their'} "
            "crossval to get them); copies, near-duplicates and one patient's X-rays then narrow its interval and "
            "shrink its p-value more than they should."
        )
    else:
        print(
            f"Each difference counts linked images (copies, near-duplicates, one patient's X-rays) as one: its "
            f"variance is over their {paired.n_groups} groups, not the {paired.n_images} images."
        )
    if compared.run_sd is None:
        print(
            "DeLong's test holds each run's predictions fixed: it leaves out how far one recipe moves between "
            "training seeds. Cross-validate a recipe under several seeds (`dvc exp run crossval/dvc.yaml --queue "
            "-n NAME -S train.seed=42,7,1`, then `dvc queue start`) and give its runs joined by commas "
            "(NAME-1,NAME-2,NAME-3) to count that spread too."
        )
    else:
        print(
            f"Each difference counts DeLong's paired variance over the {'images' if compared.ungrouped else 'groups'} "
            f"and the spread between training "
            f"seeds: one run's ROC AUC moves by sd {compared.run_sd:.4f} around its recipe's mean (pooled over the "
            f"recipes given with several runs; {compared.run_sd_df} degrees of freedom, so Student's t); the "
            f"ensemble row, if any, counts it as one run's."
        )


@app.command("crossval-compare")
def crossval_compare(
    recipes: Annotated[
        list[str],
        typer.Argument(
            help="The reference first, then the recipes to compare with it. Each a `dvc exp` name, a git revision "
            "or an out-of-fold CSV file (outputs/crossval/oof.csv), followed by #member_<k> for one network of an "
            "ensemble's run (cv8#member_1); or several, joined by commas, for one recipe run under several "
            "training seeds (cv-a-1,cv-a-2,cv-a-3)."
        ),
    ],
    ensemble: Annotated[
        bool, typer.Option(help="Also score the mean of all runs' probabilities, as averaging their models would.")
    ] = False,
) -> None:
    """Compare cross-validated recipes on the same out-of-fold images: DeLong's paired test against the first."""
    from fracture.crossval import CrossvalError, compare_oof, read_oof

    with _stage("crossval-compare", writes=False) as (params, workspace):
        twice = sorted({recipe for recipe in recipes if recipes.count(recipe) > 1})
        if twice:  # each would be read once, then "comparing needs two runs or more" for the two given
            raise CrossvalError(f"{', '.join(map(repr, twice))} given twice; give each recipe once, the reference first")
        read = {}
        for recipe in recipes:
            # A file whose name holds a comma is one run; otherwise commas join one recipe's runs.
            runs = [recipe] if Path(recipe).is_file() else [run.strip() for run in recipe.split(",")]
            if "" in runs or len(set(runs)) < len(runs):
                raise CrossvalError(f"{recipe!r}: name each of a recipe's runs once, joined by commas")
            read[recipe] = {run: read_oof(run, workspace.root) for run in runs}
        compared = compare_oof(read, params.evaluate, ensemble)
    _print_comparison(compared, params.evaluate)


@app.command()
def register() -> None:
    """Register the model; it becomes champion only if it passes the promotion gate."""
    from fracture.stages.register import run_register

    with _stage("register") as (params, workspace):
        registration = run_register(params, workspace)
    print(registration.summary())


@app.command("detect-train")
def detect_train() -> None:
    """Train the fracture detector on the classifier's backbone (detect/dvc.yaml, outside the main job)."""
    from fracture.stages.detect import run_detect_train

    with _stage("detect-train", outputs="detect", target="detect/dvc.yaml:detect_train") as (params, workspace):
        described = run_detect_train(params, workspace)
    print(
        f"detector ({described['architecture']} on {described['backbone']}, {described['image_size']} px): best val "
        f"mAP@0.5 {described['best_val_map_50']:.4f} at epoch {described['best_epoch']}, trained in "
        f"{described['train_seconds']:.0f} s; MLflow run {described['run_id']}"
    )


@app.command("detect-evaluate")
def detect_evaluate() -> None:
    """Score the detector on the test split once: COCO mAP with intervals, and its top box as a classifier."""
    from fracture.stages.detect import run_detect_evaluate

    with _stage("detect-evaluate", outputs="detect", target="detect/dvc.yaml:detect_evaluate") as (params, workspace):
        m = run_detect_evaluate(params, workspace)
    print(
        f"detector on {int(m['n_images'])} test images ({int(m['n_boxes'])} boxes): mAP@0.5 {m['map_50']:.4f} "
        f"(95% CI {m['map_50_ci_low']:.4f}-{m['map_50_ci_high']:.4f}), mAP@0.5:0.95 {m['map']:.4f}; top box as a "
        f"classifier: ROC AUC {m['image_roc_auc']:.4f}, sensitivity {m['image_sensitivity']:.3f}, specificity "
        f"{m['image_specificity']:.3f}"
    )


@app.command("detect-register")
def detect_register() -> None:
    """Register the detector (detect.model_name); it becomes champion only if it passes its gate on mAP@0.5."""
    from fracture.stages.detect import run_detect_register

    with _stage("detect-register", outputs="detect", target="detect/dvc.yaml:detect_evaluate") as (params, workspace):
        registration = run_detect_register(params, workspace)
    print(registration.summary())


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why, for the registry's record (tagged on both versions).")],
    to: Annotated[
        int | None,
        typer.Option(min=1, help="Make this version champion instead, chosen by hand (it must load); "
                     "the champion it replaces becomes previous-champion."),
    ] = None,
    detector: Annotated[
        bool, typer.Option("--detector", help="Act on the fracture detector (detect.model_name) instead of the "
                                              "classifier (register.model_name).")
    ] = False,
) -> None:
    """Move the champion alias back to the previous-champion version (or to --to VERSION), once it loads.

    Move a champion only this way, never by hand in the MLflow UI: the demoted version (and its
    training run) is tagged rolled_back_*, without which the next scheduled run that registers its
    run again puts it through the gate and makes it champion again.
    """
    from fracture.stages.register import run_rollback

    command = "fracture rollback --detector" if detector else "fracture rollback"
    if not reason.strip():
        raise SystemExit(f"{command}: --reason must say why (it is recorded on both versions)")
    with _stage("rollback") as (params, workspace):
        done = run_rollback(params, workspace, reason.strip(), to, detector=detector)
    previous = f"version {done.previous_champion}" if done.previous_champion else "none"
    if done.finished:
        # champion and previous-champion were both on one version: an earlier command stopped after
        # champion moved. This one moved previous-champion only; champion was already where it is.
        earlier = (f"the rollback from version {done.demoted} to version {done.champion}" if done.demoted is not None
                   else f"the {'hand pick' if done.chosen else 'restoration'} of version {done.champion} made where no "
                        "version held champion")
        tagged = f"; version {done.demoted} stays tagged rolled_back_at" if done.demoted is not None else ""
        print(f"{done.name}: champion and previous-champion were both on version {done.champion}: {earlier} had "
              f"stopped after champion moved. Finished it: champion stays version {done.champion}, previous-champion: "
              f"{previous}{tagged}. The stopped command's reason is the one recorded, not this one's"
              + (f"; `{command}` again rolls back to version {done.previous_champion}" if done.previous_champion else ""))
        return
    if done.demoted is None:  # no version held champion (its version was deleted)
        how = "chosen by hand" if done.chosen else "restored from previous-champion"
        print(f"{done.name}: no version held champion; version {done.champion} is champion now, {how}; "
              f"previous-champion: {previous}")
        return
    if done.chosen:
        print(
            f"{done.name}: champion moved from version {done.demoted} to version {done.champion}, chosen by hand; "
            f"previous-champion: version {done.demoted}, tagged rolled_back_at (`{command}` returns to it)"
        )
        return
    print(
        f"{done.name}: champion rolled back from version {done.demoted} to version {done.champion}; "
        f"previous-champion: {previous}; version {done.demoted} holds no alias now and is tagged rolled_back_at"
    )


PARTLY_SCORED = 3
"""``fracture predict --strict``'s exit status when some file has an error in its row: apart from
1 (nothing scored, or the model's Python ended) and 130/143 (interrupted)."""


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="Image files, folders of them, or DICOM study folders.")],
    model: Annotated[str, typer.Option(help="The registered model: models:/<name>@<alias> or models:/<name>/<version>.")] = (
        "models:/fracture-classifier@champion"
    ),
    out: Annotated[Path | None, typer.Option(help="Where to write the rows: .csv or .json (default: CSV on stdout).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Files read and scored together.")] = 16,
    dicom_sr: Annotated[
        Path | None, typer.Option(help="A folder: write a DICOM Structured Report for each scored DICOM input.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    strict: Annotated[
        bool, typer.Option(help=f"Exit {PARTLY_SCORED} when any file has an error in its row, or with --dicom-sr a "
                                "scored DICOM file has no report (every row still written).")
    ] = False,
    sr_uid_root: Annotated[
        str | None, typer.Option(envvar="FRACTURE_SR_UID_ROOT",
                                 help="Your organisation's registered DICOM UID root (1.3.6.1.4.1.<enterprise number>., "
                                      "ending with a dot): every UID of the --dicom-sr reports is made under it "
                                      "(default: pydicom's and highdicom's roots).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Take over the rows an earlier run into the same --out scored from the same bytes "
                                "with the same model version (every run with --out keeps them as it scores, in "
                                ".<out>.scored.jsonl beside it, so one killed midway loses none); score only the rest.")
    ] = False,
) -> None:
    """Score X-rays (JPEG, PNG, DICOM) with a registered model; one row per file, errors in their rows.

    Reads MLFLOW_TRACKING_URI for the registry. Exits non-zero when no file could be scored, or when the
    model's Python ended midway or the run was interrupted (Ctrl-C, SIGTERM): the rows scored are
    written, and the others say to score them again. With --strict, also when some file could not
    be scored, or a report asked for could not be written (exit 3), for a scheduler that alerts on
    a failed run. A run stopped midway, run again with the same --out and --resume, scores only the
    files it had not scored (or that changed since, or had an error), unless the model version differs.
    """
    from fracture.dicom_sr import check_uid_root
    from fracture.predict import (
        INTERRUPTED,
        NO_REPORT,
        REPORTS_INTERRUPTED,
        RESUMED,
        STOPPED,
        PredictError,
        check_outputs,
        collect,
        interruptible,
        load,
        score_files,
        wants_report,
        write,
        write_structured_reports,
    )
    from fracture.tracking import bound_registry_waits

    keep_freed_memory()
    bound_registry_waits()  # as the page: a registry that is down is said so in a minute, not in four
    try:
        files = collect(inputs)
        if not files:
            raise PredictError(f"no image or DICOM files in {', '.join(map(str, inputs))}")
        check_outputs(out, dicom_sr)
        try:  # before the model loads: a mistyped root costs seconds, not a run
            uid_root = check_uid_root(sr_uid_root) if sr_uid_root else None
        except ValueError as exc:
            raise PredictError(str(exc)) from None
        loaded = load(model)
    except PredictError as exc:
        sys.exit(f"fracture predict: {exc}")
    try:
        # The model's Python ending midway, or a signal, leaves the rows scored so far, the rest saying so (STOPPED).
        with interruptible():
            table = score_files(loaded, files, batch_size, progress, out=out, resume=resume)
    finally:
        loaded.close()
    if dicom_sr is not None:
        table["sr"] = ""
        if out is not None:
            # The rows first, without their reports: a run killed while it writes the reports (a
            # scheduler's SIGKILL after its SIGTERM) leaves the scores; they are written again after.
            with suppress(OSError):  # the write below says what failed
                write(table, out)
        try:
            with interruptible():  # Ctrl-C or SIGTERM: the rows still written, those left without a report saying so
                table["sr"] = write_structured_reports(table, files, dicom_sr, uid_root=uid_root)
        except OSError as exc:  # the report folder gone or unwritable since it was checked: the rows still count
            table["sr"] = ""
            why = f"{NO_REPORT}: {dicom_sr} cannot be written to ({exc.strerror or exc})"
            table["note"] = [
                (f"{note}; {why}" if note else why) if wanted else note
                for note, wanted in zip(table["note"], wants_report(table, files), strict=True)
            ]
    try:
        write(table, out)
    except OSError as exc:  # checked before scoring, yet failed (a full disk): the rows go to stdout instead
        write(table, None)
        sys.exit(f"fracture predict: the rows cannot be written to {out} ({exc.strerror or exc}); they are on stdout above")
    scored = int((table["error"] == "").sum())
    print(
        f"{loaded.name} version {loaded.version}: scored {scored} of {len(table)} files"
        + (f" ({taken} of them taken over from an earlier run, --resume)" if (taken := table.attrs.get(RESUMED, 0)) else "")
        + f"; {len(table) - scored} with an error in their row" + (f"; rows in {out}" if out else ""),
        file=sys.stderr,
    )
    if signal_name := table.attrs.get(INTERRUPTED):
        if table.attrs.get(REPORTS_INTERRUPTED):
            print(f"fracture predict: interrupted by {signal_name} while writing the structured reports, after "
                  f"{scored} of {len(table)} files were scored; every row is written, and those left without a "
                  "report say so in note", file=sys.stderr)
        else:
            print(f"fracture predict: interrupted by {signal_name} after {scored} of {len(table)} files were scored; "
                  "the rows scored are written, and the others say to score them again", file=sys.stderr)
        raise SystemExit(128 + signal.Signals[signal_name].value)  # as a shell reports a command a signal ended
    if stopped := table.attrs.get(STOPPED):
        sys.exit(f"fracture predict: the model's Python ended after {scored} of {len(table)} files were scored "
                 f"({stopped}); the rows scored are written, and the others say to score them again")
    if scored == 0:
        sys.exit("fracture predict: no file could be scored; see the error column")
    unreported = int(table["note"].str.contains(f"{NO_REPORT}: ", regex=False).sum()) if dicom_sr else 0
    if strict and (scored < len(table) or unreported):
        failed = [f"{len(table) - scored} of {len(table)} files could not be scored"] if scored < len(table) else []
        failed += [f"{unreported} of the files scored have no structured report"] if unreported else []
        print(f"fracture predict: {' and '.join(failed)} (--strict); see the error and note columns", file=sys.stderr)
        raise SystemExit(PARTLY_SCORED)


def main(argv: list[str] | None = None) -> None:
    """Runs one command; the ``fracture`` console script runs it through :func:`console`.

    Args:
        argv: the arguments after ``fracture`` (default: the process's).
    """
    try:
        app(args=argv, prog_name="fracture")
    except SystemExit as exc:
        # Click ends every run with SystemExit; only a failure should leave a caller's process.
        if exc.code not in (0, None):
            raise


def skip_exit_collection() -> None:
    """Lets a process that is about to end exit without the interpreter's last garbage collections.

    As it exits, Python runs full garbage collections over every object the process still holds
    while it clears the modules. With torch, MLflow and timm loaded that is most of the exit:
    1.6 s of an 8.7 s ``fracture predict`` of 16 X-rays, 3.0 s of a 17.9 s retrain flow run that
    found nothing to do (``python -m bench.process_exit``; 0.25 s and 0.50 s after this call).
    ``gc.freeze()`` moves those objects out of the collector's reach; the rest of the exit is
    unchanged: atexit handlers (MLflow's, Prefect's, logging's flush) run, modules are cleared
    and files closed. Call it last, and only in a process's own entry point: frozen objects are
    never collected, which would leak in a process that goes on (a flow calling :func:`main`).
    """
    gc.freeze()


def run_the_projects_own_code() -> None:
    """In the copy of the project a queued or ``--temp`` ``dvc exp run`` runs its stages in, runs
    the copy's code rather than the workspace's.

    The venv's ``fracture`` script imports the package ``make venv`` installed, editable, from the
    workspace. DVC runs a queued experiment's stages in a copy of the project made when it was
    queued (under ``.dvc/tmp/exps``), and records that copy's code in the experiment's
    ``dvc.lock``: without this, the stages would run whatever the workspace holds when the queue
    reaches them, code edited since or half-way through an edit. So in a DVC stage (``$DVC_ROOT``
    set) whose folder holds the package, and not the one imported, the command starts again as
    ``python -m fracture.cli`` from that folder, which imports the folder's package first.
    """
    here = Path.cwd()
    if not os.environ.get("DVC_ROOT") or not (here / "fracture" / "__init__.py").is_file():
        return
    if (here / "fracture").resolve() == Path(__file__).resolve().parent or os.environ.get("FRACTURE_CODE_FROM") == str(here):
        return
    env = {**os.environ, "FRACTURE_CODE_FROM": str(here),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))}
    os.execve(sys.executable, [sys.executable, "-m", "fracture.cli", *sys.argv[1:]], env)


def console() -> None:
    """The ``fracture`` console script: :func:`main` on the process's arguments, then a quick exit
    (:func:`skip_exit_collection`)."""
    run_the_projects_own_code()
    try:
        main()
    finally:
        skip_exit_collection()


if __name__ == "__main__":
    console()
