"""Shared fixtures: the real FracAtlas copy, small real subsets, and a throwaway project."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest
import yaml

if TYPE_CHECKING:
    from fracture.config import Params
    from fracture.inference import ServingConfig
    from fracture.vocabulary import Decode
    from fracture.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
#: The real FracAtlas copy the integration tests read: ../shared/fracatlas beside the checkout, as CI
#: has it, or the extracted folder FRACATLAS_TEST_DATA names.
FRACATLAS = Path(os.environ.get("FRACATLAS_TEST_DATA") or REPO.parent / "shared" / "fracatlas").resolve()
PROJECT_FILES = (  # the train stage depends on pretrained/, the split stage on split_assignments.csv
    "dvc.yaml", "params.yaml", ".dvcignore", "pretrained/README.md", "split_assignments.csv"
)
#: FracAtlas's fracture boxes (COCO JSON), where params.yaml's evaluate.boxes points.
COCO_BOXES = Path("Annotations/COCO JSON/COCO_fracture_masks.json")

# Each test process gets its own Prefect home, so concurrent runs never share one sqlite file: an
# xdist worker makes its own rather than inheriting the controller's (unless the user set one), and
# each is removed when its process ends.
if os.environ.get("PREFECT_HOME", "") in ("", os.environ.get("FRACTURE_TEST_PREFECT_HOME")):
    _home = tempfile.mkdtemp(prefix="fracture-prefect-")
    os.environ["PREFECT_HOME"] = os.environ["FRACTURE_TEST_PREFECT_HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow reads DO_NOT_TRACK only as "true"
os.environ.setdefault("DVC_NO_ANALYTICS", "1")  # the test projects made by `dvc init` would send analytics
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _share_cores_between_test_processes() -> int | None:
    """Under pytest-xdist, each test process's math threads (PyTorch's OpenMP, BLAS) get its share of
    the cores, and so do the processes it starts (a CLI, a model server, a page), through the
    environment; a setting the user made is kept.

    Two processes each running as many OpenMP threads as there are cores spin against each other:
    the page tests' fine-tuning took 220 s in each of two processes side by side, against 52 s with
    one thread each and 42 s alone. Returns the share, or ``None`` outside xdist.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // workers)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, str(share))
    share = int(os.environ["OMP_NUM_THREADS"])
    # NumPy's BLAS read its variable when pandas loaded it, above: limited where it runs now.
    import threadpoolctl  # noqa: PLC0415
    import torch  # noqa: PLC0415

    threadpoolctl.threadpool_limits(share)
    torch.set_num_threads(share)
    return share


THREADS_PER_TEST_PROCESS = _share_cores_between_test_processes()


#: Free disk the default run needs beside the venv: its temporary folders reach about 3.5 GiB (MLflow
#: runs with real networks, DVC caches, Prefect homes), and a run short of it fails test after test.
DISK_NEEDED_GIB = 4.0


def _free_gib(path: Path) -> float:
    return shutil.disk_usage(path).free / 2**30


_PYTEST_PID = os.getpid()


def _stop_as_on_ctrl_c(signum: int, frame: object) -> None:
    """SIGTERM (a CI runner's timeout or cancel) ends the run as Ctrl-C does: the running test's
    ``running`` blocks and every fixture's teardown stop the servers the tests started, which run in
    sessions of their own, out of reach of a signal to pytest's process group. A process forked from
    this one ends as SIGTERM ends it by default."""
    if os.getpid() != _PYTEST_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def pytest_configure(config: pytest.Config) -> None:
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop_as_on_ctrl_c)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The free disk where the tests write, so a run that ran out of it says so at its top."""
    temp = Path(tempfile.gettempdir())  # where pytest writes: TMPDIR, or /tmp when TMPDIR names no folder
    lines = [f"free disk: {_free_gib(temp):.1f} GiB at {temp}, {_free_gib(REPO):.1f} GiB at {REPO}"]
    if _free_gib(temp) < DISK_NEEDED_GIB:
        lines.append(f"WARNING: the default run needs about {DISK_NEEDED_GIB:.0f} GiB free at {temp}; "
                     "free some, or set TMPDIR to a larger disk, or expect tests to fail on full-disk errors")
    return lines


def shipped_params_text() -> str:
    """``params.yaml`` as the project ships it (committed), whatever this checkout's main job made of it.

    The main job writes the machine's profile into ``train.profile`` (``flows.retrain.set_profile``),
    so after ``make main`` on a CPU machine the file names ``cpu``; tests of the shipped defaults read
    the committed file. Without git history (an exported tree) the file as it is.
    """
    try:
        return subprocess.run(["git", "-C", str(REPO), "show", "HEAD:params.yaml"], capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return (REPO / "params.yaml").read_text()


def shipped_params() -> Params:
    """The parsed :func:`shipped_params_text`."""
    from fracture.config import parse_params  # noqa: PLC0415 - conftest stays importable without the package's deps

    return parse_params(yaml.safe_load(shipped_params_text()))


#: The environment variables MLflow's process-wide settings write, so that child processes inherit them.
MLFLOW_SETTINGS_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@pytest.fixture(autouse=True)
def _mlflow_settings_as_each_test_found_them():
    """Puts MLflow's tracking URI, registry URI and active experiment back as the test found them.

    ``mlflow.set_tracking_uri`` and ``mlflow.set_experiment`` set module globals and also write
    ``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_ID`` into the environment. A test that sets
    them (the ``client`` fixture), or that runs a stage command in its own process (the flow
    and fault tests: the stage's ``setup_mlflow``), would otherwise leave the next tests of its
    worker, and every process they start, pointed at its store and experiment: a run started
    there without naming an experiment would land in experiment 1 of another store.
    """
    env = {name: os.environ.get(name) for name in MLFLOW_SETTINGS_ENV}
    yield
    if "mlflow" in sys.modules:  # a test that never imported MLflow changed none of its settings
        # Private names, reset as MLflow's own test suite resets them: the public setters cannot
        # put back "not set" for the experiment.
        from mlflow.tracking import _model_registry, _tracking_service, fluent

        _tracking_service.utils._tracking_uri = None
        _model_registry.utils._registry_uri = None
        fluent._active_experiment_id = None
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def _prefect_temporary_servers_stop_while_output_is_open():
    """Stops the temporary Prefect server a flow run in this process started, at the session's end.

    Prefect stops it at interpreter exit otherwise, and logs that to a stream pytest has closed
    by then: a "Logging error" traceback after the summary of a run that passed. As Prefect's
    own test harness does on leaving, the log and event workers are drained first, so none
    of them tries to reach the stopped server.
    """
    yield
    server = sys.modules.get("prefect.server.api.server")  # imported only if a test ran a flow here
    if server is None:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    for instance in list(server.SubprocessASGIServer._instances.values()):
        instance.stop()


def run(cwd: Path, *args: str) -> str:
    """Runs a command in ``cwd``; fails the test with its output unless it exits 0."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed in {cwd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dvc(cwd: Path, *args: str) -> str:
    """``dvc <args>`` with this interpreter's DVC, in ``cwd``."""
    return run(cwd, sys.executable, "-m", "dvc", *args)


def require_fracatlas() -> Path:
    if not (FRACATLAS / "dataset.csv").is_file():
        pytest.skip(f"real FracAtlas copy not found at {FRACATLAS}: set FRACATLAS_TEST_DATA to an extracted FracAtlas folder")
    return FRACATLAS


@pytest.fixture(scope="session")
def fracatlas() -> Path:
    """The read-only real FracAtlas copy beside the repository."""
    return require_fracatlas()


def make_subset(src: Path, dest: Path, ids: list[str]) -> Path:
    """Copies the named images of a FracAtlas-layout folder, with their dataset.csv rows."""
    csv = pd.read_csv(src / "dataset.csv")
    rows = csv[csv["image_id"].isin(ids)]
    for folder in ("Fractured", "Non_fractured"):
        (dest / "images" / folder).mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        for folder in ("Fractured", "Non_fractured"):
            path = src / "images" / folder / image_id
            if path.exists():
                shutil.copyfile(path, dest / "images" / folder / image_id)
    rows.to_csv(dest / "dataset.csv", index=False)
    coco_file = src / COCO_BOXES
    if coco_file.is_file():  # the fracture boxes of the chosen images, as FracAtlas ships them
        coco = json.loads(coco_file.read_text())
        images = [im for im in coco["images"] if im["file_name"] in set(ids)]
        kept = {im["id"] for im in images}
        coco |= {"images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in kept]}
        (dest / COCO_BOXES).parent.mkdir(parents=True, exist_ok=True)
        (dest / COCO_BOXES).write_text(json.dumps(coco))
    return dest


def pick_ids(src: Path, n_fractured: int, n_non: int) -> list[str]:
    """The first ids of each class folder, sorted, for reproducible small subsets."""
    frac = sorted(p.name for p in (src / "images" / "Fractured").iterdir())[:n_fractured]
    non = sorted(p.name for p in (src / "images" / "Non_fractured").iterdir())[:n_non]
    return frac + non


@pytest.fixture()
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An MLflow client on a throwaway SQLite store, set as the tracking URI with an experiment of its own."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri()))
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


@pytest.fixture()
def subset_source(tmp_path: Path, fracatlas: Path) -> Path:
    """A small real FracAtlas subset (30 fractured, 30 not) in the published layout."""
    return make_subset(fracatlas, tmp_path / "source", pick_ids(fracatlas, 30, 30))


#: The evaluate stage's bootstrap resamples in a shrunk project: its intervals on a few dozen images
#: in a fifth of the time params.yaml's 1,000 take (about 5 s an evaluate run on two cores).
SHRUNK_RESAMPLES = 200


def shrink_params(project: Path, **overrides: object) -> None:
    """Starts from the real params.yaml and shrinks it: CPU profile, tiny images, one epoch, and
    :data:`SHRUNK_RESAMPLES` bootstrap resamples for the evaluate stage's intervals."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["train"]["profile"] = "cpu"
    params["profiles"]["cpu"].update(image_size=64, epochs=1)
    params["evaluate"]["bootstrap_resamples"] = SHRUNK_RESAMPLES
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(root: Path) -> Path:
    """A throwaway checkout of the project at ``root``: its pipeline, params and code, git and DVC."""
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        (root / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "fracture", root / "fracture", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throwaway copy of the project (git + DVC) with shrunk params and its own MLflow store."""
    root = copy_project(tmp_path / "project")
    shrink_params(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FRACATLAS_SOURCE", raising=False)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return root


def untrained_model_files(folder: Path, threshold: float, decode: Decode = "full") -> tuple[Path, ServingConfig]:
    """A real Lite0 (ImageNet weights, untrained head) saved as the train stage saves it, at 64 px.

    ``decode``: how its data config decodes JPEGs.
    Returns the safetensors file and the serving config (``model.json`` plus ``threshold``).
    """
    from safetensors.torch import save_file

    from fracture.config import load_params
    from fracture.inference import ServingConfig
    from fracture.model import create_classifier, data_config

    profile = load_params(REPO).profiles["cpu"]
    model = create_classifier(profile)
    weights = folder / "model.safetensors"
    save_file(model.state_dict(), str(weights))
    extra = {"profile": "cpu", "classes": ["not_fractured", "fractured"]}
    return weights, ServingConfig(profile.model, data_config(model, 64, decode=decode), threshold, extra)


def write_trained_classifier(workspace: Workspace, run_id: str, experiment_id: str) -> None:
    """A classifier the train stage could have left in ``workspace``: a random Lite0 at 64 px for run ``run_id``.

    For the detector's stages, which start from the classifier's weights and record its run.
    """
    import timm
    from safetensors.torch import save_file

    from fracture.data_config import DataConfig
    from fracture.workspace import TrainedModel

    workspace.train_dir.mkdir(parents=True)
    save_file(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).state_dict(),
              str(workspace.weights))
    data = DataConfig((3, 64, 64), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    model = TrainedModel("tf_efficientnet_lite0", "cpu", ["not_fractured", "fractured"], data, 1, 0.5)
    workspace.write_train(model, run_id, experiment_id, [])


def ranking_model_files(
    folder: Path, threshold: float, images: list[Path], labels: list[int], direction: float = 1.0
) -> tuple[Path, ServingConfig]:
    """A real Lite0 at 64 px whose head separates ``images`` by their labels (``direction`` -1: the reverse).

    The head is a nearest-class-mean rule on the ImageNet features of those very images, so on
    them the model ranks fractured above not fractured (or below, reversed): a genuinely
    better or worse model for the promotion gate to compare, scored through the registry.
    """
    import torch
    from safetensors.torch import save_file

    from fracture.decoding import open_xray
    from fracture.inference import Classifier

    weights, config = untrained_model_files(folder, threshold)
    classifier = Classifier.load(weights, config)
    network = classifier.network
    with torch.no_grad():
        features = network.forward_head(
            network.forward_features(classifier.batch([open_xray(p) for p in images])), pre_logits=True
        )
        y = torch.tensor(labels, dtype=torch.bool)
        axis = features[y].mean(0) - features[~y].mean(0)
        centre = (features[y].mean(0) + features[~y].mean(0)) / 2
        scale = direction * 4.0 / float((features @ axis).std())
        head = network.get_classifier()
        head.weight.copy_(torch.stack([-axis, axis]) * scale / 2)
        head.bias.copy_(torch.tensor([1.0, -1.0]) * float(centre @ axis) * scale / 2)
    out = folder / f"ranking{'+' if direction > 0 else '-'}.safetensors"
    save_file(network.state_dict(), str(out))
    return out, config
