"""Process-level settings that make moldiff's CPU work faster. Nothing here imports torch."""

from __future__ import annotations

import os
import sys

__all__ = ["tune_allocator"]


def tune_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the OS after every tensor.

    glibc serves allocations above a (dynamic, at most 32 MB) threshold with fresh mmap pages and
    trims the heap top eagerly; the edge tensors of a batch (E x H floats, tens of MB) then cost a
    page fault per 4 kB on every layer of every step. Raising both thresholds to 1 GB keeps those
    pages mapped (the process may then hold up to 1 GB it no longer uses). The ``moldiff`` command
    calls this at start-up; call it once from Python before sampling or training for the same speed.
    Measured by ``scripts/bench_engine.py`` (``--malloc-default`` for the comparison). Returns
    whether the allocator was tuned: False off Linux/glibc or when ``MOLDIFF_DEFAULT_MALLOC`` is set.
    """
    if sys.platform != "linux" or os.environ.get("MOLDIFF_DEFAULT_MALLOC"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
