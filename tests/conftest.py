"""Test set-up, before JAX starts: one CPU device (eight for the tests marked `devices(8)`, in a
process of their own), and a persistent compilation cache shared by the tests and the processes
they launch (identical programs -- a resumed run, the multi-host workers -- compile once)."""
import gc
import os
import re
import subprocess
import sys
import tempfile

# XLA:CPU's compile time, not the tests' run time, bounds the suite (tiny models, ~2,800 programs):
# the tests and the processes they start compile at LLVM -O1 with XLA's classic elemental emitters.
# Small programs compile 1.05-1.8x faster for the same run time; large attention programs 2x slower
# (the SDXL LoRA train step); the suite 14% faster in all. -O0 compiles faster still, but a scan over
# a model then runs 70x slower. BENCHMARKS.md, ninth session. Without XLA:CPU's loop unrolling, train
# steps compile 8-21% faster again (the suite's gain is within its run-to-run spread; tenth session). A
# flag already in XLA_FLAGS wins; the commands users run keep XLA's defaults.
FAST_COMPILE = ("--xla_backend_optimization_level=1", "--xla_cpu_use_fusion_emitters=false",
                "--xla_backend_extra_options=xla_cpu_disable_loop_unrolling")
# One device unless a test needs more: a program for a mesh of several devices compiles 15-25% slower
# (SPMD partitioning) and a train step runs 4x slower on 8 virtual devices sharing 2 cores (BENCHMARKS.md,
# tenth session). The sharding tests say `@pytest.mark.devices(8)`; the multi-process tests start
# their processes with the devices they need.
DEVICE_COUNT = "--xla_force_host_platform_device_count"


def xla_flags(devices: int = 1, given: str = "") -> str:
    """XLA_FLAGS for a test process: `given` (a user's flags), `devices` virtual CPU devices unless
    `given` names a count, and the flags that compile fast unless `given` sets them."""
    flags = given.split()
    if not any(flag.startswith(DEVICE_COUNT) for flag in flags):
        flags.insert(0, f"{DEVICE_COUNT}={devices}")
    return " ".join(flags + [f for f in FAST_COMPILE if f.split("=")[0] not in given])


def process_env(devices: int, **extra) -> dict:
    """The environment of a JAX process a test starts: this one's, without the multi-process launch
    variables, on the CPU with `devices` devices (the tests' XLA flags), and `extra`."""
    launch = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", **extra)
    return env


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (a coordinator's)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


os.environ["XLA_FLAGS"] = xla_flags(given=os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One OpenMP thread for torch's reference runs and numpy's BLAS: with the other test worker busy on
# the other core, torch's second thread spin-waits for a core it does not get (a small pipeline's
# 10 steps took 1.6-3.0 s instead of 0.16 s) and takes CPU from that worker (BENCHMARKS.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The cyclic garbage collector, less often: JAX's caches and torch's modules make a large heap that
# every full collection walks (4 s a worker in 2 minutes of tests at the default thresholds, 0.4 s here).
gc.set_threshold(50_000, 50, 100)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "diffusion_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Executables found without tracing (`executable_cache`) cannot see a function a test replaces in
# its process (monkeypatch): off for the commands tests run, on in test_compilation_cache's own test.
os.environ.setdefault("DIFFUSION_JAX_EXECUTABLE_CACHE", "off")


import pytest  # noqa: E402  (after the environment above, as JAX must see it)

from tests.diffusers_models import small_pipeline, small_sdxl  # noqa: E402,F401  (every module's fixtures)
from diffusion_jax.host_memory import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as the commands do: XLA's CPU buffers reused without a page fault a step


# The two tiers: `make test-fast` (-m "not slow") runs the pure-function and oracle tests (float64
# formulas, Monte Carlo moments, the Gaussian data set, diffusers' own schedulers and models);
# `make test` runs everything. A module of the full tier only says so beside its tests:
# `pytestmark = pytest.mark.slow` (it trains runs, runs commands, starts processes, or compiles
# whole models).


# Modules whose tests take longest on a fresh machine (compilations, trained runs), run first: the
# two workers then end on short tests together instead of one waiting for the other's long one.
LONGEST_FIRST = ("test_evaluation", "test_multihost", "test_text_runs", "test_interop_runs", "test_models",
                 "test_readme", "test_process_runs", "test_cli_errors", "test_training", "test_sd_unet",
                 "test_pipeline")


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Puts LONGEST_FIRST's modules first (each module's own order kept); the tests that need more
    devices than this process has go to a process of their own. Under `--dist loadgroup`, every test marked xdist_group
    must carry its group in its node id (xdist adds it), else the groups are silently split
    across workers."""
    module = lambda item: item.module.__name__.rpartition(".")[2]
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(module(item), len(rank)))
    result = yield
    items[:] = _in_processes_with_their_devices(items)  # after the selection (-m, -k) of the tests
    if getattr(config.option, "loadgroup", False):
        ungrouped = [item.nodeid for item in items
                     if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if ungrouped:
            raise pytest.UsageError(f"pytest-xdist did not group {len(ungrouped)} tests marked xdist_group "
                                    f"(e.g. {ungrouped[0]}): this pytest and pytest-xdist do not work together; "
                                    "install the versions pyproject.toml's dev extra names")
    return result


def _devices_here() -> int:
    match = re.search(rf"{DEVICE_COUNT}=(\d+)", os.environ["XLA_FLAGS"])
    return int(match.group(1)) if match else 1


def _in_processes_with_their_devices(items: list) -> list:
    """The tests marked `devices(n)` that need more devices than this process has become one test
    that runs them in a new process with n devices (one per n, first: it is long)."""
    needing, here = {}, _devices_here()
    for item in items:
        marker = item.get_closest_marker("devices")
        if marker and marker.args[0] > here:
            needing.setdefault(marker.args[0], []).append(item)
    moved = {id(item) for tests in needing.values() for item in tests}
    sessions = [DevicesProcess.from_parent(tests[0].session, name=f"the {len(tests)} tests marked devices({n})",
                                           devices=n, tests=tests) for n, tests in sorted(needing.items())]
    return sessions + [item for item in items if id(item) not in moved]


class DevicesProcess(pytest.Item):
    """Runs `tests` in `python -m pytest` with `devices` virtual CPU devices; fails with its output."""

    def __init__(self, *, devices: int, tests: list, **kwargs):
        super().__init__(**kwargs)
        self.devices, self.node_ids = devices, [item.nodeid.partition("@")[0] for item in tests]

    def runtest(self):
        given = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT))
        env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}  # not a worker's
        env["XLA_FLAGS"] = xla_flags(self.devices, given)
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
                                   "-rfEs", *self.node_ids], env=env, cwd=self.config.rootpath,
                                  capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired as timeout:  # (its output is bytes, whatever `text` says)
            output = (timeout.stdout or b"").decode(errors="replace")[-20000:]
            raise DevicesProcessFailed(f"still running after {timeout.timeout} s:\n{output}") from None
        if done.returncode:
            raise DevicesProcessFailed(done.stdout[-20000:] + done.stderr[-5000:])

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, DevicesProcessFailed):
            return f"{self.name} (in a process with {self.devices} devices) failed:\n{excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.config.rootpath / "tests" / "conftest.py", None, f"{self.name}: {' '.join(self.node_ids)}"


class DevicesProcessFailed(Exception):
    pass
