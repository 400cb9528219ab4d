"""Handing freed memory back to the operating system between the large steps of calibration and slimming.

glibc's malloc serves every allocation below its mmap threshold from its heap, and raises that threshold up to
32 MiB as large blocks are freed (``mallopt(3)``, M_MMAP_THRESHOLD). The row blocks, chunk buffers and
activations of calibration and slimming are of that size, so after each large step the heap holds hundreds of
MiB of freed pages, counted in the resident memory until the heap top is free (the SD1.5 configuration: 277 MiB
after calibration, ~50-100 MiB per 5120-wide feed-forward decomposition; decisions.md row 10). ``malloc_trim(0)``
returns every free page wherever it lies. Other C libraries (macOS, Windows, musl) have no such call, or return
memory by themselves: there this is a no-op.
"""
from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library (glibc); absent from musl
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def release_free_heap() -> None:
    """Return the C heap's free pages to the operating system (glibc ``malloc_trim(0)``; elsewhere nothing).

    Costs milliseconds; called after each step that frees large temporaries, so that the next step's largest
    allocation does not come on top of the previous step's garbage.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
