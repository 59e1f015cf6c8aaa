"""The clinician's page (app/) through Streamlit's AppTest, with real models in a real registry.

Registries the tests read:

- ``page_registry``, once per test process: the CPU profile's ImageNet model with a fresh
  two-class head, registered as ``@champion`` in a throwaway sqlite MLflow store. Enough for
  everything that does not need a model that has learned fractures: bad uploads, the size
  limit, what the page shows.
- ``trained_page``, once per test run, read by all its processes: the same architecture
  fine-tuned for a few epochs on a small balanced set of real FracAtlas images, registered the
  way the pipeline registers, with the decision threshold chosen on its validation images. It
  proves the label order on held-out images the model never saw.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import streamlit as st
import torch
from filelock import FileLock
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest
from torch.utils.data import TensorDataset

from fracture.config import DetectParams, load_params
from fracture.data_config import DataConfig
from fracture.detection import (
    MAX_DETECTIONS,
    BoxedImages,
    DetectorConfig,
    build_detector,
    detect,
    mean_average_precision,
    train_detector,
)
from fracture.detector_registry import DetectorTestSplit, register_detector
from fracture.evaluation import choose_threshold
from fracture.explain import grad_cam, overlay, target_layer, to_image_grid
from fracture.gate import split_fingerprint
from fracture.imaging import CLASSES, Preprocessor
from fracture.inference import ServingConfig, mirror, probabilities
from fracture.intake import InputPolicy
from fracture.localisation import read_coco_boxes
from fracture.model import create_classifier, data_config, profile_data_config
from fracture.packaging import log_detector_pyfunc, log_pyfunc
from fracture.registry import CHAMPION
from fracture.training import seed_ensemble, train
from fracture.vocabulary import Tta
from tests.conftest import COCO_BOXES, REPO, require_fracatlas
from tests.dicom_files import dicom_from_jpeg
from tests.synthetic import ihdr_png

APP = REPO / "app"
PAGE = APP / "streamlit_app.py"
PAGE_TIMEOUT = 300  # the first run loads the model from the registry
STREAMLIT_DEFAULT_UPLOAD_MB = 200
LABEL_CONFLICTS = {"IMG0003298.jpg"}  # in images/Fractured, but dataset.csv says 0 (data card)


@pytest.fixture(autouse=True)
def _main_module_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streamlit's script runner installs the page as ``sys.modules["__main__"]`` and leaves it there.
    Put back after each test: a process that spawns workers later in this run (the train stage with
    ``train.processes: 2``) would otherwise have each worker run the page as its main module."""
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])


@dataclass(frozen=True)
class PageRegistry:
    """A throwaway MLflow store holding one registered model version with alias ``champion``."""

    uri: str
    name: str
    version: str
    threshold: float


@dataclass(frozen=True)
class PageDetector:
    """The fracture detector registered beside the page's classifier (its first version, so champion)."""

    name: str
    version: str
    threshold: float


@dataclass(frozen=True)
class TrainedPage:
    """A fine-tuned model and a detector on its backbone in their registry, and the held-out images
    with both champions' output."""

    registry: PageRegistry
    held_out: pd.DataFrame  # path, fractured (folder label), fracture_probability, label, threshold, boxes, fracture_score
    detector: PageDetector


def register_for_page(
    root: Path,
    model: torch.nn.Module,
    architecture: str,
    data: DataConfig,
    threshold: float,
    name: str,
    extra: dict | None = None,
    tta: Tta = "none",
) -> PageRegistry:
    """Registers ``model`` as the first version (hence champion) of ``name`` in a new sqlite store;
    ``extra``: more keys of its ``model.json``; ``tta``: how it scores."""
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    weights = root / "model.safetensors"
    save_file(model.state_dict(), str(weights))
    serving = ServingConfig(
        architecture, data, threshold, {"profile": "cpu", "classes": list(CLASSES)} | (extra or {}), tta
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            experiment = mlflow.create_experiment("page", artifact_location=(root / "art").as_uri())
            mlflow.set_experiment(experiment_id=experiment)
            with mlflow.start_run() as run:
                pass
            # The pipeline's own logging (model code, preprocessing, signature); promotion
            # policy is the registry's business, so the alias is set directly here.
            mv = mlflow.register_model(log_pyfunc(run.info.run_id, weights, serving), name)
            MlflowClient(uri).set_registered_model_alias(name, CHAMPION, mv.version)
        finally:
            mlflow.set_tracking_uri(None)
    return PageRegistry(uri, name, str(mv.version), threshold)


@pytest.fixture(scope="session")
def page_registry(tmp_path_factory: pytest.TempPathFactory) -> PageRegistry:
    profile = load_params(REPO).profiles["cpu"]
    # Its head seeded: drawn from the process's random state (which PyTorch seeds afresh in every
    # process), it depended on that seed and on the tests run before it in the process, and so did
    # the probabilities the page's tests build their cases around.
    model = seeded_head(create_classifier(profile).eval(), 0)
    root = tmp_path_factory.mktemp("page-registry")
    return register_for_page(root, model, profile.model, data_config(model, 96), 0.5, "page-untrained")


@pytest.fixture(scope="session")
def page_registry_hflip(tmp_path_factory: pytest.TempPathFactory) -> PageRegistry:
    """An untrained network served as the CPU profile serves, each X-ray with its mirror."""
    profile = load_params(REPO).profiles["cpu"]
    model = seeded_head(create_classifier(profile).eval(), 0)
    root = tmp_path_factory.mktemp("page-registry-hflip")
    return register_for_page(root, model, profile.model, data_config(model, 96), 0.5, "page-hflip", tta="hflip")


@pytest.fixture(scope="session")
def ensemble_page_registry(tmp_path_factory: pytest.TempPathFactory) -> PageRegistry:
    """Two members of the CPU profile (equal ImageNet layers, heads drawn under two seeds) as one champion."""
    profile = load_params(REPO).profiles["cpu"]
    members = []
    with torch.random.fork_rng():  # the tests after this fixture draw from the global stream as they did before it
        for seed in (0, 1):
            torch.manual_seed(seed)
            members.append(create_classifier(profile).eval())
    model = seed_ensemble(members, profile.frozen)  # as fit_members builds it
    root = tmp_path_factory.mktemp("page-ensemble")
    return register_for_page(root, model, profile.model, data_config(members[0], 96), 0.5, "page-ensemble",
                             extra={"members": 2, "member_best_epochs": [2, 3]})


def _distinct(paths: list[Path]) -> list[Path]:
    """Drops byte-identical copies (FracAtlas has some) so no image is in two splits."""
    seen, out = set(), []
    for path in paths:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append(path)
    return out


def _complete(path: Path) -> bool:
    """Whether the JPEG decodes without truncated loading (the served model refuses cut files)."""
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except OSError:
        return False


_TRAINED: dict[str, TrainedPage] = {}


def trained_page_for(tmp_path_factory: pytest.TempPathFactory) -> TrainedPage:
    """The trained page (:func:`train_page`), built once per test run and read by every test process.

    pytest-xdist's processes of one run make their temporary folders side by side: the first to
    get here trains into a folder beside them, under a file lock, and leaves the result there;
    the others wait on the lock and read it. The registry is only read from then on.
    """
    if "model" in _TRAINED:
        return _TRAINED["model"]
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root, done = base / "trained-page", base / "trained-page.pickle"
    with FileLock(base / "trained-page.lock"):
        if done.is_file():
            trained = pickle.loads(done.read_bytes())
        else:
            shutil.rmtree(root, ignore_errors=True)  # a registry half made by a try that failed
            trained = train_page(root)
            done.write_bytes(pickle.dumps(trained))
    _TRAINED["model"] = trained
    return trained


def train_page(root: Path) -> TrainedPage:
    """Fine-tunes and registers a small real model in a registry under ``root``.

    150 + 150 training, 30 + 30 validation and 40 + 40 held-out images, drawn by a seeded
    shuffle from the two class folders; 128 px, 4 epochs, early layers frozen at their ImageNet
    weights (about 40 s on two idle cores).
    """
    src = require_fracatlas() / "images"
    pools = {}
    for label, folder in ((1, "Fractured"), (0, "Non_fractured")):
        paths = sorted(p for p in (src / folder).iterdir() if p.name not in LABEL_CONFLICTS)
        random.Random(0).shuffle(paths)
        pools[label] = [p for p in _distinct(paths[:300]) if _complete(p)][:220]
        assert len(pools[label]) == 220, f"too few complete, distinct {folder} images in {src}"
    splits = {"train": (0, 150), "val": (150, 180), "held_out": (180, 220)}
    chosen = {k: [(p, y) for y in (1, 0) for p in pools[y][a:b]] for k, (a, b) in splits.items()}

    params = load_params(REPO)
    frozen = ("conv_stem", "bn1", "blocks.0", "blocks.1")
    profile = replace(params.profiles["cpu"], image_size=128, epochs=4, frozen=frozen)
    cfg = profile_data_config(profile)
    pre = Preprocessor(cfg)

    def dataset(rows: list[tuple[Path, int]]) -> TensorDataset:
        images = pre.load([p for p, _ in rows], allow_truncated=False, workers=2)
        return TensorDataset(images, torch.tensor([y for _, y in rows]))

    train_ds, val_ds = dataset(chosen["train"]), dataset(chosen["val"])
    result = train(train_ds, val_ds, cfg, profile, replace(params.train, device="cpu"))
    val_probs = probabilities(result.model, val_ds.tensors[0], pre, torch.device("cpu"), 64)
    threshold = choose_threshold(val_ds.tensors[1].numpy(), val_probs, params.evaluate.target_sensitivity or 0.85)
    registry = register_for_page(root, result.model, profile.model, result.data_config, threshold, "page-trained")

    # The held-out images go through the champion exactly as a registry consumer loads it.
    mlflow.set_tracking_uri(registry.uri)
    try:
        champion = mlflow.pyfunc.load_model(f"models:/{registry.name}@{CHAMPION}")
        frame = pd.DataFrame({"path": [str(p) for p, _ in chosen["held_out"]]})
        images = [p.read_bytes() for p, _ in chosen["held_out"]]
        # In requests of at most 32 rows, below the model's row limit (serve.max_rows).
        out = pd.concat(
            [champion.predict(pd.DataFrame({"image": images[i : i + 32]})) for i in range(0, len(images), 32)],
            ignore_index=True,
        )
        assert (out["error"] == "").all(), out["error"].tolist()
    finally:
        mlflow.set_tracking_uri(None)
    held_out = pd.concat([frame, pd.Series([y for _, y in chosen["held_out"]], name="fractured"), out], axis=1)
    detector, found = train_page_detector(root, registry, result.model, profile.model, cfg, chosen)
    held_out = pd.concat([held_out, found], axis=1)
    return TrainedPage(registry, held_out, detector)


def train_page_detector(
    root: Path, registry: PageRegistry, classifier: torch.nn.Module, architecture: str, cfg: DataConfig,
    chosen: dict[str, list[tuple[Path, int]]],
) -> tuple[PageDetector, pd.DataFrame]:
    """Fine-tunes a detector on the page classifier's backbone and registers it through the detector's gate.

    The train images with FracAtlas fracture boxes and as many negatives, 128 px, one epoch; the
    threshold is chosen on the val images, and the held-out ones are its test split. Returns the
    registered detector and its ``boxes`` and ``fracture_score`` for each held-out image, as the
    registry serves them.
    """
    boxes = read_coco_boxes(require_fracatlas() / COCO_BOXES)

    def boxed(rows: list[tuple[Path, int]]) -> tuple[BoxedImages, list[np.ndarray], np.ndarray]:
        kept = [(p, y) for p, y in rows if (p.name in boxes) == bool(y)]
        truth = [boxes[p.name].boxes if y else np.zeros((0, 4)) for p, y in kept]
        return BoxedImages([p for p, _ in kept], truth, 128), truth, np.array([y for _, y in kept])

    train_set, _, _ = boxed(chosen["train"])
    val_set, val_truth, val_labels = boxed(chosen["val"])
    test_set, test_truth, _ = boxed(chosen["held_out"])
    config = DetectorConfig(architecture, "fcos", 128, 64, cfg.mean, cfg.std)
    torch.manual_seed(0)
    model = build_detector(config, classifier.state_dict())
    trained = train_detector(model, train_set, val_set, val_truth, epochs=1, batch_size=8, lr=1e-3, weight_decay=1e-4,
                             negatives_per_positive=1.0, seed=0)
    model.load_state_dict(trained.state)
    threshold = choose_threshold(val_labels, detect(model, val_set).top_scores(), 0.85)
    weights = root / "detector.safetensors"
    save_file(trained.state, str(weights))
    described = config.to_dict() | {"threshold": threshold, "input": InputPolicy().to_dict()}
    frame = pd.DataFrame({"image_id": [p.name for p in test_set.paths], "label": [int(len(t) > 0) for t in test_truth]})
    split = DetectorTestSplit(split_fingerprint(frame), tuple(test_set.paths), tuple(test_truth))
    mlflow.set_tracking_uri(registry.uri)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", registry.uri)
            with mlflow.start_run(tags={"classifier_run_id": "page"}) as run:
                mlflow.log_metric("test_map_50", mean_average_precision(detect(model, test_set), test_truth)["map_50"])
            reg = register_detector(replace(DetectParams(), floors={}), run.info.run_id, weights, described, split,
                                    isolated=False)  # the page's registry: the gate is test_detector_registry's
            assert reg.champion, reg.summary()
            served = mlflow.pyfunc.load_model(f"models:/{reg.name}@{CHAMPION}")
            paths = [Path(p) for p, _ in chosen["held_out"]]
            found = pd.concat(
                [served.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths[i : i + 16]]}))
                 for i in range(0, len(paths), 16)], ignore_index=True,
            )
    finally:
        mlflow.set_tracking_uri(None)
    return PageDetector(reg.name, reg.version, threshold), found[["boxes", "fracture_score"]]


@pytest.fixture(scope="session")
def trained_page(tmp_path_factory: pytest.TempPathFactory) -> TrainedPage:
    return trained_page_for(tmp_path_factory)


def page(monkeypatch: pytest.MonkeyPatch, registry: PageRegistry) -> AppTest:
    """The page, pointed at ``registry`` through the environment as an operator would."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    monkeypatch.setenv("FRACTURE_MODEL_NAME", registry.name)
    monkeypatch.delenv("FRACTURE_MODEL_ALIAS", raising=False)
    monkeypatch.delenv("FRACTURE_DETECTOR_NAME", raising=False)
    monkeypatch.syspath_prepend(str(APP))  # `streamlit run` puts the page's folder on sys.path
    return AppTest.from_file(str(PAGE), default_timeout=PAGE_TIMEOUT)


@pytest.fixture(autouse=True)
def _no_global_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The page sets MLflow's process-wide tracking URI, as an entry point does; unset it after."""
    yield
    mlflow.set_tracking_uri(None)


def upload(at: AppTest, name: str, data: bytes, mime: str = "image/png") -> AppTest:
    assert at.file_uploader, f"no uploader on the page: {[shown(e.value) for e in at.error]} {at.exception}"
    return at.file_uploader[0].set_value((name, data, mime)).run()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def real_xray(label: str = "Fractured", index: int = 0) -> Path:
    src = require_fracatlas()
    return sorted((src / "images" / label).iterdir())[index]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def captions(at: AppTest) -> list[str]:
    """Captions of the images on the page, one per image, as they read (:func:`shown`)."""
    return [shown(c) for el in at.get("image") for c in el.captions]


def shown(text: str) -> str:
    """Text the page escaped for Streamlit's Markdown (``plain``), as a reader sees it."""
    return re.sub(r"\\(.)", r"\1", text)


def consumer_prediction(registry: PageRegistry, data: bytes) -> pd.Series:
    """What a registry consumer gets for these bytes from ``models:/<name>@champion``."""
    mlflow.set_tracking_uri(registry.uri)
    model = mlflow.pyfunc.load_model(f"models:/{registry.name}@{CHAMPION}")
    return model.predict(pd.DataFrame({"image": [base64.b64encode(data).decode()]})).iloc[0]


# ---------------------------------------------------------------- the page and its model


def test_page_shows_the_registered_model_name_version_and_alias(monkeypatch, page_registry):
    at = page(monkeypatch, page_registry).run()
    assert not at.exception and not at.error
    shown = " ".join(m.value for m in at.markdown)
    assert f"Model **{page_registry.name}**, version **1**, alias **@champion**" in shown
    assert at.markdown[0].value.startswith(":red[**NOT FOR CLINICAL USE.**]")  # before anything is uploaded
    assert f"decision threshold: {page_registry.threshold:.3f}" in shown
    # No list of endings: PACS files have none, or end in their UID's last number.
    assert not at.file_uploader[0].allowed_type
    assert at.info[0].value.startswith("Upload an X-ray")
    # No detector registered in this store: the page says so and draws no boxes.
    assert "No detector at `fracture-detector@champion`: no boxes are drawn." in shown and not at.warning
    assert "- networks:" not in shown  # one network: nothing said about averaging


def test_the_threshold_is_shown_with_how_it_was_chosen_and_what_it_gives_on_the_test_split(monkeypatch, tmp_path):
    """The page said only "Fractured when the probability is at least the threshold": nothing of what
    the threshold was chosen for, nor how many fractures a Not fractured answer misses. The figures the
    version was registered with are shown beside it, and how its run chose the threshold; once that run
    is evaluated again under another threshold, its figures are another threshold's, and not shown."""
    profile = load_params(REPO).profiles["cpu"]
    model = seeded_head(create_classifier(profile).eval(), 0)
    registry = register_for_page(tmp_path, model, profile.model, data_config(model, 96), 0.3, "page-figures")
    figures = {"test_recall": 0.845, "test_recall_ci_low": 0.752, "test_recall_ci_high": 0.909,
               "test_specificity": 0.924, "test_specificity_ci_low": 0.897, "test_specificity_ci_high": 0.944,
               "test_threshold": 0.3}
    with registry_open(registry) as client:
        run_id = client.get_model_version(registry.name, "1").run_id
        for name, value in figures.items():
            client.log_metric(run_id, name, value)
        client.set_tag(run_id, "threshold_source", "the highest threshold reaching sensitivity 0.85 on the validation split")
        client.set_model_version_tag(registry.name, "1", "metrics", json.dumps(figures))  # as register records them
    # Each interval's ends joined by "to", not a hyphen a screen reader reads as "minus".
    measured = ("At it, on the test split (scored once, never used to choose): sensitivity 0.845 (95% CI 0.752 to "
                "0.909), specificity 0.924 (0.897 to 0.944): about 16% of fractured X-rays were called Not fractured.")
    chosen = "Threshold chosen as the highest threshold reaching sensitivity 0.85 on the validation split. "

    def shown_beside_the_result() -> tuple[str, str]:
        at = upload(page(monkeypatch, registry).run(), "xray.jpg", real_xray("Fractured").read_bytes(), "image/jpeg")
        assert not at.exception and not at.error
        result = [shown(c.value) for c in at.markdown if "at least the threshold" in c.value]
        return result[0], shown(" ".join(m.value for m in at.sidebar.markdown))

    caption, sidebar = shown_beside_the_result()
    assert chosen + measured in caption and chosen + measured in sidebar
    assert not re.search(r"\d-\d", caption + sidebar)  # no range the page writes reads as a subtraction
    # Evaluate again on the same run, at another threshold (a new version registered from it, say).
    with registry_open(registry) as client:
        client.log_metric(run_id, "test_threshold", 0.5)
        client.log_metric(run_id, "test_recall", 0.6)
    st.cache_resource.clear()  # a page started afresh
    caption, sidebar = shown_beside_the_result()
    assert measured in caption and chosen not in caption and "0.60" not in caption
    # A version whose training run is gone keeps its own figures; a miss of 1 in 250 is not "about 0%".
    import champion  # the module the page imported (APP is on sys.path)

    settings = champion.PageSettings(registry.uri, registry.name, "champion")
    with registry_open(registry) as client:
        client.set_model_version_tag(registry.name, "1", "metrics", json.dumps(figures | {"test_recall": 0.996}))
    monkeypatch.setattr(champion.MlflowClient, "get_run", lambda *_: (_ for _ in ()).throw(RuntimeError("run gone")))
    assert champion.test_figures(settings, registry.name, "1", 0.3) == (
        "At it, on the test split (scored once, never used to choose): sensitivity 0.996 (95% CI 0.752 to 0.909), "
        "specificity 0.924 (0.897 to 0.944): 0.4% of fractured X-rays were called Not fractured.")


def test_an_ensemble_champion_says_it_averages_networks_and_shows_what_consumers_get(
    monkeypatch, ensemble_page_registry
):
    data = real_xray("Fractured").read_bytes()
    at = upload(page(monkeypatch, ensemble_page_registry).run(), "xray.jpg", data, "image/jpeg")
    assert not at.exception and not at.error
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "- networks: the mean of 2, one recipe trained under different seeds (best epochs 2, 3)" in sidebar
    expected = consumer_prediction(ensemble_page_registry, data)
    assert metrics(at)["Fracture probability"] == f"{expected['fracture_probability']:.3f}"
    shown_images = captions(at)
    assert len(shown_images) == 2 and shown_images[1].endswith("(the mean of its 2 networks' maps)")


def test_page_says_what_to_do_when_the_alias_does_not_exist(monkeypatch, page_registry):
    monkeypatch.setenv("FRACTURE_MODEL_ALIAS", "no-such-alias")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", page_registry.uri)
    monkeypatch.setenv("FRACTURE_MODEL_NAME", page_registry.name)
    monkeypatch.syspath_prepend(str(APP))
    at = AppTest.from_file(str(PAGE), default_timeout=PAGE_TIMEOUT).run()
    assert not at.exception
    message = shown(at.error[0].value)
    assert f"'{page_registry.name}@no-such-alias'" in message and "make main" in message
    assert "FRACTURE_MODEL_ALIAS" in message and not at.file_uploader


def test_page_says_what_to_do_when_there_is_no_registry(monkeypatch, tmp_path):
    missing = tmp_path / "mlflow.db"
    at = page(monkeypatch, PageRegistry(f"sqlite:///{missing}", "fracture-classifier", "1", 0.5)).run()
    assert not at.exception and not at.file_uploader
    assert shown(at.error[0].value).startswith(f"No MLflow store at {missing}") and "make main" in shown(at.error[0].value)
    assert not missing.exists()  # the page does not create an empty store


@contextmanager
def registry_open(registry: PageRegistry) -> Iterator[MlflowClient]:
    """MLflow pointed at ``registry``'s store, logging into its ``page`` experiment (artifacts beside the store)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", registry.uri)
        mlflow.set_tracking_uri(registry.uri)
        try:
            mlflow.set_experiment("page")
            yield MlflowClient(registry.uri)
        finally:
            mlflow.set_tracking_uri(None)


def register_other_flavour(registry: PageRegistry, name: str) -> None:
    """A scikit-learn model as ``name@champion`` in ``registry``'s store: an MLflow model, but none of this
    project's pyfuncs, as an operator's slip (a name shared with another team's model) would put there."""
    from sklearn.linear_model import LogisticRegression

    with registry_open(registry) as client:
        # Its requirements given: MLflow would otherwise infer them by loading the model in a Python of its own.
        info = mlflow.sklearn.log_model(LogisticRegression().fit(np.eye(2), [0, 1]), name="model",
                                        pip_requirements=["scikit-learn"])
        mv = mlflow.register_model(info.model_uri, name)
        client.set_registered_model_alias(name, CHAMPION, mv.version)


def test_a_model_of_another_flavour_at_the_classifier_s_alias_is_named_not_a_crash(monkeypatch, page_registry):
    register_other_flavour(page_registry, "page-sklearn-classifier")
    at = page(monkeypatch, replace(page_registry, name="page-sklearn-classifier")).run()
    assert not at.exception, at.exception
    assert [shown(e.value) for e in at.error] == [
        "models:/page-sklearn-classifier/1 is a sklearn-flavour MLflow model, not a fracture classifier logged by "
        "this project's register step. Point FRACTURE_MODEL_NAME and FRACTURE_MODEL_ALIAS at one, or register one "
        "with `make main`."
    ]
    assert not at.file_uploader


def test_a_model_of_another_flavour_at_the_detector_s_alias_leaves_the_classifier_working(monkeypatch, page_registry):
    """The detector only adds boxes: a wrong model at its alias is named in a warning, and the
    classifier's answer is shown as without a detector."""
    register_other_flavour(page_registry, "page-sklearn-detector")
    at = page(monkeypatch, page_registry)
    monkeypatch.setenv("FRACTURE_DETECTOR_NAME", "page-sklearn-detector")
    at.run()
    assert not at.exception and not at.error, (at.exception, at.error)
    assert [shown(w.value) for w in at.warning] == [
        "models:/page-sklearn-detector/1 is a sklearn-flavour MLflow model, not a fracture detector logged by this "
        "project's detect-register step. Point FRACTURE_DETECTOR_NAME at one, or set it empty for no boxes. "
        "The page shows the classifier's answer without the detector's boxes."
    ]
    at = upload(at, "xray.jpg", real_xray("Fractured").read_bytes(), "image/jpeg")
    assert not at.exception and not at.error
    assert set(metrics(at)) == {"Predicted class", "Fracture probability", "Threshold"}
    assert len(captions(at)) == 2  # the X-ray and its heat map; no boxes


def test_a_detector_deleted_and_registered_again_is_the_new_one_though_its_version_is_1_again(
    monkeypatch, page_registry, tmp_path
):
    """A registered model deleted and registered again (or a store rebuilt by ``make main``) starts at
    version 1 again: the page must load the detector its run id names, not keep the one it loaded
    for an earlier version 1."""

    profile = load_params(REPO).profiles["cpu"]
    config = DetectorConfig(profile.model, "fcos", 128, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    weights = tmp_path / "detector.safetensors"
    torch.manual_seed(0)
    save_file(build_detector(config).state_dict(), str(weights))
    name = "page-detector-registered-twice"

    def register(threshold: float) -> None:
        with registry_open(page_registry) as client:
            with mlflow.start_run() as run:
                pass
            described = config.to_dict() | {"threshold": threshold, "input": InputPolicy().to_dict()}
            mv = mlflow.register_model(log_detector_pyfunc(run.info.run_id, weights, described), name)
            assert str(mv.version) == "1"
            client.set_registered_model_alias(name, CHAMPION, mv.version)

    def detector_caption() -> str:
        """The caption under the detector's boxes, for an X-ray uploaded to a page started afresh."""
        at = page(monkeypatch, page_registry)
        monkeypatch.setenv("FRACTURE_DETECTOR_NAME", name)
        at = upload(at.run(), "xray.jpg", real_xray("Fractured").read_bytes(), "image/jpeg")
        assert not at.exception and not at.error and not at.warning, (at.exception, at.error, at.warning)
        return captions(at)[2]

    def threshold_shown() -> str:
        caption = detector_caption()
        assert caption.startswith("Fracture detector v1: "), caption
        return caption.split("at least ")[1].split()[0]

    register(0.25)
    assert threshold_shown().startswith("0.250")
    with registry_open(page_registry) as client:
        client.delete_registered_model(name)
    register(0.75)
    import champion  # the module the page imported (APP is on sys.path)

    later = champion._now() + 31
    monkeypatch.setattr(champion, "_now", lambda: later)  # the page looks its alias up again after 30 s; the test does not wait
    assert threshold_shown().startswith("0.750")
    # At a threshold every box passes, the detector's cap: the caption said "20 boxes" of hundreds.
    with registry_open(page_registry) as client:
        client.delete_registered_model(name)
    register(0.01)
    latest = later + 31
    monkeypatch.setattr(champion, "_now", lambda: latest)
    assert detector_caption().startswith(f"Fracture detector v1: at least {MAX_DETECTIONS} boxes scored at least 0.010 ")
    # Switched off, the sidebar says so, not "No detector at `(off)@champion`".
    at = page(monkeypatch, page_registry)
    monkeypatch.setenv("FRACTURE_DETECTOR_NAME", "")
    at = at.run()
    assert "The detector is switched off (`FRACTURE_DETECTOR_NAME` is empty): no boxes are drawn." in " ".join(
        m.value for m in at.markdown)


def test_page_never_shows_registry_credentials(monkeypatch):
    monkeypatch.syspath_prepend(str(APP))
    from champion import PageSettings

    settings = PageSettings("https://alice:s3cret@mlflow.example.org:5000/", "m", "champion")
    assert settings.shown_uri == "https://***@mlflow.example.org:5000/"
    assert PageSettings("sqlite:////srv/mlflow.db", "m", "champion").shown_uri == "sqlite:////srv/mlflow.db"


def test_upload_limit_comes_from_the_app_config(monkeypatch, page_registry):
    """`streamlit run` from app/ reads app/.streamlit/config.toml; the uploader carries its limit."""
    before = os.getcwd()
    os.chdir(APP)
    try:
        st_config.get_config_options(force_reparse=True)
        limit = st_config.get_option("server.maxUploadSize")
        at = page(monkeypatch, page_registry).run()
        assert at.file_uploader[0].proto.max_upload_size_mb == limit
        # Streamlit counts its "MB" as 2**20 bytes, as serve.max_file_mb does: the page says MiB, as its refusals do.
        assert at.file_uploader[0].proto.help.startswith(f"Up to {limit} MiB; ")
        # The served model's serve.max_file_mb: an uncompressed flat-panel DICOM (about 30 MB) was refused
        # at 20 MB, the page then asking for the DICOM file it had been given.
        assert limit == load_params(REPO).serve.max_file_mb == 64 and limit < STREAMLIT_DEFAULT_UPLOAD_MB
        # The page refuses a larger file itself too, with a message naming the limit.
        upload(at, "huge.png", b"\x89PNG" + bytes(limit * 2**20))
        assert "huge.png is 67,108,868 bytes; the limit is 67,108,864 bytes (64 MiB)" in shown(at.error[0].value)
        assert "or its DICOM file" in shown(at.error[0].value)
        upload(at, "huge.dcm", bytes(128) + b"DICM" + bytes(limit * 2**20))
        assert "huge.dcm is 67,108,996 bytes; the limit is 67,108,864 bytes (64 MiB). Export the image from the PACS " \
               "JPEG-compressed" in shown(at.error[0].value)
        assert st_config.get_option("client.showErrorDetails") == "none"
    finally:
        os.chdir(before)
        st_config.get_config_options(force_reparse=True)


def test_a_real_xray_shows_class_probability_threshold_and_heat_map(monkeypatch, page_registry):
    data = real_xray("Fractured").read_bytes()
    at = upload(page(monkeypatch, page_registry).run(), "xray.jpg", data, "image/jpeg")
    assert not at.exception and not at.error
    expected = consumer_prediction(page_registry, data)
    shown = metrics(at)
    assert shown["Predicted class"] == {"fractured": "Fractured", "not_fractured": "Not fractured"}[expected["label"]]
    assert shown["Fracture probability"] == f"{expected['fracture_probability']:.3f}"
    assert shown["Threshold"] == "0.500"
    shown_images = captions(at)  # the X-ray and its Grad-CAM overlay
    assert len(shown_images) == 2 and shown_images[0].startswith("xray.jpg (")
    assert shown_images[1].startswith(f"Grad-CAM heat map for '{shown['Predicted class']}'")
    assert "NOT FOR CLINICAL USE" in at.markdown[0].value
    assert any("at least the threshold" in m.value and "NOT FOR CLINICAL USE" in m.value for m in at.markdown)


def live_region(at: AppTest) -> tuple[int, str]:
    """The page's polite live region: its place on the page and the text a screen reader is told."""
    found = [(place, element) for place, element in at.main.children.items()
             if element.type == "markdown" and 'aria-live="polite"' in element.value]
    assert len(found) == 1, [element.type for element in at.main.children.values()]
    place, region = found[0]
    assert region.allow_html and 'role="status"' in region.value  # HTML, not Markdown's text of it
    return place, html.unescape(re.sub(r"<[^>]*>", "", region.value))


def test_the_result_is_announced_to_a_screen_reader_in_a_region_on_the_page_before_it(monkeypatch, page_registry):
    """The class, probability and threshold appeared silently: nothing told a screen reader user
    that the answer had come. A polite live region holds them, at the same place in every state of
    the page (empty before an upload and beside a refusal, which Streamlit announces as an alert), so
    the browser keeps one region whose text changes, which is what screen readers announce."""
    at = page(monkeypatch, page_registry).run()
    place, said = live_region(at)
    assert said == ""
    at = upload(at, "xray.jpg", real_xray("Fractured").read_bytes(), "image/jpeg")
    assert not at.exception and not at.error
    shown = metrics(at)
    assert live_region(at) == (place, f"Upload 1, xray.jpg. Predicted class: {shown['Predicted class']}. Fracture "
                                      f"probability {shown['Fracture probability']}, threshold {shown['Threshold']}.")
    at = upload(at, "notes.png", b"patient notes, not an image\n" * 20)
    assert len(at.error) == 1 and live_region(at) == (place, "")


def test_the_same_answer_twice_in_a_row_is_announced_again(monkeypatch, page_registry):
    """A screen reader speaks the live region when its text changes: the second of two X-rays in a
    row that were both "Not fractured" left the text as it was, and its answer was never heard. Here
    the same file is uploaded again under its name, the same answer word for word: the region's text
    changes all the same (the upload's number), and a rerun with no new upload leaves it, heard once."""
    data = real_xray("Fractured").read_bytes()
    at = upload(page(monkeypatch, page_registry).run(), "xray.jpg", data, "image/jpeg")
    place, first = live_region(at)
    shown = metrics(at)
    at = upload(at, "xray.jpg", data, "image/jpeg")
    assert not at.exception and not at.error and metrics(at) == shown
    again, second = live_region(at)
    assert second != first, f"the region still says {first!r}: a screen reader says nothing"
    assert (again, second) == (place, first.replace("Upload 1, ", "Upload 2, ")) and first.startswith("Upload 1, ")
    assert live_region(at.run()) == (place, second)
    # A name the page did not write is said as written: bidirectional controls spelt out, markup as text.
    at = upload(at, "<b>x</b>\u202e.jpg", data, "image/jpeg")
    assert live_region(at)[1].startswith("Upload 3, <b>x</b>\\u202e.jpg. Predicted class: ")


def contrast(colour: list[float], background: list[float], alpha: float = 1.0) -> float:
    """WCAG 2's contrast ratio of ``colour`` drawn at ``alpha`` over ``background`` (sRGB, 0-255)."""

    def luminance(rgb: np.ndarray) -> float:
        c = rgb / 255
        linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return float(linear @ np.array([0.2126, 0.7152, 0.0722]))

    bg = np.asarray(background, dtype=float)
    seen = luminance(alpha * np.asarray(colour, dtype=float) + (1 - alpha) * bg)
    lighter, darker = sorted((seen, luminance(bg)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


#: Streamlit's themes (1.67, its frontend's bundle): body text on the main and the secondary
#: background, light and dark. tests/test_app_browser.py measures the captions as Chromium draws them.
STREAMLIT_THEMES = {"light": ((0x2F, 0x2D, 0x2B), [(255, 255, 255), (0xF8, 0xF8, 0xF7)]),
                    "dark": ((0xED, 0xEB, 0xE8), [(0x17, 0x16, 0x14), (0x2D, 0x2B, 0x27)])}
STREAMLIT_CAPTION_OPACITY = 0.6


def caption_opacity(at: AppTest) -> float:
    """The opacity the page's own style gives captions (Streamlit's own where it gives none)."""
    rules = [re.search(r'\[data-testid="stCaptionContainer"\]\s*\{\s*opacity:\s*([\d.]+)\s*!important', e.value)
             for e in at.get("html")]
    found = [float(rule.group(1)) for rule in rules if rule]
    assert len(found) <= 1, found
    return found[0] if found else STREAMLIT_CAPTION_OPACITY


def test_captions_are_dark_enough_for_wcag_aa_on_every_state_of_the_page(monkeypatch, page_registry):
    """The images' captions (the X-ray's name and size, what the heat map's colours mean, the detector's
    count and scores) were Streamlit's body text at 60% opacity: 3.9:1 on its light theme's white,
    under WCAG AA's 4.5:1. The page's own style draws them darker, before and after an upload and
    beside a refusal, in both of Streamlit's themes."""
    at = page(monkeypatch, page_registry).run()
    states = [caption_opacity(at)]
    at = upload(at, "xray.jpg", real_xray("Fractured").read_bytes(), "image/jpeg")
    assert not at.exception and not at.error and len(captions(at)) == 2
    states.append(caption_opacity(at))
    at = upload(at, "notes.png", b"patient notes, not an image\n" * 20)
    assert len(at.error) == 1
    states.append(caption_opacity(at))
    ratios = {(theme, background, opacity): round(contrast(text, background, opacity), 2)
              for theme, (text, backgrounds) in STREAMLIT_THEMES.items() for background in backgrounds
              for opacity in states}
    assert min(ratios.values()) >= 4.5, ratios
    assert max(states) < 1  # still a step fainter than the body text


def test_a_probability_just_below_the_threshold_is_not_shown_equal_to_it(monkeypatch, page_registry, tmp_path):
    """Beside "Not fractured", probability and threshold must not read alike: the page states that
    the class is Fractured when the probability is at least the threshold. Here the threshold lies
    just above the probability, within the same third decimal."""
    data = real_xray("Fractured", 3).read_bytes()
    probability = float(consumer_prediction(page_registry, data)["fracture_probability"])
    bin_top = (np.floor(probability * 1000 + 0.5) + 0.5) / 1000  # where its 3-decimal figure ends
    threshold = (probability + bin_top) / 2
    assert f"{threshold:.3f}" == f"{probability:.3f}" and threshold - probability > 1e-5
    # The same network as page_registry's (its weights file), served with that threshold.
    profile = load_params(REPO).profiles["cpu"]
    model = create_classifier(profile).eval()
    model.load_state_dict(load_file(Path(page_registry.uri.removeprefix("sqlite:///")).parent / "model.safetensors"))
    edge = register_for_page(tmp_path, model, profile.model, data_config(model, 96), threshold, "page-edge")
    assert consumer_prediction(edge, data)["fracture_probability"] == pytest.approx(probability, abs=1e-7)

    at = upload(page(monkeypatch, edge).run(), "xray.jpg", data, "image/jpeg")
    assert not at.exception and not at.error
    shown = metrics(at)
    places = len(shown["Threshold"].split(".")[1])
    assert shown["Predicted class"] == "Not fractured" and 3 < places <= 6
    assert shown["Fracture probability"] == f"{probability:.{places}f}" and shown["Threshold"] == f"{threshold:.{places}f}"
    assert float(shown["Fracture probability"]) < float(shown["Threshold"])


def test_scores_are_shown_to_as_many_decimals_as_tell_them_from_their_threshold(monkeypatch):
    monkeypatch.syspath_prepend(str(APP))
    from streamlit_app import against_threshold

    assert against_threshold(0.4213, 0.5) == ("0.421", "0.500")
    assert against_threshold(0.67231, 0.67249) == ("0.6723", "0.6725")
    assert against_threshold(0.6724991, 0.6724996) == ("0.672499", "0.672500")
    # At or above the threshold a figure never rounds below it: 3 decimals, equal or not.
    assert against_threshold(0.67249, 0.67231) == ("0.672", "0.672")
    assert against_threshold(0.5, 0.5) == ("0.500", "0.500")
    # Closer than 6 decimals tell: said in words.
    assert against_threshold(0.5 - 1e-9, 0.5) == ("just below 0.500000", "0.500000")
    # A threshold under 0.001 shows its first significant digits, and the score beside it as many places.
    assert against_threshold(0.0004, 7.974e-06) == ("0.00040000", "0.00000797")
    assert against_threshold(3e-06, 7.974e-06) == ("0.00000300", "0.00000797")


def test_the_heat_map_of_a_model_scored_with_its_mirror_says_so(monkeypatch, page_registry_hflip):
    data = real_xray("Fractured").read_bytes()
    at = upload(page(monkeypatch, page_registry_hflip).run(), "xray.jpg", data, "image/jpeg")
    assert not at.exception and not at.error
    shown = metrics(at)
    assert shown["Fracture probability"] == f"{consumer_prediction(page_registry_hflip, data)['fracture_probability']:.3f}"
    shown_images = captions(at)
    assert len(shown_images) == 2 and shown_images[1].endswith("(the mean over the X-ray and its mirror, as the score)")


def test_the_alias_watch_serves_the_version_found_last_while_the_registry_cannot_be_reached(monkeypatch):
    import champion
    from champion import AliasWatch, ModelUnavailable, PageSettings, RegistryUnreachable

    now = [0.0]
    answers: list[object] = [RegistryUnreachable("down at start"), ("1", "run-1"), RegistryUnreachable("outage"),
                             ("2", "run-2"), ModelUnavailable("alias deleted")]
    asked: list[float] = []

    def look_up(settings):
        asked.append(now[0])
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(champion, "_now", lambda: now[0])
    watch = AliasWatch(PageSettings("sqlite:///x.db", "m", "champion"), look_up, every=30)
    with pytest.raises(RegistryUnreachable, match="down at start"):  # nothing found yet: nothing to serve
        watch.current()
    now[0] = 10  # a failure is kept too: no click waits on a registry that is down
    with pytest.raises(RegistryUnreachable, match="down at start"):
        watch.current()
    now[0] = 30
    assert watch.current() == (("1", "run-1"), None)
    now[0] = 60
    found, unreachable = watch.current()
    assert found == ("1", "run-1") and str(unreachable) == "outage"  # the version found last, and why
    now[0] = 89
    assert watch.current()[0] == ("1", "run-1") and asked == [0, 30, 60]
    now[0] = 90
    assert watch.current() == (("2", "run-2"), None)  # the registry back: the alias moved meanwhile
    now[0] = 120
    with pytest.raises(ModelUnavailable, match="alias deleted"):  # not an outage: said, not covered up
        watch.current()


def test_a_registry_outage_leaves_the_page_serving_the_version_it_loaded(monkeypatch, page_registry):
    """A tracking server that stopped answering while the page ran: after 30 s the page said "No model
    version ... Train and register one with make main", dropped the result and the uploader, and
    waited minutes on MLflow's retries at every click. Now it goes on serving the version it loaded,
    saying why, and asks the registry again every 30 s."""
    import champion  # the module the page imported (APP is on sys.path)

    now = [champion._now()]
    monkeypatch.setattr(champion, "_now", lambda: now[0])
    # A detector name of its own: settings no other test's page shares, so its alias watch is this test's.
    monkeypatch.setenv("FRACTURE_DETECTOR_NAME", "detector-of-the-outage-test")
    at = page(monkeypatch, page_registry)
    monkeypatch.setenv("FRACTURE_DETECTOR_NAME", "detector-of-the-outage-test")
    at = at.run()
    assert not at.exception and not at.error and not at.warning and at.file_uploader
    calls: list[str] = []

    class Down:
        def __init__(self, tracking_uri: str) -> None:
            calls.append(tracking_uri)
            raise ConnectionRefusedError(f"connection to {tracking_uri} refused")

    monkeypatch.setattr(champion, "MlflowClient", Down)
    now[0] += 31
    data = real_xray("Fractured").read_bytes()
    at = upload(at.run(), "xray.jpg", data, "image/jpeg")
    assert not at.exception and not at.error
    warned = [shown(w.value) for w in at.warning]
    assert len(warned) == 1 and warned[0].startswith(
        f"The MLflow registry at {page_registry.uri} cannot be reached or read (connection to {page_registry.uri} refused)."
    ) and warned[0].endswith("The page goes on serving the model's version 1, loaded when the registry last answered; "
                             "it asks the registry again every 30 s.")
    expected = consumer_prediction(page_registry, data)
    assert metrics(at)["Fracture probability"] == f"{expected['fracture_probability']:.3f}"
    looked_up = len(calls)  # the classifier's alias, and the detector's
    now[0] += 5
    at.run()
    assert len(calls) == looked_up  # within 30 s the registry is not asked again
    monkeypatch.setattr(champion, "MlflowClient", MlflowClient)
    now[0] += 31
    at = at.run()
    assert not at.warning and not at.error and at.file_uploader


def test_a_failing_heat_map_leaves_the_prediction_on_the_page(monkeypatch, page_registry):
    """Grad-CAM is an explanation of the score, not the score: when it fails, the class and
    probability are still shown, with a warning where the heat map would be."""
    at = page(monkeypatch, page_registry).run()
    import champion  # the module the page imported (APP is on sys.path)

    def broken(*args, **kwargs):
        raise RuntimeError("no gradient reached the target layer")

    monkeypatch.setattr(champion, "grad_cam", broken)
    data = real_xray("Fractured").read_bytes()
    at = upload(at, "xray.jpg", data, "image/jpeg")
    assert not at.exception and not at.error
    expected = consumer_prediction(page_registry, data)
    assert metrics(at)["Fracture probability"] == f"{expected['fracture_probability']:.3f}"
    assert len(captions(at)) == 1  # the X-ray, no overlay
    assert [shown(w.value) for w in at.warning] == [
        "No heat map for xray.jpg (RuntimeError: no gradient reached the target layer); the prediction above stands."
    ]


@pytest.mark.parametrize("registry", ["page_registry", "page_registry_hflip"])
def test_heat_map_explains_the_pixels_the_prediction_scored(monkeypatch, request, registry):
    """The page shows a large X-ray shrunk to its display size; the heat map is still computed on
    the pixels the served model scored (the upload decoded in full, then resized), not on the
    smaller display copy, whose resized pixels differ. A model served with ``tta: hflip`` scores
    the image and its mirror, and its map explains both."""
    page_registry = request.getfixturevalue(registry)
    monkeypatch.syspath_prepend(str(APP))
    from champion import PageSettings, load_served_model
    from streamlit_app import DISPLAY_SIDE

    path = real_xray("Fractured", 0)
    data = path.read_bytes()
    with Image.open(path) as img:
        assert max(img.size) > DISPLAY_SIDE  # the case where display and scored pixels part ways
        display = img.convert("L")
    display.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    served = load_served_model(PageSettings(page_registry.uri, page_registry.name, CHAMPION), page_registry.version, "")
    classifier = served.pyfunc.unwrap_python_model().classifier
    tta = served.config.tta
    assert tta == {"page_registry": "none", "page_registry_hflip": "hflip"}[registry]
    batch = served.scored_input(data)
    with torch.no_grad():
        explained = torch.softmax(classifier.network(batch), dim=1)[0, 1].item()
        if tta == "hflip":
            explained = (explained + torch.softmax(classifier.network(mirror(batch)), dim=1)[0, 1].item()) / 2
    assert explained == pytest.approx(consumer_prediction(page_registry, data)["fracture_probability"], abs=1e-6)
    assert not torch.equal(batch, classifier.batch([display]))

    overlaid, heat = served.heat_map(data, 1, display)
    assert overlaid.size == display.size and heat.shape == (display.height, display.width)
    expected = to_image_grid(grad_cam(classifier.network, batch, 1, tta=tta), display.size, "squash")
    assert np.allclose(heat, expected)
    if tta == "hflip":  # not the unmirrored image's map alone
        assert heat.max() > 0
        assert not np.allclose(heat, to_image_grid(grad_cam(classifier.network, batch, 1), display.size, "squash"))


# ---------------------------------------------------------------- bad uploads


def _truncated() -> bytes:
    data = real_xray("Fractured").read_bytes()
    return data[: len(data) // 2]


def _corrupt_jpeg() -> bytes:
    data = bytearray(real_xray("Non_fractured").read_bytes())
    data[200:4000] = bytes(3800)  # zeroes over the Huffman tables and the first scan
    return bytes(data)


def _transparent_rgba() -> bytes:
    img = Image.open(real_xray("Fractured")).convert("RGBA")
    img.putalpha(Image.linear_gradient("L").resize(img.size))
    return png(img)


BAD_UPLOADS = {
    "not an image": ("notes.png", lambda: b"patient notes, not an image\n" * 20, "not an image file that can be read"),
    "empty": ("empty.png", lambda: b"", "is empty"),
    "corrupt JPEG": ("corrupt.jpg", _corrupt_jpeg, "cannot be decoded"),
    "decompression bomb": ("bomb.png", lambda: ihdr_png(100_000, 100_000), "declares absurd dimensions"),
    "blank bomb": ("black.png", lambda: ihdr_png(12_000, 12_000), "declares 12000 x 12000 px (144 megapixels)"),
    "blank": ("black.png", lambda: png(Image.new("L", (600, 800))), "is blank or nearly constant"),
    "too wide": (
        "wide.png",
        lambda: ihdr_png(9000, 300),
        "9000 x 300 px; the model accepts images whose sides are between 64 and 8192 px",
    ),
    "too small": ("tiny.png", lambda: png(Image.new("L", (20, 40))), "20 x 40 px; the model accepts"),
    "16-bit PNG": ("deep.png", lambda: png(Image.new("I;16", (300, 300), 40000)), "is a 16-bit PNG (mode I;16)"),
    "GIF renamed": ("anim.png", lambda: _gif(), "is a GIF file, not JPEG, PNG or DICOM"),
}


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (100, 100)).save(buf, format="GIF")
    return buf.getvalue()


def test_an_uploads_name_is_shown_as_written_never_read_as_markdown(monkeypatch, page_registry):
    """Streamlit renders Markdown in alerts and captions: an upload named ![x](https://...) made the
    clinician's browser fetch that address, and [text](https://...) showed a link the page never wrote."""
    name = "![x](https://attacker.example/t.png) [Open the report](https://attacker.example) :red[NORMAL] $x$.png"
    at = upload(page(monkeypatch, page_registry).run(), name, b"not an image")
    raw = at.error[0].value
    assert "![x](" not in raw and "[Open the report](" not in raw and ":red[" not in raw and "$x$" not in raw
    assert shown(raw).startswith(name + " is not an image file that can be read")
    at = upload(at, name, real_xray("Non_fractured").read_bytes(), "image/jpeg")
    assert not at.error and captions(at)[0].startswith(name + " (")
    raw_caption = at.get("image")[0].captions[0]
    assert "](" not in raw_caption and ":red[" not in raw_caption


def test_a_name_shows_its_entities_and_bidi_controls_as_written_and_every_image_has_alt_text(monkeypatch, page_registry):
    """An & was read as an HTML entity (a&amp;b shown as a&b, &rlm; as an invisible mark), and a
    right-to-left override in a name turned the page's own text around it (1152 x 1440 read
    2511 x 0441, the file's ending shown as .jpg). The three images had no alt text."""
    name = "Smith&amp;Jones patient\u202egpj.exe"
    at = upload(page(monkeypatch, page_registry).run(), name, real_xray("Non_fractured").read_bytes(), "image/jpeg")
    assert not at.exception and not at.error
    caption = at.get("image")[0].captions[0]
    assert "\u202e" not in caption and "\\&amp;" in caption
    assert shown(caption).startswith("Smith&amp;Jones patient\\u202egpj.exe (")
    images = [img for element in at.get("image") for img in element.proto.imgs]
    alts = [img.alt for img in images]
    assert len(alts) == 2 and all(alts), alts
    assert alts[0].startswith("X-ray Smith&amp;Jones patient\\u202egpj.exe, ") and " by " in alts[0]
    assert alts[0].endswith(("greyscale JPEG", "colour JPEG"))
    assert alts[1].startswith("Grad-CAM heat map for ") and ("third, " in alts[1] or "no region" in alts[1])


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_gets_a_clear_message_and_the_page_keeps_working(monkeypatch, page_registry, case):
    name, make, expected = BAD_UPLOADS[case]
    at = upload(page(monkeypatch, page_registry).run(), name, make())
    assert not at.exception, at.exception
    assert len(at.error) == 1 and name in shown(at.error[0].value) and expected in shown(at.error[0].value)
    assert not at.metric and not captions(at)
    assert "NOT FOR CLINICAL USE" in at.markdown[0].value  # a refused upload too

    good = real_xray("Non_fractured").read_bytes()
    at = upload(at, "next.jpg", good, "image/jpeg")
    assert not at.exception and not at.error
    assert set(metrics(at)) == {"Predicted class", "Fracture probability", "Threshold"}


def test_truncated_jpeg_is_scored_with_a_visible_note_as_every_consumer_scores_it(monkeypatch, page_registry):
    """The model was trained on FracAtlas's truncated files (validate.on_truncated: keep), so it
    scores them, saying so; the page gives the same answer as the registry's consumers."""
    data = _truncated()
    at = upload(page(monkeypatch, page_registry).run(), "cut.jpg", data, "image/jpeg")
    assert not at.exception and not at.error
    assert shown(at.warning[0].value).startswith("cut.jpg: the file ends early: ")  # each note names its file
    expected = consumer_prediction(page_registry, data)
    assert metrics(at)["Fracture probability"] == f"{expected['fracture_probability']:.3f}"


def test_a_monochrome1_dicom_upload_scores_as_its_jpeg(monkeypatch, page_registry):
    jpeg = real_xray("Fractured")
    data = dicom_from_jpeg(jpeg, "MONOCHROME1 VOI LUT")
    # Named as a PACS names it, after its SOP Instance UID.
    at = upload(page(monkeypatch, page_registry).run(), "1.2.840.113619.2.55.3.320", data, "application/dicom")
    assert not at.exception and not at.error and not at.warning
    assert "DICOM MONOCHROME1 12-bit" in captions(at)[0]
    expected = consumer_prediction(page_registry, png(Image.open(jpeg).convert("L")))
    assert metrics(at)["Fracture probability"] == f"{expected['fracture_probability']:.3f}"


def test_rgba_png_is_converted_with_a_visible_note(monkeypatch, page_registry):
    data = _transparent_rgba()
    at = upload(page(monkeypatch, page_registry).run(), "rgba.png", data)
    assert not at.exception and not at.error
    assert "transparent pixels are shown to the model as black background" in shown(at.warning[0].value)
    assert "Predicted class" in metrics(at) and len(captions(at)) == 2


def test_opaque_rgba_png_gives_the_same_answer_as_its_rgb_pixels(monkeypatch, page_registry):
    rgb = Image.open(real_xray("Fractured")).convert("RGB")
    at = upload(page(monkeypatch, page_registry).run(), "opaque.png", png(rgb.convert("RGBA")))
    assert "alpha channel is fully opaque and was dropped" in shown(at.warning[0].value)
    expected = consumer_prediction(page_registry, png(rgb))
    assert metrics(at)["Fracture probability"] == f"{expected['fracture_probability']:.3f}"


# ---------------------------------------------------------------- Grad-CAM


def test_grad_cam_covers_the_input_and_peaks_at_one():
    profile = load_params(REPO).profiles["cpu"]
    model = seeded_head(create_classifier(profile).eval(), 0)
    assert target_layer(model) is model.bn2
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    cams = [grad_cam(model, x, target=t) for t in range(len(CLASSES))]
    for cam in cams:
        assert cam.shape == (96, 96) and cam.min() >= 0 and cam.max() in (0.0, pytest.approx(1.0))
    # Behind global average pooling and a linear head, Grad-CAM on the last feature map is the
    # class activation map: ReLU(sum_k W[class, k] * A_k), upsampled and scaled to peak at 1.
    with torch.no_grad():
        features = model.forward_features(x)
    for t, cam in enumerate(cams):
        expected = torch.einsum("k,bkhw->bhw", model.classifier.weight[t].detach(), features).clamp_min(0)
        expected = torch.nn.functional.interpolate(expected[:, None], size=(96, 96), mode="bilinear")[0, 0].numpy()
        expected = expected / expected.max() if expected.max() > 0 else expected
        assert np.allclose(cam, expected, atol=1e-4)
    assert not np.allclose(cams[0], cams[1])
    assert not model.bn2._forward_hooks and not model.bn2._backward_hooks  # Captum removed its hooks


def test_grad_cam_under_hflip_is_the_mean_of_the_image_s_map_and_its_mirror_s_mirrored_back():
    """With ``tta: hflip`` the score averages an X-ray and its mirror, so the map does too: the
    mirror's map is flipped back onto the X-ray before the mean, and so the map of a mirrored
    upload is the mirror of the upload's map."""
    model = seeded_head(create_classifier(load_params(REPO).profiles["cpu"]).eval(), 2)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    seen, of_mirror = grad_cam(model, x, target=1), grad_cam(model, mirror(x), target=1)
    assert seen.max() == pytest.approx(1.0) and of_mirror.max() == pytest.approx(1.0)  # both views raise the class
    both = grad_cam(model, x, target=1, tta="hflip")
    mean = (seen + of_mirror[:, ::-1]) / 2
    assert both.shape == (96, 96) and both.max() == pytest.approx(1.0)
    np.testing.assert_allclose(both, mean / mean.max(), atol=1e-6)
    # Flipped back, not laid over the X-ray as the mirror's own pixels had it.
    assert not np.allclose(both, _peak((seen + of_mirror) / 2), atol=1e-3)
    assert not np.allclose(both, seen, atol=1e-3)
    # Equal up to float rounding: the twice-mirrored input runs in channels-last layout, x does not.
    np.testing.assert_allclose(grad_cam(model, mirror(x), target=1, tta="hflip"), both[:, ::-1], atol=2e-5)
    with pytest.raises(ValueError, match=r"tta must be one of 'none', 'hflip'; got 'vflip'"):
        grad_cam(model, x, target=1, tta="vflip")


def seeded_head(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with a classifier head of its own, weights and bias, drawn from a seeded generator as
    ``nn.Linear`` draws them: one drawn from the global stream depends on the seed PyTorch gave the
    process and on what earlier tests drew, and some draws score no region above the rest for either
    class. The bias moves every probability the page's tests build their cases around."""
    bound = model.classifier.in_features ** -0.5
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        torch.nn.init.uniform_(model.classifier.weight, -bound, bound, generator=generator)
        torch.nn.init.uniform_(model.classifier.bias, -bound, bound, generator=generator)
    return model


def _peak(cam: np.ndarray) -> np.ndarray:
    return cam / cam.max()


def test_grad_cam_hooks_a_copy_so_a_prediction_on_the_shared_network_meanwhile_changes_nothing(monkeypatch):
    """Page sessions share one network. Another session's prediction during an attribution ran
    through Captum's hooks on it and overwrote the saved activations (a failed heat map, and the
    prediction lost with it). The attribution runs on a copy holding the network's weights."""
    from captum.attr import LayerGradCam

    from fracture import explain

    model = create_classifier(load_params(REPO).profiles["cpu"]).eval()
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    quiet = grad_cam(model, x, target=1)
    attribute = LayerGradCam.attribute

    def another_session_predicts_meanwhile(self, inputs, **kwargs):
        hooked = self.layer  # where Captum hooks
        assert hooked is not model.bn2
        with torch.no_grad():
            model(torch.randn(4, 3, 96, 96))  # the shared network, mid-attribution
        return attribute(self, inputs, **kwargs)

    monkeypatch.setattr(LayerGradCam, "attribute", another_session_predicts_meanwhile)
    np.testing.assert_allclose(grad_cam(model, x, target=1), quiet, atol=1e-6)
    # New weights on the shared network reach the copy.
    with torch.no_grad():
        model.classifier.weight.neg_()
    monkeypatch.setattr(LayerGradCam, "attribute", attribute)
    assert not np.allclose(grad_cam(model, x, target=1), quiet)
    assert explain._COPIES[model] is not model


def test_heat_map_lands_where_the_padded_image_was():
    """With ``aspect: pad`` the heat map is cropped back from the square to the image."""
    cam = np.zeros((64, 64))
    cam[16:48, 0:8] = 1.0  # left edge of the square: the padding beside a tall image
    tall = to_image_grid(cam, (100, 400), aspect="pad")
    assert tall.shape == (400, 100) and tall.max() < 0.05  # none of it falls on the image
    cam[:] = 0
    cam[0:8, 24:40] = 1.0  # top centre of the square = top centre of a tall image
    tall = to_image_grid(cam, (100, 400), aspect="pad")
    assert tall[:40, 30:70].mean() > 0.5 and tall[100:].max() < 0.05
    squashed = to_image_grid(cam, (100, 400), aspect="squash")
    assert squashed.shape == (400, 100) and squashed[:40].mean() > squashed[100:].mean()


def test_overlay_leaves_cold_regions_untouched():
    img = Image.fromarray(np.full((50, 80), 120, dtype=np.uint8))
    heat = np.zeros((50, 80))
    heat[10:20, 10:20] = 1.0
    out = np.asarray(overlay(img, heat))
    assert out.shape == (50, 80, 3)
    assert (out[30:, 40:] == 120).all()
    assert not (out[12:18, 12:18] == 120).all()
    # The hotter, the lighter, on a dark part of an X-ray as on a bright one: jet's peak was about as
    # dark there as no heat at all, and read as nothing on a greyscale display.
    for grey in (40, 200):
        ramp = np.linspace(0, 1, 11)[None, :].repeat(4, 0)
        shown = np.asarray(overlay(Image.fromarray(np.full((4, 11), grey, dtype=np.uint8)), ramp), dtype=float)[0]
        luminance = shown @ np.array([0.2126, 0.7152, 0.0722])
        assert luminance[-1] > luminance[0] + 20 and luminance[-1] == luminance.max(), (grey, luminance.round())


def test_the_heat_map_is_shown_with_a_colour_bar_from_low_to_high_attention(monkeypatch, page_registry):
    """The heat map's colours came with no key: a reader could not tell which end meant more, nor
    that it shows where the model looked rather than a finding. Under the map, in the same image, a
    colour bar runs from low to high attention in the overlay's own colours, and says it is not a
    diagnosis; the alt text says so too."""
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    def left_to_right(network, batch, target, tta="none"):  # a map that rises from left to right
        return np.tile(np.linspace(0, 1, batch.shape[-1]), (batch.shape[-2], 1))

    drawn: list[Image.Image] = []
    load = MemoryMediaFileStorage.load_and_get_id

    def keep(self, path_or_data, mimetype, kind, filename=None):
        if isinstance(path_or_data, bytes) and mimetype.startswith("image/"):
            drawn.append(Image.open(io.BytesIO(path_or_data)).convert("RGB"))
        return load(self, path_or_data, mimetype, kind, filename)

    at = page(monkeypatch, page_registry).run()
    import champion  # the module the page imported (APP is on sys.path)

    monkeypatch.setattr(champion, "grad_cam", left_to_right)
    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", keep)
    at = upload(at, "xray.jpg", real_xray("Fractured").read_bytes(), "image/jpeg")
    assert not at.exception and not at.error and len(drawn) == 2
    xray, heat_map = drawn
    assert heat_map.width == xray.width and heat_map.height > xray.height
    band = np.asarray(heat_map, dtype=float)[xray.height:]
    assert np.median(band) < 10  # a black band, under the X-ray
    # The bar: the rows drawn across the band, grey at its left, the overlay's peak colour over grey
    # at its right, lighter all the way.
    across = np.flatnonzero((band.max(axis=2) > 20).mean(axis=1) > 0.9)
    assert len(across) >= 5, across
    bar = band[across[len(across) // 2]]
    drawn_bar = bar[bar.max(axis=1) > 20]
    luminance = drawn_bar @ np.array([0.2126, 0.7152, 0.0722])
    peak = np.asarray(overlay(Image.new("L", (1, 1), 128), np.ones((1, 1))), dtype=float)[0, 0]
    assert np.abs(drawn_bar[2] - 128).max() < 16 and np.abs(drawn_bar[-3] - peak).max() < 16, (drawn_bar[2], drawn_bar[-3])
    assert luminance[-len(luminance) // 4:].mean() > luminance[: len(luminance) // 4].mean() + 30
    from fracture.explain import LEGEND_ENDS, LEGEND_TITLE

    alt = at.get("image")[1].proto.imgs[0].alt
    assert LEGEND_TITLE.lower() in alt and all(end in alt for end in LEGEND_ENDS), alt
    assert "not a diagnosis" in LEGEND_TITLE


@pytest.mark.parametrize("size", [(1024, 512), (400, 1024), (13, 1024)])
def test_the_heat_map_s_legend_fits_any_x_ray_and_scales_with_its_width(size):
    """The page fits an image's width to its column: the legend's text and bar are drawn in
    proportion to the width, so a narrow X-ray's legend is no larger on screen than a wide one's."""
    from fracture.explain import with_legend

    shown = overlay(Image.new("L", size, 90), np.zeros(size[::-1]))
    drawn = with_legend(shown)
    assert drawn.width == size[0] and drawn.height > size[1]
    assert np.array_equal(np.asarray(drawn)[: size[1]], np.asarray(shown))  # the map itself untouched
    if size[0] >= 400:  # in proportion to the width (a 13 px wide X-ray's legend has a least size)
        reference = with_legend(Image.new("RGB", (800, 800)))
        assert abs((drawn.height - size[1]) / size[0] - (reference.height - 800) / 800) < 0.01


@pytest.mark.parametrize("width", [224, 300, 373])
def test_the_legend_s_words_are_not_cut_off_on_a_small_x_ray(width):
    """An X-ray narrower than about 250 px (uploads are not enlarged) had its legend's title cut off at
    the right edge: the text is made smaller until the title and both ends fit the width."""
    from fracture.explain import with_legend

    shown = overlay(Image.new("L", (width, 300), 90), np.zeros((300, width)))
    band = np.asarray(with_legend(shown))[300:]
    white = (band > 160).all(axis=2)  # the words, white (antialiased) on the black band; the bar is coloured
    assert white.any() and not white[:, -2:].any(), np.nonzero(white[:, -2:])


# ---------------------------------------------------------------- a trained model: label order


@pytest.mark.integration
def test_label_order_on_known_fractured_and_non_fractured_images(trained_page):
    """A model that learned anything ranks held-out fractured X-rays above non-fractured ones;
    with the classes swapped anywhere between training and the page, it would rank them below."""
    held = trained_page.held_out
    frac = held[held["fractured"] == 1]["fracture_probability"]
    non = held[held["fractured"] == 0]["fracture_probability"]
    auc = roc_auc_score(held["fractured"], held["fracture_probability"])
    assert frac.mean() > non.mean() and auc > 0.65, (auc, frac.mean(), non.mean())
    expected = np.where(held["fracture_probability"] >= held["threshold"], CLASSES[1], CLASSES[0])
    assert (held["label"] == expected).all()
    assert (held["threshold"] == trained_page.registry.threshold).all()


@pytest.mark.integration
def test_page_shows_fractured_and_not_fractured_for_known_xrays(monkeypatch, trained_page):
    held = trained_page.held_out
    top_fractured = held[held["fractured"] == 1].sort_values("fracture_probability").iloc[-1]
    low_non = held[held["fractured"] == 0].sort_values("fracture_probability").iloc[0]
    at = page(monkeypatch, trained_page.registry).run()
    detector = trained_page.detector
    assert f"- registered model: `{detector.name}`\n- version: `{detector.version}`" in " ".join(
        m.value for m in at.sidebar.markdown
    )
    for row, shown_class in ((top_fractured, "Fractured"), (low_non, "Not fractured")):
        at = upload(at, Path(row["path"]).name, Path(row["path"]).read_bytes(), "image/jpeg")
        assert not at.exception and not at.error
        assert metrics(at) == {
            "Predicted class": shown_class,
            "Fracture probability": f"{row['fracture_probability']:.3f}",
            "Threshold": f"{trained_page.registry.threshold:.3f}",
        }


def test_the_sidebar_says_whether_the_networks_are_seeds_or_snapshots_of_one(monkeypatch):
    monkeypatch.syspath_prepend(str(APP))
    from streamlit_app import averaging_note

    assert averaging_note({}, 1) == []
    assert averaging_note({"members": 2, "member_best_epochs": [2, 3]}, 2) == [
        "- networks: the mean of 2, one recipe trained under different seeds (best epochs 2, 3)"]
    assert averaging_note({"members": 3, "snapshots": 3, "member_best_epochs": [1, 2, 3]}, 3) == [
        "- networks: the mean of 3 snapshots of one network, taken at the ends of its cosine cycles "
        "(after epochs 1, 2, 3)"]


def test_boxes_are_drawn_where_they_are_on_a_thumbnail_whose_sides_were_rounded_apart():
    """A 100 x 8000 X-ray is shown 13 x 1024: its width shrinks by 0.13, its height by 0.128, so a
    box ending at row 6000 drawn with the width's scale alone would end 12 rows too low (780)."""
    from fracture.explain import BOX_COLOUR, BOX_EDGE, draw_boxes

    display = Image.new("L", (100, 8000))
    display.thumbnail((1024, 1024))
    assert display.size == (13, 1024)
    drawn = np.asarray(draw_boxes(display, np.array([[0, 4000, 100, 6000, 0.9]]), (13 / 100, 1024 / 8000)))
    outlined = np.flatnonzero((drawn == BOX_COLOUR).all(axis=2).any(axis=1))
    assert abs(outlined.max() - 6000 * 1024 / 8000) <= 1  # its bottom edge at row 768
    # Edged in black on bright bone: the row under the green stroke is dark.
    bright = draw_boxes(Image.new("L", (200, 200), 220), np.array([[50, 50, 150, 150, 0.9]]))
    below = np.asarray(bright)[151, 60:140]
    assert (below == BOX_EDGE).all(), below[:3]


def test_box_labels_and_strokes_keep_their_size_on_screen_whatever_the_x_ray_s_shape():
    """The page fits an image's width to its column. Labels and strokes were sized by the shorter
    side: on a landscape X-ray 1024 x 400 shown 430 px wide, a score was 13 px high in the image,
    5 px on screen, and the stroke 2 px, under 1 px. Sized by the width, a label is the same share
    of the width, about 15 px in that column, on a landscape X-ray as on a portrait one."""
    from fracture.explain import BOX_COLOUR, draw_boxes

    def measured(size: tuple[int, int]) -> tuple[float, float]:
        width, height = size
        x0, y0 = round(0.1 * width), round(0.4 * height)
        drawn = np.asarray(draw_boxes(Image.new("L", size, 90), np.array([[x0, y0, 0.9 * width, 0.9 * height, 0.9]])))
        green = (drawn == BOX_COLOUR).all(axis=2)
        label = green[:y0, x0 + 1].sum()  # the label's green plate, above the box
        stroke = green[y0 - 2: y0 + 60, round(0.8 * width)].sum()  # the top edge, clear of the label
        return label / width, stroke / width

    for landscape, portrait in ((measured((1024, 400)), measured((400, 1024))), (measured((1024, 600)), measured((600, 1024)))):
        assert landscape[0] * 430 >= 12 and portrait[0] * 430 >= 12, (landscape, portrait)  # px on screen
        assert landscape[1] * 430 >= 2.5 and portrait[1] * 430 >= 2.5, (landscape, portrait)
        assert landscape[0] == pytest.approx(portrait[0], rel=0.2) and landscape[1] == pytest.approx(portrait[1], rel=0.35)

