"""The persistent compilation cache the command line turns on (`compilation_cache`)."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion_jax import compilation_cache
from tests.conftest import xla_flags
from tests.train_helpers import tiny_config, write_untrained_run

pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

HIT = "Persistent compilation cache hit for '"


def _cache_entries(directory) -> set:
    return {p.name for p in directory.rglob("*") if p.is_file()} if directory.exists() else set()


def test_a_second_process_loads_the_sampler_from_the_cache_in_the_users_cache_directory(tmp_path):
    """`sample` run twice in fresh processes, nothing configured but $XDG_CACHE_HOME: the first
    writes compiled programs under XDG_CACHE_HOME/diffusion_jax/xla, the second reads them back
    (JAX logs a cache hit for the sampling program and writes nothing new) and draws the same
    samples. JAX's threshold is 0 here: the sampler compiles in 0.45-0.6 s with the tests' flags, so
    the library's 0.5 s would keep it on one machine and not on another."""
    run = write_untrained_run(tmp_path / "run", tiny_config())
    cache = tmp_path / "xdg" / "diffusion_jax" / "xla"
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", compilation_cache.CACHE_ENV)}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_DEBUG_LOG_MODULES="jax._src.compiler",
               XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def sample(out):
        proc = subprocess.run([sys.executable, "-m", "diffusion_jax", "sample", "--workdir", str(run),
                               "--num_samples", "4", "--method", "ddim", "--steps", "3", "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    first_log = sample(tmp_path / "first.npz")
    written = _cache_entries(cache)
    assert written, f"nothing written to {cache}:\n{first_log[-3000:]}"
    second_log = sample(tmp_path / "second.npz")
    hit_keys = {line.split(" with key ")[1].strip("'") for line in second_log.splitlines() if HIT in line}
    written_keys = {name.removesuffix("-cache") for name in written if name.endswith("-cache")}
    assert any(key.startswith("jit_run-") for key in written_keys), written  # the sampling chain
    assert written_keys <= hit_keys, (written_keys, hit_keys, second_log[-3000:])
    assert _cache_entries(cache) == written, "the second run wrote new entries: it compiled again"
    first, second = np.load(tmp_path / "first.npz"), np.load(tmp_path / "second.npz")
    np.testing.assert_array_equal(first["samples"], second["samples"])


def test_the_cache_directory_setting(monkeypatch, tmp_path, caplog):
    """An explicit path wins, then DIFFUSION_JAX_COMPILATION_CACHE (a directory, or 'off'), then
    the directory JAX already has; a directory that cannot be made turns the cache off with a
    warning naming the setting (no exception)."""
    import jax

    monkeypatch.setenv(compilation_cache.CACHE_ENV, str(tmp_path / "env"))
    assert compilation_cache.cache_dir_setting(tmp_path / "arg") == str(tmp_path / "arg")
    assert compilation_cache.cache_dir_setting() == str(tmp_path / "env")
    for off in ("off", "OFF", "0", "none"):
        monkeypatch.setenv(compilation_cache.CACHE_ENV, off)
        assert compilation_cache.cache_dir_setting() is None
    monkeypatch.delenv(compilation_cache.CACHE_ENV)
    assert compilation_cache.cache_dir_setting() == jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.default_cache_dir() == tmp_path / "xdg" / "diffusion_jax" / "xla"

    (tmp_path / "a_file").write_text("")
    with caplog.at_level(logging.WARNING, logger="diffusion_jax"):
        assert compilation_cache.enable_compilation_cache(tmp_path / "a_file" / "cache") is None
    assert "cannot create" in caplog.text and compilation_cache.CACHE_ENV in caplog.text, caplog.text


@pytest.fixture
def fresh_jax_cache(tmp_path):
    """JAX's persistent cache in an empty directory for one test (its programs are compiled, not
    read from the suite's cache), restored afterwards."""
    import jax
    from jax._src import compilation_cache as jax_cache  # reset_cache: the documented way to switch

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
    jax_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", before)
    jax_cache.reset_cache()


def test_a_train_step_is_read_from_the_executable_cache_without_tracing(tmp_path, monkeypatch, caplog,
                                                                       fresh_jax_cache):
    """With the executable cache on (as the command line has it), a run compiles and stores its
    train step and initialiser, and its state's shapes; a second run of the same config reads them
    (no tracing: neither the step function nor the initialiser is called) and ends bitwise where the first did; a damaged file is removed with a
    warning and the run is the same; another config is another key. The key's environment holds
    the source of every module loaded from outside the Python installation: an edited one is
    another key."""
    import sys

    from diffusion_jax import executable_cache
    from diffusion_jax.training import step as step_module, train
    from tests.train_helpers import state_arrays

    monkeypatch.delenv(executable_cache.CACHE_ENV)
    monkeypatch.setattr(executable_cache, "_directory", tmp_path / "executables")  # restored afterwards
    first = train(tiny_config(2), tmp_path / "a")
    directory = tmp_path / "executables"
    stored = {p.name for p in directory.iterdir()}
    assert {name.split("-")[0] for name in stored} == {"train_step", "init", "state"}, stored

    traced = []
    counted = lambda make: lambda *a, **k: (lambda f: lambda *x: traced.append(1) or f(*x))(make(*a, **k))
    make_step, make_init = step_module.make_train_step, step_module.make_init_fn
    monkeypatch.setattr(step_module, "make_train_step", counted(make_step))
    monkeypatch.setattr(step_module, "make_init_fn", counted(make_init))  # nor its state shapes evaluated
    with caplog.at_level(logging.WARNING, logger="diffusion_jax"):
        second = train(tiny_config(2), tmp_path / "b")
    assert not traced and not caplog.text, caplog.text
    a = state_arrays(first)
    assert all(np.array_equal(a[k], v) for k, v in state_arrays(second).items())

    monkeypatch.setattr(step_module, "make_train_step", make_step)
    monkeypatch.setattr(step_module, "make_init_fn", make_init)
    (step_file,) = [p for p in directory.iterdir() if p.name.startswith("train_step")]
    step_file.write_bytes(b"not an executable")
    with caplog.at_level(logging.WARNING, logger="diffusion_jax"):
        third = train(tiny_config(2), tmp_path / "c")
    assert "could not be read" in caplog.text and not step_file.exists()  # JAX's cache gave it: not kept
    assert all(np.array_equal(a[k], v) for k, v in state_arrays(third).items())
    train(tiny_config(2, **{"optim.learning_rate": 2e-3}), tmp_path / "d")
    (other,) = [p for p in directory.iterdir() if p.name.startswith("train_step")]
    assert other.name != step_file.name  # its own key
    # a file holds its arguments' signature: called with other arguments, the function is compiled
    # for them and the file replaced
    import pickle
    import zlib

    import jax

    double = jax.jit(lambda x: 2 * x)
    assert float(executable_cache.cached("double", double, "d")(np.float32(3))) == 6.0
    (kept,) = directory.glob("double-*")
    np.testing.assert_array_equal(executable_cache.cached("double", double, "d")(np.ones(3, np.int32)), 2)
    signature, _ = pickle.loads(zlib.decompress(kept.read_bytes()))
    assert "int32" in signature and "float32" not in signature, signature

    module = tmp_path / "user_module.py"  # a module of the user's, e.g. a condition kind
    module.write_text("X = 1\n")
    monkeypatch.setitem(sys.modules, "user_module", type(sys)("user_module"))
    sys.modules["user_module"].__file__ = str(module)
    monkeypatch.setattr(executable_cache, "_environment", None)
    before = executable_cache.environment()
    module.write_text("X = 2\n")
    monkeypatch.setattr(executable_cache, "_environment", None)
    assert executable_cache.environment() != before
