"""Pipeline commands keep the memory they free for their next tensors (fracture/allocator.py):
a freed block serves the next one without the kernel mapping and zeroing its pages again."""

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

#: Writes and frees two such blocks through the C library's malloc (as torch's CPU allocator does),
#: then counts the pages the kernel maps in for a third.
COUNT_FAULTS = f"""
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes, libc.memset.argtypes = (ctypes.c_void_p,), (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
def write_block():
    block = libc.malloc({BLOCK_BYTES})
    libc.memset(block, 1, {BLOCK_BYTES})
    return block
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    libc.free(write_block())
before = faults()
write_block()
print('faults', faults() - before, flush=True)
"""

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the allocator's settings are glibc's")


def faults_after(code: str, keep: str, cwd: Path = REPO) -> int:
    """Pages mapped in for a new 64 MiB block after ``code`` ran, in a Python of its own."""
    env = os.environ | {SWITCH: keep}
    proc = subprocess.run([sys.executable, "-c", code + COUNT_FAULTS], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("faults ")]
    assert line, f"the probe did not run:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return int(line[-1].split()[1])


def transparent_huge_pages_always() -> bool:
    """With THP always on, the kernel maps a fresh block in 2 MiB pages: few faults either way."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[always]" in setting.read_text()


def test_a_freed_block_serves_the_next_one_without_the_kernel_mapping_its_pages_again():
    setting = "from fracture.allocator import keep_freed_memory; assert keep_freed_memory() == {}\n"
    assert faults_after(setting.format(True), "1") < PAGES // 20
    # Switched off, glibc maps every block this large afresh and unmaps it when freed.
    returned = faults_after(setting.format(False), "0")
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
