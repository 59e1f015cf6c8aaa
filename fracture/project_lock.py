"""One writer per project: the retrain flow and every ``fracture`` command that writes the project
hold the same operating-system lock while they work. A command typed by hand, or a one-shot run,
is refused at once while another holds it; a run of the deployment waits for it a while
(``schedule.busy_wait_seconds``).

Two writers in one checkout would copy data under each other's stages and race for
``dvc.lock``, the outputs and the registry: a retrain run and a ``fracture ingest`` or
``dvc repro`` typed by hand meanwhile, for example. The lock is ``filelock``'s, so a holder
that dies, even killed, releases it.

The holder's own work is not refused: the flow runs each stage's command in its own process, and
a stage DVC runs in a child process (a command DVC does not run in-process) inherits
``FRACTURE_PROJECT_LOCK``, which names the lock and a token only the holder's note carries.

A ``dvc repro`` typed by hand holds the project only while one of its stages' ``fracture``
commands runs. So the project counts as busy while another DVC command runs in it
(:func:`dvc_running`): a deployment's run waiting for the project does not take it between two of
those stages (which would refuse the next one), and a command or one-shot run is refused at once,
as it would be during a stage. A ``fracture`` command that DVC runs as a stage (``DVC_STAGE`` set in
its environment) is the DVC command's own work.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import zc.lockfile
from filelock import FileLock, Timeout

#: Held by whoever is writing the project, beside a note of who holds it (``<lock>.json``).
LOCK_FILE = Path("outputs") / "retrain.lock"
#: Set while the lock is held, for the holder's own process and its children: ``<lock path>\t<token>``.
HELD_ENV = "FRACTURE_PROJECT_LOCK"
#: DVC's repository lock (``dvc.lock.Lock``, on zc.lockfile), held by a DVC command while it runs, but for
#: its stages' commands; the file holds the process id of the last command to take it.
DVC_LOCK = Path(".dvc") / "tmp" / "lock"
#: What DVC sets in the environment of each stage command it runs.
DVC_STAGE_ENV = "DVC_STAGE"
#: Seconds between a waiting writer's looks at DVC's repository lock.
DVC_POLL_S = 1.0


class ProjectBusy(RuntimeError):
    """Another run or command is writing the project; this one changed nothing."""


def _held_here(path: Path, note: Path) -> bool:
    """Whether this process or one of its parents holds the lock at ``path`` (which is taken)."""
    held, _, token = os.environ.get(HELD_ENV, "").partition("\t")
    if held != str(path) or not token:
        return False
    try:
        return json.loads(note.read_text()).get("token") == token
    except (OSError, ValueError, AttributeError):
        return False


def _holder(note: Path) -> str:
    """Who holds the project, from the note its holder writes once it has taken the lock."""
    try:
        info = json.loads(note.read_text())
        return f"{info['holder']}, process {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its details are not written yet"


def dvc_running(root: Path) -> bool:
    """Whether another DVC command (a ``dvc repro``, ``dvc exp run`` or ``dvc add``) is running in ``root``,
    unless this process is a stage command DVC runs (:data:`DVC_STAGE_ENV`).

    A DVC command holds its repository lock, except while each stage's command runs: DVC lets it go
    then and takes it again once the command's process has ended, which leaves a moment with neither
    lock held after the command lets the project go. So the command counts as running while it holds
    the lock (a non-blocking lock of the file, let go at once, writing nothing to it), and while the
    process the file names, the last to take it, is alive and is ``dvc``.
    """
    path = root / DVC_LOCK
    if os.environ.get(DVC_STAGE_ENV) or not path.is_file():
        return False
    try:
        zc.lockfile.SimpleLockFile(str(path)).close()
    except zc.lockfile.LockError:
        return True
    except OSError:  # not writable by this user (another user's DVC made it): the process it names tells
        pass
    return _dvc_alive(path, root)


def _dvc_alive(path: Path, root: Path) -> bool:
    """Whether the process whose id DVC's lock file holds (zc.lockfile writes it on taking the lock) is a
    ``dvc`` command still running in ``root``, other than this process or one that started it.

    The file keeps the id after its command ends, and the system gives ids out again: a ``dvc``
    command in another checkout that got it counted as this project's, which was busy for as long
    as that command ran. So the process works in ``root`` or a folder of it; one whose folder this
    user may not read (another user's) counts, as it did.
    """
    try:
        pid = int(path.read_text().split()[0])
        here = psutil.Process()
        if pid == here.pid or pid in {parent.pid for parent in here.parents()}:
            return False
        process = psutil.Process(pid)
        if not any(Path(arg).name == "dvc" for arg in process.cmdline()[:3]):
            return False
        try:
            folder = Path(process.cwd()).resolve()
        except psutil.AccessDenied:
            return True
        project = root.resolve()
        return folder == project or project in folder.parents
    except (OSError, ValueError, IndexError, psutil.Error):  # no id written, or that process has ended
        return False


def _dvc_holder(root: Path) -> str:
    return (f"a DVC command is running in it (DVC's repository lock, {root / DVC_LOCK}): a `dvc repro` or "
            "`dvc exp run` between two stages, or another DVC command")


def _busy(root: Path, note: Path, holder: str, waited: float, dvc: bool = False) -> ProjectBusy:
    """The refusal of a writer that found the project busy (after waiting ``waited`` seconds)."""
    after = f" after waiting {waited:g} s (schedule.busy_wait_seconds)" if waited > 0 else ""
    return ProjectBusy(
        f"another run is working in {root} ({_dvc_holder(root) if dvc else _holder(note)}). {holder} stopped{after} "
        "without changing anything; "
        "run it again once that one has finished (scheduled retrain runs queue for each other: "
        "schedule.concurrency_limit)"
    )


@contextmanager
def project_lock(
    project: Path, holder: str, wait: float = 0, say: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Holds the project for the block; a second writer is refused before it touches anything.

    Args:
        project: the project root.
        holder: who is working, as the refusal names it to the other writer (``"flow run
            smart-fox"``, ``"`fracture train`"``).
        wait: seconds to wait for a busy project to come free before refusing; 0 refuses at
            once (a command typed by hand, a one-shot run).
        say: told once, when the project is busy and this writer starts waiting, whom it waits for.

    Raises:
        ProjectBusy: another run or command holds the project (still, after ``wait``); the message says which.
    """
    root = project.resolve()
    path = root / LOCK_FILE
    note = path.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if _held_here(path, note):  # held by this process or a parent: its own work goes ahead
            yield
            return
        if wait <= 0:
            raise _busy(root, note, holder, 0) from None
        _wait_for(lock, root, note, holder, wait, say, dvc=False)
    else:
        if dvc_running(root):
            lock.release()
            if wait <= 0:
                raise _busy(root, note, holder, 0, dvc=True)
            _wait_for(lock, root, note, holder, wait, say, dvc=True)
    # Taken: a note left by a holder that died (its children may still carry its token) is replaced.
    token = secrets.token_hex(16)
    before = os.environ.get(HELD_ENV)
    try:
        note.write_text(json.dumps({"holder": holder, "pid": os.getpid(), "host": socket.gethostname(),
                                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": token}))
        os.environ[HELD_ENV] = f"{path}\t{token}"
        yield
    finally:
        if before is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = before
        note.unlink(missing_ok=True)
        lock.release()


def _wait_for(
    lock: FileLock, root: Path, note: Path, holder: str, wait: float, say: Callable[[str], None] | None, dvc: bool
) -> None:
    """Takes ``lock`` once the project is free, at most ``wait`` seconds from now: its holder gone and
    no other DVC command running in it (:func:`dvc_running`). Says once whom it waits for.

    Raises:
        ProjectBusy: still busy after ``wait``; the message names who holds it.
    """
    if say is not None:
        whom = _dvc_holder(root) if dvc else _holder(note)
        say(f"another run is working in {root} ({whom}); {holder} waits up to {wait:g} s for it to finish "
            "(schedule.busy_wait_seconds)")
    deadline = time.monotonic() + wait
    while True:
        try:
            lock.acquire(timeout=max(deadline - time.monotonic(), 0))
        except Timeout:
            raise _busy(root, note, holder, wait) from None
        if not dvc_running(root):
            return
        lock.release()  # between two stages of a DVC command: not free yet
        if time.monotonic() >= deadline:
            raise _busy(root, note, holder, wait, dvc=True)
        time.sleep(min(DVC_POLL_S, max(deadline - time.monotonic(), 0)))
