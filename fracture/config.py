"""Typed, frozen view of ``params.yaml``.

The file is read once at an entry point (a CLI command or a flow) and the resulting
:class:`Params` object is passed down; no module reads the file on its own.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from zoneinfo import available_timezones

import yaml

from fracture.vocabulary import (
    LIMBS,
    Aspect,
    Augment,
    ClassBalance,
    Decode,
    Detector,
    Device,
    Enhancement,
    Layout,
    OnDuplicate,
    OnLabelConflict,
    OnNearDuplicateConflict,
    OnTruncated,
    Severity,
    SplitStrategy,
    Tta,
    WeightsSource,
)

PARAMS_FILE = "params.yaml"
#: The folder data.dvc versions (`dvc add data`); every dataset is ingested into it.
DATA_DIR = "data"


class ConfigError(ValueError):
    """A parameter is missing or has a value the pipeline cannot use."""


#: YAML 1.2's float (its core schema): the dot and the exponent's sign optional, so ``1e-05`` is a number.
_YAML_12_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")


class ParamsLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader (libyaml's where PyYAML ships it, ~14x faster) reading floats as YAML 1.2 does.

    DVC writes ``params.yaml`` back with ruamel.yaml (YAML 1.2) after ``dvc exp run -S``, and spells
    every float below 1e-4 without a dot (``1e-05``), which YAML 1.1's resolver reads as text: through
    ``-S`` no learning rate or weight decay that small could be set. Ints stay ints (the int resolver
    comes first), ``.inf`` and ``.nan`` are read as before, and quoted text stays text.
    """


ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_12_FLOAT, list("-+0123456789."))


def _construct_mapping_once(loader: ParamsLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A mapping whose keys are each written once: PyYAML keeps the last of two (a value added at
    the top of a section while the old line stays further down is silently overridden), and DVC's
    reader refuses the file without naming the key."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is written twice in one mapping (first on line {seen[key]}); keep one of them",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


ParamsLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping_once)


def read_params_yaml(text: str | typing.IO[str]) -> Any:
    """The document in ``params.yaml``'s text (or open file) as :func:`load_params` reads it (:class:`ParamsLoader`).

    Raises:
        ConfigError: the text is not YAML (an unclosed bracket, a tab in the indentation); the
            message gives the line and what the parser found, as a hand edit needs.
    """
    try:
        return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise ConfigError(f"params.yaml is not valid YAML: {' '.join(str(exc).split())}. Fix it there "
                          "(`git diff params.yaml` shows what changed)") from None


@dataclass(frozen=True)
class IngestParams:
    dest: str
    figshare_api: str
    figshare_article: int
    figshare_file: str
    layout: Layout = "fracatlas"


@dataclass(frozen=True)
class ValidateParams:
    min_side: int
    max_side: int
    colour_modes: tuple[str, ...]
    fractured_share: tuple[float, float]
    on_truncated: OnTruncated
    on_label_conflict: OnLabelConflict
    severity: dict[str, Severity] = dataclasses.field(default_factory=dict)
    on_duplicate: OnDuplicate = "grouped"
    compare_previous: bool = True
    # Pearson's r of 32 x 32 thumbnails above which two images are one radiograph (null: off).
    near_duplicate_threshold: float | None = None
    # Pearson's r of the thumbnails' top halves above which two images are one radiograph whatever
    # their lower parts hold (a copy corrupt in its lower part); null: not compared so.
    near_duplicate_top_threshold: float | None = None
    on_near_duplicate_conflict: OnNearDuplicateConflict = "exclude"


@dataclass(frozen=True)
class SplitParams:
    seed: int
    val_size: float
    test_size: float
    strategy: SplitStrategy = "stratified"
    stratify_body_part: bool = False
    # Each image stays in the split split_assignments.csv names for it (fracture.split.ASSIGNMENTS_FILE),
    # so a grown export keeps earlier images where they were; false: every run draws afresh.
    keep: bool = True


@dataclass(frozen=True)
class PrepareParams:
    aspect: Aspect = "squash"
    workers: int = 2
    enhance: Enhancement = "none"


@dataclass(frozen=True)
class Profile:
    """What differs between the paper's GPU recipe and the CPU profile."""

    model: str
    weights: WeightsSource
    image_size: int
    epochs: int
    weights_file: str | None = None
    augment: Augment = "none"
    frozen: tuple[str, ...] = ()
    lr: float | None = None  # this profile's learning rate; None: train.lr
    tta: Tta = "none"  # test-time augmentation of every scoring pass: val, evaluate, the served model
    # timm's regularisers while training (no effect on scoring): dropout before the new head and
    # stochastic depth over the blocks, scaled up with depth; 0: off, as the paper's profile
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # Cross-entropy against targets smoothed towards the other class by this much (PyTorch's
    # label_smoothing); 0: the paper's plain cross-entropy
    label_smoothing: float = 0.0
    # An exponential moving average of the weights (timm's ModelEmaV3, with its decay warm-up) is
    # what the val pass scores, picks the epoch from and hands on as the model; 0: off, as the
    # paper's profile
    ema_decay: float = 0.0
    # Layer-wise learning-rate decay (timm's param_groups_layer_decay): the head trains at the
    # profile's rate, each layer group below it at this fraction of the one above; 1: off, one
    # rate for every layer, as the paper's profile
    layer_decay: float = 1.0
    # How JPEGs are decoded before the resize, in the prepared cache and in the served model alike
    # (a part of the model's data config): full, as the paper's profile, or draft (reduced scale)
    decode: Decode = "full"
    # Networks trained under seeds train.seed, train.seed + 1, ...; the model scores the mean of their
    # probabilities (fracture.model.SeedEnsemble). Frozen leading layers are the same weights in every
    # member, so they run once per image, in training and scoring; 1: one network, as the paper's profile
    members: int = 1
    # The cosine schedule restarts so that the epochs fall into this many cycles of equal length (its
    # T_0), and the model scores the mean of the networks at the cycles' ends: a snapshot ensemble
    # (Huang et al., 2017) for no more training. They share the frozen layers as members do; 1: one
    # network, kept from its best val epoch, as the paper's profile
    snapshots: int = 1


@dataclass(frozen=True)
class TrainParams:
    profile: str
    seed: int
    batch_size: int
    lr: float
    weight_decay: float
    t_0: int | None
    t_mult: int
    device: Device
    class_balance: ClassBalance = "none"
    # Data-parallel processes on this machine (one per GPU, or CPU workers): batch_size is the
    # global batch, split over them (fracture.distributed).
    processes: int = 1


@dataclass(frozen=True)
class EvaluateParams:
    """``evaluate``: the decision threshold and the test figures' intervals and calibration.

    Attributes:
        threshold: the fixed decision threshold, used when ``target_sensitivity`` is null.
        batch_size: images scored at once.
        target_sensitivity: choose the threshold on the val split to reach this sensitivity, or null.
        bootstrap_resamples: stratified bootstrap resamples, over whole groups of linked test images,
            for ROC AUC's interval (sensitivity's and specificity's at a threshold fixed before test
            are Wilson score intervals, which need none; crossval's, at a threshold chosen on the same
            predictions, are bootstrapped with it).
        calibration_bins: equal-width bins of the reliability diagram and the ECE.
        seed: seeds the bootstrap.
        boxes: COCO JSON of fracture boxes for the heat map's pointing game, or null.
    """

    threshold: float
    batch_size: int
    target_sensitivity: float | None = None
    bootstrap_resamples: int = 1000
    calibration_bins: int = 10
    seed: int = 0
    # COCO JSON of fracture boxes, relative to the dataset (FracAtlas: Annotations/COCO JSON/...);
    # None: the dataset has none, and the heat map's pointing game is not played.
    boxes: str | None = None


@dataclass(frozen=True)
class ServeParams:
    """The served model's input checks, stored with every registered version (:mod:`fracture.intake`).

    The side bounds come from ``validate.min_side`` / ``max_side`` and the truncated-file policy
    from ``validate.on_truncated``, so the model scores what it was trained on.

    Attributes:
        max_rows: most rows one request may hold.
        max_file_mb: largest input file, in MiB.
        max_megapixels: most pixels decoded for one image, in millions (a decompression bomb
            declares more and is refused before decoding).
        min_grey_std: an image whose greyscale standard deviation (0-255) is below this is
            blank or near-constant, and refused.
        modalities: DICOM modalities accepted.
        body_parts: Body Part Examined values a DICOM file may name (one naming none is read);
            null: any.
    """

    max_rows: int = 64
    max_file_mb: int = 64
    max_megapixels: int = 50
    min_grey_std: float = 2.0
    modalities: tuple[str, ...] = ("CR", "DX", "RG")
    body_parts: tuple[str, ...] | None = LIMBS

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_file_mb", "max_megapixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"params.yaml: serve.{name} must be a whole number of at least 1; got {value!r}")
        if not _number(self.min_grey_std) or self.min_grey_std < 0:
            raise ConfigError(f"params.yaml: serve.min_grey_std must be a number, 0 or more; got {self.min_grey_std!r}")
        if not self.modalities or not all(isinstance(m, str) and m.isupper() for m in self.modalities):
            raise ConfigError(
                f"params.yaml: serve.modalities must list DICOM modality codes such as [CR, DX]; got {self.modalities!r}"
            )
        if self.body_parts is not None and not (
            self.body_parts and all(isinstance(b, str) and b.strip() and b == b.upper() for b in self.body_parts)
        ):
            raise ConfigError(
                "params.yaml: serve.body_parts must list Body Part Examined values in capitals, such as [HAND, WRIST], "
                f"or be null to read any; got {self.body_parts!r}"
            )


@dataclass(frozen=True)
class DetectParams:
    """``detect/dvc.yaml``: the fracture detector on the trained classifier's backbone.

    Attributes:
        architecture: torchvision's head, ``fcos`` or ``retinanet``.
        image_size: the longer side, in pixels, each image is resized to (aspect kept).
        fpn_channels: channels of the feature pyramid.
        epochs, batch_size, lr, weight_decay: AdamW with a cosine schedule; the epoch kept is the
            one with the best val mAP@0.5.
        warmup_epochs: the learning rate rises linearly from a tenth of ``lr`` over these epochs first.
        frozen: backbone modules kept at the classifier's weights (timm names, e.g. ``blocks.0``).
        negatives_per_positive: non-fractured images drawn per image with boxes, each epoch.
        flip: random horizontal flips in training.
        seed: seeds the weights of the new layers, the negatives' draws and the flips.
        workers: data loader processes (0: decode in the training process).
        bootstrap_resamples: resamples of the test images for the mAP intervals, and of the
            promotion gate's paired comparison.
        enabled: the retrain flow trains, evaluates and registers the detector after the
            classifier (off by default: on two CPU cores it does not fit the main job's budget).
        model_name: the registered model consumers load (``models:/<name>@champion``).
        confidence: a version replaces the champion only when, both scored through the registry
            on the same test images, a paired bootstrap puts its mAP@0.5 gain above 0 at this
            confidence (two-sided p-value below ``1 - confidence``).
        floors: run metric -> minimum every champion reaches (``test_map_50``, ...).
    """

    architecture: Detector = "fcos"
    image_size: int = 512
    fpn_channels: int = 128
    epochs: int = 12
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    frozen: tuple[str, ...] = ("conv_stem", "bn1", "blocks.0", "blocks.1")
    negatives_per_positive: float = 1.0
    flip: bool = True
    seed: int = 42
    workers: int = 2
    bootstrap_resamples: int = 1000
    enabled: bool = False
    model_name: str = "fracture-detector"
    confidence: float = 0.95
    floors: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _number(self.confidence) or not 0 <= self.confidence < 1:
            raise ConfigError(
                f"params.yaml: detect.confidence must be a number in [0, 1), e.g. 0.95; got {self.confidence!r}"
            )
        if not isinstance(self.floors, dict) or not all(isinstance(k, str) and _number(v) for k, v in self.floors.items()):
            raise ConfigError(
                "params.yaml: detect.floors must map run metric names to numbers, "
                f"e.g. {{test_map_50: 0.1}}; got {self.floors!r}"
            )
        # The detector's training settings, refused here rather than by torch or the data loader once the
        # stage (or the retrain flow, after the classifier is trained and registered) reaches them.
        for key, least, usual in (("epochs", 1, "10"), ("batch_size", 1, "8"), ("image_size", 32, "384 pixels"),
                                  ("bootstrap_resamples", 1, "1000")):
            value = getattr(self, key)
            if not (_whole(value) and value >= least):
                raise ConfigError(
                    f"params.yaml: detect.{key} must be a whole number of at least {least} (e.g. {usual}); got {value!r}"
                )
        # The paired bootstrap's p-value is never below 2 / (resamples + 1): fewer resamples than this and
        # the gate could never find a detector better "with confidence", however much better it is.
        least = math.floor(round(2 / (1 - self.confidence), 9))
        if self.bootstrap_resamples < least:
            raise ConfigError(
                f"params.yaml: detect.bootstrap_resamples {self.bootstrap_resamples} cannot give a p-value below "
                f"{1 - self.confidence:.3g} (detect.confidence {self.confidence}): the paired bootstrap's least is "
                f"2 / (resamples + 1), so the gate could never promote a detector. Use at least {least} (e.g. 1000)"
            )
        check_model_name("detect.model_name", self.model_name, "fracture-detector")
        if not (_whole(self.workers) and self.workers >= 0):
            raise ConfigError(
                f"params.yaml: detect.workers must be a whole number, 0 or more (e.g. 2; 0: decode in the training "
                f"process); got {self.workers!r}"
            )
        if not (_whole(self.fpn_channels) and self.fpn_channels >= 64 and self.fpn_channels % 32 == 0):
            # torchvision's FCOS and RetinaNet heads normalise with 32 groups (fracture.detection.DetectorConfig).
            raise ConfigError(
                f"params.yaml: detect.fpn_channels must be a whole multiple of 32, at least 64 (e.g. 128); "
                f"got {self.fpn_channels!r}"
            )
        if not (_number(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(
                f"params.yaml: detect.lr must be a number above 0, e.g. 1.0e-3; got {self.lr!r}{_float_hint(self.lr)}"
            )
        for key, meaning in (("weight_decay", "0: none"), ("warmup_epochs", "0: no warm-up"),
                             ("negatives_per_positive", "non-fractured images per image with boxes, e.g. 1.0")):
            value = getattr(self, key)
            if not (_number(value) and math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"params.yaml: detect.{key} must be a number, 0 or more ({meaning}); got {value!r}"
                    f"{_float_hint(value)}"
                )
        if not (isinstance(self.frozen, tuple) and all(isinstance(m, str) and m for m in self.frozen)):
            raise ConfigError(
                "params.yaml: detect.frozen must be a list of the backbone's module names, as timm names them "
                f"(e.g. [conv_stem, bn1, blocks.0]), or []; got {self.frozen!r}"
            )
        _check_seed("detect.seed", self.seed)


@dataclass(frozen=True)
class CrossvalParams:
    """``fracture crossval``: k-fold cross-validation of the recipe on train + val, never test.

    Attributes:
        folds: k, the number of folds (at least 2).
        seed: seeds the draw of the folds (the recipe keeps ``train.seed``).
    """

    folds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.folds, int) or isinstance(self.folds, bool) or self.folds < 2:
            raise ConfigError(
                f"params.yaml: crossval.folds must be a whole number of at least 2, e.g. 3; got {self.folds!r}"
            )
        _check_seed("crossval.seed", self.seed)


@dataclass(frozen=True)
class RegisterParams:
    """The registry and its promotion gate.

    Attributes:
        model_name: the registered model name consumers load (``models:/<name>@champion``).
        experiment: the MLflow experiment of the training runs.
        confidence: a version replaces the champion only when, scored on the same test images,
            its ROC AUC is higher and DeLong's paired test puts the difference above 0 at this
            confidence (two-sided p-value below ``1 - confidence``).
        sensitivity_tolerance: ... and its sensitivity at its served threshold is at most this
            much below the champion's at its own.
        specificity_tolerance: ... and its specificity at its served threshold is at most this
            much below the champion's at its own.
        floors: run metric -> minimum value every champion must reach (e.g. ``test_recall``).
    """

    model_name: str
    experiment: str
    confidence: float = 0.95
    sensitivity_tolerance: float = 0.02
    specificity_tolerance: float = 0.05
    floors: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_model_name("register.model_name", self.model_name, "fracture-classifier")
        if not _number(self.confidence) or not 0 <= self.confidence < 1:
            raise ConfigError(
                f"params.yaml: register.confidence must be a number in [0, 1), e.g. 0.95; got {self.confidence!r}"
            )
        for key, example in (("sensitivity_tolerance", 0.02), ("specificity_tolerance", 0.05)):
            value = getattr(self, key)
            if not _number(value) or not 0 <= value <= 1:
                raise ConfigError(
                    f"params.yaml: register.{key} must be a number in [0, 1], e.g. {example}; got {value!r}"
                )
        if not isinstance(self.floors, dict) or not all(isinstance(k, str) and _number(v) for k, v in self.floors.items()):
            raise ConfigError(
                "params.yaml: register.floors must map run metric names to numbers, "
                f"e.g. {{test_roc_auc: 0.85}}; got {self.floors!r}"
            )


def check_model_name(key: str, name: object, example: str) -> None:
    """Refuses a registered model's name that MLflow refuses (empty; a ``/`` or ``:``; a name that
    resolves to another as a path, such as ``.`` or ``..x``), or that the registry's searches cannot
    quote (an apostrophe: the pipeline finds a run's versions with MLflow filter strings, which
    quote names in ``'``, and a registration stopped at the first search with a parse error).

    Raises:
        ConfigError: naming params.yaml's field ``key``, what is wrong and an ``example``.
    """
    if not (isinstance(name, str) and name.strip()):
        raise ConfigError(f"params.yaml: {key} must be a registered model's name, e.g. {example}; got {name!r}")
    if "'" in name:
        why = "a name with an apostrophe, which MLflow's search filters, quoted in ', cannot hold"
    elif "/" in name or ":" in name:
        why = "a name with '/' or ':', which MLflow refuses in a registered model's name"
    elif name == "." or name.startswith(".."):  # with no '/', what MLflow's normpath check leaves
        why = "a name MLflow refuses, as it would resolve to another when treated as a file path"
    else:
        return
    raise ConfigError(
        f"params.yaml: {key} {name!r} is {why}. Use letters, digits, '-', '_' or '.' (e.g. {example}; "
        "st-marys-fracture rather than st-mary's-fracture)"
    )


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: Seeds are NumPy's (``np.random.seed``, ``RandomState``) and scikit-learn's ``random_state``: 0 to 2**32 - 1.
SEED_LIMIT = 2**32


def _check_seed(key: str, seed: object, span: int = 1, span_key: str = "") -> None:
    """Refuses a seed NumPy would refuse only when the stage draws with it; ``span`` seeds from ``seed`` on are used."""
    if not (_whole(seed) and 0 <= seed and seed + span - 1 < SEED_LIMIT):
        top = SEED_LIMIT - span
        raise ConfigError(
            f"params.yaml: {key} must be a whole number from 0 to {top}"
            + (f" ({span_key} {key} to {key} + {span - 1}, each below 2**32)" if span > 1 else "")
            + f", e.g. 42; got {seed!r}"
        )


@dataclass(frozen=True)
class ScheduleParams:
    """When and where the retrain flow runs on its own (read by ``flows.deploy``, not by DVC)."""

    deployment: str
    cron: str
    timezone: str = "UTC"
    work_pool: str | None = None
    image: str | None = None
    job_variables: dict[str, Any] = dataclasses.field(default_factory=dict)
    concurrency_limit: int = 1
    retries: int = 2
    retry_delay_seconds: float = 30
    busy_wait_seconds: float = 3600


@dataclass(frozen=True)
class Params:
    ingest: IngestParams
    validate: ValidateParams
    split: SplitParams
    prepare: PrepareParams
    train: TrainParams
    profiles: dict[str, Profile]
    evaluate: EvaluateParams
    register: RegisterParams
    schedule: ScheduleParams
    crossval: CrossvalParams
    detect: DetectParams
    serve: ServeParams = ServeParams()

    @property
    def profile(self) -> Profile:
        """The profile named by ``train.profile``."""
        try:
            return self.profiles[self.train.profile]
        except KeyError:
            raise ConfigError(
                f"params.yaml: train.profile is {self.train.profile!r}, but profiles defines only "
                f"{sorted(self.profiles)}; set train.profile to one of them"
            ) from None


def _literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values when ``annotation`` is a ``Literal`` (``None`` for any other type)."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def _check_choices(cls: type, section: str, kwargs: dict[str, Any], renames: dict[str, str]) -> None:
    """Checks every ``Literal`` field (and every value of a ``dict[str, Literal]``) once, here."""
    hints = typing.get_type_hints(cls)
    spelled = {v: k for k, v in renames.items()}
    for name, value in kwargs.items():
        hint = hints[name]
        where = f"{section}.{spelled.get(name, name)}"
        if hint is bool and not isinstance(value, bool):
            # Text such as "false" would be taken as true.
            raise ConfigError(f"params.yaml: {where} must be true or false, unquoted; got {value!r}")
        allowed = _literal_choices(hint)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"params.yaml: {where} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        args = typing.get_args(hint)
        if typing.get_origin(hint) is dict and len(args) == 2 and (allowed := _literal_choices(args[1])):
            if not isinstance(value, dict):
                raise ConfigError(f"params.yaml: {where} must be a mapping; got {value!r}")
            bad = {k: v for k, v in value.items() if v not in allowed}
            if bad:
                raise ConfigError(f"params.yaml: {where} values must be one of {', '.join(map(repr, allowed))}; got {bad}")


def _build(
    cls: type, section: str, raw: dict[str, Any], renames: dict[str, str] | None = None, prefix: str = ""
) -> Any:
    data = raw.get(section)
    label = prefix + section
    if not isinstance(data, dict):
        raise ConfigError(f"params.yaml: section '{label}' is missing or not a mapping")
    renames = renames or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    spelled = {v: k for k, v in renames.items()}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = renames.get(key, key)
        if name not in fields or (key in spelled and key not in renames):  # t_0 is written T_0
            raise ConfigError(
                f"params.yaml: unknown key '{label}.{key}'; known keys are {sorted(spelled.get(n, n) for n in fields)}"
            )
        kwargs[name] = tuple(value) if isinstance(value, list) else value
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"params.yaml: section '{label}' lacks {missing}")
    _check_choices(cls, label, kwargs, renames)
    return cls(**kwargs)


#: Keys of the active profile that dvc.yaml names one by one (``profiles.${train.profile}.<key>``):
#: DVC fails a stage whose params file lacks one, so they are required even where a default exists.
DVC_TRACKED_PROFILE_KEYS = ("model", "image_size", "decode", "tta")


def parse_params(raw: dict[str, Any]) -> Params:
    """Builds :class:`Params` from the mapping in ``params.yaml``.

    Args:
        raw: the parsed YAML document.

    Returns:
        The frozen parameters.

    Raises:
        ConfigError: a section or key is missing or unknown, or the file holds no mapping (it is empty).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml holds no sections (it is {'empty' if raw is None else type(raw).__name__}): "
                          "restore it (`git checkout params.yaml`)")
    sections = [f.name for f in dataclasses.fields(Params)]
    unknown = [key for key in raw if key not in sections]
    if unknown:
        raise ConfigError(f"params.yaml: unknown section {', '.join(map(repr, unknown))}; the sections are {sections}")
    profiles_raw = raw.get("profiles")
    if not isinstance(profiles_raw, dict) or not profiles_raw:
        raise ConfigError("params.yaml: section 'profiles' is missing or empty")
    profiles = {name: _build(Profile, name, profiles_raw, prefix="profiles.") for name in profiles_raw}
    active = raw["train"].get("profile") if isinstance(raw.get("train"), dict) else None
    if active is not None and not isinstance(active, str):
        raise ConfigError(f"params.yaml: train.profile names one profile, written as its name (e.g. cpu), one of "
                          f"{sorted(profiles)}; got {active!r}")
    if isinstance(profiles_raw.get(active), dict):
        # dvc.yaml tracks these of the active profile by name, and DVC refuses a stage whose params are absent.
        unnamed = [key for key in DVC_TRACKED_PROFILE_KEYS if key not in profiles_raw[active]]
        if unnamed:
            raise ConfigError(
                f"params.yaml: profiles.{active} lacks {unnamed}: dvc.yaml tracks them by name, so write them out "
                f"(e.g. decode: full, tta: none)"
            )
    params = Params(
        ingest=_build(IngestParams, "ingest", raw),
        validate=_build(ValidateParams, "validate", raw),
        split=_build(SplitParams, "split", raw),
        prepare=_build(PrepareParams, "prepare", raw),
        train=_build(TrainParams, "train", raw, {"T_0": "t_0", "T_mult": "t_mult"}),
        profiles=profiles,
        evaluate=_build(EvaluateParams, "evaluate", raw),
        register=_build(RegisterParams, "register", raw),
        schedule=_build(ScheduleParams, "schedule", raw),
        crossval=_build(CrossvalParams, "crossval", raw),
        detect=_build(DetectParams, "detect", raw),
        serve=_build(ServeParams, "serve", raw),
    )
    _check(params)
    return params


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(p: Params) -> None:
    # The allowed values of every choice were checked by _build; these are the numeric rules.
    v = p.validate
    if not (_whole(v.min_side) and _whole(v.max_side) and 0 < v.min_side <= v.max_side):
        raise ConfigError(
            f"params.yaml: validate.min_side and validate.max_side must be whole numbers of pixels with "
            f"0 < min_side <= max_side, got {v.min_side!r} and {v.max_side!r}"
        )
    share = v.fractured_share
    if not (isinstance(share, (list, tuple)) and len(share) == 2 and all(map(_number, share))
            and 0 <= share[0] <= share[1] <= 1):
        raise ConfigError(
            f"params.yaml: validate.fractured_share must be [low, high] with 0 <= low <= high <= 1, got {share!r}"
        )
    if isinstance(v.colour_modes, str) or not all(isinstance(m, str) for m in v.colour_modes):
        raise ConfigError(
            f"params.yaml: validate.colour_modes must be a list of Pillow modes such as [L, RGB], got {v.colour_modes!r}"
        )
    ev = p.evaluate
    if not (_number(ev.threshold) and 0 <= ev.threshold <= 1):
        raise ConfigError(f"params.yaml: evaluate.threshold is a probability, from 0 to 1; got {ev.threshold!r}")
    target = ev.target_sensitivity
    if target is not None and not (_number(target) and 0 < target <= 1):
        raise ConfigError(
            f"params.yaml: evaluate.target_sensitivity is a fraction above 0 and at most 1 (0.85, not 85), or null; "
            f"got {target!r}"
        )
    # Counts the evaluate stage needs only once it scores (batch_size) or after the test split is scored, and
    # crossval after every fold is trained, so a 0 is refused here.
    for key, usual in (("batch_size", "32"), ("bootstrap_resamples", "1000 for the ROC AUC's 95% interval"),
                       ("calibration_bins", "10")):
        value = getattr(ev, key)
        if not (_whole(value) and value >= 1):
            raise ConfigError(
                f"params.yaml: evaluate.{key} must be a whole number of at least 1 (usually {usual}), got {value!r}"
            )
    _check_seed("evaluate.seed", ev.seed)
    if not (_whole(p.train.batch_size) and p.train.batch_size >= 1):
        raise ConfigError(f"params.yaml: train.batch_size must be a whole number of at least 1, got {p.train.batch_size!r}")
    t = p.validate.near_duplicate_threshold
    if t is not None and not (isinstance(t, (int, float)) and 0 < t < 1):
        raise ConfigError(f"params.yaml: validate.near_duplicate_threshold must lie in (0, 1) or be null, got {t!r}")
    top = p.validate.near_duplicate_top_threshold
    if top is not None and not (isinstance(top, (int, float)) and not isinstance(top, bool) and 0 < top < 1):
        raise ConfigError(
            f"params.yaml: validate.near_duplicate_top_threshold must lie in (0, 1) or be null, got {top!r}"
        )
    if top is not None and t is None:
        raise ConfigError(
            "params.yaml: validate.near_duplicate_top_threshold needs validate.near_duplicate_threshold: set both, "
            "or set the top threshold to null"
        )
    _check_dest(p.ingest.dest)
    if not (_whole(p.prepare.workers) and p.prepare.workers >= 1):
        raise ConfigError(f"params.yaml: prepare.workers must be a whole number of decoding threads, at least 1 "
                          f"(e.g. 2), got {p.prepare.workers!r}")
    for key in ("val_size", "test_size"):
        size = getattr(p.split, key)
        if not (_number(size) and 0 < size < 1):
            raise ConfigError(
                f"params.yaml: split.{key} is a fraction of the images, above 0 and below 1 (0.15, not 15%); "
                f"got {size!r}"
            )
    if p.split.val_size + p.split.test_size >= 1:
        raise ConfigError("params.yaml: split.val_size + split.test_size must be below 1")
    if p.split.strategy == "published" and p.ingest.layout != "fracatlas":
        raise ConfigError(
            f"params.yaml: split.strategy 'published' reads FracAtlas's own split lists, but ingest.layout is "
            f"{p.ingest.layout!r}; set split.strategy: stratified"
        )
    _check_seed("split.seed", p.split.seed)
    _check_optimiser(p.train)
    # A profile's members train under train.seed, train.seed + 1, ... (fracture.training.fit_members).
    members, widest = max(((prof.members, name) for name, prof in p.profiles.items()
                           if _whole(prof.members) and prof.members >= 1), default=(1, ""))
    _check_seed("train.seed", p.train.seed, members, f"profiles.{widest}.members {members} trains under")
    processes = p.train.processes
    if not (_whole(processes) and processes >= 1):
        raise ConfigError(f"params.yaml: train.processes must be a whole number of at least 1, got {processes!r}")
    if p.train.batch_size % processes:
        raise ConfigError(
            f"params.yaml: train.batch_size {p.train.batch_size} is the global batch and must divide evenly over "
            f"train.processes {processes}"
        )
    for name, prof in p.profiles.items():
        if not (isinstance(prof.model, str) and prof.model.strip()):
            raise ConfigError(f"params.yaml: profiles.{name}.model must be a timm model name such as "
                              f"tf_efficientnet_lite0, got {prof.model!r}")
        if not (_whole(prof.epochs) and prof.epochs >= 1):
            raise ConfigError(
                f"params.yaml: profiles.{name}.epochs must be a whole number of at least 1, e.g. 3; got {prof.epochs!r}"
            )
        if not (_whole(prof.image_size) and prof.image_size >= 32):
            raise ConfigError(
                f"params.yaml: profiles.{name}.image_size must be a whole number of pixels, at least 32, "
                f"got {prof.image_size!r}"
            )
        if prof.lr is not None and not (_number(prof.lr) and math.isfinite(prof.lr) and prof.lr > 0):
            raise ConfigError(
                f"params.yaml: profiles.{name}.lr must be a positive number or null, got {prof.lr!r}"
                f"{_float_hint(prof.lr)}"
            )
        _check_weights_file(name, prof)
        frozen = prof.frozen
        if not (isinstance(frozen, tuple) and all(isinstance(m, str) and m for m in frozen)):
            raise ConfigError(
                f"params.yaml: profiles.{name}.frozen must be a list of the model's module names, as timm names them "
                f"(e.g. [conv_stem, bn1, blocks.0]), or []; got {frozen!r}"
            )
        for key in ("drop_rate", "drop_path_rate", "label_smoothing", "ema_decay"):
            rate = getattr(prof, key)
            if not (_number(rate) and 0 <= rate < 1):
                raise ConfigError(f"params.yaml: profiles.{name}.{key} must be a number from 0 up to (not including) 1, "
                                  f"got {rate!r}")
        if not (_whole(prof.members) and prof.members >= 1):
            raise ConfigError(f"params.yaml: profiles.{name}.members must be a whole number of at least 1 (1: one "
                              f"network), got {prof.members!r}")
        _check_snapshots(name, prof, p.train)
        decay = prof.layer_decay
        if not (_number(decay) and 0 < decay <= 1):
            raise ConfigError(f"params.yaml: profiles.{name}.layer_decay must be a number above 0 and at most 1 "
                              f"(1: off), got {decay!r}")
    _check_schedule(p.schedule)
    if p.detect.model_name == p.register.model_name:
        raise ConfigError(
            f"params.yaml: detect.model_name and register.model_name are both {p.register.model_name!r}: the detector "
            "and the classifier would be versions of one registered model, each moving the other's champion; name "
            "the detector apart (e.g. fracture-detector)"
        )
    p.profile  # noqa: B018 - raises ConfigError on an unknown profile name


def _check_weights_file(name: str, prof: Profile) -> None:
    # fracture.model reads weights_file only under weights: file; its other sources would ignore it silently.
    if prof.weights == "file" and not (isinstance(prof.weights_file, str) and prof.weights_file):
        raise ConfigError(
            f"params.yaml: profiles.{name}.weights is file, but the profile sets no weights_file; set weights_file: "
            f"pretrained/<name> (a .safetensors or .pth file added with `dvc add`, pretrained/README.md), or choose "
            f"another weights source"
            + (f"; got weights_file {prof.weights_file!r}" if prof.weights_file is not None else "")
        )
    if prof.weights != "file" and prof.weights_file is not None:
        raise ConfigError(
            f"params.yaml: profiles.{name}.weights_file {prof.weights_file!r} is read only with weights: file, and "
            f"profiles.{name}.weights is {prof.weights!r}; set weights: file, or remove weights_file"
        )


def _check_dest(dest: object) -> None:
    # data.dvc versions the data/ folder (`dvc add data`): a dataset anywhere else would be copied,
    # then never versioned, and every ingest would fail at `dvc add` naming no setting.
    parts = PurePosixPath(dest).parts if isinstance(dest, str) else ()
    if len(parts) < 2 or parts[0] != DATA_DIR or any(part in {"..", "."} for part in parts) or "\\" in str(dest):
        raise ConfigError(
            f"params.yaml: ingest.dest must be a folder inside {DATA_DIR}/, which data.dvc versions, given as "
            f"{DATA_DIR}/<name> relative to the project (e.g. {DATA_DIR}/fracatlas); got {dest!r}"
        )


def _float_hint(value: object) -> str:
    """What to write instead when params.yaml holds a number as text (quoted, ``'1e-4'``), else ``""``.

    :func:`load_params` reads an unquoted ``1e-4`` as a number (YAML 1.2's floats, as DVC writes
    them); the spelling suggested, ``1.0e-4``, is a number to YAML 1.1's readers (PyYAML) too.
    """
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if not math.isfinite(number) or number < 0 or (number == 0 and any(c in "123456789" for c in value)):
        return ""  # written as a number, it would be refused all the same (negative, or below a float's range)
    if "e" not in value.lower():
        return f": YAML reads {value!r} as text; write it unquoted, e.g. {number!r}"
    mantissa, exponent = f"{number:e}".split("e")
    mantissa = mantissa.rstrip("0") + ("0" if mantissa.rstrip("0").endswith(".") else "")
    # PyYAML's floats need a dot in the mantissa and a sign in the exponent, and no quotes.
    return f": YAML reads {value!r} as text, not a number; write it unquoted as {mantissa}e{int(exponent):+d}"


def _check_optimiser(t: TrainParams) -> None:
    # Adam and PyTorch's warm-restart schedule refuse these only once training starts, naming no field;
    # a T_0 of 0 would read as null (the profile's epochs).
    if not (_number(t.lr) and math.isfinite(t.lr) and t.lr > 0):
        raise ConfigError(
            f"params.yaml: train.lr must be a number above 0, e.g. 1.0e-4; got {t.lr!r}{_float_hint(t.lr)}"
        )
    if not (_number(t.weight_decay) and math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        raise ConfigError(
            f"params.yaml: train.weight_decay must be a number, 0 or more (0: none); got {t.weight_decay!r}"
            f"{_float_hint(t.weight_decay)}"
        )
    if t.t_0 is not None and not (_whole(t.t_0) and t.t_0 >= 1):
        raise ConfigError(
            "params.yaml: train.T_0 must be a whole number of epochs, at least 1, or null (one cosine cycle over the "
            f"profile's epochs); got {t.t_0!r}"
        )
    if not (_whole(t.t_mult) and t.t_mult >= 1):
        raise ConfigError(
            "params.yaml: train.T_mult must be a whole number of at least 1 (1: every cosine cycle as long as the "
            f"first); got {t.t_mult!r}"
        )


def _check_snapshots(name: str, prof: Profile, train: TrainParams) -> None:
    k = prof.snapshots
    if not (_whole(k) and k >= 1):
        raise ConfigError(f"params.yaml: profiles.{name}.snapshots must be a whole number of at least 1 (1: one "
                          f"network), got {k!r}")
    if k == 1:
        return
    if prof.epochs % k:
        raise ConfigError(f"params.yaml: profiles.{name}.snapshots {k} must divide its epochs {prof.epochs}: each "
                          "snapshot ends a cosine cycle of equal length")
    if (train.t_0 not in (None, prof.epochs // k)) or train.t_mult != 1:
        raise ConfigError(f"params.yaml: profiles.{name}.snapshots {k} sets the cosine cycle to {prof.epochs // k} "
                          f"epochs; set train.T_0 to null and train.T_mult to 1 (got {train.t_0!r} and {train.t_mult!r})")
    if prof.members > 1:
        raise ConfigError(f"params.yaml: profiles.{name} sets both members {prof.members} and snapshots {k}; an "
                          "ensemble of seeds and one of snapshots cannot be combined yet: set one of them to 1")


#: The characters Prefect refuses in a deployment's or a work pool's name (``prefect.types.names.BANNED_CHARACTERS``;
#: not imported: reading params.yaml should not import Prefect).
PREFECT_BANNED_CHARACTERS = ("/", "%", "&", ">", "<")


def _check_schedule(s: ScheduleParams) -> None:
    for key in ("deployment", "work_pool"):
        name = getattr(s, key)
        if key == "work_pool" and name is None:
            continue
        if not (isinstance(name, str) and name.strip()) or any(c in name for c in PREFECT_BANNED_CHARACTERS):
            raise ConfigError(
                f"params.yaml: schedule.{key} {name!r} is no name Prefect takes: give text without "
                f"{' '.join(PREFECT_BANNED_CHARACTERS)} (e.g. weekly-retrain)"
                + ("" if key == "deployment" else ", or null for this machine")
            )
    # Five fields: Prefect reads a sixth as seconds after them, so Quartz's or Spring's seconds-first
    # "0 0 3 * * 1" would run monthly, at 00:00:01 on the 3rd.
    if not isinstance(s.cron, str) or len(s.cron.split()) != 5:
        raise ConfigError(
            f"params.yaml: schedule.cron is {s.cron!r}; give a cron string of five fields such as \"0 3 * * 1\" "
            "(minute hour day-of-month month day-of-week; no seconds)"
        )
    # The names Prefect schedules in. ZoneInfo also loads tzdata's other files (posixrules, the
    # posix/ and right/ copies), which Prefect refuses only when the deployment is made.
    zones = available_timezones()
    if not isinstance(s.timezone, str) or s.timezone not in zones:
        like = sorted(z for z in zones if isinstance(s.timezone, str) and z.lower() == s.timezone.lower())
        raise ConfigError(
            f"params.yaml: schedule.timezone {s.timezone!r} is not an IANA time zone name; "
            + (f"did you mean {like[0]}?" if like else "use one such as Europe/Berlin or UTC")
        )
    if not (_whole(s.concurrency_limit) and s.concurrency_limit >= 1):
        raise ConfigError(
            f"params.yaml: schedule.concurrency_limit must be a whole number of at least 1; got {s.concurrency_limit!r}"
        )
    if not (_whole(s.retries) and s.retries >= 0):
        raise ConfigError(f"params.yaml: schedule.retries must be a whole number, 0 or more; got {s.retries!r}")
    delay = s.retry_delay_seconds
    if not (_number(delay) and math.isfinite(delay) and delay >= 0):
        raise ConfigError(
            f"params.yaml: schedule.retry_delay_seconds must be a number of seconds, 0 or more (30, not 30s); "
            f"got {delay!r}"
        )
    wait = s.busy_wait_seconds
    if not (_number(wait) and math.isfinite(wait) and wait >= 0):
        raise ConfigError(
            f"params.yaml: schedule.busy_wait_seconds must be a number of seconds, 0 or more (3600, not 1h); "
            f"got {wait!r}"
        )
    if not isinstance(s.job_variables, dict):
        raise ConfigError("params.yaml: schedule.job_variables must be a mapping (use {} for none)")


def load_params(root: Path | str = ".") -> Params:
    """Reads and parses ``params.yaml`` in the project root.

    Args:
        root: the project directory.

    Returns:
        The frozen parameters.
    """
    path = Path(root) / PARAMS_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root (where dvc.yaml is)")
    with path.open() as fh:
        return parse_params(read_params_yaml(fh))


def store_root(root: Path | str = ".") -> Path:
    """The project folder whose ``mlflow.db`` and ``mlartifacts/`` are the local MLflow store.

    ``root`` itself, except in the temporary copy of the project that a queued or ``--temp``
    ``dvc exp run`` runs its stages in (under ``.dvc/tmp/exps``, removed when the experiment
    ends, and without the git-ignored store): there, DVC names the project it copied in
    ``$DVC_ROOT``, and the runs land in that project's store, where ``dvc exp apply`` and
    ``fracture register`` look for them.
    """
    root = Path(root).resolve()
    project = os.environ.get("DVC_ROOT")
    if project and root.is_relative_to(Path(project).resolve() / ".dvc" / "tmp"):
        return Path(project).resolve()
    return root


def tracking_uri(root: Path | str = ".") -> str:
    """The MLflow tracking URI: ``MLFLOW_TRACKING_URI`` if set, else the project's sqlite file (:func:`store_root`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root(root) / 'mlflow.db'}"


def artifact_location(root: Path | str = ".") -> str:
    """Where a new experiment stores artifacts when the tracking store is the local sqlite file."""
    return (store_root(root) / "mlartifacts").as_uri()
