"""A model card per evaluated run: what was trained on what, how well, and where not to trust it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fracture.workspace import TrainedModel

INTENDED_USE = (
    "Research and decision support for a trained reader, who reads every image: NOT FOR CLINICAL USE. "
    "It has not been cleared by any regulator as a medical device."
)

#: The dataset a card names when the run does not say which (FracAtlas's layout, the default).
FRACATLAS = "FracAtlas"

#: What a card says of the split's patients and of the test set, by the dataset trained on.
DATASET_LIMITATIONS = {
    True: (
        "FracAtlas publishes no patient identifier, so on it the split is image-level (a hospital "
        "export's labels.csv can name each image's patient_id, or its DICOM files' Patient ID is "
        "used, and then a patient's images share a split). Byte-identical files and near-duplicate "
        "X-rays (re-encoded copies and repeat exposures, "
        "found by thumbnail correlation) are kept in one split, but without patient ids other "
        "radiographs of the same patient can still sit in training and test, which can make the test "
        "figures optimistic.",
        "Test set: one public dataset (FracAtlas) from one region's hospitals; performance on other "
        "scanners, populations and protocols is unmeasured.",
    ),
    False: (
        "A patient's images share a split where labels.csv names each image's patient_id or the DICOM "
        "files' Patient ID is used; byte-identical files and near-duplicate X-rays (re-encoded copies "
        "and repeat exposures, found by thumbnail correlation) are kept in one split too. Images "
        "without a patient id are split one by one, so other radiographs of the same patient can still "
        "sit in training and test, which can make the test figures optimistic.",
        "Test set: held-out images of the same export, from the sites, scanners and period it covers; "
        "performance elsewhere is unmeasured.",
    ),
}

LIMITATIONS = (
    "Body parts with few test images of a class have sensitivity or specificity intervals too wide to rely on "
    "(see the table's intervals).",
    "The output is a probability of any fracture on the image, not a diagnosis; the heat map is "
    "not a localisation: it shows where the score came from, which is not always the fracture (where it "
    "points on the test split, when measured, is above). A clinician reads every image.",
)

#: How the weights were kept: an epoch chosen on validation, or (snapshots) the ends of the cycles.
EPOCH_KEPT = "The epoch kept (each averaged network's own) is the one with the best validation ROC AUC."
SNAPSHOTS_KEPT = ("The snapshots are the network at the ends of its cosine cycles, fixed before training; no epoch "
                  "is chosen on validation.")

#: A body part's ROC AUC is shown from this many images of each class (fewer: the figure says little).
MIN_CLASS_FOR_AUC = 5

SELECTION_PROTOCOL = (
    "The split keeps byte-identical files and near-duplicate X-rays in one group, and every group "
    "in one of train, val and test (stratified by label). With `split.keep` (the default), when the "
    "data grows every earlier image keeps its split (`split_assignments.csv`) and only new images "
    "are drawn, so no later model trains on an earlier model's test images.",
    "Recipe choices (learning rate, epochs, input size, aspect, augmentation, class balance, "
    "test-time augmentation, networks averaged) are made on the validation split (`dvc exp run train -S ...`) or by "
    "k-fold cross-validation on train+val, grouped and stratified like the split "
    "(`dvc exp run crossval/dvc.yaml -S ...`), two recipes compared on the same held-out images by "
    "DeLong's paired test (`fracture crossval-compare`); the comments in params.yaml record which, "
    "with the figures. The paper profile keeps the published recipe. No choice was made on the test split.",
    EPOCH_KEPT,
    "The test split is scored once per model, by the evaluate stage, to report the figures below. "
    "The promotion gate compares the model with the champion on the same test images (DeLong's "
    "paired test); it decides which model is served, never how one is trained.",
)


def dataset_name(layout: str, dest: str) -> str:
    """What a card and a version's description say the model was trained on: FracAtlas for its
    published layout (``ingest.layout: fracatlas``), else the export ingested into ``dest``."""
    return FRACATLAS if layout == "fracatlas" else f"the hospital export in `{dest}` (ingest.layout: {layout})"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _fmt_ci(row: dict[str, float | None], name: str) -> str:
    """A body part's figure with its 95% interval, ``n/a`` where the part lacks the class."""
    value, low, high = row.get(name), row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    if value is None or low is None or high is None:
        return _fmt(value)
    return f"{value:.3f} ({low:.3f}–{high:.3f})"


def _part_auc(row: dict[str, float | None]) -> str:
    """A body part's ROC AUC with its interval, or why it is not shown: ``n/a (1 fractured)`` below
    :data:`MIN_CLASS_FOR_AUC` images of either class (an AUC of 1.000 from one fractured image)."""
    fractured = int(row.get("n_fractured") or 0)
    others = int(row.get("n_images") or 0) - fractured
    if row.get("roc_auc") is None or min(fractured, others) < MIN_CLASS_FOR_AUC:
        return f"n/a ({fractured} fractured, {others} not)" if row.get("n_images") else "n/a"
    if "roc_auc_ci_low" in row and row["roc_auc_ci_low"] is None:  # a file of before intervals lacks the key
        return f"{row['roc_auc']:.3f} (no interval: all its fractured, or all its other, X-rays are one patient's or linked)"
    return _fmt_ci(row, "roc_auc")


#: The project's quality bar (docs/recipe.md), on the test split at the decision threshold: (metric
#: key, name, least value).
QUALITY_BAR = (("roc_auc", "ROC AUC", 0.92), ("recall", "sensitivity", 0.85), ("specificity", "specificity", 0.85))


def beside(value: float, floor: float, digits: int = 3) -> str:
    """``value`` to ``digits`` decimals, or to as many more as keep it on its side of ``floor``
    (0.84996 < 0.85, not 0.850 < 0.85): the card's quality bar and the gate's floors print it so."""
    for places in range(digits, 18):
        shown = f"{value:.{places}f}"
        if (float(shown) >= floor) == (value >= floor):
            return shown
    return repr(value)


def quality_bar(metrics: dict[str, float]) -> str:
    """Whether the test figures meet the project's quality bar (:data:`QUALITY_BAR`), and which miss it."""
    missed = [f"{name} {beside(metrics[key], least)} < {least}" for key, name, least in QUALITY_BAR
              if metrics[key] < least]
    bar = ", ".join(f"{name} ≥ {least}" for _, name, least in QUALITY_BAR)
    verdict = "**met**" if not missed else f"**not met** ({'; '.join(missed)})"
    return (f"The project's quality bar ({bar}, at the decision threshold; docs/recipe.md): {verdict}, "
            "on the point estimates; their intervals say how surely")


def _fmt_threshold(threshold: float) -> str:
    """Four significant digits: a threshold chosen on val can be 8e-06, which four decimals print as 0."""
    return f"{threshold:.4g}"


def _compared(m: dict[str, float], name: str, what: str) -> str:
    """The map against the centre baseline, read from their paired difference on the same images."""
    difference, low, high = m[f"{name}_vs_centre"], m[f"{name}_vs_centre_ci_low"], m[f"{name}_vs_centre_ci_high"]
    paired = f"the map minus the centre on the same images: {difference:+.3f} (95% CI {low:+.3f} to {high:+.3f})"
    if low > 0:
        return f"{paired}, so the map {what} better than the image centre"
    if high < 0:
        return f"{paired}, so the image centre {what} better than the map"
    return f"{paired}, so the map {what} no better than the image centre"


def _localisation_lines(m: dict[str, float]) -> list[str]:
    """How far the page's heat map can be trusted to show where the fracture is, when it was measured."""
    if "pointing_game" not in m:
        return []
    n = int(m["localised_images"])
    return [
        "",
        "## Where the heat map points (test split, fractured images with boxes)",
        f"The page's Grad-CAM heat map for the fractured class, on the {n} fractured test images with "
        "FracAtlas fracture boxes:",
        f"- Pointing game (the map's maximum inside a fracture box): {m['pointing_game']:.3f} (95% CI "
        f"{m['pointing_game_ci_low']:.3f}–{m['pointing_game_ci_high']:.3f}); the image centre as the point: "
        f"{m['pointing_game_centre']:.3f}; {_compared(m, 'pointing_game', 'points')}.",
        f"- Share of the map inside the boxes: {m['heat_mass_in_boxes']:.3f} (95% CI "
        f"{m['heat_mass_in_boxes_ci_low']:.3f}–{m['heat_mass_in_boxes_ci_high']:.3f}); a Gaussian on the image "
        f"centre: {m['heat_mass_in_boxes_centre']:.3f}; {_compared(m, 'heat_mass_in_boxes', 'covers the boxes')}; "
        f"a uniform map (the boxes' share of the image): {m['box_area_share']:.3f}.",
        "- Read the overlay as where the score came from, not as a fracture outline: boxes are small "
        f"(on average {m['box_area_share']:.1%} of the image), and the map is as coarse as the "
        "network's last feature map.",
    ]


def _composition_lines(composition: dict[str, dict[str, Any]] | None) -> list[str]:
    """The section on what each split holds: images, fractured, truncated files, DICOM files."""
    if not composition:
        return []
    rows = composition["splits"]
    parts = composition.get("train_fractured_by_part") or {}
    return [
        "",
        "## Data composition",
        "",
        "| split | images | fractured (share) | truncated files | DICOM files |",
        "|---|---|---|---|---|",
        *(f"| {name} | {r['images']} | {r['fractured']} ({r['fractured'] / max(r['images'], 1):.3f}) | "
          f"{r['truncated']} | {_fmt(r['dicom'])} |" for name, r in rows.items()),
        "",
        "Fractured training images by body part: " + ", ".join(f"{k} {v}" for k, v in parts.items()) + "."
        if parts else "",
        "Images validation left out (undecodable, label conflicts among near-duplicates, and the rest) are "
        "listed with their reasons in `outputs/validate/report.json`.",
    ]


def _data_limitations(composition: dict[str, dict[str, Any]] | None, metrics: dict[str, float],
                      body_parts: dict[str, dict[str, float | None]]) -> list[str]:
    """What this run's data leaves unmeasured or shaped, read from its composition and test figures."""
    lines = []
    if composition:
        rows = composition["splits"]
        if all(r["dicom"] == 0 for r in rows.values()):  # None: the files were not there to look at
            lines.append("Trained and tested on JPEG and PNG exports only: the served model also reads DICOM "
                         "(CR, DX, RG) through the display pipeline a viewer applies, which no figure here "
                         "measures.")
        truncated = {name: r["truncated"] for name, r in rows.items() if r["truncated"]}
        if truncated:
            lines.append("Truncated files (their missing rows decoded as grey) are in the splits ("
                         + ", ".join(f"{k} {v}" for k, v in truncated.items())
                         + "), and the served model scores such files too, with a note.")
        parts = composition.get("train_fractured_by_part") or {}
        few = [part for part, v in body_parts.items() if (v.get("n_fractured") or 0) < MIN_CLASS_FOR_AUC]
        if few:
            lines.append("Fracture detection on " + ", ".join(
                f"{part} ({body_parts[part]['n_fractured']} fractured test image"
                + ("" if body_parts[part]["n_fractured"] == 1 else "s")
                + (f", {parts[part]} in training" if part in parts else "") + ")" for part in few
            ) + " is unmeasured or too imprecise to rely on.")
        others = {part: int(v.get("n_images") or 0) - int(v.get("n_fractured") or 0) for part, v in body_parts.items()}
        if clear := [part for part, n in others.items() if n < MIN_CLASS_FOR_AUC]:
            lines.append("Specificity on " + ", ".join(
                f"{part} ({others[part]} non-fractured test image{'' if others[part] == 1 else 's'})" for part in clear
            ) + " is unmeasured or too imprecise to rely on: how often the model calls a sound one fractured there.")
    if "n_images" in metrics and metrics.get("n_images"):
        prevalence = metrics["n_fractured"] / metrics["n_images"]
        lines.append(f"Precision (positive predictive value) {metrics['precision']:.3f} holds at the test split's "
                     f"share of fractured images, {prevalence:.3f}; where fractures are more or less common it "
                     "differs. Sensitivity and specificity carry over; predictive values do not.")
    return lines


def render_model_card(
    model: TrainedModel,
    recipe: dict[str, Any],
    data: dict[str, Any],
    metrics: dict[str, float],
    body_parts: dict[str, dict[str, float | None]],
    threshold_source: str,
    run_id: str,
    composition: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The model card as Markdown.

    Args:
        model: the train stage's model (architecture, profile, best epoch, data config).
        recipe: the training parameters that define the recipe (optimiser, scheduler, epochs...).
        data: ``version`` (DVC md5 of the dataset) and ``git_commit`` the model was trained
            from, the split sizes, and ``dataset``, what it was trained on (:func:`dataset_name`;
            default FracAtlas).
        metrics: the evaluate stage's test metrics, with ``*_ci_low`` / ``*_ci_high`` intervals
            (ROC AUC's by bootstrap over groups of linked images, sensitivity's and specificity's
            Wilson score intervals over the effective number of images).
        body_parts: metrics per body part (:func:`fracture.evaluation.by_group`), sensitivity and
            specificity with their Wilson intervals.
        threshold_source: how the decision threshold was chosen.
        run_id: the MLflow run.
        composition: ``splits``, per split its ``images``, ``fractured``, ``truncated`` and
            ``dicom`` files, and ``train_fractured_by_part``; ``None`` leaves the section out.

    Returns:
        Markdown text.
    """
    m = metrics

    def with_ci(name: str) -> str:
        return f"{m[name]:.3f} (95% CI {m[name + '_ci_low']:.3f}–{m[name + '_ci_high']:.3f})"

    config = model.data_config
    size = config.input_size
    dataset = data.get("dataset") or FRACATLAS
    lines = [
        f"# Model card: {model.architecture} ({model.profile} profile)",
        "",
        "Fractured / not fractured classifier for musculoskeletal X-rays, fine-tuned from ImageNet "
        + (
            f"weights on {dataset} (Gupta & Sharma, 2024 recipe)."
            if model.profile == "paper"
            else f"weights on {dataset} (the {model.profile} profile's recipe, below; the paper profile keeps Gupta & "
            "Sharma's, 2024)."
        ),
        "",
        "## Intended use",
        f"- {INTENDED_USE}",
        "",
        "## Provenance",
        f"- MLflow run: `{run_id}`",
        f"- Code: git commit `{data.get('git_commit') or 'unknown'}`"
        + (f", with uncommitted changes to {data['git_dirty_files']}" if data.get("git_dirty_files") else ""),
        f"- Data: {dataset}, DVC version `{data.get('version') or 'unversioned'}`; split "
        + ", ".join(f"{k} {v}" for k, v in data.get("splits", {}).items()),
        "",
        "## Recipe",
        f"- Input: {size[1]}×{size[2]} px, resized without cropping ({config.interpolation}; aspect: "
        f"{config.aspect}), enhancement: {config.enhance}, normalised with mean {list(config.mean)} and std "
        f"{list(config.std)}; "
        f"JPEGs decoded {'in full' if config.decode == 'full' else 'at draft scale (DICOM in full)'}",
        *(f"- {k}: {v}" for k, v in recipe.items()),
        (f"- {model.members} networks trained under seeds train.seed onwards, scored as the mean of their "
         f"probabilities; each kept from its best validation epoch ({', '.join(map(str, model.member_best_epochs))}); "
         f"validation ROC AUC of the mean {model.best_val_roc_auc:.4f}"
         if model.members > 1 and model.snapshots == 1 else
         f"- {model.members} snapshots of one network, taken at the ends of its cosine cycles (after epochs "
         f"{', '.join(map(str, model.member_best_epochs))}), scored as the mean of their probabilities; no epoch "
         f"chosen on validation; validation ROC AUC of the mean {model.best_val_roc_auc:.4f}"
         if model.members > 1 else
         f"- Model kept from epoch {model.best_epoch} (best validation ROC AUC {model.best_val_roc_auc:.4f})"),
        "",
        "## How the recipe was chosen",
        *(f"- {SNAPSHOTS_KEPT if text is EPOCH_KEPT and model.snapshots > 1 else text}" for text in SELECTION_PROTOCOL),
        f"- The decision threshold: {threshold_source}.",
        "",
        "## Test metrics",
        f"- ROC AUC: {with_ci('roc_auc')}",
        f"- Sensitivity: {with_ci('recall')}",
        f"- Specificity: {with_ci('specificity')}",
        f"- {quality_bar(m)}",
        f"- Average precision {m['average_precision']:.3f}, precision {m['precision']:.3f}, "
        f"F1 {m['f1']:.3f}, accuracy {m['accuracy']:.3f}",
        f"- Calibration: expected calibration error {m['ece']:.3f}, Brier score {m['brier']:.3f}",
        "- Intervals: ROC AUC's is a stratified percentile bootstrap over the test images, drawing linked images "
        "(copies, near-duplicates, one patient's) as one group; sensitivity's and "
        "specificity's (here and per body part) are Wilson score intervals of the proportions at the decision "
        "threshold, which was fixed before the test split was scored, over each class's effective number of "
        "images (its count divided by the design effect of its linked images, Rao & Scott 1992): wider than "
        "Wilson's over the images where images are linked, the same where none are.",
        f"- Decision threshold {_fmt_threshold(m['threshold'])} ({threshold_source}); "
        f"{int(m['n_images'])} test images, {int(m['n_fractured'])} fractured",
        *_localisation_lines(m),
        *_composition_lines(composition),
        "",
        "## By body part (test split)",
        "",
        "| body part | images | fractured | ROC AUC (95% CI) | sensitivity (95% CI) | specificity (95% CI) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {part} | {v['n_images']} | {v['n_fractured']} | {_part_auc(v)} | "
            f"{_fmt_ci(v, 'recall')} | {_fmt_ci(v, 'specificity')} |"
            for part, v in body_parts.items()
        ),
        "",
        f"A body part's ROC AUC is shown from {MIN_CLASS_FOR_AUC} images of each class, with its 95% bootstrap "
        "interval over the part's own test images, linked images drawn together as for the whole split.",
        "",
        "## Known limitations",
        *(f"- {text}" for text in (*DATASET_LIMITATIONS[dataset == FRACATLAS], *_data_limitations(composition, m, body_parts),
                                   *LIMITATIONS)),
        "",
    ]
    return "\n".join(lines)


def version_description(
    architecture: str, profile: str, input_size: tuple[int, ...], aspect: str, metrics: dict[str, float],
    run_id: str, data_version: str | None, threshold_source: str | None = None, dataset: str | None = None,
    card_packed: bool = False,
) -> str:
    """The registered version's description, as the MLflow UI's registry page shows it: what the
    model is, its test figures with their intervals and the threshold, and where its card is.

    Args:
        architecture: the timm model name.
        profile: the training profile.
        input_size: (channels, height, width).
        aspect: ``squash`` or ``pad``.
        metrics: the run's metrics (the evaluate stage's ``test_*``, with ``_ci_low`` / ``_ci_high``:
            ROC AUC's by bootstrap, sensitivity's and specificity's Wilson score intervals).
        run_id: the training run, which holds the model card.
        data_version: the DVC version of the dataset.
        threshold_source: how the evaluate stage chose the threshold (its run's ``threshold_source``
            tag), or ``None`` when the run does not say.
        dataset: what the model was trained on (the run's ``dataset`` tag, :func:`dataset_name`),
            or ``None`` when the run does not say.
        card_packed: the version's model files hold the card of the evaluation it was registered
            with (``artifacts/model_card.md``); else the description names the run's card.
    """
    m = metrics

    def with_ci(name: str) -> str:
        value, low, high = (m.get(f"test_{name}{end}") for end in ("", "_ci_low", "_ci_high"))
        if value is None:
            return "n/a"
        return f"{value:.3f}" + (f" (95% CI {low:.3f}–{high:.3f})" if low is not None and high is not None else "")

    images, fractured = m.get("test_n_images"), m.get("test_n_fractured")
    split = f"{int(images)} images, {int(fractured)} fractured" if images is not None and fractured is not None else "test split"
    threshold = m.get("test_threshold")
    return "\n\n".join(
        [
            f"Fractured / not fractured classifier for musculoskeletal X-rays: {architecture} ({profile} profile), "
            f"{input_size[1]}×{input_size[2]} px ({aspect}), fine-tuned from ImageNet weights on "
            f"{dataset or 'its dataset'} (DVC data version `{data_version or 'unversioned'}`).",
            f"Test split ({split}): ROC AUC {with_ci('roc_auc')}; sensitivity {with_ci('recall')}; "
            f"specificity {with_ci('specificity')}"
            + (
                "."
                if threshold is None
                else f"; at the decision threshold {_fmt_threshold(threshold)}"
                + (f" ({threshold_source})." if threshold_source else ".")
            ),
            (f"Model card: `artifacts/model_card.md` among this version's model files, as evaluated when it was "
             f"registered (run `{run_id}`). " if card_packed else
             f"Model card: artifact `evaluation/model_card.md` of run `{run_id}`. ")
            + "Decision support for a trained reader, not a diagnosis; not for clinical use.",
        ]
    )
