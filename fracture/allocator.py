"""Keeps the memory a pipeline command frees for its next tensors, and hands it back when it ends.

glibc's malloc serves a request above its mmap threshold (128 KiB, rising with what is freed to
at most 32 MiB) with pages mapped fresh from the kernel, and unmaps them when the block is freed;
memory freed at the top of its heap goes back to the kernel past a trim threshold (128 KiB, moving
with it). A training step of the CPU profile (batches of 16 at 448 px) allocates and frees
activations of up to about 100 MB dozens of times, so each step the kernel maps those pages
again and zeroes every one of them: on two cores, 30% of the main job's CPU time went to the
kernel (624 of 2,057 s). PyTorch's CPU performance guide answers this by preloading jemalloc or
tcmalloc, which pip does not install; glibc's own ``mallopt(3)`` does the same job here: no mmap
for any block (``M_MMAP_MAX`` 0) and no trimming of the heap's top (``M_TRIM_THRESHOLD`` -1).
Freed blocks then serve the next step's tensors, already mapped. A trim threshold, even of 1 GiB,
is not enough: a step can free more than that at the top of the heap, which the next step maps in
again (traced: 22 times 1.0-1.2 GB over four one-epoch fits of 32 to 96 images at 448 px).

:func:`freed_memory_kept` holds it for a block of work and hands the free memory back to the
kernel (``malloc_trim(3)``) when the outermost such block ends: a stage command is one, and the
retrain flow, which runs its stages in its own process (tasks/pipeline.py), is one around them, so
each stage reuses what the one before freed and the process keeps none of it once the run ends.

It changes where memory comes from, not what is computed: the same weights, bit for bit. While a
command runs, its process holds its peak: freed blocks stay mapped for the next ones. It is set by
every pipeline command (the stages, cross-validation, ``fracture predict``), once per process, and by
the Python of its own in which the gate scores a version and ``fracture predict`` keeps one loaded
(:mod:`fracture.consumer`); the served model leaves the allocator as the consumer's process has it.
``FRACTURE_KEEP_FREED_MEMORY=0`` in the environment leaves it too. Elsewhere than glibc (macOS,
musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

#: mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: ``M_TRIM_THRESHOLD``'s value that never trims the heap's top (mallopt(3)).
NEVER_TRIM = -1
#: The environment variable that leaves the allocator as it is when set to 0.
SWITCH = "FRACTURE_KEEP_FREED_MEMORY"

_blocks = 0  # freed_memory_kept blocks open in this process
_blocks_lock = threading.Lock()


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc and the switch is not 0; else ``None``."""
    if os.environ.get(SWITCH, "1").strip() == "0":
        log.debug("%s=0: the allocator is left as it is", SWITCH)
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only; musl's mallopt does nothing
    except (OSError, AttributeError):
        log.debug("not glibc: the allocator is left as it is")
        return None
    return libc


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to reuse freed memory (see the module). Returns whether it is set.

    Safe to call again: the settings are the same each time.
    """
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1


def give_back_freed_memory() -> bool:
    """Returns the heap's free memory to the kernel (``malloc_trim(0)``).

    What is still in use stays; the next tensors map memory in again. Returns whether any was
    returned; ``False`` also where :func:`keep_freed_memory` does nothing.
    """
    libc = _glibc()
    if libc is None:
        return False
    trim = libc.malloc_trim
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return trim(0) == 1


@contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Keeps freed memory for the block's next tensors (:func:`keep_freed_memory`), and hands it
    back (:func:`give_back_freed_memory`) when the outermost such block in the process ends.

    Yields whether the setting is in force.
    """
    global _blocks
    kept = keep_freed_memory()
    with _blocks_lock:
        _blocks += 1
    try:
        yield kept
    finally:
        with _blocks_lock:
            _blocks -= 1
            last = _blocks == 0
        if last:
            give_back_freed_memory()
