"""Keep freed CPU tensor memory in the process instead of handing it back to the OS after every forward.

PyTorch's CPU tensors come from the C library's malloc. glibc serves a large block with mmap and unmaps it when it is
freed (above its mmap threshold, which only adapts up to the sizes it has seen freed), and trims the top of the heap
back to the OS once more than its trim threshold is free there. A sampling step frees its activations and the next
step allocates the same sizes again, so every step page-faults them back in: on a 2-core AMD EPYC, a 16-row
xut-pixel-debug forward at 32 px took 28,000 minor page faults, and a forward of 2 to 32 rows 8-18 % longer than
with the memory kept (README "Benchmarks"; `python -m bench.core` applies this in its batching measurement, as the
image workers and `hdm generate` do). A dim256 train step (bench.core's case) faulted 1,500-4,000 pages a step
without it and 70 with it, about 1 % of its time; `python -m hdm_core.train` applies it too.
The cost: the process keeps the memory of its largest batch after that batch is done, as CUDA's caching allocator
does on a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
# glibc's largest accepted value on 64-bit; bigger blocks are still mapped and unmapped
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: their own allocator, left alone
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.info("malloc keeps freed blocks up to %d MiB: %s", MMAP_THRESHOLD >> 20, ok)
    return ok
