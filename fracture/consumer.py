"""A registered version scored as its consumers score it: in a Python of its own, with its own code.

MLflow puts a model's packaged code (``code_paths``) on ``sys.path`` when it loads the model, but
a process that has already imported this project (the pipeline, the gate) keeps running the
installed copy: a version whose packaged code is broken, or a champion logged by older code,
would be judged by today's code. :func:`predict_as_consumer` loads the version in a new Python
that can import only what the model's ``requirements.txt`` installs (those distributions and
what they require) plus the model's own code; every other distribution of this environment,
this project included, is hidden behind an import hook. It reads each file's bytes there and
returns the model's answer rows.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import mlflow
import pandas as pd

from fracture.allocator import (
    M_MMAP_MAX,
    M_TRIM_THRESHOLD,
    NEVER_TRIM,
    SWITCH,
    give_back_freed_memory,
)

__all__ = ["ConsumerAnswer", "ConsumerError", "ConsumerModel", "predict_as_consumer"]

#: Hides from imports every distribution the model at ``uri`` does not require, this project's
#: installed copy among them, so that MLflow's ``code_paths`` give the version's own ``fracture``.
#: Run by ``python -I`` (no script folder, user site or PYTHON* variables on the path).
_HIDE_WHAT_THE_MODEL_DOES_NOT_REQUIRE = r'''
import importlib.abc, importlib.machinery, importlib.metadata as md, json, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import mlflow

# The version's files, fetched once (in place from a local artifact store): its requirements are
# read from them and the model is loaded from them, rather than fetching the whole version twice.
model_dir = mlflow.artifacts.download_artifacts(artifact_uri=uri)
requirements = mlflow.pyfunc.get_model_dependencies(model_dir)
closure, todo = set(), [Requirement(line.strip()).name for line in open(requirements) if line.strip()]
while todo:
    name = canonicalize_name(todo.pop())
    if name in closure:
        continue
    closure.add(name)
    try:
        requires = md.distribution(name).requires or []
    except md.PackageNotFoundError:
        continue
    for spec in map(Requirement, requires):
        if spec.marker is None or spec.marker.evaluate({"extra": ""}):
            todo.append(spec.name)
hidden = {top for top, dists in md.packages_distributions().items()
          if not any(canonicalize_name(d) in closure for d in dists)}
refused = []


class Hidden(importlib.abc.MetaPathFinder):
    """One of Python's finders, finding nothing of a hidden distribution (absent to find_spec too)."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        spec = self.inner.find_spec(name, path, target)
        # This project's package only as the model's own copy, on the sys.path code_paths extends.
        if spec is not None and "." not in name and name in hidden and not (
                name == "fracture" and self.inner is importlib.machinery.PathFinder):
            refused.append(name)
            return None
        return spec

    def find_distributions(self, context=md.DistributionFinder.Context()):
        found = getattr(self.inner, "find_distributions", lambda context: ())(context)
        return (d for d in found if canonicalize_name(d.metadata["Name"] or "") in closure)

    def invalidate_caches(self):
        getattr(self.inner, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
'''

#: Keeps the memory the consumer's Python frees for its next batch, as :mod:`fracture.allocator` does
#: for every pipeline command (``FRACTURE_KEEP_FREED_MEMORY=0`` leaves glibc's default): each batch
#: of full-size X-rays and 448 px activations would otherwise be mapped and zeroed afresh by the
#: kernel. The gate scores two versions on the test split this way. The process ends after its
#: batches (:data:`SCRIPT`) or its requests (:data:`WORKER`), so nothing is handed back. That Python
#: cannot import this installation's ``fracture``: the allocator's switch and settings are written in.
_KEEP_FREED_MEMORY = f'''
import ctypes, os
if os.environ.get({SWITCH!r}, "1").strip() != "0":
    try:  # a C library of its own, so the program's names are left as they are
        _glibc = ctypes.CDLL(None)
        _glibc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
        _glibc.mallopt({M_MMAP_MAX}, 0), _glibc.mallopt({M_TRIM_THRESHOLD}, {NEVER_TRIM})
    except (OSError, AttributeError):
        pass
'''


#: Ends a consumer's Python without the interpreter's last garbage collections over the objects
#: torch, timm and MLflow hold, most of its exit, as the ``fracture`` command ends
#: (:func:`fracture.cli.skip_exit_collection`, which that Python cannot import). Last in a program.
_EXIT_WITHOUT_LAST_COLLECTIONS = r'''
import gc
gc.freeze()
'''


#: A consumer's batch: reads the files there and writes every answer row at once.
SCRIPT = r'''
import json, sys
uri, request_file, out_file = sys.argv[1:]
with open(request_file) as fh:
    files = json.load(fh)["files"]
''' + _HIDE_WHAT_THE_MODEL_DOES_NOT_REQUIRE + _KEEP_FREED_MEMORY + r'''
import pandas as pd

model = mlflow.pyfunc.load_model(model_dir)
rows = int(getattr(getattr(model.unwrap_python_model(), "policy", None), "max_rows", 32) or 32)
parts = []
for start in range(0, len(files), rows):
    batch = []
    for path in files[start : start + rows]:
        with open(path, "rb") as fh:
            batch.append(fh.read())
    parts.append(model.predict(pd.DataFrame({"image": batch}), params={"on_error": "report"}))
answer = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
with open(out_file, "w") as fh:
    json.dump({"answer": answer.to_dict(orient="list"), "code": sys.modules["fracture"].__file__,
               "refused": sorted(set(refused)), "closure": sorted(closure)}, fh)
''' + _EXIT_WITHOUT_LAST_COLLECTIONS


#: A consumer's model kept loaded: answers one request at a time, framed on its standard input
#: and output (8 bytes of length, then a pickle), until its input ends. Its first frame says what
#: the model is: ``kind``, and for this project's classifier its ``threshold`` and input ``policy``.
WORKER = r'''
import os, pickle, struct, sys
uri = sys.argv[1]
# The frames own the real standard output; anything printed goes to standard error.
frames_out = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
frames_in = sys.stdin.buffer
''' + _HIDE_WHAT_THE_MODEL_DOES_NOT_REQUIRE + _KEEP_FREED_MEMORY + r'''


def send(obj):
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    frames_out.write(struct.pack(">Q", len(data)) + data)
    frames_out.flush()


model = mlflow.pyfunc.load_model(model_dir)
try:
    inner = model.unwrap_python_model()
    kind = type(inner).__name__
except mlflow.exceptions.MlflowException:
    inner, kind = None, model.loader_module.removeprefix("mlflow.") + "-flavour MLflow model"
header = {"kind": kind, "code": getattr(sys.modules.get("fracture"), "__file__", None)}
try:
    from fracture.serving import FracturePyfunc
except ImportError:
    FracturePyfunc = None
if FracturePyfunc is not None and isinstance(inner, FracturePyfunc):
    # A version logged up to 2026-11-30 keeps its threshold on the model itself and has no input policy.
    held = getattr(inner, "classifier", inner)
    policy = getattr(inner, "policy", None)
    header |= {"threshold": float(held.threshold), "policy": None if policy is None else policy.to_dict()}
send(header)
while True:
    size = frames_in.read(8)
    if len(size) < 8:
        break
    frame, params = pickle.loads(frames_in.read(struct.unpack(">Q", size)[0]))
    send(model.predict(frame, params=params))
''' + _EXIT_WITHOUT_LAST_COLLECTIONS


class ConsumerError(RuntimeError):
    """The version could not be loaded or could not answer in a consumer's Python; the message
    holds the end of that Python's error output."""


@dataclass(frozen=True)
class ConsumerAnswer:
    """What the version answered in its own Python.

    Attributes:
        rows: the model's answer rows, one per file, in order (``fracture_probability``,
            ``label``, ``threshold``, ``error``, ...).
        code: the file the ``fracture`` package was imported from there: the version's own copy.
        closure: the distributions that Python could import (the requirements and theirs).
        refused: hidden top-level modules that something asked for (each optional to its asker).
        files: the files it predicted, resolved, in the order of ``rows``.
    """

    rows: pd.DataFrame
    code: str
    closure: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    @property
    def ran_installed_code(self) -> bool:
        """Whether the version imported this installation's ``fracture`` package, not its own
        packaged copy: then its answer says nothing of whether its consumers can load it."""
        return Path(self.code).resolve().parent == Path(__file__).resolve().parent


def _consumer_env(temp: str) -> dict[str, str]:
    """A consumer's environment: this one without PYTHON* variables, with this process's registry,
    and ``temp`` as its temporary folder. From a tracking server's artifact store MLflow downloads
    a version it loads into a folder of its own there and never removes it; the caller removes
    ``temp`` once that Python has ended, so each load leaves no copy of the version behind."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {
        "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
        "MLFLOW_REGISTRY_URI": mlflow.get_registry_uri(),
        "TMPDIR": temp,
    }


@contextmanager
def loaded_version(uri: str) -> Iterator[Any]:
    """``mlflow.pyfunc.load_model(uri)`` in this process, its downloaded files removed on leaving.

    For a version loaded to be scored or checked and then dropped (the gate, the load check):
    from a tracking server's artifact store MLflow would download it into a temporary folder of
    its own and leave it there, a copy of the version (tens of MB) for every load.
    """
    with tempfile.TemporaryDirectory(prefix="fracture-version-") as folder:
        yield mlflow.pyfunc.load_model(uri, dst_path=folder)


def predict_as_consumer(uri: str, files: list[Path], timeout: float = 3600.0) -> ConsumerAnswer:
    """Loads ``uri`` (``models:/<name>/<version>``) in a consumer's Python and predicts each file.

    The registry is the one this process uses (``mlflow.get_tracking_uri()``, and its registry
    URI). Files are read there, a request of the model's ``max_rows`` at a time, with
    ``on_error: report``, so a file the model refuses is a row with its error.

    Raises:
        ConsumerError: that Python failed (the model did not load, its code did not import) or
            ran past ``timeout`` seconds.
    """
    with tempfile.TemporaryDirectory(prefix="fracture-consumer-") as tmp:
        folder = Path(tmp)
        script, request, out = folder / "consumer.py", folder / "request.json", folder / "answer.json"
        script.write_text(SCRIPT)
        resolved = [str(Path(f).resolve()) for f in files]
        request.write_text(json.dumps({"files": resolved}))
        env = _consumer_env(tmp)
        # That Python takes memory of its own (4 GiB for the CPU profile's two networks on batches of
        # full-size X-rays): what this process keeps free for its next tensors (fracture.allocator;
        # the retrain flow's, after training, several GiB) goes back to the kernel first, so that
        # the two processes do not hold both.
        give_back_freed_memory()
        try:
            done = subprocess.run(
                [sys.executable, "-I", str(script), uri, str(request), str(out)],
                env=env, capture_output=True, text=True, timeout=timeout, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ConsumerError(f"{uri} did not answer within {timeout:.0f} s in a consumer's Python") from exc
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["(no error output)"]
            raise ConsumerError(f"{uri} failed in a consumer's Python (exit {done.returncode}): {tail[0]}")
        result = json.loads(out.read_text())
    return ConsumerAnswer(pd.DataFrame(result["answer"]), result["code"], tuple(result["closure"]),
                          tuple(result["refused"]), tuple(resolved))


class ConsumerModel:
    """A registered version kept loaded in a consumer's Python of its own (:data:`WORKER`), with its own code.

    For a command of this project that scores with a version (``fracture predict``): its process
    has imported the installed ``fracture`` package, which MLflow's ``code_paths`` cannot replace,
    so a version loaded there would check and decode inputs with today's code, not its own, and
    answer otherwise than the served model. Here each :meth:`predict` is sent to that Python and
    its answer returned. Use it as a context manager; leaving it ends that Python.

    Attributes:
        uri: the version, ``models:/<name>/<version>``.
        kind: the class of the Python model it wraps (``FracturePyfunc`` for this project's
            classifier), or ``"<flavour>-flavour MLflow model"`` for another flavour's.
        threshold: the classifier's decision threshold (``None`` for another model).
        policy: the classifier's input policy as its ``model.json`` states it (``None`` for another).
        code: the file the ``fracture`` package was imported from there: the version's own copy.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._errors = tempfile.TemporaryFile()  # noqa: SIM115 - held until close(), which closes it
        self._temp = tempfile.TemporaryDirectory(prefix="fracture-consumer-")  # removed by close()
        env = _consumer_env(self._temp.name)
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-c", WORKER, uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._errors, env=env,
        )
        try:
            header = self._receive()
        except BaseException:
            self.close()
            raise
        self.kind: str = header["kind"]
        self.code: str | None = header["code"]
        self.threshold: float | None = header.get("threshold")
        self.policy: dict[str, Any] | None = header.get("policy")

    def predict(self, frame: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """The version's ``predict(frame, params=params)``, answered in its own Python."""
        data = pickle.dumps((frame, params), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._process.stdin.write(struct.pack(">Q", len(data)) + data)
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # it has ended: _receive says why
        return self._receive()

    def _receive(self) -> Any:
        size = self._process.stdout.read(8)
        if len(size) < 8:
            self._process.wait()
            self._errors.seek(0)
            code = self._process.returncode
            if code is not None and code < 0:  # killed: its last output line is whatever it printed before
                name = signal.Signals(-code).name if -code in signal.Signals.__members__.values() else str(-code)
                raise ConsumerError(
                    f"{self.uri} failed in a consumer's Python: killed by signal {name}"
                    + (" (the system's out-of-memory killer, or a user)" if -code == signal.SIGKILL else "")
                )
            tail = self._errors.read().decode(errors="replace").strip().splitlines()[-1:] or ["(no error output)"]
            raise ConsumerError(f"{self.uri} failed in a consumer's Python (exit {code}): {tail[0]}")
        return pickle.loads(self._process.stdout.read(struct.unpack(">Q", size)[0]))

    def close(self) -> None:
        """Ends that Python (its input closed, it returns)."""
        if self._process.stdin and not self._process.stdin.closed:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._errors.close()
        self._temp.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
