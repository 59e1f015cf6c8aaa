"""The page's copies of the versions it loads from a tracking server: as many as its cache holds,
none once it has ended.

From a tracking server MLflow downloads a version into a temporary folder it never removes; a
page that runs for months, loading each new champion, would fill its disk with them. Here a
page in a Python of its own (as ``streamlit run`` is), with a fresh temporary directory, serves
versions 1, 2, 3, 2 and 1 of a registered classifier in turn through a real ``mlflow server``;
its cache keeps two models, the last used, so two copies at most may be on the disk, theirs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import timm
from PIL import Image
from safetensors.torch import save_file

from fracture.inference import ServingConfig
from fracture.model import data_config
from fracture.packaging import log_pyfunc
from fracture.vocabulary import CLASSES
from tests.conftest import REPO
from tests.servers import child_env, running_mlflow_server

pytestmark = pytest.mark.integration

NAME = "page-model-files"

#: The page as its clinicians use it, in this Python: at each step the champion moves to the
#: version given, a new browser session opens the page (its alias look-up, kept 30 s, cleared so
#: as not to wait), and the versions whose copies are on the disk are noted. At the last step an
#: X-ray is uploaded: the model served from the page's copy answers.
PAGE_SESSIONS = r"""
import json, sys
from pathlib import Path
import champion  # the module the page imports (its folder is on PYTHONPATH)
import yaml
from mlflow import MlflowClient
from streamlit.testing.v1 import AppTest

page, url, name, xray, temp = sys.argv[1:6]
client = MlflowClient(url)
clock = [0.0]
champion._now = lambda: clock[0]  # the page's clock for looking its alias up again (every 30 s)


def on_disk():
    # MLflow writes this file into every copy of a version it downloads: the name and version.
    metas = [yaml.safe_load(p.read_text()) for p in Path(temp).rglob("registered_model_meta")]
    return sorted(int(m["model_version"]) for m in metas if m["model_name"] == name)


steps = []
for version in sys.argv[6:]:
    client.set_registered_model_alias(name, "champion", version)
    clock[0] += 31  # the page looks the alias up again; the script does not wait
    at = AppTest.from_file(page, default_timeout=300).run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    shown = " ".join(m.value for m in at.markdown)
    assert f"version **{version}**" in shown, shown
    steps.append({"serves": version, "on_disk": on_disk()})
at = at.file_uploader[0].set_value(("xray.png", Path(xray).read_bytes(), "image/png")).run()
assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
print(json.dumps({"steps": steps, "metrics": {m.label: m.value for m in at.metric}}))
"""


@pytest.fixture()
def tracking_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on a free loopback port; yields its URL."""
    with running_mlflow_server(tmp_path) as (url, _):
        yield url


def register_versions(url: str, folder: Path, count: int) -> None:
    """A tiny classifier (timm's test EfficientNet, untrained) logged as the pipeline logs one and
    registered ``count`` times: versions 1 .. count, each downloaded on its own."""
    network = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(CLASSES)).eval()
    weights = folder / "model.safetensors"
    save_file(network.state_dict(), str(weights))
    config = ServingConfig("test_efficientnet", data_config(network, 64), 0.5, {"classes": list(CLASSES)})
    mlflow.set_tracking_uri(url)
    try:
        mlflow.set_experiment("page-model-files")
        with mlflow.start_run() as run:
            pass
        model_uri = log_pyfunc(run.info.run_id, weights, config)
        for _ in range(count):
            mlflow.register_model(model_uri, NAME)
    finally:
        mlflow.set_tracking_uri(None)


def test_the_page_keeps_a_copy_of_the_versions_its_cache_holds_and_none_after_it_ends(tracking_server, tmp_path):
    register_versions(tracking_server, tmp_path, 3)
    xray = tmp_path / "xray.png"
    Image.effect_noise((128, 128), 40).save(xray)
    temp = tmp_path / "temp"  # the page's temporary directory, and nothing else's
    temp.mkdir()
    env = child_env(MLFLOW_TRACKING_URI=tracking_server, FRACTURE_MODEL_NAME=NAME, FRACTURE_DETECTOR_NAME="",
                    TMPDIR=str(temp), PYTHONPATH=str(REPO / "app"))  # `streamlit run` puts the page's folder there
    proc = subprocess.run(
        [sys.executable, "-c", PAGE_SESSIONS, str(REPO / "app" / "streamlit_app.py"), tracking_server, NAME,
         str(xray), str(temp), "1", "2", "3", "2", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    # The cache holds the two versions last used: a version it dropped leaves no copy, and one it
    # holds keeps its own (version 2, used again before 1 came back, is kept; 3 is dropped).
    assert [(s["serves"], s["on_disk"]) for s in out["steps"]] == [
        ("1", [1]), ("2", [1, 2]), ("3", [2, 3]), ("2", [2, 3]), ("1", [1, 2]),
    ]
    assert set(out["metrics"]) == {"Predicted class", "Fracture probability", "Threshold"}
    # The page's Python has ended: its copies went with it.
    assert list(temp.rglob("registered_model_meta")) == []
    assert [p.name for p in temp.iterdir() if p.name.startswith("fracture-page-")] == []


def page_module(monkeypatch: pytest.MonkeyPatch, temp: Path):
    """The page's :mod:`champion`, as a fresh page process would start it: its temporary directory
    ``temp``, no page folder made yet, and ``sys.path`` (which loads change) put back afterwards."""
    monkeypatch.syspath_prepend(str(REPO / "app"))  # also restores sys.path when the test ends
    import champion

    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(champion, "_page_folder", None)
    return champion


def test_a_version_the_page_releases_leaves_nothing_of_its_own_on_sys_path(tracking_server, tmp_path, monkeypatch):
    # MLflow prepends each loaded version's code folder (`code_paths`) to sys.path and never takes it
    # off: a page reloading versions for weeks would grow sys.path without end, its entries naming
    # folders long removed, ahead of the code of versions loaded later.
    register_versions(tracking_server, tmp_path, 2)
    temp = tmp_path / "temp"
    temp.mkdir()
    champion = page_module(monkeypatch, temp)
    settings = champion.PageSettings(tracking_server, NAME, "champion", "")
    before = list(sys.path)

    def ours() -> list[str]:
        return [p for p in sys.path if p.startswith(str(temp))]

    for version in ["1", "2", "1", "2"]:
        model = champion.load_served_model(settings, version, "")
        assert len(ours()) == 1 and Path(ours()[0]).is_dir()  # its own code, while it is served
        model.release()
        assert sys.path == before, f"after releasing version {version}: {ours()}"

    # Two served at once (the cache keeps two): each keeps its own entry until it is dropped.
    first = champion.load_served_model(settings, "1", "")
    second = champion.load_served_model(settings, "2", "")
    assert len(ours()) == 2
    first.release()
    assert len(ours()) == 1 and Path(ours()[0]).is_dir()
    second.release()
    assert sys.path == before


#: A models-from-code pyfunc whose packaged code (``code_paths``) is one module, imported at load.
PROBE_ENTRY = """
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
import {module}


class Probe(PythonModel):
    version = {module}.VERSION
    code = {module}.__file__

    def predict(self, context, model_input, params=None):
        return model_input


set_model(Probe())
"""


def register_probes(url: str, folder: Path, module: str, versions: int) -> None:
    """Versions 1 .. ``versions`` of ``module``'s probe, each packaging its own ``module`` (``VERSION = n``)."""
    mlflow.set_tracking_uri(url)
    try:
        mlflow.set_experiment("page-model-code")
        for version in range(1, versions + 1):
            code = folder / f"v{version}" / f"{module}.py"
            code.parent.mkdir()
            code.write_text(f"VERSION = {version}\n")
            entry = code.parent / "entry.py"
            entry.write_text(PROBE_ENTRY.format(module=module))
            # MLflow runs the entry when it logs it: its module must be importable here, then gone again.
            sys.path.insert(0, str(code.parent))
            try:
                with mlflow.start_run():
                    # Its requirements given: MLflow would otherwise infer them in a Python of its own.
                    info = mlflow.pyfunc.log_model(name="model", python_model=str(entry), code_paths=[str(code)],
                                                   pip_requirements=["mlflow"])
            finally:
                sys.path.remove(str(code.parent))
                sys.modules.pop(module, None)
            mlflow.register_model(info.model_uri, module)
    finally:
        mlflow.set_tracking_uri(None)


def test_each_version_the_page_loads_imports_its_own_packaged_code(tracking_server, tmp_path, monkeypatch):
    # A module the first version imported stays in sys.modules: a later version importing a module of
    # that name would get the earlier version's, whether the earlier one is released or still served.
    module = "page_probe_code"
    register_probes(tracking_server, tmp_path, module, 3)
    temp = tmp_path / "temp"
    temp.mkdir()
    champion = page_module(monkeypatch, temp)
    monkeypatch.delitem(sys.modules, module, raising=False)  # put back as it was (absent) afterwards
    settings = champion.PageSettings(tracking_server, module, "champion", "")

    def load(version: int):
        pyfunc, files = champion._load_pyfunc(settings, module, str(version))
        probe = pyfunc.unwrap_python_model()
        assert probe.version == version
        assert Path(probe.code).is_file()  # from its own copy, not a removed one
        return pyfunc, files

    _, files_1 = load(1)
    files_1()  # released
    _, files_2 = load(2)  # a fresh import, not version 1's module
    _, files_3 = load(3)  # version 2 still served
    files_2()
    files_3()
    assert module not in sys.modules  # nothing of a released version is left to import


#: A page process that makes its folder and a version's folder in it, says where, and waits.
PAGE_WITH_A_FOLDER = r"""
import time
import champion

folder = champion.page_folder()
(folder / "page-model-v1-abcdefgh").mkdir()
(folder / "page-model-v1-abcdefgh" / "MLmodel").write_text("stands for a version's files")
print(folder, flush=True)
time.sleep(600)
"""


@contextmanager
def two_pages_one_killed(tmp_path: Path) -> Iterator[tuple[Path, list[subprocess.Popen], list[Path]]]:
    """Two page processes, each with its folder (and a version's folder in it) under ``tmp_path/temp``;
    the first killed with SIGKILL (no atexit, no finalizer: its folder stays behind), the second left
    running. Yields the temporary directory, the processes and their folders; ends both."""
    temp = tmp_path / "temp"
    temp.mkdir()
    env = child_env(TMPDIR=str(temp), PYTHONPATH=str(REPO / "app"))
    pages = [subprocess.Popen([sys.executable, "-c", PAGE_WITH_A_FOLDER], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        folders = [Path(page.stdout.readline().strip()) for page in pages]
        assert all(f.is_dir() and f.parent == temp for f in folders), folders
        os.kill(pages[0].pid, signal.SIGKILL)
        pages[0].wait()
        assert folders[0].is_dir()
        yield temp, pages, folders
    finally:
        for page in pages:  # started here, ended here, by their own ids
            if page.poll() is None:
                page.kill()
                page.wait()


def test_a_starting_page_removes_the_folders_of_pages_killed_before_they_could_and_no_live_page_s(tmp_path, monkeypatch):
    with two_pages_one_killed(tmp_path) as (temp, (killed, live), folders):
        killed_folder, live_folder = folders

        # Each page holds its folder's owner lock while it runs; the kernel let go of the killed one's.
        assert all((f / ".owner.lock").is_file() for f in folders)

        # The killed page's pid reused by a live process (this one): the folder is still a dead page's.
        reused = temp / killed_folder.name.replace(f"-{killed.pid}-", f"-{os.getpid()}-", 1)
        assert reused != killed_folder
        shutil.copytree(killed_folder, reused)
        # Folders of an earlier release (named with a start time, without a lock file) are judged by
        # pid: kept while a process has it, whatever its start time, removed once none has.
        older_live = temp / f"fracture-page-{live.pid}-s1-abcdefgh"
        older_dead = temp / f"fracture-page-{killed.pid}-s1-abcdefgh"
        for older in (older_live, older_dead):
            shutil.copytree(killed_folder, older, ignore=shutil.ignore_patterns(".owner.lock"))

        champion = page_module(monkeypatch, temp)
        this_page = champion.page_folder()  # a page (re)starting: this process
        assert not killed_folder.exists()
        assert not reused.exists()
        assert not older_dead.exists()
        assert older_live.is_dir()
        assert live_folder.is_dir() and (live_folder / "page-model-v1-abcdefgh" / "MLmodel").is_file()
        assert this_page.is_dir() and this_page.name.startswith(f"fracture-page-{os.getpid()}-")
        assert (this_page / ".owner.lock").is_file()

        monkeypatch.setattr(champion, "_page_folder", None)  # another page starting, beside this one
        assert champion.page_folder() != this_page
        assert this_page.is_dir() and live_folder.is_dir()  # a live page's folder, its pid this very one


def test_a_running_page_keeps_its_folder_when_the_system_clock_is_stepped(tmp_path, monkeypatch):
    # psutil reckons a process's start time as the boot time, in wall-clock time, plus the ticks from
    # boot to its start: when the clock is stepped (chrony's makestep, NTP, a VM resumed) every running
    # process seems to have started at another time. A running page must keep its folder all the same.
    if not sys.platform.startswith("linux"):
        pytest.skip("psutil reckons start times from the wall-clock boot time on Linux")
    import psutil._pslinux

    with two_pages_one_killed(tmp_path) as (temp, _, (killed_folder, live_folder)):
        champion = page_module(monkeypatch, temp)
        boot_time = psutil._pslinux.boot_time
        for step in (1.0, -1.0):  # the clock stepped forward, then back
            monkeypatch.setattr(psutil._pslinux, "boot_time", lambda step=step: boot_time() + step)
            champion.remove_stale_page_folders()
            assert live_folder.is_dir() and (live_folder / "page-model-v1-abcdefgh" / "MLmodel").is_file(), step
            assert not killed_folder.exists()  # a page that is gone is still told from one that runs
