"""Keeps the memory a pipeline process frees for its next tensors, instead of handing it back.

glibc's malloc serves a request above its mmap threshold (128 KiB, rising with what is freed to
at most 32 MiB) with pages mapped fresh from the kernel, and unmaps them when the block is freed;
memory freed at the top of its heap goes back to the kernel past a trim threshold (128 KiB, moving
with it). A training step of the CPU profile (batches of 16 at 448 px) allocates and frees
activations of up to about 100 MB dozens of times, so each step the kernel maps those pages
again and zeroes every one of them: on two cores, 30% of the main job's CPU time went to the
kernel (624 of 2,057 s). PyTorch's CPU performance guide answers this by preloading jemalloc or
tcmalloc, which pip does not install; glibc's own ``mallopt(3)`` does the same job here: no mmap
for any block (``M_MMAP_MAX`` 0) and at most :data:`TRIM_THRESHOLD` of free memory kept at the
top of the heap (``M_TRIM_THRESHOLD``). Freed blocks then serve the next step's tensors, already
mapped (bench/allocator.py: a fit 1.34x faster; the main job 19 min 38 s -> 15 min 06 s).

It changes where memory comes from, not what is computed: the same weights, bit for bit. The
process holds more than it uses at the moment: up to :data:`TRIM_THRESHOLD` at the heap's top,
and freed blocks between live ones (the main job's peak resident memory 7.5 -> 8.7 GiB). It is
set by every pipeline command (the stages, cross-validation, ``fracture predict``), once per
process; the served model leaves the allocator as the consumer's process has it.
``FRACTURE_KEEP_FREED_MEMORY=0`` in the environment leaves it too. Elsewhere than glibc (macOS,
musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

#: mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: Free memory the heap keeps at its top before giving it back to the kernel.
TRIM_THRESHOLD = 1 << 30
#: The environment variable that leaves the allocator as it is when set to 0.
SWITCH = "FRACTURE_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to reuse freed memory (see the module). Returns whether it is set.

    Safe to call again: the settings are the same each time.
    """
    if os.environ.get(SWITCH, "1").strip() == "0":
        log.debug("%s=0: the allocator is left as it is", SWITCH)
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only; musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("not glibc: the allocator is left as it is")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
