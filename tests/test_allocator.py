"""Pipeline commands keep the memory they free for their next tensors (fracture/allocator.py):
a freed block serves the next one without the kernel mapping and zeroing its pages again; and the
outermost block of work that kept it (a stage command, or the retrain flow's run around its
stages) hands it back when it ends."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fracture.allocator import SWITCH
from tests.conftest import REPO

#: A block larger than glibc's largest mmap threshold (32 MiB), as a training step's activations are.
BLOCK_BYTES = 64 * 2**20
PAGES = BLOCK_BYTES // 4096

#: What every probe starts with: blocks written and freed through the C library's malloc (as
#: torch's CPU allocator does), and the process's minor page faults and resident memory (MiB).
PRELUDE = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes, libc.memset.argtypes = (ctypes.c_void_p,), (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
def write_block(size):
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    return block
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def resident():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 // 2**20
"""

#: Sets the allocator (``{}``: whether it must take).
SETTING = "from fracture.allocator import keep_freed_memory; assert keep_freed_memory() == {}\n"

#: Writes and frees two blocks of ``{size}`` bytes, then counts the pages the kernel maps in for a third.
COUNT_FAULTS = """
for _ in range(2):
    libc.free(write_block({size}))
before = faults()
write_block({size})
print('faults', faults() - before, flush=True)
"""

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the allocator's settings are glibc's")


def printed(code: str, word: str, keep: str, cwd: Path = REPO) -> list[int]:
    """The numbers on the last line starting with ``word`` that ``code`` prints, run after
    :data:`PRELUDE` in a Python of its own."""
    env = os.environ | {SWITCH: keep}
    proc = subprocess.run([sys.executable, "-c", PRELUDE + code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"the probe failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"{word} ")]
    assert lines, f"the probe printed no {word}"
    return [int(value) for value in lines[-1].split()[1:]]


def faults_after(code: str, keep: str, cwd: Path = REPO, size: int = BLOCK_BYTES) -> int:
    """Pages mapped in for a new block of ``size`` bytes after ``code`` ran, in a Python of its own."""
    return printed(code + COUNT_FAULTS.format(size=size), "faults", keep, cwd)[0]


def transparent_huge_pages_always() -> bool:
    """With THP always on, the kernel maps a fresh block in 2 MiB pages: few faults either way."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[always]" in setting.read_text()


def test_a_freed_block_serves_the_next_one_without_the_kernel_mapping_its_pages_again():
    assert faults_after(SETTING.format(True), "1") < PAGES // 20
    # Switched off, glibc maps every block this large afresh and unmaps it when freed.
    returned = faults_after(SETTING.format(False), "0")
    if not transparent_huge_pages_always():
        assert returned > PAGES * 9 // 10


@pytest.mark.parametrize("argv", [["validate"], ["predict", "no-such-folder"]])
def test_every_pipeline_command_keeps_freed_memory_also_when_it_fails(argv, tmp_path):
    """A stage (here one run outside a project, which fails at once) and ``fracture predict`` set it
    before anything else, as the flow's process and `dvc repro`'s commands run them."""
    run = f"from fracture.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
    assert faults_after(run, "1", cwd=tmp_path) < PAGES // 20
    if not transparent_huge_pages_always():
        assert faults_after(run, "0", cwd=tmp_path) > PAGES * 9 // 10


def test_a_consumers_python_keeps_freed_memory_before_it_loads_the_model(tmp_path):
    """The gate scores each version on the test split in a Python of its own that cannot import
    this installation's ``fracture`` (fracture/consumer.py), and ``fracture predict`` keeps one
    loaded: both set the allocator themselves, before the model loads, as the commands do."""
    from fracture.consumer import _KEEP_FREED_MEMORY, SCRIPT, WORKER

    assert faults_after(_KEEP_FREED_MEMORY, "1", cwd=tmp_path) < PAGES // 20
    if not transparent_huge_pages_always():
        assert faults_after(_KEEP_FREED_MEMORY, "0", cwd=tmp_path) > PAGES * 9 // 10
    for program in (SCRIPT, WORKER):
        assert 0 <= program.find(_KEEP_FREED_MEMORY) < program.index("mlflow.pyfunc.load_model(model_dir)")


def test_freed_memory_at_the_top_of_the_heap_is_kept_whatever_its_size():
    """A training step can free more than 1 GiB at the heap's top: a trim threshold that size gave
    it back to the kernel, only for the next step to map it in again (fracture/allocator.py).
    Kept, a 1.25 GiB block freed there serves the next one."""
    size = 5 * 2**28
    assert faults_after(SETTING.format(True), "1", size=size) < size // 4096 // 20
    # glibc's default maps a block this large afresh each time.
    if not transparent_huge_pages_always():
        assert faults_after(SETTING.format(False), "0", size=size) > size // 4096 * 9 // 10


#: Runs a stage command once (outside a project it fails at once), frees a 256 MiB block while
#: memory is kept, runs the command again and prints the resident memory before and after that
#: second run, in MiB (the first run's imports would take some of the block's pages).
STAGE_GIVES_BACK = """
from fracture.allocator import keep_freed_memory
from fracture.cli import main
def stage():
    try:
        main(['validate'])
    except SystemExit:
        pass
stage()
assert keep_freed_memory()
libc.free(write_block(2**28))
before = resident()
stage()
print('resident', before, resident(), flush=True)
"""


def test_a_stage_hands_the_memory_it_kept_back_when_it_ends(tmp_path):
    """A process that runs a stage command and goes on (a notebook, an application calling the
    commands) must not keep what the stage freed."""
    before, after = printed(STAGE_GIVES_BACK, "resident", "1", cwd=tmp_path)
    assert before - after > 200, f"resident memory {before} MiB before the stage, {after} MiB after it"


#: Keeps freed memory, frees a 256 MiB block, then has a consumer's Python score nothing with a
#: version that does not exist, and prints the resident memory (MiB) before and after.
CONSUMER_GIVES_BACK = """
from fracture.allocator import keep_freed_memory
from fracture.consumer import ConsumerError, predict_as_consumer
assert keep_freed_memory()
libc.free(write_block(2**28))
before = resident()
try:
    predict_as_consumer('models:/no-such-model/1', [])
except ConsumerError:
    pass
print('resident', before, resident(), flush=True)
"""


def test_a_process_gives_back_what_it_kept_before_a_consumers_python_starts(tmp_path):
    """The gate scores two versions in consumers' Pythons of their own, each holding gigabytes,
    after the retrain flow's process has trained and kept what training freed: that process hands
    its free memory back first, so the machine does not hold both."""
    before, after = printed(CONSUMER_GIVES_BACK, "resident", "1", cwd=tmp_path)
    assert before - after > 200, f"resident memory {before} MiB before the consumer's Python, {after} MiB after it"


#: Frees a 256 MiB block inside two nested blocks of kept memory and prints the resident memory
#: (MiB) after the inner one ends and after the outer one ends.
NESTED = """
from fracture.allocator import freed_memory_kept
with freed_memory_kept() as outer:
    with freed_memory_kept() as inner:
        assert outer and inner
        libc.free(write_block(2**28))
    after_inner = resident()
print('resident', after_inner, resident(), flush=True)
"""


def test_a_stage_inside_the_flow_leaves_the_memory_to_the_next_stage_and_the_run_hands_it_back():
    """The retrain flow runs its stages in its own process inside a block of its own: a stage's end
    must not hand back what the next stage would map in again; the run's end hands it back."""
    after_inner, after_outer = printed(NESTED, "resident", "1")
    assert after_inner - after_outer > 200, (
        f"resident memory {after_inner} MiB after the inner block, {after_outer} MiB after the outer one"
    )
