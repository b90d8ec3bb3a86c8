"""Process-wide malloc settings that keep activation memory mapped between forward passes.

glibc's ``malloc`` serves a block above its mmap threshold (128 KiB at start, raised only as
large blocks happen to be freed) with a fresh ``mmap``, and ``free`` unmaps it again; the kernel
then zero-fills every page on first touch. A CPU forward pass of ResNet-20 on a batch of 100
allocates about twenty 6.5 MB activations, so without this each batch pays for thousands of page
faults: full FP32 certification (batch 100, 2 cores) ran at 2,224 noisy samples/s with glibc's
defaults and at 3,286 with :func:`keep_activation_memory`, with the same certificates (one
probe, the two settings in separate processes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap (glibc's largest allowed mmap threshold, 32 MiB)
MMAP_THRESHOLD = 32 << 20
#: free memory at the top of the heap kept for the next batch instead of returned to the system
TRIM_THRESHOLD = 512 << 20

_applied: bool | None = None


def keep_activation_memory() -> bool:
    """Set glibc's mmap threshold to 32 MiB and its trim threshold to 512 MiB, once per process.

    Returns whether the settings are in effect. It does nothing (and returns False) off Linux
    glibc, when the user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (their
    choice stands), or when ``ARQ_GYM_MALLOC=default``. The cost is memory: up to 512 MiB of
    freed heap stays with the process.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get("ARQ_GYM_MALLOC") == "default":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _applied
