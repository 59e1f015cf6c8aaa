"""Data-parallel training: two gloo processes on the CPU end where one process ends."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import mlflow
import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from torch.utils.data import RandomSampler, TensorDataset, WeightedRandomSampler

from fracture import distributed
from fracture.config import ConfigError, load_params, parse_params
from fracture.imaging import Preprocessor
from fracture.model import profile_data_config
from fracture.training import train, train_mode
from tasks.pipeline import repro
from tests.conftest import REPO, dvc, make_subset, pick_ids, run, shrink_params
from tests.servers import free_port
from tests.synthetic import make_dataset, training_frame
from tests.test_dvc_remote import git, publish
from tests.test_prepare import tensor_data

# A tiny timm EfficientNet with group norm: no batch statistics, so splitting a batch over two
# processes changes nothing but the order of floating-point sums. (PyTorch's SyncBatchNorm is
# CUDA only; on CPU workers, a batch-norm model normalises each process's share on its own.)
GN_MODEL = "test_efficientnet_gn.r160_in1k"
# Stated tolerance between the two-process and the one-process run after 2 epochs of Adam: the
# gradients agree to float32 rounding, but Adam divides by the gradient's running RMS, so where a
# gradient is near zero a rounding difference can flip a step's sign (at most lr per step). The
# weights therefore agree relative to how far training moved them: the L2 norm of the difference
# is at most 1% of the L2 norm of the training update (measured: about 0.03%).
RELATIVE_TOLERANCE = 0.01
SCORE_ATOL = 1e-4


def seeded_network(name: str) -> torch.nn.Module:
    """timm's ``name``, randomly initialised under a fixed seed: the start both runs train from, drawn
    from the process's stream, would change from run to run, and the differences measured with it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False)


def _setup(tmp_path):
    make_dataset(tmp_path, 6, 10)
    network = seeded_network(GN_MODEL)
    weights = tmp_path / "gn.safetensors"
    save_file(network.state_dict(), str(weights))
    params = load_params(REPO)
    profile = dataclasses.replace(
        params.profiles["cpu"], model=GN_MODEL, weights="file", weights_file=str(weights),
        image_size=32, epochs=2, frozen=(), augment="none", tta="none", lr=1e-3,
    )
    config = profile_data_config(profile)
    data = tensor_data(tmp_path, training_frame(tmp_path), config)
    train_params = dataclasses.replace(params.train, batch_size=4, device="cpu", seed=3)
    return data, config, profile, train_params


def _rank_run(images, labels, config, profile, train_params):
    """One process's run (module level, so the launcher can pickle it into each process)."""
    data = TensorDataset(images, labels)
    fit = train(data, data, config, profile, train_params)
    return {
        "rank": torch.distributed.get_rank(),
        "world_size": torch.distributed.get_world_size(),
        "state": {k: v.numpy().copy() for k, v in fit.model.state_dict().items()},
        "history": fit.history,
        "best_epoch": fit.best_epoch,
        "val": fit.final_val_probabilities,
    }


def _rank_projects_compared():
    """Which ranks each rank finds unlike rank 0: all the same, then rank 1's project another."""
    context = distributed.setup(use_cuda=False)
    return {"same": distributed.ranks_unlike_main("project", context),
            "one_differs": distributed.ranks_unlike_main("project" if context.rank == 0 else "stale copy", context)}


def _rank_runs(runs):
    """One process's share of each of ``runs`` (name -> function and its arguments), one after
    another in the same process group: ``train`` joins the group the first run set up."""
    try:
        return {name: run(*args) for name, (run, args) in runs.items()}
    finally:
        distributed.teardown()


@dataclasses.dataclass(frozen=True)
class GlooRuns:
    """The two-process runs the tests below check: each one's arguments, and what each rank returned."""

    inputs: dict[str, tuple]
    ranks: dict[str, dict[int, dict]]


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory) -> GlooRuns:
    """Every two-process run the tests below check, in one launch of two gloo processes: starting
    them (each importing torch, timm and this package) takes longer than these small runs."""
    folder = tmp_path_factory.mktemp("gloo")
    data, config, profile, train_params = _setup(folder)
    images, labels = data.tensors
    weights = folder / "bn.safetensors"
    save_file(seeded_network("test_efficientnet").state_dict(), str(weights))
    batch_norm = dataclasses.replace(profile, model="test_efficientnet", weights_file=str(weights))
    bn_config = profile_data_config(batch_norm)
    bn_images, bn_labels = tensor_data(folder, training_frame(folder), bn_config).tensors
    runs = {
        **{balance: (_rank_run, (images, labels, config, profile, dataclasses.replace(train_params, class_balance=balance)))
           for balance in ("none", "weighted_loss")},
        "batch_norm": (_rank_run, (bn_images, bn_labels, bn_config, batch_norm, train_params)),
        "projects": (_rank_projects_compared, ()),
        # Last: it replaces the augmentation in the processes it runs in.
        "augmentation": (_rank_augmentation_draws,
                         (images, labels, config, dataclasses.replace(profile, augment="light"), train_params)),
    }
    # Spawned processes re-run the parent's __main__ script. In a full test session another
    # test may have left a Streamlit page there (its AppTest runs the page as __main__); the
    # entry point here is importable, so the children need no main script at all.
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
        ranks = distributed.launch(_rank_runs, 2, runs)
    return GlooRuns({name: args for name, (_, args) in runs.items()},
                    {name: {rank: answers[name] for rank, answers in ranks.items()} for name in runs})


def test_every_rank_learns_which_machines_project_is_not_rank_0s(gloo_runs):
    """The train stage compares each rank's run key (split, cache, params, code) with rank 0's:
    every rank learns of a machine whose project differs, so all stop at once, none left waiting."""
    assert gloo_runs.ranks["projects"] == {rank: {"same": [], "one_differs": [1]} for rank in (0, 1)}


@pytest.mark.parametrize("class_balance", ["none", "weighted_loss"])
def test_two_gloo_processes_end_with_one_processs_weights(gloo_runs, class_balance):
    images, labels, config, profile, train_params = gloo_runs.inputs[class_balance]
    assert train_params.class_balance == class_balance
    ranks = gloo_runs.ranks[class_balance]
    data = TensorDataset(images, labels)
    single = train(data, data, config, profile, train_params)

    assert sorted((r["rank"], r["world_size"]) for r in ranks.values()) == [(0, 2), (1, 2)]
    zero, one = ranks[0], ranks[1]
    # Both ranks: the same weights, bit for bit, and the same val scores, epoch and history.
    assert zero["state"].keys() == one["state"].keys()
    for key in zero["state"]:
        assert np.array_equal(zero["state"][key], one["state"][key]), key
    assert np.array_equal(zero["val"], one["val"])
    assert zero["best_epoch"] == one["best_epoch"]

    # Against one process on the same data and global batch: equal within the stated tolerance.
    reference = {k: v.numpy().astype(np.float64) for k, v in single.model.state_dict().items()}
    assert reference.keys() == zero["state"].keys()
    start = timm_start(profile)
    trained = [k for k in reference if k.startswith(("conv_stem", "blocks.", "conv_head"))]

    def norm(arrays):
        return float(np.sqrt(sum(float((a**2).sum()) for a in arrays)))

    update = norm(reference[k] - start[k] for k in trained)
    difference = norm(zero["state"][k] - reference[k] for k in reference)
    print(f"2 gloo processes vs 1 process ({class_balance}): |weights difference| / |training update| = "
          f"{difference / update:.2e} (tolerance {RELATIVE_TOLERANCE:g}); largest element "
          f"{max(float(np.abs(zero['state'][k] - reference[k]).max()) for k in reference):.2e}")
    assert update > 0.01  # training moved the weights
    assert difference <= RELATIVE_TOLERANCE * update
    np.testing.assert_allclose(zero["val"], single.final_val_probabilities, atol=SCORE_ATOL)
    assert zero["best_epoch"] == single.best_epoch
    for mine, theirs in zip(zero["history"], single.history, strict=True):
        # Each rank summed the other's loss and images in: the epoch's figures are the run's.
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)
        assert mine["val_roc_auc"] == pytest.approx(theirs["val_roc_auc"], abs=1e-9)


def test_two_gloo_processes_of_a_batch_norm_model_end_with_one_set_of_statistics(gloo_runs):
    """Without synchronised batch norm (CUDA only) each process updates its running statistics
    from its own share; before the ranks score their shares of val they take rank 0's, so every
    rank holds the model rank 0 saves and the val scores that picked the epoch are that model's."""
    images, _, config, profile, _ = gloo_runs.inputs["batch_norm"]
    assert profile.model == "test_efficientnet"
    ranks = gloo_runs.ranks["batch_norm"]
    assert sorted((r["rank"], r["world_size"]) for r in ranks.values()) == [(0, 2), (1, 2)]
    zero, one = ranks[0], ranks[1]
    statistics = [k for k in zero["state"] if k.endswith(("running_mean", "running_var"))]
    assert statistics
    for key in zero["state"]:
        assert np.array_equal(zero["state"][key], one["state"][key]), key
    # The val scores both ranks gathered are rank 0's model's, scored here on its own.
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=2)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in zero["state"].items()})
    with torch.no_grad():
        x = Preprocessor(config).network_input(images, torch.device("cpu"))
        own = torch.softmax(model.eval()(x), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(zero["val"], own, atol=1e-5)


@pytest.mark.parametrize(
    ("images", "batch", "world", "synced", "drops"),
    [
        (10, 4, 1, False, False),  # one process: last batch of 2
        (9, 4, 1, False, True),  # one process: last batch of 1
        (10, 4, 2, True, False),  # GPUs, synchronised: the global last batch of 2, as one process
        (9, 4, 2, True, True),  # GPUs: the global last batch of 1, as one process
        (10, 4, 2, False, True),  # CPUs: each process's last share would be 1 image
    ],
)
def test_the_last_batch_sits_out_only_where_batch_norm_would_train_on_one_image(images, batch, world, synced, drops):
    assert distributed.drops_lone_last(images, batch, world, synced) is drops


def test_frozen_layers_train_as_at_inference():
    """Stochastic depth and dropout stay off in the layers kept at their pretrained weights."""
    torch.manual_seed(0)
    # Lite0's blocks.1.1 adds its input back, so stochastic depth drops it for an image (p 0.11 here) in
    # training; test_efficientnet's blocks add nothing back, and so never drop anything.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, drop_path_rate=0.9)
    frozen = ("conv_stem", "bn1", "blocks.0", "blocks.1")
    train_mode(model, model, frozen)
    assert all(not m.training for name in frozen for m in model.get_submodule(name).modules())
    assert model.get_submodule("blocks.2").training and model.training
    x = torch.randn(64, 3, 32, 32)
    prefix = torch.nn.Sequential(model.conv_stem, model.bn1, model.blocks[0], model.blocks[1])
    assert torch.equal(prefix(x), prefix(x))  # no stochastic depth drawn in them
    model.train()  # the same layers training: each pass draws which images skip blocks.1
    assert not torch.equal(prefix(x), prefix(x))


def _rank_augmentation_draws(images, labels, config, profile, train_params):
    """One process's run, recording a draw from the global generator as each image is augmented."""
    from fracture import training  # noqa: PLC0415 - patched in this process only

    draws: list[float] = []

    def recording(_name):
        def augment(image):
            draws.append(float(torch.rand(())))  # as a random flip or rotation draws
            return image

        return augment

    training.augmentation = recording
    data = TensorDataset(images, labels)
    train(data, data, config, profile, train_params)
    return {"rank": torch.distributed.get_rank(), "draws": draws}


def test_each_process_draws_its_own_augmentation(gloo_runs):
    ranks = gloo_runs.ranks["augmentation"]
    zero, one = ranks[0]["draws"], ranks[1]["draws"]
    # Each rank augments its share of 2 epochs (16 images over 2 ranks).
    assert len(zero) == len(one) == 16
    # Alike, each rank's k-th image would get the other's flip and rotation.
    assert not set(zero) & set(one)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_one_process_global_batch_loss_is_the_weighted_mean(label_smoothing):
    """Summed and divided by the batch's class weights, as PyTorch's weighted mean divides."""
    weights = torch.tensor([0.6, 2.8])
    criterion = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)
    logits = torch.randn(7, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    target = torch.tensor([0, 0, 1, 0, 0, 0, 1])
    wrapped = distributed.GlobalBatchLoss(criterion, distributed.Context())
    expected, got = criterion(logits, target), wrapped(logits, target)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    (grad_expected,) = torch.autograd.grad(expected, logits)
    (grad_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(grad_got, grad_expected)


def timm_start(profile) -> dict[str, np.ndarray]:
    """The profile's weights before training (the file it loads, with its ImageNet head)."""
    from safetensors.torch import load_file

    return {k: v.numpy() for k, v in load_file(profile.weights_file).items()}


def test_ranks_deal_out_the_single_process_order_and_pad_it_evenly():
    base = list(RandomSampler(range(11), generator=torch.Generator().manual_seed(0)))
    shares = [
        list(distributed.ShardedSampler(RandomSampler(range(11), generator=torch.Generator().manual_seed(0)), r, 3))
        for r in range(3)
    ]
    assert [len(s) for s in shares] == [4, 4, 4]  # 11 padded to 12: every rank takes as many steps
    dealt = [shares[i % 3][i // 3] for i in range(12)]
    assert dealt == base + base[:1]
    alone = distributed.ShardedSampler(RandomSampler(range(11), generator=torch.Generator().manual_seed(0)))
    assert list(alone) == base  # one process: the order is exactly the plain sampler's

    def weighted():  # each rank's own sampler, seeded alike
        return WeightedRandomSampler([0.1] * 8 + [0.9] * 2, 10, generator=torch.Generator().manual_seed(1))

    drawn = list(weighted())
    both = [list(distributed.ShardedSampler(weighted(), r, 2)) for r in range(2)]
    assert [i for pair in zip(*both, strict=True) for i in pair] == drawn  # the class-balanced draws too


def test_the_global_batch_must_divide_over_the_processes():
    assert distributed.per_process_batch(16, 4) == 4
    with pytest.raises(ValueError, match=r"train.batch_size 16 does not divide over 3 processes"):
        distributed.per_process_batch(16, 3)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["processes"] = 3
    with pytest.raises(ConfigError, match=r"train.batch_size 16 is the global batch .* train.processes 3"):
        parse_params(raw)
    raw["train"]["processes"] = 0
    with pytest.raises(ConfigError, match=r"train.processes must be a whole number of at least 1"):
        parse_params(raw)


@pytest.mark.integration  # about 20 s: the switch in params.yaml, through DVC, as every run uses it
def test_train_stage_with_two_processes_logs_one_mlflow_run_from_rank_zero(project, fracatlas, tmp_path):
    source = make_subset(fracatlas, tmp_path / "source", pick_ids(fracatlas, 8, 8))
    shrink_params(project, train__processes=2, train__batch_size=4, profiles__cpu__epochs=2, profiles__cpu__image_size=32)
    run(project, sys.executable, "-m", "fracture.cli", "ingest", "--source", str(source))
    # As the retrain flow runs it: DVC in this process, and `fracture train` in it too, launching the two ranks.
    for stage in ("validate", "split", "prepare", "train"):
        assert repro(project, stage).ran
    assert "Data and pipelines are up to date" in dvc(project, "status", "train")
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # rank 1 trained without a run of its own
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_roc_auc")]
    members = load_params(project).profiles["cpu"].members  # each member's epochs, numbered on
    assert steps == list(range(1, 2 * members + 1))  # each epoch logged once, by rank 0
    assert json.loads((project / "outputs" / "train" / "run.json").read_text())["run_id"] == runs[0].info.run_id
    assert runs[0].data.params["train.processes"] == "2"
    assert (runs[0].data.tags["world_size"], runs[0].data.tags["machines"]) == ("2", "1")


def _readme_two_machine_command() -> list[str]:
    """The torchrun command docs/operations.md gives for training across machines, continuation joined."""
    readme = (REPO / "docs" / "operations.md").read_text()
    found = re.search(r"^ +(\.venv/bin/torchrun --nnodes 2 .*?)\n(?! +--)", readme, flags=re.MULTILINE | re.DOTALL)
    assert found, "docs/operations.md: no `.venv/bin/torchrun --nnodes 2` command"
    return re.sub(r"\\\n\s*", " ", found[1]).split()


# About 30 s on two cores: two clones, a DVC remote and two torchrun launchers. Slow (make test-all);
# the default run keeps the same launcher on one machine
# (test_train_stage_with_two_processes_logs_one_mlflow_run_from_rank_zero).
@pytest.mark.slow
@pytest.mark.integration
def test_the_readmes_two_machine_command_trains_once_with_rank_zeros_machine_writing(project, fracatlas, tmp_path):
    """The steps across machines in docs/operations.md, each machine a torchrun launcher in its own clone, on loopback."""
    shutil.copy(REPO / ".gitignore", project / ".gitignore")
    source = make_subset(fracatlas, tmp_path / "source", pick_ids(fracatlas, 8, 8))
    shrink_params(project, train__batch_size=4, profiles__cpu__image_size=32)
    run(project, sys.executable, "-m", "fracture.cli", "ingest", "--source", str(source))
    for stage in ("validate", "split", "prepare"):
        assert repro(project, stage).ran
    # The second machine: the same commit, the split and prepared images pulled from the DVC remote.
    publish(project, tmp_path / "remote")
    node1 = tmp_path / "node1"
    git(tmp_path, "clone", "-q", str(project), str(node1))
    dvc(node1, "pull", "split", "prepare")

    command = _readme_two_machine_command()
    assert command[command.index("--rdzv-backend") + 1] == "static"  # node 0 holds rank 0
    port = str(free_port())
    values = {"--nproc-per-node": "1", "--master-addr": "127.0.0.1", "--master-port": port}
    launchers = []
    for rank, cwd in enumerate((project, node1)):
        args = [Path(sys.executable).parent / "torchrun", *command[1:]]
        for option, value in {**values, "--node-rank": str(rank)}.items():
            at = args.index(option) + 1
            if option == "--node-rank":
                assert args[at] == "<0" and args[at + 1:at + 3] == ["or", "1>"]
                del args[at + 1:at + 3]
            args[at] = value
        log = (tmp_path / f"node{rank}.log").open("w")  # the project fixture left MLFLOW_TRACKING_URI unset
        launchers.append((subprocess.Popen([str(a) for a in args], cwd=cwd, stdout=log, stderr=log), log))
    try:
        for proc, _ in launchers:
            proc.wait(timeout=600)
    finally:  # a launcher left waiting for a failed one is stopped with the test
        for proc, log in launchers:
            proc.kill()
            proc.wait()
            log.close()
    outputs = {rank: (tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)}
    assert [proc.returncode for proc, _ in launchers] == [0, 0], outputs

    weights = "outputs/train/model.safetensors"
    assert (project / weights).is_file()
    assert not (node1 / weights).exists()  # rank 1 trained its share and wrote nothing
    assert "best epoch 1" in outputs[0] and "best epoch" not in outputs[1]
    # Then, on node 0: record the outputs in dvc.lock (as docs/operations.md: --force, since no one is asked
    # to confirm), and `dvc repro` evaluates them and nothing else.
    assert ".venv/bin/dvc commit --force train" in (REPO / "docs" / "operations.md").read_text()
    dvc(project, "commit", "--force", "train")
    assert "Data and pipelines are up to date" in dvc(project, "status", "train")
    reproduced = dvc(project, "repro")
    assert "Running stage 'evaluate'" in reproduced and "Running stage 'train'" not in reproduced
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # rank 0's, on node 0
    tags = runs[0].data.tags
    assert (tags["world_size"], tags["machines"], runs[0].data.params["train.processes"]) == ("2", "2", "1")
    assert not (node1 / "mlflow.db").exists()
