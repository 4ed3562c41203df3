"""Keep freed memory in the process heap between optimization steps (glibc only).

Each engine step frees and reallocates the same few hundred MB of activations. With glibc's
default thresholds much of it goes back to the OS on free and is faulted in again, page by
page, on the next step (about 2,000 page faults and 5-10 ms of kernel time per step of the
benchmark). Raising the mmap and trim thresholds keeps it in the heap, so the process holds
its peak instead of giving memory back between steps.
"""

from __future__ import annotations

import ctypes

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit
_done = False


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process; False where there is no glibc `mallopt`."""
    global _done
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    _done = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20)))
    return _done
