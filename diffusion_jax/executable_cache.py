"""Compiled programs kept on disk and found without tracing: a command run again skips tracing and
lowering its largest programs, which JAX's persistent cache (keyed by the lowered program) cannot.
For the digits U-Net's train step on a CPU that is about 1 s of a 5 s command.

`cached(name, jitted, description)` wraps a jitted function. Its file's key is made of
  - the name and the caller's `description` (a run's whole config);
  - the environment: the source of this package and of every other module loaded from outside
    the Python installation (experiment files, a condition kind of the user's), the versions of
    jax, jaxlib, flax, optax, numpy and ml_dtypes, jax's config, the XLA_ / JAX_ / LIBTPU_ /
    DIFFUSION_JAX_ environment variables, the devices and the backend's version.
The file also holds the arguments' abstract signature (tree structure, shapes, dtypes, weak types
and shardings). Since the key needs no arguments, the executable is read and loaded on a thread
from the moment the function is wrapped, beside whatever the command does before its first call
(a training command: its initialiser, checkpoints, first batch). At the first call it is used if
its signature is the arguments'; otherwise (or with no file) the function is compiled and stored.
Later calls with other abstract arguments fall back to the jitted function.
`shapes(name, fn, description, *args)` keeps `jax.eval_shape(fn, *args)` under the same kind of key
(a run's state shapes, so its initialiser is not traced either).

What a key cannot see: a function replaced at run time (a test's monkeypatch, an edited module in
a notebook), and data a program holds as constants that was read from files (a text encoder's
null embedding). So the cache is off unless the command line turns it on (`enable`, called by
`compilation_cache.enable_compilation_cache(executables=True)`), it is never used with several
processes, and callers use it only for programs decided by their description and arguments.
DIFFUSION_JAX_EXECUTABLE_CACHE=off turns it off; deleting the directory is always safe. A file
that cannot be read is compiled again and replaced; it never stops a run.

Only a program this process compiled is kept: one that JAX's persistent cache gave serializes
without its kernels on XLA:CPU (jax 0.10: loaded again, it fails with "Function ... not found"),
so a run whose programs JAX's cache already holds keeps nothing here and loses nothing.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import pickle
import sys
import sysconfig
import threading
import zlib
from typing import Callable

log = logging.getLogger(__name__)

CACHE_ENV = "DIFFUSION_JAX_EXECUTABLE_CACHE"
ENV_PREFIXES = ("XLA_", "JAX_", "LIBTPU_", "TPU_", "CUDA_VISIBLE", "DIFFUSION_JAX_")

_directory: pathlib.Path | None = None
_environment: str | None = None


def enable(directory: str | os.PathLike | None) -> pathlib.Path | None:
    """Keeps executables under `directory` (None, or DIFFUSION_JAX_EXECUTABLE_CACHE=off: not at
    all); returns the directory used."""
    global _directory
    if directory is None or os.environ.get(CACHE_ENV, "").strip().lower() in ("off", "0", "false", "no", "none"):
        _directory = None
    else:
        _directory = pathlib.Path(directory)
    return _directory


def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def _installation_roots() -> tuple:
    """The Python installation's own directories (its library and site-packages), with a separator."""
    paths = sysconfig.get_paths()
    return tuple({os.path.abspath(paths[k]) + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def environment() -> str:
    """The digest of everything besides a program's description and arguments that decides what
    it compiles to (see the module docstring); computed once per process."""
    global _environment
    if _environment is not None:
        return _environment
    import flax
    import jax
    import jaxlib
    import ml_dtypes
    import numpy as np
    import optax

    h = hashlib.sha256()
    package = pathlib.Path(__file__).resolve().parent
    sources = {str(p) for p in package.rglob("*.py")}
    roots = _installation_roots()
    sources |= {m.__file__ for m in list(sys.modules.values())
                if (getattr(m, "__file__", None) or "").endswith(".py")
                and not os.path.abspath(m.__file__).startswith(roots)}
    for path in sorted(sources):
        h.update(f"{path}\0{_file_digest(path)}\n".encode())
    versions = (jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__, np.__version__,
                ml_dtypes.__version__)
    backend = jax.devices()[0].client
    devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
    settings = sorted((k, repr(v)) for k, v in jax.config.values.items())
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) and k != CACHE_ENV)
    h.update(repr((versions, backend.platform, backend.platform_version, devices, settings, env)).encode())
    _environment = h.hexdigest()
    return _environment


def abstract_signature(args) -> str:
    """The arguments' tree structure and, per leaf, shape, dtype, weak type and sharding (with
    its devices), as text."""
    import jax

    leaves, tree = jax.tree_util.tree_flatten(args)

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        devices = tuple(d.id for d in sharding._device_assignment) if sharding is not None else ()
        return (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), repr(sharding), devices)

    return repr((str(tree), [leaf(x) for x in leaves]))


def cached(name: str, jitted: Callable, description: str) -> Callable:
    """`jitted` (a `jax.jit` function), its executable for the first call's abstract arguments
    read from the cache (loading from now on, on a thread) or compiled and written there; `jitted`
    itself when the cache is off or several processes run."""
    import jax

    if _directory is None or jax.process_count() > 1:
        return jitted
    path = _path(name, description, ".bin")
    loading = _Loading(path, name)
    compiled = None
    first = True

    def call(*args):
        nonlocal compiled, first
        if first:
            first = False
            compiled = _loaded_or_compiled(name, jitted, path, loading.result(), args)
        if compiled is not None:
            try:
                return compiled(*args)
            except (TypeError, ValueError):  # other abstract arguments (checked before running)
                compiled = None
        return jitted(*args)

    return call


class _Loading:
    """The executable stored in `path` (with its arguments' signature) read and loaded on a thread:
    `result()` waits for (signature, executable), or None (no file; a damaged or foreign one is
    removed with a warning)."""

    def __init__(self, path: pathlib.Path, name: str):
        self.path, self.name, self.value = path, name, None
        self.thread = threading.Thread(target=self._load, name=f"executable_cache:{name}", daemon=True)
        self.thread.start()

    def _load(self):
        from jax.experimental import serialize_executable

        stored = _read(self.path, self.name)
        if stored is None:
            return
        try:
            signature, serialized = stored
            self.value = signature, serialize_executable.deserialize_and_load(*serialized)
        except Exception as e:  # noqa: BLE001 -- a foreign executable: removed, compiled again
            log.warning("executable cache: %s could not be loaded (%s: %s); removed it, compiling %s again",
                        self.path, type(e).__name__, e, self.name)
            self.path.unlink(missing_ok=True)

    def result(self):
        self.thread.join()
        return self.value


_jax_cache_hits = 0
_listening = False


def _count_jax_cache_hit(event: str, **_) -> None:
    global _jax_cache_hits
    if event == "/jax/compilation_cache/cache_hits":
        _jax_cache_hits += 1


def jax_cache_hits() -> int:
    """How many programs JAX's persistent cache has given this process since this was first asked."""
    import jax

    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_count_jax_cache_hit)
        _listening = True
    return _jax_cache_hits


def shapes(name: str, fn: Callable, description: str, *args):
    """`jax.eval_shape(fn, *args)` (a pytree of ShapeDtypeStructs), read from the cache under the
    same key as an executable's, or evaluated and written there: a run's state shapes without
    tracing its initialiser (0.4-0.6 s for the digits U-Net)."""
    import jax

    if _directory is None or jax.process_count() > 1:
        return jax.eval_shape(fn, *args)
    path = _path(name, description, ".shapes", args)
    loaded = _read(path, name)
    if loaded is not None:
        return loaded
    result = jax.eval_shape(fn, *args)
    _write(path, result)
    return result


def _path(name: str, description: str, suffix: str, args=()) -> pathlib.Path:
    key = hashlib.sha256("\0".join((name, description, abstract_signature(args), environment())).encode())
    return _directory / f"{name}-{key.hexdigest()}{suffix}"


def _read(path: pathlib.Path, name: str):
    """The object pickled in `path`, or None (no file; a damaged one is removed with a warning)."""
    if not path.exists():
        return None
    try:
        loaded = pickle.loads(zlib.decompress(path.read_bytes()))
        log.debug("%s read from %s", name, path)
        return loaded
    except Exception as e:  # noqa: BLE001 -- a damaged or foreign file: removed, made again
        log.warning("executable cache: %s could not be read (%s: %s); removed it, making %s again",
                    path, type(e).__name__, e, name)
        path.unlink(missing_ok=True)
        return None


def _write(path: pathlib.Path, value) -> None:
    """`value` pickled into `path` atomically; a failure is a warning (the cache is an optimisation)."""
    try:
        blob = zlib.compress(pickle.dumps(value), 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_bytes(blob)
        os.replace(partial, path)
    except Exception as e:  # noqa: BLE001 -- a full disk must not stop a run
        log.warning("executable cache: %s not written (%s: %s)", path, type(e).__name__, e)


def _loaded_or_compiled(name: str, jitted: Callable, path: pathlib.Path, loaded, args):
    """The loaded executable if it was compiled for `args`' abstract signature; else `jitted`
    compiled for them and written to `path` with that signature."""
    from jax.experimental import serialize_executable

    signature = abstract_signature(args)
    if loaded is not None and loaded[0] == signature:
        return loaded[1]
    hits = jax_cache_hits()
    compiled = jitted.lower(*args).compile()
    if jax_cache_hits() != hits:  # read from JAX's cache: not serialized again (see the module docstring)
        log.debug("executable %s came from JAX's persistent cache: not kept", name)
        return compiled
    try:
        serialized = serialize_executable.serialize(compiled)
    except Exception as e:  # noqa: BLE001 -- the cache is an optimisation
        log.warning("executable cache: %s not serialized (%s: %s)", name, type(e).__name__, e)
        return compiled
    _write(path, (signature, serialized))
    return compiled
