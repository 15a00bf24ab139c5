"""`keep_freed_memory`: a large buffer freed and allocated again is served from the heap without
faulting its pages in again (counted by the kernel), another thread's allocations come from the same
heap (XLA's threads allocate a train step's buffers), and a user's MALLOC_* setting is left alone."""
import subprocess
import sys

from diffusion_jax import host_memory

# Each script below runs in a process of its own: the module loaded alone (without JAX) from the
# path in argv[2], and its setting applied when argv[1] is "keep".
LOAD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("host_memory", sys.argv[2])
host_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_memory)
applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
"""
# Allocates and frees a 64 MiB buffer 8 times, writing every page; prints whether the setting was
# applied and the minor page faults of the last 7 rounds: a fresh mapping each round faults each of
# its 2 MiB (a huge page) at least once, 32 times a round, and 16,384 times without huge pages.
ROUNDS = LOAD + """
import resource
import numpy as np
np.ones(1 << 24, np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(7):
    np.ones(1 << 24, np.float32)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
# A thread allocates 1 MiB, then glibc's malloc_stats lists its arenas on stderr ("Arena 0:", ...).
THREAD = LOAD + """
import ctypes, threading
thread = threading.Thread(target=lambda: bytearray(1 << 20))
thread.start()
thread.join()
ctypes.CDLL("libc.so.6").malloc_stats()
"""


def _run(script: str, mode: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, mode, host_memory.__file__], capture_output=True, text=True,
                          check=True, env={"PATH": "", **env})


def _faults(mode: str, **env) -> tuple[str, int]:
    out = _run(ROUNDS, mode, **env).stdout.split()
    return out[0], int(out[1])


def _arenas(mode: str) -> int:
    return sum(line.startswith("Arena ") for line in _run(THREAD, mode).stderr.splitlines())


def test_freed_memory_is_reused_without_page_faults():
    applied, kept = _faults("keep")
    _, default = _faults("default")
    assert applied == "True" and kept < 7 and default >= 7 * 32, (kept, default)
    # by default a thread gets an arena (a mapped heap) of its own; kept, every thread uses the main one
    assert (_arenas("keep"), _arenas("default")) == (1, 2)
    assert _faults("keep", MALLOC_ARENA_MAX="2")[0] == "False"  # the user's own settings win
