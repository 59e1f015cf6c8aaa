"""The MLflow pyfunc model that consumers load from the registry.

Input: a DataFrame with a column ``image`` (the file's bytes, or their base64 text as a JSON
request carries them) or ``path`` (a file under the folder named by ``FRACTURE_INPUT_ROOT`` when
the model was loaded); one of the two per row. JPEG, PNG and DICOM radiographs are read.

Output: one row per input row, in order: ``fracture_probability`` (NaN for a row that was not
scored; ``null`` over HTTP), ``label`` (empty when not scored) and ``threshold``; ``error``,
empty when the row was scored, else a message naming the row and what to send instead; and
``note``, what was done to the image on the way (a conversion, a truncated file).

Every row passes the model's own input checks (:mod:`fracture.intake`, with the
:class:`~fracture.intake.InputPolicy` stored in its config), so a page upload, a batch job and
an HTTP request get the same answer for the same bytes. One bad row never costs the others:
with the inference parameter ``on_error`` at ``report`` (the default) its error is returned in
its row; ``raise`` refuses the whole request at the first bad row instead. A request over the
policy's ``max_rows`` is refused as a whole. Messages never name a path on the server, and no
refusal of the model's carries a stack trace over HTTP (MLflow's own, for a CSV or Parquet body
it cannot parse, does: docs/consumers.md says to let only JSON through).

It scores through the one inference path (:mod:`fracture.inference`). This package travels
inside the logged model (``code_paths``), so a consumer needs nothing of this project installed.
"""

from __future__ import annotations

import binascii
import json
import logging
import os
import re
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from fracture.imaging import nchw
from fracture.inference import Classifier, ServingConfig, probabilities
from fracture.intake import (
    InputPolicy,
    InputRejected,
    Xray,
    check_size,
    read_file,
    read_xray,
)

log = logging.getLogger(__name__)

#: The folder ``path`` rows are read from; unset, ``path`` rows are refused.
INPUT_ROOT_ENV = "FRACTURE_INPUT_ROOT"
ON_ERROR = ("report", "raise")
INPUT_SCHEMA = Schema(
    [ColSpec("string", "image", required=False), ColSpec("string", "path", required=False)]
)
OUTPUT_COLUMNS = ("fracture_probability", "label", "threshold", "error", "note")
OUTPUT_SCHEMA = Schema(
    [
        ColSpec("double", "fracture_probability"),
        ColSpec("string", "label"),
        ColSpec("double", "threshold"),
        ColSpec("string", "error"),
        ColSpec("string", "note"),
    ]
)
PARAMS_SCHEMA = ParamSchema([ParamSpec("on_error", "string", "report")])
SIGNATURE = ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA, params=PARAMS_SCHEMA)
#: Rows decoded and scored together; bounds the memory a large request needs.
BATCH_SIZE = 32
#: Threads that check, decode and resize rows (Pillow releases the GIL while it decodes and
#: resizes), while the network scores the batch before.
DECODE_THREADS = max(2, min(4, os.cpu_count() or 1))


class RequestRefused(MlflowException, ValueError):
    """A request the model refuses as a whole (HTTP 400, with no stack trace)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class RowRefused(ValueError):
    """One row that cannot be scored; the message names the row and what to send instead."""


def input_root(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The folder ``path`` rows may be read from (``FRACTURE_INPUT_ROOT``), or ``None`` when unset.

    Raises:
        ValueError: the variable names no folder.
    """
    value = environ.get(INPUT_ROOT_ENV)
    if not value:
        return None
    root = Path(value).resolve()
    if not root.is_dir():
        raise ValueError(f"{INPUT_ROOT_ENV}={value} names no folder; set it to the folder 'path' rows are read from")
    return root


def _present(value: Any) -> bool:
    return isinstance(value, (str, bytes, bytearray, memoryview)) and len(value) > 0


def _missing(value: Any) -> bool:
    """An empty cell as pandas fills one in: None, NaN, NaT or pd.NA."""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # an array or other container: not one missing value
        return False


def read_path(i: int, path: str, root: Path | None, policy: InputPolicy) -> bytes:
    """The bytes of a ``path`` row's file, read only from under ``root``.

    The path is resolved with every symbolic link and ``..`` followed before it is compared
    with the root, so no spelling reaches outside it. Messages never repeat the path.

    Raises:
        RowRefused: no root is set, the path leads outside it, names no file, or the file is
            larger than the policy allows.
    """
    if root is None:
        raise RowRefused(
            f"row {i}: 'path' input is switched off on this model; send the file's bytes in 'image' "
            f"(a server reads paths only when {INPUT_ROOT_ENV} names a folder when the model is loaded)"
        )
    try:
        target = Path(os.path.realpath(root / path))
    except (ValueError, OSError, TypeError):  # a NUL byte, a path the system cannot resolve
        raise RowRefused(f"row {i}: 'path' is not a usable file path; give a path inside the folder") from None
    if not target.is_relative_to(root):
        raise RowRefused(f"row {i}: 'path' leads outside the folder this model reads from; give a path inside it")
    try:
        # Past ENOENT and ENOTDIR, is_file raises (a name too long, a folder the server may not
        # enter): that row's refusal, and its message never repeats the path.
        found = target.is_file()
    except OSError as exc:
        raise RowRefused(f"row {i}: 'path' cannot be looked up in the folder this model reads from "
                         f"({type(exc).__name__}); give a readable file's path") from None
    if not found:
        raise RowRefused(f"row {i}: 'path' names no file in the folder this model reads from")
    try:
        return read_file(target, policy)
    except InputRejected as exc:
        raise RowRefused(f"row {i}: the file at 'path' {exc}") from exc
    except OSError as exc:
        raise RowRefused(f"row {i}: the file at 'path' cannot be read ({type(exc).__name__})") from exc


def check_request(
    model_input: pd.DataFrame, params: dict[str, Any] | None, policy: InputPolicy
) -> tuple[str, pd.DataFrame]:
    """The request's ``on_error`` and its rows (indexed from 0), or the whole request refused.

    Raises:
        RequestRefused: ``on_error`` is not allowed, the input has neither an ``image`` nor a
            ``path`` column, it holds more rows than the policy's ``max_rows``, or a cell holds
            several files (:func:`_one_file_a_row`).
    """
    on_error = (params or {}).get("on_error") or "report"
    if on_error not in ON_ERROR:
        raise RequestRefused(f"parameter on_error must be one of {', '.join(ON_ERROR)}; got {on_error!r}")
    frame = pd.DataFrame(model_input)
    if not {"image", "path"} & set(frame.columns):
        # MLflow drops the columns its signature does not name before the model sees the request: a
        # request whose columns are all misnamed ('file', 'images') arrives as no rows and no columns, as an
        # empty batch sent as records, instances or inputs does. Neither is answered with no rows, which
        # would read as every file scored.
        raise RequestRefused(
            "input needs a column 'image' (file bytes, or base64 text) or 'path', and at least one row; the model "
            "gets no other column (MLflow drops those its signature does not name)"
        )
    if len(frame) > policy.max_rows:
        raise RequestRefused(
            f"the request holds {len(frame)} rows; this model scores at most {policy.max_rows} per "
            "request (params: serve.max_rows): send them in smaller requests"
        )
    return on_error, _one_file_a_row(frame.reset_index(drop=True))


def _one_file_a_row(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each ``image`` or ``path`` cell that holds a list of one value holding that value.

    MLflow turns a dict of lists of text (``predict({"image": [b64, b64]})``) into ONE row whose
    cell is the list; answering it as one row, or splitting it into several, would break one
    answer per row sent, so such a request is refused, saying how to send one file per row. A
    list of one file is that row's file (``predict({"image": [b64]})``).

    Raises:
        RequestRefused: a cell holds a list, tuple, array or series of other than one value.
    """
    for column in ("image", "path"):
        if column not in frame.columns:
            continue
        cells, unwrapped = list(frame[column]), False
        for i, value in enumerate(cells):
            if not isinstance(value, (list, tuple, np.ndarray, pd.Series)):
                continue
            values = list(value.ravel()) if isinstance(value, np.ndarray) else list(value)
            if len(values) != 1:
                raise RequestRefused(
                    f"row {i}: '{column}' holds {len(values)} values in one row; give one file per row, as a "
                    f"DataFrame: pd.DataFrame({{'{column}': [...]}}) (a dict of lists of text reaches the model "
                    "as one row)"
                )
            cells[i], unwrapped = values[0], True
        if unwrapped:  # a new column: the caller's frame is left as it was sent
            frame = frame.assign(**{column: pd.Series(cells, index=frame.index, dtype=object)})
    return frame


#: What encoders that wrap lines (base64.encodebytes, openssl base64, MIME) put in base64 text.
_WRAPPING = re.compile(r"\s")


def _from_base64(i: int, text: str, policy: InputPolicy) -> bytes:
    """The bytes of row ``i``'s base64 ``image`` text. Whitespace carries nothing; anything else
    that is not base64 is refused. A file over ``policy.max_bytes`` is refused from the text's
    length, before it is decoded: decoding first held about four times the file in memory (the
    text without its line breaks, its ASCII copy, the bytes), for a row then refused on its size.

    Raises:
        RowRefused: the text is not base64, or the file it holds is over the limit.
    """
    if _WRAPPING.search(text):
        text = _WRAPPING.sub("", text)
    padding = len(text[-2:]) - len(text[-2:].rstrip("="))
    size = len(text) // 4 * 3 - padding  # the bytes it decodes to
    try:
        start = binascii.a2b_base64(text[:176], strict_mode=True) if size > policy.max_bytes else b""
        data = b"" if start else binascii.a2b_base64(text, strict_mode=True)  # read from the str, not a copy
    except (binascii.Error, ValueError) as exc:  # ValueError: text with characters outside ASCII
        raise RowRefused(f"row {i}: 'image' is not base64 text; send the file's bytes base64-encoded") from exc
    if start:
        try:
            check_size(size, policy, start)  # its start: whether it is DICOM, for what to send instead
        except InputRejected as exc:
            raise RowRefused(f"row {i}: the image {exc}") from exc
    return data


def read_row(
    i: int, row: pd.Series, root: Path | None, policy: InputPolicy, draft: tuple[int, int] | None = None
) -> Xray:
    """Reads and checks one input row: ``image`` (bytes, or base64 text) or ``path``, exactly one.

    ``draft``: JPEGs are decoded at a reduced scale covering it, as the model was trained
    (:func:`fracture.intake.read_xray`).

    Raises:
        RowRefused: the row gives neither or both, or its image fails a check; the message
            names the row and what to send instead.
    """
    image = row.get("image")
    path = row.get("path")
    for column, value in (("image", image), ("path", path)):
        if not (value is None or isinstance(value, (str, bytes, bytearray, memoryview)) or _missing(value)):
            raise RowRefused(
                f"row {i}: '{column}' holds a value of type {type(value).__name__}; give "
                + ("the file's bytes, or base64 text" if column == "image" else "a file path, as text")
            )
    has_image, has_path = _present(image), _present(path)
    if has_image == has_path:
        raise RowRefused(f"row {i}: give exactly one of 'image' (file bytes, or base64 text) or 'path' (a file path)")
    if has_path:
        data, what = read_path(i, str(path), root, policy), "the file at 'path'"
    elif isinstance(image, str):
        data, what = _from_base64(i, image, policy), "the image"
    else:
        data, what = bytes(image), "the image"
    try:
        return read_xray(data, policy, draft)
    except InputRejected as exc:
        raise RowRefused(f"row {i}: {what} {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - whatever a file does to a decoder costs that row only
        log.exception("row %d could not be read", i)
        raise RowRefused(f"row {i}: {what} could not be read ({type(exc).__name__}); send another export of it") from exc


class FracturePyfunc(mlflow.pyfunc.PythonModel):
    """Fracture classifier with its preprocessing and input checks, as logged to the MLflow registry.

    Attributes:
        classifier: the network, its preprocessing and threshold (:class:`fracture.inference.Classifier`),
            for consumers that need more than :meth:`predict`, such as a heat map on the page.
        root: the folder ``path`` rows are read from (``FRACTURE_INPUT_ROOT`` at load time), or ``None``.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        with open(context.artifacts["config"]) as fh:
            config = ServingConfig.from_dict(json.load(fh))
        self.classifier = Classifier.load(context.artifacts["weights"], config)
        self.root = input_root()

    @property
    def config(self) -> ServingConfig:
        """Architecture, data config, threshold and input policy the model was logged with."""
        return self.classifier.config

    @property
    def policy(self) -> InputPolicy:
        return self.classifier.config.input

    def score_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Fracture probabilities of images already resized to the input size (uint8 NCHW), as float64."""
        c = self.classifier
        return probabilities(c.network, pixels, c.preprocessor, c.device, BATCH_SIZE, c.config.tta).astype(np.float64)

    def _read_resized(self, i: int, row: pd.Series) -> tuple[list[str], np.ndarray]:
        """One row checked, decoded and resized to the input size (HWC), with what was done on the way."""
        xray = read_row(i, row, self.root, self.policy, self.config.data_config.draft_size)
        return list(xray.warnings), np.asarray(self.classifier.preprocessor.resize(xray.image))

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        on_error, rows = check_request(model_input, params, self.policy)
        out = pd.DataFrame(
            {
                "fracture_probability": np.full(len(rows), np.nan),
                "label": "",
                "threshold": float(self.classifier.threshold),
                "error": "",
                "note": "",
            },
            columns=list(OUTPUT_COLUMNS),
        )
        # A batch at a time, so a large request never holds every full-size X-ray at once; each
        # row is resized as soon as it is decoded, and the next batch is read while this one is
        # scored, so decoding and the network overlap.
        batches = [rows.iloc[start : start + BATCH_SIZE] for start in range(0, len(rows), BATCH_SIZE)]
        with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="fracture-decode") as pool:

            def submit(batch: pd.DataFrame) -> list[tuple[int, Future[tuple[list[str], np.ndarray]]]]:
                return [(int(i), pool.submit(self._read_resized, int(i), row)) for i, row in batch.iterrows()]

            pending = submit(batches[0]) if batches else []
            for k in range(len(batches)):
                current, pending = pending, submit(batches[k + 1]) if k + 1 < len(batches) else []
                read: dict[int, tuple[list[str], np.ndarray]] = {}
                for i, future in current:
                    try:
                        read[i] = future.result()
                    except RowRefused as exc:
                        if on_error == "raise":
                            for _, later in pending:
                                later.cancel()
                            raise RequestRefused(str(exc)) from None
                        out.at[i, "error"] = str(exc)
                if not read:
                    continue
                index = list(read)
                probs = self.score_pixels(nchw(np.stack([pixels for _, pixels in read.values()])))
                out.loc[index, "fracture_probability"] = probs
                out.loc[index, "label"] = self.classifier.labels(probs)
                out.loc[index, "note"] = ["; ".join(warnings) for warnings, _ in read.values()]
        if _in_scoring_server() and out["error"].ne("").any():
            # MLflow's server writes NaN as a bare NaN, which is not JSON; an unscored row gets null.
            out["fracture_probability"] = out["fracture_probability"].astype(object).where(out["error"].eq(""), None)
        return on_input_index(out, model_input)


def on_input_index(out: pd.DataFrame, model_input: Any) -> pd.DataFrame:
    """``out`` (one row per input row, in order) indexed as the request's rows were.

    A consumer who scores a filtered manifest and assigns the result back
    (``manifest.loc[rows.index, "p"] = model.predict(rows)["fracture_probability"]``) gets each
    row's own answer; on a fresh 0..n-1 index pandas would align them to other rows. The
    messages' "row N" counts rows by position, from 0.
    """
    if isinstance(model_input, pd.DataFrame) and len(model_input.index) == len(out):
        out.index = model_input.index
    return out


def _in_scoring_server() -> bool:
    """True inside ``mlflow models serve`` (MLflow flags its scoring server in the environment)."""
    try:
        from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT  # noqa: PLC0415
    except ImportError:
        return False
    return bool(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.get())
