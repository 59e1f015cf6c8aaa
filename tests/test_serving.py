"""The model consumers get: the registered pyfunc in process and behind `mlflow models serve`.

One real model (ImageNet-initialised Lite0 at 64 px) is registered as champion in a sqlite
store; predictions on real FracAtlas X-rays are compared with the project's own preprocessing
and with what the scoring server answers over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import timm
import torch
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import save_file

from fracture.config import RegisterParams
from fracture.consumer import predict_as_consumer
from fracture.decoding import open_xray
from fracture.detection import build_detector
from fracture.gate import EvaluatedSplit
from fracture.inference import Classifier
from fracture.intake import InputPolicy
from fracture.packaging import save_detector_pyfunc, save_pyfunc
from fracture.registry import register
from fracture.serving import INPUT_ROOT_ENV, RequestRefused
from tests.conftest import REPO, require_fracatlas, untrained_model_files
from tests.dicom_files import ENCODINGS, dicom_from_jpeg
from tests.servers import child_env, free_port, running
from tests.synthetic import ihdr_png
from tests.test_detection import CONFIG as DETECTOR

pytestmark = pytest.mark.integration

NAME = "fracture-classifier"
THRESHOLD = 0.42


def xray_paths() -> list[Path]:
    root = require_fracatlas()
    return [root / "images/Fractured/IMG0000019.jpg", root / "images/Non_fractured/IMG0000000.jpg"]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def champion(tmp_path_factory) -> Iterator[dict]:
    """A sqlite registry holding one real model as ``champion``; yields its URI and files."""
    xrays = xray_paths()
    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", artifact_location=(tmp / "art").as_uri()))
        torch.manual_seed(0)  # the untrained head, so the scores the tests compare are the same in every run
        weights, config = untrained_model_files(tmp, THRESHOLD)
        with mlflow.start_run(tags={"data_version": "d" * 32 + ".dir"}) as run:
            mlflow.log_metrics({"test_roc_auc": 0.9})
        params = RegisterParams(NAME, "t")
        # Registered in this process (the gate's consumer Python is tested in test_registry); the
        # consumer test below loads it in one.
        reg = register(params, run.info.run_id, weights, config, EvaluatedSplit("s" * 64, 1, xrays[0]), MlflowClient(uri),
                       isolated=False)
        assert reg.champion
        yield {"uri": uri, "weights": weights, "config": config, "tmp": tmp}
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def model(champion):
    """The champion as a consumer loads it, with no input root: ``path`` rows are refused."""
    assert INPUT_ROOT_ENV not in os.environ
    return mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


@pytest.fixture(scope="module")
def root_model(champion):
    """The champion loaded with ``FRACTURE_INPUT_ROOT`` naming a folder that holds the two X-rays,
    a link inside it pointing outside, and nothing else."""
    root = champion["tmp"] / "inputs"
    root.mkdir()
    for path in xray_paths():
        (root / path.name).write_bytes(path.read_bytes())
    (root / "escape.jpg").symlink_to(xray_paths()[0])
    patch = pytest.MonkeyPatch()
    patch.setenv(INPUT_ROOT_ENV, str(root))
    try:
        yield mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    finally:
        patch.undo()


def test_bytes_base64_and_paths_predict_as_the_project_preprocesses(model, root_model, champion):
    paths = xray_paths()
    by_path = root_model.predict(pd.DataFrame({"path": [p.name for p in paths]}))
    by_b64 = model.predict(pd.DataFrame({"image": [b64(p) for p in paths]}))
    by_bytes = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))
    mixed = root_model.predict(pd.DataFrame({"image": [b64(paths[0]), None], "path": [None, paths[1].name]}))

    assert list(by_path.columns) == ["fracture_probability", "label", "threshold", "error", "note"]
    assert (by_path["error"] == "").all() and (by_path["note"] == "").all()
    for other in (by_b64, by_bytes, mixed):
        np.testing.assert_allclose(other["fracture_probability"], by_path["fracture_probability"], rtol=0, atol=1e-6)
    assert (by_path["threshold"] == THRESHOLD).all()
    expected_labels = np.where(by_path["fracture_probability"] >= THRESHOLD, "fractured", "not_fractured")
    assert list(by_path["label"]) == list(expected_labels)

    # The logged model scores exactly as the project's own weights and config do in this process.
    direct = Classifier.load(champion["weights"], champion["config"]).probabilities([open_xray(p) for p in paths])
    np.testing.assert_allclose(by_path["fracture_probability"], direct, rtol=0, atol=1e-6)


def test_a_draft_model_reads_jpegs_at_draft_scale_and_dicom_in_full(tmp_path):
    """A model whose data config says ``decode: draft`` scores a JPEG from the reduced-scale
    decode its prepared cache holds, not from a full decode; a DICOM radiograph has no such
    scale and is scored from its full pixels (what ``decode: full`` gives its JPEG too)."""
    with torch.random.fork_rng():
        # The untrained head, seeded: drawn from the process's stream, about one head in 70 scores
        # the two decodes of this X-ray within 1e-4 of each other.
        torch.manual_seed(1)
        weights, config = untrained_model_files(tmp_path, THRESHOLD, decode="draft")
    served = mlflow.pyfunc.load_model(str(save_pyfunc(tmp_path / "pyfunc", weights, config)))
    jpeg = xray_paths()[0]  # 1152 x 1440, greyscale
    out = served.predict(pd.DataFrame({"image": [jpeg.read_bytes(), dicom_from_jpeg(jpeg, "8-bit")]}))
    assert (out["error"] == "").all(), out["error"].tolist()
    classifier = Classifier.load(weights, config)
    assert classifier.preprocessor.open(jpeg, allow_truncated=False).size == (144, 180)  # 1/8 still covers 64 px
    draft = classifier.probabilities([classifier.preprocessor.open(jpeg, allow_truncated=False)])[0]
    full = classifier.probabilities([open_xray(jpeg, rgb=False)])[0]
    assert abs(draft - full) > 1e-4
    assert abs(out["fracture_probability"][0] - draft) <= 1e-6
    assert abs(out["fracture_probability"][1] - full) <= 1e-6


def test_the_models_own_input_example_is_answered_whatever_its_smallest_side(tmp_path):
    """The example logged with the model (MLflow's input_example, which the UI's snippets and
    `mlflow models predict` use) passes the model's input checks, also when validate.min_side is
    above the 64 px example of before."""
    from mlflow.models import Model

    from fracture.intake import InputPolicy

    weights, config = untrained_model_files(tmp_path, THRESHOLD)
    config = dataclasses.replace(config, input=InputPolicy(min_side=128))
    folder = save_pyfunc(tmp_path / "pyfunc", weights, config)
    example = Model.load(str(folder)).load_input_example(str(folder))
    out = mlflow.pyfunc.load_model(str(folder)).predict(example)
    assert out["error"].tolist() == [""]


def test_an_empty_frame_gives_an_empty_answer(model):
    out = model.predict(pd.DataFrame({"path": pd.Series([], dtype=object)}))
    assert out.empty and list(out.columns) == ["fracture_probability", "label", "threshold", "error", "note"]


@pytest.mark.parametrize("frame", [pd.DataFrame({"file": ["x.jpg"]}), pd.DataFrame.from_records([])])
def test_a_request_without_an_image_or_path_column_is_refused_saying_what_the_model_gets(model, frame):
    """MLflow drops a column its signature does not name: a request of misnamed columns reaches the model
    as no rows and no columns, as `{"dataframe_records": []}` does. Answered with no rows, it would read
    as every file scored; the message says what the model gets."""
    with pytest.raises(Exception, match=r"input needs a column 'image' \(file bytes, or base64 text\) or 'path', and "
                                        r"at least one row; the model gets no other column"):
        model.predict(frame)


BAD_ROWS = [
    ({"image": base64.b64encode(b"not an image").decode()}, "row 1: the image is not an image file that can be read"),
    ({"image": b"\xff\xd8\xff\xe0 cut short"}, "row 1: the image is not an image file that can be read"),
    ({"image": "this is not base64!"}, "row 1: 'image' is not base64 text"),
    ({"image": "bild\u00e9"}, "row 1: 'image' is not base64 text"),  # text beyond ASCII, which b64decode refuses apart
    ({"image": "", "path": ""}, "row 1: give exactly one of 'image'"),
    # Was told it gave neither an image nor a path.
    ({"image": 5}, "row 1: 'image' holds a value of type int; give the file's bytes, or base64 text"),
    ({"image": base64.b64encode(ihdr_png(12_000, 12_000)).decode()}, "row 1: the image declares 12000 x 12000 px"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_a_bad_row_is_reported_in_its_row_and_the_others_are_scored(model, row, message):
    good = {"image": b64(xray_paths()[0]), "path": None}
    frame = pd.DataFrame([good, {"image": None, "path": None} | row, good])
    out = model.predict(frame)
    assert list(out["error"]) == ["", out["error"][1], ""] and out["error"][1].startswith(message)
    assert np.isnan(out["fracture_probability"][1]) and out["label"][1] == ""
    assert out["fracture_probability"][0] == out["fracture_probability"][2] > 0
    with pytest.raises(RequestRefused, match="^" + message.replace("(", r"\(")):
        model.predict(frame, params={"on_error": "raise"})


def test_a_request_of_several_batches_answers_every_row_in_order(model):
    # 40 rows: two batches, the second decoded while the first is scored; bad rows in both.
    xrays = [b64(p) for p in xray_paths()]
    rows = [{"image": xrays[i % 2]} for i in range(40)]
    rows[5] = rows[35] = {"image": "this is not base64!"}
    out = model.predict(pd.DataFrame(rows))
    alone = model.predict(pd.DataFrame({"image": xrays}))["fracture_probability"]
    assert [i for i, e in enumerate(out["error"]) if e] == [5, 35]
    assert out["error"][35].startswith("row 35: 'image' is not base64 text")
    scored = [i for i in range(40) if i not in (5, 35)]
    np.testing.assert_allclose(out["fracture_probability"][scored], [alone[i % 2] for i in scored], rtol=0, atol=1e-6)
    with pytest.raises(RequestRefused, match="^row 5: "):
        model.predict(pd.DataFrame(rows), params={"on_error": "raise"})


def test_answers_keep_the_request_rows_index_and_wrapped_base64_is_read(model):
    # A filtered manifest: its index is not 0..n-1. The answer for each row must land on that row.
    xrays = [base64.encodebytes(p.read_bytes()).decode() for p in xray_paths()]  # wrapped at 76 columns
    assert "\n" in xrays[0]
    manifest = pd.DataFrame({"image": [xrays[0], "this is not base64!", xrays[1], xrays[0]]}, index=[10, 11, 12, 13])
    rows = manifest.loc[[11, 12, 13]]
    out = model.predict(rows)
    assert list(out.index) == [11, 12, 13]
    manifest["p"] = out["fracture_probability"]  # aligned by index, as pandas assigns
    assert np.isnan(manifest.loc[10, "p"]) and np.isnan(manifest.loc[11, "p"])
    alone = model.predict(pd.DataFrame({"image": [b64(p) for p in xray_paths()]}))["fracture_probability"]
    np.testing.assert_allclose(manifest.loc[[12, 13], "p"], [alone[1], alone[0]], rtol=0, atol=1e-6)
    assert out.loc[11, "error"].startswith("row 0: 'image' is not base64 text")


def test_path_rows_are_refused_without_an_input_root(model):
    out = model.predict(pd.DataFrame({"path": [str(xray_paths()[0])]}))
    assert out["error"][0].startswith("row 0: 'path' input is switched off on this model; send the file's bytes")
    assert str(xray_paths()[0].parent) not in out["error"][0]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/etc/passwd", "leads outside the folder this model reads from"),
        ("../../../../etc/passwd", "leads outside the folder this model reads from"),
        ("/etc/nonexistent", "leads outside the folder this model reads from"),
        ("escape.jpg", "leads outside the folder this model reads from"),
        ("missing.jpg", "names no file in the folder this model reads from"),
        ("a\x00b.jpg", "is not a usable file path"),  # costs its row only, not the request
        ("x" * 300, "cannot be looked up in the folder this model reads from (OSError)"),  # a name too long
    ],
)
def test_paths_outside_the_root_are_refused_without_echoing_them(root_model, path, message):
    out = root_model.predict(pd.DataFrame({"path": [xray_paths()[1].name, path]}))
    assert out["error"][0] == "" and out["fracture_probability"][0] > 0
    ends = ("", "; give a path inside it", "; give a path inside the folder", "; give a readable file's path")
    assert out["error"][1] in {f"row 1: 'path' {message}{end}" for end in ends}
    assert "etc" not in out["error"][1] and "inputs" not in out["error"][1]


def test_a_request_over_the_row_limit_is_refused_whole(model):
    rows = model.unwrap_python_model().policy.max_rows + 1
    with pytest.raises(RequestRefused, match=f"the request holds {rows} rows; this model scores at most {rows - 1}"):
        model.predict(pd.DataFrame({"image": ["x"] * rows}))
    with pytest.raises(RequestRefused, match="on_error must be one of report, raise"):
        model.predict(pd.DataFrame({"image": ["x"]}), params={"on_error": "ignore"})


def test_several_files_in_one_row_are_refused_whole_not_answered_as_one_row(model):
    """MLflow makes a dict of lists of text (``predict({"image": [b64, b64]})``) ONE row whose cell
    is the list: answering that row "give exactly one of 'image' or 'path'" misled the caller, and
    two answers to one row would break one answer per row. The request is refused, saying how
    to send one file per row; the DataFrame it names is answered row by row, and a list of one
    file is that row's file."""
    xrays = [b64(p) for p in xray_paths()]
    requests_ = [({"image": xrays}, "image"), (pd.DataFrame({"image": [xrays]}), "image"),
                 (pd.DataFrame({"image": [tuple(xrays)]}), "image"), (pd.DataFrame({"path": [["a.jpg", "b.jpg"]]}), "path")]
    for request, column in requests_:
        with pytest.raises(RequestRefused, match=rf"^row 0: '{column}' holds 2 values in one row; give one file per row, "
                                                 rf"as a DataFrame: pd.DataFrame\(\{{'{column}': \[\.\.\.\]\}}\)"):
            model.predict(request)
    out = model.predict(pd.DataFrame({"image": xrays}))
    assert len(out) == 2 and (out["error"] == "").all()
    both = model.predict({"image": [p.read_bytes() for p in xray_paths()]})  # a dict of lists of bytes: one row each
    np.testing.assert_allclose(both["fracture_probability"], out["fracture_probability"], rtol=0, atol=1e-6)
    sent = pd.DataFrame({"image": [[xrays[1]]]}, index=[7])
    for request in ({"image": [xrays[1]]}, sent):
        one = model.predict(request)
        assert len(one) == 1 and one["error"].iloc[0] == ""
        assert one["fracture_probability"].iloc[0] == pytest.approx(out["fracture_probability"][1], abs=1e-6)
    assert list(one.index) == [7] and sent["image"][7] == [xrays[1]]  # the caller's frame is left as sent


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_dicom_radiograph_scores_as_its_jpeg(model, encoding):
    """Tolerance: 1e-6 where the DICOM holds the JPEG's pixels exactly; 0.02 for the encapsulated
    JPEG, which another decoder reads (pixels within one grey level, tests/test_dicom.py). This
    64 px model has an untrained head; the real champion moved by 0.0006 on the same file."""
    jpeg = xray_paths()[0]  # a greyscale JPEG
    out = model.predict(pd.DataFrame({"image": [jpeg.read_bytes(), dicom_from_jpeg(jpeg, encoding)]}))
    assert (out["error"] == "").all(), out["error"].tolist()
    tolerance = 0.02 if encoding == "JPEG baseline" else 1e-6
    assert abs(out["fracture_probability"][1] - out["fracture_probability"][0]) <= tolerance


def test_monochrome1_is_not_scored_as_a_negative(model):
    jpeg = xray_paths()[0]
    negative = Image.fromarray(255 - np.asarray(Image.open(jpeg).convert("L")))
    buf = io.BytesIO()
    negative.save(buf, format="PNG")
    out = model.predict(
        pd.DataFrame({"image": [jpeg.read_bytes(), dicom_from_jpeg(jpeg, "MONOCHROME1 VOI LUT"), buf.getvalue()]})
    )
    p_jpeg, p_dicom, p_negative = out["fracture_probability"]
    assert abs(p_dicom - p_jpeg) <= 1e-6
    assert abs(p_negative - p_jpeg) > 1e-3  # the model tells the negative apart, so the check above means something


def test_input_without_an_image_column_is_refused(model):
    with pytest.raises(Exception, match="'image'"):
        model.predict(pd.DataFrame({"file": ["x.jpg"]}))


def test_models_serve_answers_as_in_process_prediction(model, champion):
    """`mlflow models serve -m models:/<name>@champion` on 127.0.0.1 answers a real X-ray, and
    answers the probes of a hostile caller row by row, without a stack trace or a server path."""
    paths = xray_paths()
    root = champion["tmp"] / "served-inputs"
    root.mkdir()
    (root / paths[1].name).write_bytes(paths[1].read_bytes())
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]
    env = child_env(MLFLOW_TRACKING_URI=champion["uri"], **{INPUT_ROOT_ENV: str(root)})
    url = f"http://127.0.0.1:{port}"
    with running(cmd, env, f"{url}/ping", champion["tmp"] / "serve.log"):
        split = {"dataframe_split": {"columns": ["image"], "data": [[b64(p)] for p in paths]}}
        answer = requests.post(f"{url}/invocations", json=split, timeout=120)
        assert answer.status_code == 200, answer.text
        print("POST /invocations ->", json.dumps(answer.json()))
        served = pd.DataFrame(answer.json()["predictions"])

        probe_rows = [
            {"path": "/etc/passwd"},
            {"path": "/etc/nonexistent"},
            {"path": "../../../../etc/passwd"},
            {"image": base64.b64encode(ihdr_png(12_000, 12_000)).decode()},
            {"path": paths[1].name},
            {"image": b64(paths[0])},
        ]
        probe = requests.post(f"{url}/invocations", json={"dataframe_records": probe_rows}, timeout=120)
        assert probe.status_code == 200, probe.text
        print("probe ->", json.dumps(probe.json()))

        too_many = {"dataframe_records": [{"image": "x"}] * 65}
        refused = requests.post(f"{url}/invocations", json=too_many, timeout=120)
        strict = {"dataframe_records": [{"path": "/etc/passwd"}], "params": {"on_error": "raise"}}
        raised = requests.post(f"{url}/invocations", json=strict, timeout=120)
        print("over the row limit ->", refused.status_code, refused.text[-300:])
        print("on_error=raise ->", raised.status_code, raised.text[-300:])

    local = model.predict(pd.DataFrame({"image": [b64(p) for p in paths]}))
    np.testing.assert_allclose(served["fracture_probability"], local["fracture_probability"], rtol=0, atol=1e-6)
    assert list(served["label"]) == list(local["label"])
    assert list(served["threshold"]) == [THRESHOLD] * 2

    rows = probe.json()["predictions"]
    outside = "row {}: 'path' leads outside the folder this model reads from; give a path inside it"
    assert [r["error"] for r in rows[:3]] == [outside.format(0), outside.format(1), outside.format(2)]
    assert rows[3]["error"].startswith("row 3: the image declares 12000 x 12000 px (144 megapixels)")
    assert rows[3]["fracture_probability"] is None
    assert rows[4]["error"] == rows[5]["error"] == ""
    assert rows[4]["fracture_probability"] == pytest.approx(local["fracture_probability"][1], abs=1e-6)
    assert rows[5]["fracture_probability"] == pytest.approx(local["fracture_probability"][0], abs=1e-6)

    for response in (refused, raised):
        assert response.status_code == 400
        body = response.json()
        assert "stack_trace" not in body and str(root) not in response.text and str(champion["tmp"]) not in response.text
    assert "the request holds 65 rows; this model scores at most 64" in refused.json()["message"]
    assert "row 0: 'path' leads outside the folder" in raised.json()["message"]


@pytest.mark.parametrize("kind", ["classifier", "detector"])
def test_a_consumer_with_only_the_models_requirements_loads_and_scores_it(model, champion, tmp_path, kind, monkeypatch):
    """The promise docs/consumers.md makes to a consumer: MLflow and the packages of the model's requirements.txt
    are all it needs. In a Python that hides every other package of this venv (this project, the
    pipeline's and the page's libraries; :mod:`fracture.consumer`, which the gate loads versions
    with), the registered classifier and a saved fracture detector load and score a JPEG and a
    DICOM file exactly as in this process."""
    jpeg = xray_paths()[0]
    dicom = tmp_path / "xray.dcm"
    dicom.write_bytes(dicom_from_jpeg(jpeg, "12-bit rescaled"))
    if kind == "classifier":
        uri, local, score = f"models:/{NAME}@champion", model, "fracture_probability"
    else:
        torch.manual_seed(0)
        detector = build_detector(DETECTOR, timm.create_model("tf_efficientnet_lite0", num_classes=2).state_dict())
        save_file(detector.state_dict(), str(tmp_path / "detector.safetensors"))
        # An untrained head scores every box low: threshold 0 returns each box the detector keeps.
        described = DETECTOR.to_dict() | {"threshold": 0.0, "input": InputPolicy().to_dict()}
        uri = str(save_detector_pyfunc(tmp_path / "detector", tmp_path / "detector.safetensors", described))
        local, score = mlflow.pyfunc.load_model(uri), "fracture_score"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion["uri"])  # the registry the consumer's Python reads
    result = predict_as_consumer(uri, [jpeg, dicom])
    assert "prefect" not in result.closure and "opencv-contrib-python-headless" not in result.closure
    assert "fracture" not in result.closure
    assert not Path(result.code).is_relative_to(REPO), result.code  # the model's copy of the code
    answer = result.rows.to_dict(orient="list")
    assert answer["error"] == ["", ""], answer["error"]
    expected = local.predict(pd.DataFrame({"image": [jpeg.read_bytes(), dicom.read_bytes()]}))
    np.testing.assert_allclose(answer[score], expected[score], rtol=0, atol=1e-6)
    if kind == "detector":
        for theirs, ours in zip(answer["boxes"], expected["boxes"], strict=True):
            theirs, ours = json.loads(theirs), json.loads(ours)
            assert len(theirs) == len(ours) > 0
            np.testing.assert_allclose(theirs, ours, rtol=0, atol=0.011)  # [x0, y0, x1, y1] to 0.01 px, score
    print("hidden modules the consumer's imports asked for (each optional):", result.refused)


@pytest.mark.parametrize("dicom", [False, True])
def test_a_base64_row_over_the_size_limit_is_refused_from_its_length_before_it_is_decoded(dicom):
    """Decoding first held about four times the file (the text without its line breaks, its ASCII
    copy, the bytes) for a row then refused on its size: memory a request of a few such rows spent
    for nothing. The refusal is the one read_xray gives, with what to send for a DICOM file."""
    import tracemalloc

    from fracture.intake import InputPolicy
    from fracture.serving import RowRefused, read_row

    policy = InputPolicy(max_bytes=8 * 2**20)
    start = b"\0" * 128 + b"DICM" if dicom else b"\xff\xd8\xff\xe0"
    text = base64.b64encode(start + b"\0" * (12 * 2**20)).decode()
    row = pd.Series({"image": text}, dtype=object)
    tracemalloc.start()
    try:
        with pytest.raises(RowRefused) as refused:
            read_row(0, row, None, policy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB allocated to refuse a {len(text) / 2**20:.0f} MiB cell"
    with pytest.raises(RowRefused) as decoded:  # the same refusal as once decoded
        read_row(0, pd.Series({"image": base64.b64decode(text)}, dtype=object), None, policy)
    assert str(refused.value) == str(decoded.value)
    assert str(refused.value).startswith("row 0: the image is 12.0 MiB; the model accepts files up to 8 MiB.")
    # wrapped as MIME wraps it, the same
    wrapped = pd.Series({"image": base64.encodebytes(base64.b64decode(text)).decode()}, dtype=object)
    with pytest.raises(RowRefused, match=r"^row 0: the image is 12\.0 MiB"):
        read_row(0, wrapped, None, policy)
