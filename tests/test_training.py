"""Training options on tiny synthetic images: frozen layers stay put, augmentation never crops."""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import pytest
import torch
from timm.utils.model import freeze

from fracture.config import ConfigError, load_params
from fracture.model import create_classifier, profile_data_config
from fracture.prepare import StaleCacheError
from fracture.recipe import learning_rate
from fracture.training import (
    class_balance,
    light_augmentation,
    moving_average,
    parameter_groups,
    train,
)
from tests.conftest import REPO
from tests.synthetic import make_dataset, training_frame
from tests.test_prepare import tensor_data


def tiny_run(tmp_path, fractured: int, healthy: int, **profile_changes):
    """Synthetic images in memory and the CPU profile with ``profile_changes``: params, profile, config, data."""
    make_dataset(tmp_path, fractured, healthy)
    params = load_params(REPO)
    profile = dataclasses.replace(params.profiles["cpu"], **profile_changes)
    config = profile_data_config(profile)
    return params, profile, config, tensor_data(tmp_path, training_frame(tmp_path), config)


def counting_stem(stem_images: list[int]):
    """A model factory in place of ``create_classifier`` whose stem appends each batch's image count to ``stem_images``."""

    def counted(profile):
        model = create_classifier(profile)
        model.conv_stem.register_forward_hook(lambda _m, inputs, _out: stem_images.append(len(inputs[0])))
        return model

    return counted


def watching_head(seen: list[tuple[torch.dtype, bool, bool]]):
    """A model factory in place of ``create_classifier`` whose last convolution (``conv_head``, which trains)
    appends, for each batch reaching it, its output's dtype, whether its input is channels_last, and
    whether it was in training mode."""

    def watched(profile):
        model = create_classifier(profile)
        model.conv_head.register_forward_hook(lambda m, inputs, out: seen.append(
            (out.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last), m.training)))
        return model

    return watched


def test_frozen_layers_keep_imagenet_weights_and_the_rest_learns(tmp_path):
    params, profile, config, data = tiny_run(
        tmp_path, 8, 8, image_size=64, epochs=2, augment="light", frozen=("conv_stem", "bn1", "blocks.0")
    )
    result = train(data, data, config, profile, dataclasses.replace(params.train, lr=1e-3))
    start = create_classifier(profile)
    assert torch.equal(result.model.conv_stem.weight, start.conv_stem.weight)
    assert torch.equal(result.model.blocks[0][0].conv_dw.weight, start.blocks[0][0].conv_dw.weight)
    assert not torch.equal(result.model.blocks[3][0].conv_pw.weight, start.blocks[3][0].conv_pw.weight)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert 1 <= result.best_epoch <= 2


def test_the_epoch_with_the_best_val_auc_is_kept_not_the_last(tmp_path, monkeypatch):
    """Val ROC AUC rising then falling (0.6, 0.9, 0.7 over three epochs): the network returned is the
    one after epoch 2, with epoch 2's val figures, though epoch 3 trained on."""
    from fracture import training  # noqa: PLC0415 - patched in this test only

    params, profile, config, data = tiny_run(tmp_path, 6, 6, image_size=64, epochs=3, members=1, snapshots=1,
                                             ema_decay=0.0)
    built, states, scored = [], [], []
    scripted = iter([0.6, 0.9, 0.7])

    def building(profile_):
        built.append(create_classifier(profile_))
        return built[-1]

    def val_auc(labels, probabilities):  # the val pass's score, as the epoch's val images would give it
        scored.append(np.array(probabilities))
        return next(scripted)

    monkeypatch.setattr(training, "create_classifier", building)
    monkeypatch.setattr(training, "roc_auc_score", val_auc)
    result = train(data, data, config, profile, dataclasses.replace(params.train, lr=1e-3),
                   on_epoch=lambda _epoch, _metrics: states.append(
                       {k: v.detach().clone() for k, v in built[0].state_dict().items()}))
    assert [h["val_roc_auc"] for h in result.history] == [0.6, 0.9, 0.7] and len(states) == 3
    assert (result.best_epoch, result.best_val_roc_auc) == (2, 0.9)
    np.testing.assert_array_equal(result.best_val_probabilities, scored[1])
    np.testing.assert_array_equal(result.final_val_probabilities, scored[2])
    kept = result.model.state_dict()
    assert all(torch.equal(kept[k], states[1][k]) for k in states[1])
    assert not all(torch.equal(kept[k], states[2][k]) for k in states[2])  # epoch 3 did change the weights


def test_on_the_cpu_training_batches_reach_the_trained_layers_channels_last_in_float32(tmp_path, monkeypatch):
    """The CPU's side of tests/test_gpu.py's check (bf16 there): no autocast, the channels_last layout kept."""
    from fracture import training  # noqa: PLC0415 - the model factory is wrapped in this test only

    params, profile, config, data = tiny_run(tmp_path, 4, 4, image_size=64, epochs=1, members=1)
    seen: list[tuple[torch.dtype, bool, bool]] = []
    monkeypatch.setattr(training, "create_classifier", watching_head(seen))
    train(data, data, config, profile, dataclasses.replace(params.train, device="cpu"))
    assert {(dtype, last) for dtype, last, in_training in seen if in_training} == {(torch.float32, True)}
    assert any(not in_training for *_, in_training in seen)  # the val passes, in eval mode


def test_light_augmentation_keeps_size_and_dtype():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    out = light_augmentation()(image)
    assert out.shape == image.shape and out.dtype == torch.uint8


def test_light_augmentation_moves_and_mirrors_the_x_ray_but_keeps_it_whole_in_view():
    """A bright bone 16 x 16 px in a 64 x 80 image, off centre: each draw shifts, turns, zooms by at most
    5% or mirrors it, so it stays whole in view at about its size (a crop would enlarge it, or cut it off)."""
    torch.manual_seed(0)
    image = torch.full((3, 64, 80), 30, dtype=torch.uint8)
    image[:, 20:36, 12:28] = 220  # left of centre
    augment = light_augmentation()
    draws = [augment(image) for _ in range(40)]
    sizes = [int((d[0] > 125).sum()) for d in draws]
    assert all(0.8 * 256 <= size <= 1.25 * 256 for size in sizes), sizes
    left = [int((d[0, :, :40] > 125).sum()) > int((d[0, :, 40:] > 125).sum()) for d in draws]
    assert 5 <= sum(left) <= 35  # mirrored in some draws, not in others
    assert sum(not torch.equal(d, image) and not torch.equal(d, image.flip(-1)) for d in draws) >= 35  # moved


def test_images_prepared_for_another_model_are_refused(tmp_path):
    make_dataset(tmp_path, 2, 2)
    params = load_params(REPO)
    profile = dataclasses.replace(params.profiles["cpu"], image_size=64, epochs=1)
    config = dataclasses.replace(profile_data_config(profile), mean=(0.485, 0.456, 0.406))
    data = tensor_data(tmp_path, training_frame(tmp_path), config)
    with pytest.raises(StaleCacheError, match="dvc repro prepare"):
        train(data, data, config, profile, params.train)


def test_class_balance_options_follow_sklearn_weights_and_balance_the_draws():
    labels = torch.tensor([1] * 20 + [0] * 80)
    generator = torch.Generator().manual_seed(0)
    plain, none = class_balance("none", labels, generator)
    assert none is None and plain.weight is None
    weighted, sampler = class_balance("weighted_loss", labels, generator)
    assert sampler is None
    assert torch.allclose(weighted.weight, torch.tensor([100 / (2 * 80), 100 / (2 * 20)]))
    logits = torch.zeros(4, 2)
    target = torch.tensor([0, 0, 0, 1])
    logits[:, 1] = torch.tensor([0.5, 0.2, -0.3, -1.0])
    assert weighted(logits, target) > plain(logits, target)  # the missed fracture costs more
    _, sampler = class_balance("balanced_sampler", labels, generator)
    drawn = labels[torch.tensor(list(sampler))]
    assert len(drawn) == 100
    draws = torch.cat([labels[torch.tensor(list(sampler))] for _ in range(50)])
    assert abs(draws.float().mean().item() - 0.5) < 0.03  # 18%-like data drawn about 50/50


@pytest.mark.parametrize("mode", ["none", "weighted_loss", "balanced_sampler"])
def test_label_smoothing_moves_each_target_towards_the_other_class(mode):
    """With smoothing s, a two-class target y becomes (1 - s) y + s / 2 under every class balance."""
    labels = torch.tensor([1] * 20 + [0] * 80)
    smoothed, _ = class_balance(mode, labels, torch.Generator().manual_seed(0), label_smoothing=0.1)
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.1], [-0.5, 1.5]])
    target = torch.tensor([0, 0, 1])
    soft = torch.nn.functional.one_hot(target, 2).float() * 0.9 + 0.05
    weight = smoothed.weight if smoothed.weight is not None else torch.ones(2)
    per_image = -(soft * weight * logits.log_softmax(1)).sum(1)
    assert smoothed(logits, target) == pytest.approx((per_image.sum() / weight[target].sum()).item(), rel=1e-6)
    plain, _ = class_balance(mode, labels, torch.Generator().manual_seed(0))
    assert plain.label_smoothing == 0.0 and smoothed(logits, target) != plain(logits, target)


def test_the_val_pass_that_picks_the_epoch_scores_with_the_profiles_tta(tmp_path):
    from sklearn.metrics import roc_auc_score

    from fracture.imaging import Preprocessor
    from fracture.inference import probabilities

    params, profile, config, data = tiny_run(tmp_path, 4, 4, image_size=64, epochs=1, tta="hflip")
    result = train(data, data, config, profile, params.train)
    images, labels = data.tensors
    pre = Preprocessor(config)
    batch = params.train.batch_size * 2
    hflip = probabilities(result.model, images, pre, torch.device("cpu"), batch, "hflip")
    plain = probabilities(result.model, images, pre, torch.device("cpu"), batch)
    assert result.best_val_roc_auc == pytest.approx(roc_auc_score(labels.numpy(), hflip), abs=1e-9)
    assert result.history[0]["val_roc_auc"] == result.best_val_roc_auc
    assert not np.allclose(hflip, plain)  # the mirror pass did change the scores


def test_an_epoch_that_would_end_on_a_batch_of_one_image_skips_it(tmp_path, caplog):
    # 17 images in batches of 16: batch norm cannot train on the 17th alone.
    params, profile, config, data = tiny_run(tmp_path, 8, 9, image_size=32, epochs=1, frozen=())
    assert len(data) == 17
    with caplog.at_level(logging.INFO, logger="fracture.training"):
        result = train(data, data, config, profile, dataclasses.replace(params.train, batch_size=16))
    assert result.history[0]["epoch"] == 1
    assert ("17 images per epoch and process in batches of 16: each process's last batch, of 1 image(s), is "
            "skipped each epoch (1 of the epoch's 17 draws)") in caplog.text


def test_the_weights_moving_average_warms_up_and_is_capped_at_the_profiles_decay():
    net = torch.nn.Linear(2, 2)
    assert moving_average(net, 0.0) is None
    ema = moving_average(net, 0.99)
    assert ema.get_decay(1) == 0.0  # the first step copies the weights
    assert ema.get_decay(101) == pytest.approx(1 - 101**-0.75)  # warming up: 0.968
    assert ema.get_decay(10_000) == 0.99  # capped


def test_with_a_moving_average_training_is_unchanged_and_the_average_is_scored_and_returned(tmp_path):
    from sklearn.metrics import roc_auc_score

    from fracture.imaging import Preprocessor
    from fracture.inference import probabilities

    params, profile, config, data = tiny_run(tmp_path, 8, 8, image_size=64, epochs=2, frozen=())
    train_params = dataclasses.replace(params.train, lr=1e-3, batch_size=4)
    plain = train(data, data, config, profile, train_params)
    averaged = train(data, data, config, dataclasses.replace(profile, ema_decay=0.9), train_params)

    # The average only watches: the trained weights follow the same path, epoch by epoch.
    assert "val_roc_auc_raw" not in plain.history[0]
    for a, b in zip(plain.history, averaged.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
        assert b["val_roc_auc_raw"] == pytest.approx(a["val_roc_auc"], abs=1e-9)
    # What is scored and handed on is the average, not the trained weights.
    head = "classifier.weight"
    assert not torch.allclose(averaged.model.state_dict()[head], plain.model.state_dict()[head])
    images, labels = data.tensors
    scores = probabilities(averaged.model, images, Preprocessor(config), torch.device("cpu"), 8, profile.tta)
    assert averaged.best_val_roc_auc == pytest.approx(roc_auc_score(labels.numpy(), scores), abs=1e-9)
    assert averaged.history[averaged.best_epoch - 1]["val_roc_auc"] == averaged.best_val_roc_auc


def test_dataset_inputs_are_logged_with_their_local_source_and_without_mlflows_ambiguity_warning(tmp_path, client):
    import warnings  # noqa: PLC0415 - only this test records warnings

    import mlflow  # noqa: PLC0415 - only this test logs to MLflow

    from fracture.stages.train import log_dataset_inputs  # noqa: PLC0415 - the stage module imports MLflow
    from fracture.workspace import Workspace  # noqa: PLC0415 - as above

    params = load_params(REPO)
    make_dataset(tmp_path, 2, 2)
    frame = training_frame(tmp_path).assign(sha256="0" * 64)
    with mlflow.start_run() as run, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_dataset_inputs(params, Workspace(tmp_path), {"train": frame.iloc[:2], "test": frame.iloc[2:]})
    assert not [w for w in caught if "interpreted in multiple ways" in str(w.message)]
    inputs = {i.dataset.name: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"fracatlas", "fracatlas-train", "fracatlas-test"}
    source = (tmp_path / params.ingest.dest).resolve().as_uri()
    assert all(d.source_type == "local" and source in d.source for d in inputs.values())


def test_frozen_leading_layers_are_recognised_only_as_the_networks_first_layers():
    from fracture.training import frozen_prefix_depth  # noqa: PLC0415 - this test's subject

    model = create_classifier(load_params(REPO).profiles["cpu"])
    assert frozen_prefix_depth(model, ("conv_stem", "bn1", "blocks.0", "blocks.1")) == 2
    assert frozen_prefix_depth(model, ("blocks.1", "bn1", "conv_stem", "blocks.0")) == 2
    assert frozen_prefix_depth(model, ("conv_stem", "bn1")) == 0
    assert frozen_prefix_depth(model, ("conv_stem", "bn1", "blocks.1")) is None  # blocks.0 still trains
    assert frozen_prefix_depth(model, ("blocks.0",)) is None
    assert frozen_prefix_depth(model, ()) is None
    assert frozen_prefix_depth(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), ("0",)) is None


@pytest.mark.parametrize(("ema_decay", "tta"), [(0.0, "none"), (0.9, "none"), (0.0, "hflip")])
def test_keeping_the_frozen_layers_output_trains_the_same_weights_and_runs_them_once_per_image(
    tmp_path, monkeypatch, ema_decay, tta
):
    """13 training images over 3 epochs: the stem sees each training image, and each val image
    scored by the trained weights, once instead of every epoch, and the trained weights, history
    and val scores are the same, bit for bit."""
    from fracture import training  # noqa: PLC0415 - the model factory is wrapped below

    params, profile, config, data = tiny_run(
        tmp_path, 6, 7, image_size=64, epochs=3, frozen=("conv_stem", "bn1", "blocks.0", "blocks.1"),
        ema_decay=ema_decay, tta=tta,
    )
    train_params = dataclasses.replace(params.train, lr=1e-3, batch_size=4)
    stem_images: list[int] = []
    monkeypatch.setattr(training, "create_classifier", counting_stem(stem_images))
    kept = train(data, data, config, profile, train_params)
    with_kept, stem_images[:] = sum(stem_images), []
    plain = train(data, data, config, profile, train_params, reuse_frozen_outputs=False)
    without = sum(stem_images)

    # Every epoch scores val (and the raw weights); with hflip, each image and its mirror.
    val_passes = 3 * len(data) * (2 if ema_decay else 1) * (2 if tta == "hflip" else 1)
    assert without == 3 * 12 + val_passes  # 13 images in batches of 4: the lone last one sits each epoch out
    # The trained weights score each val image (and with hflip its mirror) once; the moving
    # average, another network, every epoch.
    kept_val_passes = len(data) * (2 if tta == "hflip" else 1) + (3 * len(data) if ema_decay else 0)
    assert 12 <= with_kept - kept_val_passes <= 13  # each training image once (a lone last one may wait an epoch)
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(kept.model.state_dict()[name], tensor), name
    timing = {"train_images_per_s", "epoch_seconds", "rss_mb"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in kept.history] == [
        {k: v for k, v in h.items() if k not in timing} for h in plain.history
    ]
    assert np.array_equal(kept.final_val_probabilities, plain.final_val_probabilities)


def test_the_logged_learning_rate_is_the_last_step_of_each_epoch_not_the_restart_that_follows(tmp_path):
    """Two epochs, one cosine cycle: the rate falls from the profile's to near 0 by the last step;
    the scheduler's next rate (a warm restart at the full rate) is not what the run trained with."""
    params, profile, config, data = tiny_run(tmp_path, 6, 6, image_size=32, epochs=2, frozen=())
    train_params = dataclasses.replace(params.train, batch_size=4)
    base = learning_rate(profile, train_params)
    history = train(data, data, config, profile, train_params).history
    assert 0.5 * base < history[0]["lr"] < 0.9 * base  # 3 steps an epoch: the first epoch ends at (1 + cos(pi/3)) / 2
    assert history[1]["lr"] < 0.1 * base


def test_layer_decay_gives_each_block_a_fraction_of_the_rate_of_the_block_above():
    params = load_params(REPO)
    profile = dataclasses.replace(params.profiles["cpu"], frozen=("conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2"))
    model = create_classifier(profile)
    freeze(model, list(profile.frozen))
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    # Off: one group, every trainable parameter at the profile's rate.
    (one,) = parameter_groups(model, 1e-3, 0.0, 1.0)
    assert one["lr"] == 1e-3 and {names[id(p)] for p in one["params"]} == trainable

    groups = parameter_groups(model, 1e-3, 0.0, 0.5)
    rate = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert set(rate) == trainable  # every trainable parameter once, no frozen one
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert rate["classifier.weight"] == 1e-3  # the head trains at the profile's rate
    assert rate["conv_head.weight"] == rate["blocks.6.0.conv_pw.weight"] == 0.5e-3  # the last block and the head conv
    assert rate["blocks.5.3.conv_pw.weight"] == pytest.approx(0.25e-3)
    assert rate["blocks.5.2.conv_pw.weight"] == pytest.approx(0.125e-3)
    # Lite0's blocks 3-6 hold 11 sub-blocks, each one layer group: the first trainable is 11 below the head's.
    assert rate["blocks.3.0.conv_pw.weight"] == pytest.approx(1e-3 * 0.5**11)
    assert rate["blocks.3.0.bn1.weight"] == rate["blocks.3.0.conv_pw.weight"]


def test_training_under_layer_decay_follows_the_heads_schedule_and_moves_the_early_blocks_less(tmp_path):
    params, profile, config, data = tiny_run(tmp_path, 8, 8, image_size=32, epochs=2, frozen=("conv_stem", "bn1"))
    train_params = dataclasses.replace(params.train, lr=1e-3, batch_size=4)
    plain = train(data, data, config, profile, train_params)
    decayed = train(data, data, config, dataclasses.replace(profile, layer_decay=0.5), train_params)
    start = create_classifier(profile)

    # The logged rate is the head's, which follows the same schedule as without decay.
    assert [h["lr"] for h in decayed.history] == [h["lr"] for h in plain.history]

    def moved(result, name):
        return (dict(result.model.named_parameters())[name] - dict(start.named_parameters())[name]).abs().sum().item()

    # Block 0 is 16 layer groups below the head, so it trains at 0.5**16 of the head's rate and barely moves.
    early = "blocks.0.0.conv_dw.weight"
    assert moved(decayed, early) < moved(plain, early) / 100
    assert moved(decayed, "classifier.weight") > 0


@pytest.mark.parametrize(
    ("frozen", "told"),
    [
        (("conv_stem", "bn1", "blocks.7"), r"'blocks\.7', which tf_efficientnet_lite0 does not have: its top-level "
                                           r"modules are conv_stem, bn1, blocks, conv_head, bn2, global_pool, "
                                           r"classifier; blocks holds blocks\.0, .*, blocks\.6\."),
        (("conv-stem", "bn1"), r"'conv-stem', which tf_efficientnet_lite0 does not have: its top-level modules are "
                               r"conv_stem, bn1, blocks, conv_head, bn2, global_pool, classifier\. Name modules"),
    ],
)
def test_a_frozen_module_the_model_lacks_is_refused_naming_the_field_and_the_modules_it_has(tmp_path, frozen, told):
    """Lite0 has blocks 0-6, and timm spells its stem conv_stem: a typo is a ConfigError, not timm's bare
    AttributeError. The train and crossval stages say so before they read any data; train() before its
    first step."""
    from fracture.config import ConfigError  # noqa: PLC0415 - this test's subject
    from fracture.stages.crossval import run_crossval  # noqa: PLC0415 - the stage module imports MLflow
    from fracture.stages.train import run_train  # noqa: PLC0415 - as above
    from fracture.workspace import Workspace  # noqa: PLC0415 - as above

    params = load_params(REPO)
    profile = dataclasses.replace(params.profiles["cpu"], frozen=frozen)
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, profile="cpu", device="cpu"),
                                 profiles=params.profiles | {"cpu": profile})
    # An empty project: the stage stops at the profile, before the split tables it would read first.
    for stage in (run_train, run_crossval):
        with pytest.raises(ConfigError, match=r"^params\.yaml: profiles\.cpu\.frozen names " + told):
            stage(params, Workspace(tmp_path))
    params, profile, config, data = tiny_run(tmp_path, 2, 2, image_size=32, epochs=1, frozen=frozen)
    with pytest.raises(ConfigError, match=r"profiles\.<train\.profile>\.frozen names " + told):
        train(data, data, config, profile, params.train)


def test_every_shipped_profiles_frozen_modules_are_in_its_model():
    """Checked on the architecture alone (PyTorch's meta device): the paper's B6 with no weights fetched."""
    from fracture.model import check_profile_frozen  # noqa: PLC0415 - this test's subject

    params = load_params(REPO)
    for name, profile in params.profiles.items():
        check_profile_frozen(dataclasses.replace(profile, frozen=(*profile.frozen, "blocks.0.0", "conv_head")), name)


def test_a_misspelt_model_is_named_as_the_profiles_model_before_any_stage_works():
    """profiles.cpu.model: tf_efficientnet_lite00 sent the prepare stage's user to fix the weights
    ("timm knows no pretrained config ... Give them one of three ways"), and train and crossval
    stopped with timm's bare RuntimeError: Unknown model."""
    from fracture.model import check_profile_frozen  # noqa: PLC0415 - this test's subject
    from fracture.stages.prepare import active_cache  # noqa: PLC0415

    params = load_params(REPO)
    cpu = dataclasses.replace(params.profiles["cpu"], model="tf_efficientnet_lite00")
    params = dataclasses.replace(params, profiles={**params.profiles, "cpu": cpu},
                                 train=dataclasses.replace(params.train, profile="cpu"))
    told = r"^params\.yaml: profiles\.cpu\.model 'tf_efficientnet_lite00' is not a model timm .* knows; write a name"
    with pytest.raises(ConfigError, match=told):
        active_cache(params)  # prepare, and every stage that reads the cache
    with pytest.raises(ConfigError, match=told):
        check_profile_frozen(cpu, "cpu")  # train and crossval
    with pytest.raises(ConfigError, match=told):
        check_profile_frozen(dataclasses.replace(cpu, frozen=()), "cpu")


def test_a_loss_that_stops_being_a_number_stops_training_at_that_step_naming_the_epoch_batch_and_rate(tmp_path):
    """A rate far too high: the weights overflow after the first step and the second step's loss is NaN.
    Training stops there, instead of training the rest on NaN and failing in scikit-learn's ROC AUC."""
    params, profile, config, data = tiny_run(tmp_path, 6, 6, image_size=64, epochs=3, frozen=("conv_stem", "bn1"),
                                             lr=1e30)
    train_params = dataclasses.replace(params.train, batch_size=4)
    seen: list[int] = []
    with pytest.raises(RuntimeError) as err:
        train(data, data, config, profile, train_params, on_epoch=lambda epoch, _: seen.append(epoch))
    assert type(err.value).__name__ == "TrainingDivergedError"
    assert re.fullmatch(
        r"the training loss is nan at epoch 1/3, batch 2/3, learning rate \S+: training diverged\. Lower "
        r"the learning rate \(the profile's lr, or train\.lr when it has none; a tenth is a start\) and train again",
        str(err.value),
    ), str(err.value)
    assert seen == []  # no epoch finished
