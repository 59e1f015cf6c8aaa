"""Where the page finds its model, and the model as the page uses it.

Settings come from the environment, with defaults from the project's ``params.yaml``:

- ``MLFLOW_TRACKING_URI``: the tracking server or store (default: the project's ``mlflow.db``);
- ``FRACTURE_MODEL_NAME``: the registered model (default: ``register.model_name``);
- ``FRACTURE_MODEL_ALIAS``: the alias to serve (default: ``champion``);
- ``FRACTURE_DETECTOR_NAME``: the registered fracture detector whose boxes the page draws, at the
  same alias (default: ``detect.model_name``; empty: no boxes). Without a version at that alias
  the page shows the classifier alone.

Each version the page loads is downloaded into a folder of its own under the page's folder (one
per process, under the temporary directory, locked by its process while it runs), removed when the
page drops that version (see :meth:`ServedModel.release`) and, with the page's folder, when the
process exits. The code MLflow puts on ``sys.path`` for a version (its ``code_paths``) is taken off
again when the version is dropped, and the modules imported from it are forgotten.

That code is not what scores the project's models here. The page imports this project's
``fracture`` package from its installation when it starts, and ``import fracture`` then finds it in
``sys.modules``: a version's packaged copy of ``fracture`` is never imported, and every version the
page serves runs the installed ``fracture``. Only a version's other packaged modules are its own.
A version's own code is what :mod:`fracture.consumer` tests, loading the version in a Python of its
own (the promotion gate's load check and the scoring of versions).

A page that could not clean up (killed with SIGKILL, or at a power cut) leaves its folder behind:
the next page to start on the machine removes it (:func:`remove_stale_page_folders`).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import logging
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

try:
    import fcntl
except ImportError:  # Windows: folders are judged by pid alone
    fcntl = None  # type: ignore[assignment]

import mlflow
import numpy as np
import pandas as pd
import psutil
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from fracture.config import load_params, tracking_uri
from fracture.detector_serving import DetectorPyfunc
from fracture.explain import grad_cam, overlay, to_image_grid
from fracture.inference import ServingConfig
from fracture.intake import read_xray
from fracture.registry import CHAMPION
from fracture.serving import FracturePyfunc
from fracture.tracking import NOT_FOUND, sqlite_store
from fracture.vocabulary import CLASSES

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """The registry, the model or its alias cannot be reached; the message says what to do."""


class RegistryUnreachable(ModelUnavailable):
    """The registry did not answer, or its store cannot be read (a tracking server down, a network
    outage, a file that is no MLflow store): unlike a missing model or alias, nothing a user of the
    page did, and the version the page loaded before can go on being served (:class:`AliasWatch`)."""


@dataclass(frozen=True)
class PageSettings:
    """What the page serves (the uploads it accepts are the model's own input policy)."""

    tracking_uri: str
    model_name: str
    alias: str
    detector_name: str = ""

    @property
    def shown_uri(self) -> str:
        """The tracking URI as the page may show it: without a password or token in it."""
        parts = urlsplit(self.tracking_uri)
        if parts.password is None and parts.username is None:
            return self.tracking_uri
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))


def settings_from_env(root: Path = ROOT) -> PageSettings:
    """Reads the page's settings from the environment and the project's ``params.yaml``.

    Args:
        root: the project root holding ``params.yaml`` (and the default ``mlflow.db``).

    Returns:
        The settings.
    """
    params = load_params(root)
    return PageSettings(
        tracking_uri=tracking_uri(root),
        model_name=os.environ.get("FRACTURE_MODEL_NAME") or params.register.model_name,
        alias=os.environ.get("FRACTURE_MODEL_ALIAS") or CHAMPION,
        detector_name=os.environ.get("FRACTURE_DETECTOR_NAME", params.detect.model_name),
    )


@dataclass(frozen=True)
class Prediction:
    """One X-ray's result, as the registered model returns it."""

    label: str
    fracture_probability: float
    threshold: float

    @property
    def class_index(self) -> int:
        return CLASSES.index(self.label)


class ServedModel:
    """A registered model version, loaded through MLflow's pyfunc flavour.

    ``files``: removes the folder the version was loaded from (:func:`_load_pyfunc`); ``None``
    for a pyfunc whose files are not the page's to remove.
    """

    def __init__(
        self, name: str, version: str, alias: str, run_id: str, pyfunc: mlflow.pyfunc.PyFuncModel,
        files: weakref.finalize | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.alias = alias
        self.run_id = run_id
        self.pyfunc = pyfunc
        self._files = files
        inner, kind = _python_model(pyfunc)
        if not isinstance(inner, FracturePyfunc):
            self.release()  # never served: its copy goes now, not whenever the collector gets to it
            raise ModelUnavailable(
                f"models:/{name}/{version} is a {kind}, not a fracture classifier logged by this project's "
                "register step. Point FRACTURE_MODEL_NAME and FRACTURE_MODEL_ALIAS at one, or register one with "
                "`make main`."
            )
        self._inner = inner

    def release(self) -> None:
        """Removes this version's downloaded files, and takes its packaged code folder off ``sys.path``
        and the modules imported from there out of ``sys.modules`` (never the installed ``fracture``,
        which the page runs for every version: see the module's docstring): the page's cache calls it
        when it drops the model.

        The model keeps working: its network was read into memory at load. Without a call the files
        go when the model is garbage-collected, or when the process exits.
        """
        if self._files is not None:
            self._files()

    @property
    def config(self) -> ServingConfig:
        """Architecture, data config and threshold the served model was logged with."""
        return self._inner.config

    def predict(self, model_bytes: bytes) -> Prediction:
        """Classifies one image through the pyfunc, exactly as a registry consumer would."""
        out = self.pyfunc.predict(pd.DataFrame({"image": [base64.b64encode(model_bytes).decode()]}))
        row = out.iloc[0]
        if row["error"]:
            raise ValueError(str(row["error"]))
        return Prediction(str(row["label"]), float(row["fracture_probability"]), float(row["threshold"]))

    def scored_input(self, model_bytes: bytes) -> torch.Tensor:
        """The normalised batch of one image that the network scores for these bytes: decoded as the
        pyfunc decodes a consumer's file (a JPEG at reduced scale when the model was trained that
        way), at full resolution, then resized by the model's own preprocessing."""
        xray = read_xray(model_bytes, self.config.input, self.config.data_config.draft_size)
        return self._inner.classifier.batch([xray.image])

    def heat_map(self, model_bytes: bytes, target: int, display: Image.Image) -> tuple[Image.Image, np.ndarray]:
        """Grad-CAM of class ``target`` over the pixels :meth:`predict` scored, drawn on ``display``
        (the upload at the page's display size).

        Returns:
            The overlay at ``display``'s size, and the heat map values in ``[0, 1]``. With
            ``tta: hflip`` it is the mean of the image's map and its mirror's, mirrored back, as
            the score is the mean of their probabilities.
        """
        cam = grad_cam(self._inner.classifier.network, self.scored_input(model_bytes), target, tta=self.config.tta)
        heat = to_image_grid(cam, display.size, self.config.data_config.aspect)
        return overlay(display, heat), heat


def _python_model(pyfunc: mlflow.pyfunc.PyFuncModel) -> tuple[object | None, str]:
    """The Python model a pyfunc wraps (``None`` for another flavour's model), and what it is, for a message.

    A model of another flavour (sklearn, say) has no Python model to unwrap: MLflow raises, and
    the page must say which model is wrong instead of failing whole, the classifier's answer with it.
    """
    try:
        inner = pyfunc.unwrap_python_model()
    except MlflowException:
        return None, f"{pyfunc.loader_module.removeprefix('mlflow.')}-flavour MLflow model"
    return inner, type(inner).__name__


def resolve_version(settings: PageSettings) -> tuple[str, str]:
    """The version (and its run id) the alias points to now.

    Raises:
        ModelUnavailable: the registry cannot be reached, or has no such model or alias.
    """
    try:
        store = sqlite_store(settings.tracking_uri)
    except ValueError as exc:
        raise ModelUnavailable(f"MLFLOW_TRACKING_URI: {exc}.") from exc
    # MLflow would create an empty store; a missing file means nothing was registered yet.
    if store is not None and not store.is_file():
        raise ModelUnavailable(
            f"No MLflow store at {store}. Train and register a model with `make main`, or point "
            "the page at your registry with MLFLOW_TRACKING_URI."
        )
    try:
        # Inside: opening a store that is no MLflow store (a Git LFS pointer for mlflow.db) raises here.
        client = MlflowClient(tracking_uri=settings.tracking_uri)
        mv = client.get_model_version_by_alias(settings.model_name, settings.alias)
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND:  # MLflow wraps a server that does not answer as INTERNAL_ERROR
            raise _unreachable(settings, exc) from exc
        raise ModelUnavailable(
            f"No model version '{settings.model_name}@{settings.alias}' in the registry at "
            f"{settings.shown_uri} ({exc.message.splitlines()[0]}). Train and register one with "
            "`make main`, or point the page elsewhere with MLFLOW_TRACKING_URI, FRACTURE_MODEL_NAME "
            "and FRACTURE_MODEL_ALIAS."
        ) from exc
    except Exception as exc:  # connection and database errors come in many types
        raise _unreachable(settings, exc) from exc
    return str(mv.version), mv.run_id


def _unreachable(settings: PageSettings, exc: Exception) -> RegistryUnreachable:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].replace(settings.tracking_uri, settings.shown_uri)
    return RegistryUnreachable(
        f"The MLflow registry at {settings.shown_uri} cannot be reached or read ({reason}). Check that it is up "
        "and that MLFLOW_TRACKING_URI names it."
    )


def _now() -> float:
    """The clock :class:`AliasWatch` reads (looked up at each call, so a test can move it)."""
    return time.monotonic()


class AliasWatch:
    """The version the page serves at its alias, for one registered model, shared by every browser session.

    The alias is looked up (``look_up``: :func:`resolve_version`, or :func:`resolve_detector`) at most
    every ``every`` seconds, so a moved alias reaches the page without a restart. While the registry
    cannot be reached (:class:`RegistryUnreachable`), the answer found last goes on being served,
    with the reason, and the registry is asked again only after ``every`` seconds: a clinician's
    page should neither go blank nor wait on a registry that is down at every click because of a
    network outage. Any other failure (no such model or alias) is raised and not kept.
    """

    _NEVER = object()

    def __init__(
        self,
        settings: PageSettings,
        look_up: Callable[[PageSettings], Any] = resolve_version,
        every: float = 30.0,
    ) -> None:
        self.settings = settings
        self.every = every
        self._look_up = look_up
        self._lock = threading.Lock()
        self._found: Any = self._NEVER
        self._failure: RegistryUnreachable | None = None
        self._asked = -math.inf

    def current(self) -> tuple[Any, RegistryUnreachable | None]:
        """What ``look_up`` found last, and why the registry did not answer this time (``None`` when it did).

        Raises:
            ModelUnavailable: the registry never answered for these settings, or the model or alias is gone.
        """
        with self._lock:  # one lookup at a time: every session needs its answer
            if _now() - self._asked >= self.every:
                try:
                    found = self._look_up(self.settings)
                except RegistryUnreachable as exc:
                    self._failure, self._asked = exc, _now()
                else:
                    self._found, self._failure, self._asked = found, None, _now()
            if self._found is self._NEVER:  # a lookup that failed otherwise raised its error above
                raise self._failure or ModelUnavailable(f"{self.settings.shown_uri} gave no answer")
            return self._found, self._failure


def test_figures(settings: PageSettings, name: str, version: str, threshold: float) -> str | None:
    """What the decision threshold means for this registered version: the sensitivity and
    specificity measured at it on the test split, with their 95% intervals, from the figures the
    version was registered with (its ``metrics`` tag), and how the threshold was chosen when its
    training run says so for this threshold. Evaluate may run again on the same training run, under
    another threshold rule, and register another version: that run's figures are then another
    threshold's, and the version keeps its own.

    Returns:
        ``None`` when the version carries no such figures, or carries them for another threshold.

    Raises:
        Exception: the registry cannot be read (the page shows the threshold alone, and asks again
            on the next rerun: a failure is not cached).
    """
    client = MlflowClient(settings.tracking_uri)
    mv = client.get_model_version(name, version)
    m = json.loads(mv.tags.get("metrics") or "{}")
    names = ("test_recall", "test_recall_ci_low", "test_recall_ci_high", "test_specificity",
             "test_specificity_ci_low", "test_specificity_ci_high", "test_threshold")
    if not all(isinstance(m.get(key), int | float) for key in names) or not math.isclose(m["test_threshold"], threshold):
        return None
    try:
        run = client.get_run(mv.run_id)
    except Exception:  # noqa: BLE001 - the run deleted since (the version stays): its figures are the version's own
        source, same = None, False
    else:
        source = run.data.tags.get("threshold_source")
        same = math.isclose(run.data.metrics.get("test_threshold", math.nan), threshold)
    missed = 1 - m["test_recall"]
    share = f"about {missed:.0%}" if missed >= 0.01 else f"{missed:.1%}"  # 1 in 250 is not "about 0%"
    # Each interval's ends joined by "to": a screen reader reads "0.752-0.909" as "0.752 minus 0.909".
    return (
        (f"Threshold chosen as {source}. " if source and same else "")
        + f"At it, on the test split (scored once, never used to choose): sensitivity {m['test_recall']:.3f} "
        f"(95% CI {m['test_recall_ci_low']:.3f} to {m['test_recall_ci_high']:.3f}), specificity "
        f"{m['test_specificity']:.3f} ({m['test_specificity_ci_low']:.3f} to {m['test_specificity_ci_high']:.3f})"
        + (f": {share} of fractured X-rays were called Not fractured." if missed > 0 else ".")
    )


def load_served_model(settings: PageSettings, version: str, run_id: str) -> ServedModel:
    """Loads one registered version; the caller resolves the alias first, so that the page
    shows the version it actually loaded even when the alias moves meanwhile.

    Raises:
        ModelUnavailable: the version's files cannot be loaded.
    """
    return ServedModel(settings.model_name, version, settings.alias, run_id,
                       *_load_pyfunc(settings, settings.model_name, version))


_page_folder: Path | None = None
_page_folder_lock = threading.Lock()
#: The open owner lock files by which this process holds its page folders (:func:`_hold`), for its
#: whole life: one, unless a test starts several pages in one process.
_held: dict[str, int] = {}

#: A page folder's name: its process's pid, for an operator looking at the disk. Pages of earlier
#: releases added their start time (``-s<hundredths of a second>``); their folders are judged by pid.
_PAGE_FOLDER_NAME = re.compile(r"fracture-page-(?P<pid>[0-9]+)-(?:s[0-9]+-)?[a-z0-9_]+")

#: The file in a page folder that its page holds an exclusive ``flock`` on while it runs. The kernel
#: lets go of the lock when the process ends, however it ends (SIGKILL and the OOM killer included),
#: and a lock is no clock: a page is judged by it, not by a start time that psutil reckons from the
#: wall clock, which moves when the clock is stepped (NTP, chrony's makestep, a VM resumed).
_OWNER_LOCK = ".owner.lock"


def _hold(folder: Path) -> None:
    """Takes the exclusive lock on ``folder``'s owner lock file, held until this process ends.

    The file is locked under a name of its own, then renamed into place: no cleaner ever finds the
    owner lock file unlocked while its page runs. Without ``flock`` (Windows) there is none.
    """
    if fcntl is None:
        return
    fd, made = tempfile.mkstemp(prefix=f"{_OWNER_LOCK}-", dir=folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file just made: no one else holds it
        os.replace(made, folder / _OWNER_LOCK)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(made)
        raise
    previous = _held.pop(os.path.realpath(folder), None)
    _held[os.path.realpath(folder)] = fd
    if previous is not None:  # the lock of a lock file something removed
        os.close(previous)


@contextlib.contextmanager
def _claimed(folder: str) -> Iterator[bool | None]:
    """Whether the page that made ``folder`` has ended, told by its owner lock file: ``True`` when
    its lock could be taken (and it is held until the block ends: the folder is removed under it),
    ``False`` while a page holds it, ``None`` without a lock file to judge by (or without ``flock``)."""
    if fcntl is None:
        yield None
        return
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # no link, no FIFO's wait
    try:
        fd = os.open(os.path.join(folder, _OWNER_LOCK), flags)
    except OSError:
        yield None  # a folder of an earlier release, or one whose page is taking its lock this instant
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            gone = None
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                gone = True
            except OSError:  # held (EWOULDBLOCK): its page runs
                gone = False
        yield gone
    finally:
        os.close(fd)


def _runs(pid: int) -> bool:
    """Whether a process ``pid`` runs: how a folder without an owner lock file is judged.

    In doubt (the process cannot be inspected), it does: a live page's files are never removed.
    Such a folder whose pid now belongs to another process is kept until that process ends.
    """
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess among them
        return False
    except (psutil.AccessDenied, OSError):
        return True


def remove_stale_page_folders(temp: Path | None = None) -> list[Path]:
    """Removes the page folders (and the versions in them) of page processes that no longer run.

    A page removes its folder when it exits; one killed with SIGKILL (or by the OOM killer, or a
    power cut) cannot, and each crash would leave its downloaded versions on the disk for good.
    Only folders named as :func:`page_folder` names them and owned by this user are judged. A page
    holds an exclusive ``flock`` on its folder's owner lock file for as long as it runs: a folder
    whose lock this process can take is a dead page's, and is removed under that lock (so a reused
    pid, or a stepped clock, misleads no one). A folder without the lock file (made by an earlier
    release, or by a page taking its lock this instant) is removed only if no process has its pid.

    Args:
        temp: where page folders are made (default: the temporary directory).

    Returns:
        The folders removed.
    """
    temp = Path(tempfile.gettempdir()) if temp is None else temp
    removed = []
    try:
        entries = list(os.scandir(temp))
    except OSError:
        return removed
    for entry in entries:
        named = _PAGE_FOLDER_NAME.fullmatch(entry.name)
        try:
            if named is None or not entry.is_dir(follow_symlinks=False):
                continue
            if hasattr(os, "getuid") and entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue  # another user's page: not this one's to judge, nor to remove
        except OSError:
            continue
        if os.path.realpath(entry.path) in _held:
            # This process's own. Its second open file would not get the lock where flock is
            # emulated by per-process fcntl locks (NFS), and closing it would let go of the lock held.
            continue
        with _claimed(entry.path) as gone:
            if gone is False or (gone is None and _runs(int(named["pid"]))):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            removed.append(Path(entry.path))
    if removed:
        log.info("Removed %d model folder(s) left by page processes that no longer run: %s",
                 len(removed), ", ".join(map(str, removed)))
    return removed


def page_folder() -> Path:
    """This process's folder for the versions it loads (``fracture-page-<pid>-*`` under the temporary
    directory), made on first use and removed when the process exits; the process holds the lock on
    its owner lock file as long as it runs. Made first, the folders left by pages that were killed
    before they could remove theirs are removed (:func:`remove_stale_page_folders`)."""
    global _page_folder
    with _page_folder_lock:
        if _page_folder is None:
            remove_stale_page_folders()
            _page_folder = Path(tempfile.mkdtemp(prefix=f"fracture-page-{os.getpid()}-"))
            atexit.register(shutil.rmtree, _page_folder, ignore_errors=True)
        # Made again if something removed it (a cleaner of old temporary files) while the page ran, and
        # its lock file with it: until then the folder is judged by pid alone.
        _page_folder.mkdir(parents=True, exist_ok=True)
        held = os.path.realpath(_page_folder) in _held
        if fcntl is not None and (not held or not (_page_folder / _OWNER_LOCK).is_file()):
            _hold(_page_folder)
        return _page_folder


#: Held while MLflow loads a version (and changes ``sys.path`` and ``sys.modules`` for it), and while
#: a dropped version's entries are taken out of them. Re-entrant: a version's finalizer may run in
#: the loading thread, when the collector runs mid-load.
_code_lock = threading.RLock()


def _under(path: object, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it."""
    return isinstance(path, str) and (path == folder or path.startswith(folder.rstrip(os.sep) + os.sep))


def _from(module: object, folder: str) -> bool:
    """Whether ``module`` was imported from a file (or is a package with a path) under ``folder``."""
    try:
        files = [getattr(module, "__file__", None)]
        paths = getattr(module, "__path__", None)
        if isinstance(paths, (list, tuple)) or type(paths).__name__ == "_NamespacePath":
            files.extend(paths)
        return any(_under(f, folder) for f in files)
    except Exception:  # noqa: BLE001 - a module's attributes can be anything (lazy modules, C extensions' namespaces)
        return False


def _forget_modules_from(folder: str) -> None:
    """Takes out of ``sys.modules`` every module imported from under ``folder``: a version loaded
    later imports its own packaged module, not one of that name another version imported. The
    installed ``fracture`` is not under ``folder`` and stays. The models already loaded keep the
    modules they were built with."""
    for name, module in list(sys.modules.items()):
        if module is not None and _from(module, folder):
            sys.modules.pop(name, None)


def _load_with_own_code(local: str) -> mlflow.pyfunc.PyFuncModel:
    """Loads the version downloaded to ``local`` (in the page's folder); the packaged modules it
    imports that the page has not imported already come from its own folder.

    MLflow puts the version's code folder first on ``sys.path`` (``mlflow.pyfunc.load_model``,
    through ``_add_code_from_conf_to_system_path``) and never takes it off: :func:`_drop_version`
    does. A module already in ``sys.modules`` is the one any import gets, whatever ``sys.path`` says.
    So a module another version imported would be this version's too: the modules imported from the
    page's folder are forgotten first. And the ``fracture`` package, which the page imported from its
    installation at start, is this version's too: its packaged copy of ``fracture`` is never
    imported, and the project's model entry (``from fracture.serving import FracturePyfunc``) builds
    the version from the installed code. Only its other packaged modules are its own;
    :mod:`fracture.consumer` loads a version with its own ``fracture``.
    """
    with _code_lock:
        _forget_modules_from(str(page_folder()))
        return mlflow.pyfunc.load_model(local)


def _drop_version(folder: str) -> None:
    """Takes a dropped version's code (the ``sys.path`` entries inside its folder, the modules imported
    from there) off ``sys.path`` and out of ``sys.modules``, then removes its folder."""
    with _code_lock:
        sys.path[:] = [entry for entry in sys.path if not _under(entry, folder)]
        _forget_modules_from(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _load_pyfunc(
    settings: PageSettings, name: str, version: str
) -> tuple[mlflow.pyfunc.PyFuncModel, weakref.finalize]:
    """``models:/<name>/<version>`` from the page's registry, loaded from a folder of the page's own.

    From a tracking server (or any artifact store MLflow downloads from), MLflow would download
    the version into a temporary folder it never removes: a copy (tens of MB) left on the disk for
    every version the page loads, for as long as the page runs and after. Loaded here into a
    folder of its own under :func:`page_folder`, the copy lives as long as the model: the returned
    finalizer removes it when called (:meth:`ServedModel.release`, when the page's cache drops
    the model), when the pyfunc is garbage-collected, or at exit. Not sooner: the project's
    pyfuncs read their files whole at load, but a model still served keeps what it was loaded
    from (its packaged code stays on ``sys.path``, and a pyfunc may open its files later). The
    finalizer takes that code off ``sys.path`` too (:func:`_drop_version`): MLflow would leave it
    there, one entry for every version the page ever loaded, naming folders long removed.
    A local store's versions are copied too (MLflow would load them in place; given a folder, it
    copies), so that every version the page serves is one it owns.

    Returns:
        The pyfunc, and the finalizer that removes its files.

    Raises:
        ModelUnavailable: its files cannot be loaded.
    """
    mlflow.set_tracking_uri(settings.tracking_uri)
    uri = f"models:/{name}/{version}"
    folder = None
    try:
        # Named after the version, for an operator looking at the disk: registered names may hold any character.
        folder = tempfile.mkdtemp(prefix=f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-v{version}-", dir=page_folder())
        # Downloaded first, outside the lock a load holds: a slow download delays no other version's load.
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=folder, tracking_uri=settings.tracking_uri)
        pyfunc = _load_with_own_code(local)
    except Exception as exc:  # artifact stores fail in many ways; the page must say so, not crash
        if folder is not None:
            _drop_version(folder)  # with what a load that failed half-way put on sys.path
        reason = str(exc).replace(str(folder), "<the page's copy>") if folder is not None else str(exc)
        raise ModelUnavailable(
            f"{uri} could not be loaded from {settings.shown_uri}: {reason}. Its files in the registry's artifact "
            "store are missing or damaged: register the model again, or move the alias to a version that loads "
            "(`fracture rollback --to <version>`)."
        ) from exc
    return pyfunc, weakref.finalize(pyfunc, _drop_version, folder)


@dataclass(frozen=True)
class FoundBoxes:
    """The detector's answer for one X-ray, as the registered detector returns it.

    Attributes:
        boxes: ``(n, 5)``: ``x0, y0, x1, y1, score`` in the upload's pixels, each scored at least
            ``threshold``, highest first.
        fracture_score: the top box's score (0 without a box).
        threshold: the detector's image-level threshold, chosen on its val split.
    """

    boxes: np.ndarray
    fracture_score: float
    threshold: float


class ServedDetector:
    """A registered fracture detector version, loaded through MLflow's pyfunc flavour.

    ``files``: as :class:`ServedModel`'s.
    """

    def __init__(
        self, name: str, version: str, run_id: str, pyfunc: mlflow.pyfunc.PyFuncModel,
        files: weakref.finalize | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.run_id = run_id
        self.pyfunc = pyfunc
        self._files = files
        inner, kind = _python_model(pyfunc)
        if not isinstance(inner, DetectorPyfunc):
            self.release()
            raise ModelUnavailable(
                f"models:/{name}/{version} is a {kind}, not a fracture detector logged by this project's "
                "detect-register step. Point FRACTURE_DETECTOR_NAME at one, or set it empty for no boxes."
            )
        self.architecture = f"{inner.config.architecture} on {inner.config.backbone}"

    def release(self) -> None:
        """Removes this version's downloaded files, as :meth:`ServedModel.release`."""
        if self._files is not None:
            self._files()

    def find(self, model_bytes: bytes) -> FoundBoxes:
        """The boxes on one image through the pyfunc, exactly as a registry consumer gets them."""
        out = self.pyfunc.predict(pd.DataFrame({"image": [base64.b64encode(model_bytes).decode()]}))
        row = out.iloc[0]
        if row["error"]:
            raise ValueError(str(row["error"]))
        boxes = np.array(json.loads(row["boxes"]), dtype=np.float64).reshape(-1, 5)
        return FoundBoxes(boxes, float(row["fracture_score"]), float(row["threshold"]))


def resolve_detector(settings: PageSettings) -> tuple[str, str] | None:
    """The detector version at the page's alias, or ``None`` when no detector is registered there.

    Raises:
        ModelUnavailable: the registry failed otherwise (the page then shows the classifier alone).
    """
    if not settings.detector_name:
        return None
    try:
        client = MlflowClient(tracking_uri=settings.tracking_uri)
        mv = client.get_model_version_by_alias(settings.detector_name, settings.alias)
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND:
            return None
        raise _unreachable(settings, exc) from exc
    except Exception as exc:  # connection and database errors come in many types
        raise _unreachable(settings, exc) from exc
    return str(mv.version), mv.run_id


def load_served_detector(settings: PageSettings, version: str, run_id: str) -> ServedDetector:
    """Loads one registered detector version (``run_id``: the run :func:`resolve_detector` found it logged by).

    Raises:
        ModelUnavailable: its files cannot be loaded, or it is no fracture detector.
    """
    return ServedDetector(settings.detector_name, version, run_id,
                          *_load_pyfunc(settings, settings.detector_name, version))
