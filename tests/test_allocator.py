"""The allocator thresholds (dumpproxy/allocator.py): bulk-sized blocks stay on the heap,
and freeing them does not hand the heap's top back to the kernel (which made every later
read fault its pages in again). Each case runs in a fresh interpreter; the untuned run
is the control showing that glibc's defaults behave otherwise."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt and mallinfo2 are glibc's")

PROBE = r"""
import ctypes, json, sys
from dumpproxy import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    ).split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
tuned = allocator.tune() if sys.argv[1] == "tune" else None
mapped = libc.mallinfo2().hblks
blocks = [libc.malloc(256 * 1024) for _ in range(8)]  # socket reads' size
held = libc.mallinfo2().hblks - mapped
for b in reversed(blocks):
    libc.free(b)
print(json.dumps({"tuned": tuned, "mapped": held, "kept": libc.mallinfo2().keepcost}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                         text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def test_bulk_blocks_stay_on_the_heap_and_its_top_is_kept() -> None:
    tuned = probe("tune")
    assert tuned["tuned"] is True
    assert tuned["mapped"] == 0  # no mapping per block
    assert tuned["kept"] >= 8 * 256 * 1024  # freed, not trimmed away: no new page faults


def test_glibc_defaults_differ_so_the_probe_can_tell() -> None:
    untuned = probe("default")
    assert untuned["mapped"] > 0 or untuned["kept"] < 8 * 256 * 1024
