"""The C allocator's thresholds for a process that moves bulk data in 64-256 KiB chunks.

Every chunk a socket read returns is a fresh bytes object of up to 256 KiB. With glibc's
defaults such a block sits right at the mmap threshold (128 KiB, raised dynamically) and
the trim threshold: a block freed at the top of the heap gives its pages back to the
kernel, and the next read faults them in again, zeroed. On a 1 GiB download through the
proxy that was a third of its CPU time (page faults, page clearing) and a third of its
throughput. Fixed thresholds keep such blocks on the heap and the heap's top in place;
blocks of 1 MiB and more are still mapped, and more than 4 MiB free at the top is still
given back, so memory stays bounded.

Only glibc has `mallopt`; on other C libraries this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1024 * 1024  # blocks from this size on get their own mapping
TRIM_THRESHOLD = 4 * 1024 * 1024  # free memory at the heap's top kept up to this much


def tune() -> bool:
    """Set the thresholds; True when the C library took them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
