"""JAX's persistent compilation cache, on by default for the command line and the experiments.

A command run a second time (the same model, shapes and options) loads its compiled programs
from disk instead of compiling them again; on a GPU, XLA's autotuning results are kept there
too. The directory is decided here, once, before the first compilation:

  1. `enable_compilation_cache(path)` with a path (the API);
  2. DIFFUSION_JAX_COMPILATION_CACHE: a directory, or "off" to disable the cache;
  3. a directory JAX already has (JAX_COMPILATION_CACHE_DIR or `jax.config`): left as it is;
  4. the user's cache directory: $XDG_CACHE_HOME/diffusion_jax/xla, else ~/.cache/diffusion_jax/xla.

The cache is keyed by the program, the jax/jaxlib versions, the device kind and the compile
options, so a stale entry is never used; deleting the directory is always safe.
"""
from __future__ import annotations

import logging
import os
import pathlib

log = logging.getLogger(__name__)

CACHE_ENV = "DIFFUSION_JAX_COMPILATION_CACHE"
OFF_VALUES = ("off", "0", "false", "no", "none")
# Programs that compile faster than this are not written (JAX's default is 1 s; the digits
# model's evaluation programs take 0.5-1 s each on a CPU and add up).
MIN_COMPILE_TIME_SECS = 0.5


def default_cache_dir() -> pathlib.Path:
    """$XDG_CACHE_HOME/diffusion_jax/xla, else ~/.cache/diffusion_jax/xla."""
    from diffusion_jax.user_cache import user_cache_dir

    return user_cache_dir() / "xla"


def cache_dir_setting(path: str | os.PathLike | None = None) -> str | None:
    """The directory the cache should use (None: disabled), by the order in the module docstring.
    Reads the environment and JAX's config; changes nothing."""
    import jax

    if path is not None:
        return os.fspath(path)
    chosen = os.environ.get(CACHE_ENV, "").strip()
    if chosen.lower() in OFF_VALUES:
        return None
    if chosen:
        return chosen
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    return os.fspath(default_cache_dir())


def enable_compilation_cache(path: str | os.PathLike | None = None, executables: bool = False) -> str | None:
    """Point JAX's persistent compilation cache at `cache_dir_setting(path)` and return that
    directory (None when disabled). Call it before the first compilation: JAX fixes the cache
    when it first compiles. A directory that cannot be created disables the cache with a
    warning; it never stops a run. `executables` (the command line's choice) also keeps the
    largest programs under its executables/ to be found without tracing (`executable_cache`)."""
    import jax

    from diffusion_jax import executable_cache

    directory = cache_dir_setting(path)
    executable_cache.enable(None)
    if directory is None:
        jax.config.update("jax_compilation_cache_dir", None)
        log.debug("persistent compilation cache off (%s)", CACHE_ENV)
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        log.warning("persistent compilation cache off: cannot create %s (%s); set %s to another "
                    "directory or to 'off'", directory, e.strerror or e, CACHE_ENV)
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    if executables:
        executable_cache.enable(os.path.join(directory, "executables"))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
    log.debug("persistent compilation cache: %s", directory)
    return directory
