"""Test set-up, before JAX starts: 8 virtual CPU devices for the sharding tests, and a
persistent compilation cache shared by the tests and the processes they launch (identical
programs -- a resumed run, the multi-host workers -- compile once)."""
import os
import tempfile

# XLA:CPU's compile time, not the tests' run time, bounds the suite (tiny models, ~2,800 programs):
# the tests and the processes they start compile at LLVM -O1 with XLA's classic elemental emitters.
# Small programs compile 1.05-1.8x faster for the same run time; large attention programs 2x slower
# (the SDXL LoRA train step); the suite 14% faster in all. -O0 compiles faster still, but a scan over
# a model then runs 70x slower. BENCHMARKS.md, ninth session. A flag already in XLA_FLAGS wins; the
# commands users run keep XLA's defaults.
FAST_COMPILE = ("--xla_backend_optimization_level=1", "--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int = 8, given: str = "") -> str:
    """XLA_FLAGS for a test process: `devices` virtual CPU devices (unless `given` says), compiled fast."""
    flags = given or f"--xla_force_host_platform_device_count={devices}"
    return " ".join([flags, *(f for f in FAST_COMPILE if f.split("=")[0] not in flags)])


os.environ["XLA_FLAGS"] = xla_flags(given=os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "diffusion_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Executables found without tracing (`executable_cache`) cannot see a function a test replaces in
# its process (monkeypatch): off for the commands tests run, on in test_compilation_cache's own test.
os.environ.setdefault("DIFFUSION_JAX_EXECUTABLE_CACHE", "off")


import pytest  # noqa: E402  (after the environment above, as JAX must see it)


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
    """Puts LONGEST_FIRST's modules first (each module's own order kept). Under `--dist loadgroup`, every test marked xdist_group
    must carry its group in its node id (xdist adds it), else the groups are silently split
    across workers."""
    module = lambda item: item.module.__name__.rpartition(".")[2]
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(module(item), len(rank)))
    result = yield
    if getattr(config.option, "loadgroup", False):
        ungrouped = [item.nodeid for item in items
                     if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if ungrouped:
            raise pytest.UsageError(f"pytest-xdist did not group {len(ungrouped)} tests marked xdist_group "
                                    f"(e.g. {ungrouped[0]}): this pytest and pytest-xdist do not work together; "
                                    "install the versions pyproject.toml's dev extra names")
    return result
