"""The persistent compilation cache the command line turns on (`compilation_cache`)."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion_jax import compilation_cache
from tests.train_helpers import tiny_config, write_untrained_run

pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

HIT = "Persistent compilation cache hit for '"


def _cache_entries(directory) -> set:
    return {p.name for p in directory.rglob("*") if p.is_file()} if directory.exists() else set()


def test_a_second_process_loads_the_sampler_from_the_cache_in_the_users_cache_directory(tmp_path):
    """`sample` run twice in fresh processes, nothing configured but $XDG_CACHE_HOME: the first
    writes compiled programs under XDG_CACHE_HOME/diffusion_jax/xla, the second reads them back
    (JAX logs a cache hit for the sampling program and writes nothing new) and draws the same
    samples."""
    run = write_untrained_run(tmp_path / "run", tiny_config())
    cache = tmp_path / "xdg" / "diffusion_jax" / "xla"
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                        compilation_cache.CACHE_ENV)}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_DEBUG_LOG_MODULES="jax._src.compiler",
               XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")

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
