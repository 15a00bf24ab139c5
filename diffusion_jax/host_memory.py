"""How the C allocator keeps host memory: decided once, by the command line (and the tests).

On the CPU backend XLA's buffers (a train step's activations and temporaries, megabytes each) come
from glibc's malloc, which by default gives every large one a fresh mapping and unmaps it when it
is freed: each step faults all of its pages in again. A 300-step digits run took 4.9 M page faults,
12.9 s of system time and 52.6 s in all; with freed memory kept in the heap, 0.15 M, 1.7 s and
43.8 s (BENCHMARKS.md, fourteenth session). On another machine XLA's threads allocated from arenas of
their own, which those settings did not keep: 1.78 M faults in 100 steps with or without them, 0.2
M with one arena for every thread (fifteenth session). The price is that the process holds on to
the most heap it has used (nothing is given back to the system before it exits), which a command
that runs one job can afford.

A user's own MALLOC_* environment variables (glibc's settings) take precedence: nothing is changed
where any is set, nor where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h) and the values set: one arena, the main one, for every
# thread (XLA's threads allocate too, and on some machines what they freed in arenas of their own
# was not kept; BENCHMARKS.md), every allocation from it (never its own mapping), the heap grown
# 1 GiB at a time and never trimmed.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 1 << 30))


def keep_freed_memory() -> bool:
    """Makes glibc's malloc serve large allocations from its heap and keep what is freed for the
    next ones. Returns whether it did: False off Linux, without glibc, or when the environment sets
    any MALLOC_* variable."""
    if not sys.platform.startswith("linux") or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc's own symbol: musl and others keep their allocator
    except (OSError, AttributeError):
        return False
    done = all(libc.mallopt(option, value) == 1 for option, value in SETTINGS)
    log.debug("malloc keeps freed memory: %s", done)
    return done
