"""Keep freed memory in the process heap while streaming a checkpoint (glibc only).

``protect`` allocates and frees the same large working tensors block after block.  glibc serves
each allocation above its mmap threshold with a fresh ``mmap`` and returns it with ``munmap``
on free, so every block pays the kernel's page faults again (half of protect's CPU time was
system time at 1B parameters).  :func:`keep_freed_memory` turns that off for the process:
``M_MMAP_MAX = 0`` (no mmap'd chunks: everything comes from the heap), a high
``M_TRIM_THRESHOLD`` (freed heap memory is not handed back) and a ``M_TOP_PAD`` (the heap grows
in large steps) and ``M_ARENA_MAX = 1`` (threads allocate from that heap too: a thread's own
arena lives in 64 MiB mmap'd heaps that glibc unmaps as soon as one is empty, whatever the trim
threshold, so the block workers' arrays were faulted in afresh every block).  Freed blocks are
then reused without new page faults; the cost is a peak RSS that stays at its high-water mark.
Measured in BENCHMARKS.md ("Scale").
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
INT_MAX = 2**31 - 1


def keep_freed_memory(top_pad: int = 256 * 2**20) -> bool:
    """Apply the settings above with ``mallopt``; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_MAX, 0),
            (M_TRIM_THRESHOLD, INT_MAX),
            (M_TOP_PAD, top_pad),
            (M_ARENA_MAX, 1),
        )
    )
