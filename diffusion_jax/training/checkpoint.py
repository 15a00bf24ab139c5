"""Orbax checkpoints of the train state with a JSON record, verified on every restore.

A save writes the state (asynchronously where Orbax can) and a record: the step, the run's
config, the layout of the state (the name and shape of every array) and a digest of every
array's bits. Orbax writes into a temporary folder and renames it when complete, so a save cut
short never looks finished; the digest catches what Orbax cannot (bytes changed on disk that
still decompress, which it restores as garbage without complaint).

`restore_latest` walks back from the newest checkpoint and classifies each:
  * corrupt -- the record or the arrays cannot be read, the digest of what was read differs from
    the saved one, or the parameters are not finite: set aside in unreadable_checkpoints/ (never
    deleted) with a warning, and the one before it is tried;
  * does not fit -- written by another model or diffusion config, or with an optimizer state of
    another structure (another optimizer, clipping on or off, accumulation, skipping non-finite
    updates): `CheckpointMismatch`, naming the settings that differ; nothing is moved;
  * anything else (no permission, out of memory): raised as it is.
The processes of a multi-host job agree on the outcome before any of them acts on it.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import shutil
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from diffusion_jax.errors import CheckpointMismatch, UsageError
from diffusion_jax.parallel import agree_across_processes

log = logging.getLogger(__name__)

__all__ = ["CheckpointMismatch", "Checkpointer", "StateSummary", "abstract_like", "config_differences",
           "config_fingerprint", "named_shapes", "summarize"]

# Outcomes of one restore attempt, in the order processes settle on the worst.
OK, CORRUPT, MISMATCH, ERROR = 0, 1, 2, 3


# Orbax saves a replicated array from all its replicas in parallel, each writing a slice: worth
# it for large arrays, pure overhead for small ones (every slice of a new shape is an eager op
# that compiles, 17 s for the first save of the 0.6M-parameter digits U-Net on 8 CPU devices).
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore_args(abstract):
    """Orbax's per-array restore arguments: onto the sharding of each abstract array."""
    return jax.tree_util.tree_map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)


class Checkpointer:
    def __init__(self, workdir, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": _state_handler(), "record": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, config, summary: StateSummary | None = None) -> None:
        """Saves `state` (a TrainState) at `step` with its record (config, layout, digest);
        `summary` is `summarize(state)` when the caller has it already."""
        summary = summarize(state) if summary is None else summary
        record = {"step": int(step), "config": config.to_dict(), "jax": jax.__version__,
                  "layout": {name: named_shapes(tree) for name, tree in state_groups(state).items()},
                  "digest": summary.digest}
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), record=ocp.args.JsonSave(record)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_record(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]

    # ------------------------------------------------------------------------ training restore
    def restore_latest(self, abstract_state, config):
        """(state, record) of the newest checkpoint that restores and verifies, or (None, None)
        when none does (`set_aside` then lists the ones moved away). Raises CheckpointMismatch
        for a checkpoint that does not fit `config` / `abstract_state`."""
        self.set_aside_steps = []
        for step in reversed(self.steps()):
            outcome, detail = self._attempt(step, abstract_state, config)
            outcome = agree_across_processes(outcome, f"restore_{step}")
            if outcome == OK:
                return detail
            if outcome == CORRUPT:
                aside = self.set_aside(step)
                self.set_aside_steps.append(step)
                log.warning("checkpoint %d is unreadable (%s); moved it to %s and fell back to the "
                            "previous one", step, detail if isinstance(detail, str) else "on another process",
                            aside)
                continue
            if isinstance(detail, Exception):
                raise detail
            raise RuntimeError(f"restoring the checkpoint at step {step} failed on another process")
        return None, None

    def _attempt(self, step: int, abstract_state, config):
        """(outcome, (state, record) | reason | exception) of restoring one checkpoint here."""
        try:
            record = self.restore_record(step)
            if not isinstance(record, dict) or "step" not in record:
                raise UsageError("its record is malformed")
        except (PermissionError, MemoryError) as e:
            return ERROR, e
        except Exception as e:
            return CORRUPT, f"its record cannot be read: {type(e).__name__}"
        try:
            self._check_fits(step, record, abstract_state, config)
        except CheckpointMismatch as e:
            return MISMATCH, e
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                abstract_state, restore_args=_restore_args(abstract_state))))["state"]
        except (PermissionError, MemoryError) as e:
            return ERROR, e
        except Exception as e:  # the layout fits, so an array that cannot be read is corrupt
            return CORRUPT, f"its arrays cannot be read: {type(e).__name__}: {str(e)[:200]}"
        problem = verify(restored, record)
        if problem:
            return CORRUPT, problem
        return OK, (restored, record)

    def _check_fits(self, step: int, record: dict, abstract_state, config) -> None:
        saved_config = record.get("config")
        if saved_config is not None:
            changed = config_differences(config_fingerprint(saved_config), config_fingerprint(config))
            if changed:
                raise CheckpointMismatch(
                    f"the checkpoint at step {step} in this workdir was written by a different config "
                    f"({'; '.join(changed)}): use a new --workdir, or the config the run was started with")
        layout = record.get("layout")
        if layout is None:  # a record without a layout: the parameters from Orbax's metadata
            self.check_params(step, abstract_state.params)
            return
        expected = {name: named_shapes(tree) for name, tree in state_groups(abstract_state).items()}
        for name in ("params", "ema_params"):
            _raise_on_param_difference(step, self.directory, _as_shapes(layout.get(name, {})), expected[name])
        if _as_shapes(layout.get("opt_state", {})) != expected["opt_state"]:
            changed = config_differences((saved_config or {}).get("optim", {}), config.optim.to_dict(), "optim.")
            raise CheckpointMismatch(
                f"the optimizer state saved at step {step} has another structure than this config's "
                f"({'; '.join(changed) or 'the optimizer code changed'}): the optimizer, clipping on or off, "
                "gradient accumulation and skip_nonfinite cannot change on resume; resume with the settings "
                "the run was written with, or train into a new --workdir")

    # ------------------------------------------------------------------------ read-only restore
    def restore_ema(self, step: int, abstract_params):
        """The EMA parameters saved at `step`, verified (digest, finite); ValueError naming the
        problem if they are corrupt, CheckpointMismatch if they do not fit `abstract_params`."""
        record = self.restore_record(step)
        layout = record.get("layout")
        if layout is None:
            self.check_params(step, abstract_params)
        else:
            _raise_on_param_difference(step, self.directory, _as_shapes(layout.get("ema_params", {})),
                                       named_shapes(abstract_params))
        target = {"ema_params": abstract_params}
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=_restore_args(target), partial_restore=True)))["state"]["ema_params"]
        saved = record.get("digest", {}).get("ema_params")
        digest, finite = tree_digest_and_finite(restored)
        if saved is not None and saved != digest:
            raise UsageError("the digest of its EMA parameters differs from the one saved with them")
        if not finite:
            raise UsageError("its EMA parameters are not finite")
        return restored

    def check_params(self, step: int, abstract_params) -> None:
        """Raises CheckpointMismatch if the parameter names or shapes saved at `step` (read from
        Orbax's metadata) differ from `abstract_params`."""
        saved = saved_param_shapes(self.directory / str(step) / "state")
        _raise_on_param_difference(step, self.directory, saved, named_shapes(abstract_params))

    def set_aside(self, step: int) -> pathlib.Path:
        """Moves an unreadable checkpoint out of the manager's way (nothing is deleted)."""
        target = self.directory.parent / "unreadable_checkpoints" / f"{step}_{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"set_aside_{step}")
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _as_shapes(layout: dict) -> dict:
    return {name: tuple(shape) for name, shape in layout.items()}


def _raise_on_param_difference(step: int, directory, saved: dict, expected: dict) -> None:
    if saved == expected:
        return
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
    show = lambda names: ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    parts = [f"{len(missing)} of the model's are not in it ({show(missing)})" if missing else "",
             f"{len(unexpected)} in it are not in the model ({show(unexpected)})" if unexpected else "",
             f"{len(reshaped)} have another shape ({show(reshaped)})" if reshaped else ""]
    raise CheckpointMismatch(
        f"the checkpoint at step {step} in {directory} does not fit this model's parameters: "
        f"{'; '.join(p for p in parts if p)}. The model's code or config changed since it was "
        "written: resume with the version that wrote it, or train into a new --workdir")


# ---------------------------------------------------------------------------- digests
def _bits(x) -> jnp.ndarray:
    """The bits of every element of x as uint32 (floats bitcast, narrower types widened)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _digests(tree) -> jnp.ndarray:
    """uint32 [n]: one digest per array of a pytree, sum_i bits_i * (2654435761 i + 1) mod 2^32.
    Every factor is odd, so a change to any one element changes it; integer sums are exact, so
    the value does not depend on the sharding or the order of the reduction."""
    digests = []
    for x in jax.tree_util.tree_leaves(tree):
        bits = _bits(x).reshape(-1)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        digests.append(jnp.sum(bits * weights, dtype=jnp.uint32))
    return jnp.stack(digests) if digests else jnp.zeros((0,), jnp.uint32)


def _sum_of_squares(tree) -> jnp.ndarray:
    """float32 sum of the squares of every float array: not finite iff an entry is not (or the
    weights are so large that it overflows, which is divergence too)."""
    floats = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in floats), jnp.float32(0))


@functools.partial(jax.jit, static_argnums=1)
def _facts(groups: dict, squared: tuple):
    """({name: digests} of every group, {name: sum of squares} of the groups named in `squared`)."""
    return ({name: _digests(tree) for name, tree in groups.items()},
            {name: _sum_of_squares(groups[name]) for name in squared})


def _combine(digests) -> int:
    """The leaf digests of a tree as one uint32, in order (FNV-1a)."""
    combined = 2166136261
    for value in np.asarray(digests):
        combined = ((combined ^ int(value)) * 16777619) % 2**32
    return combined


class StateSummary(NamedTuple):
    """What is checked of a train state before it is kept and after it is restored."""

    digest: dict  # {field of the TrainState: uint32 digest of its arrays}
    finite: bool  # every parameter and EMA parameter finite
    param_norm: float  # global L2 norm of the parameters


def summarize(state) -> StateSummary:
    """Digests, finiteness and parameter norm of a TrainState, in one compiled program."""
    digests, squares = jax.device_get(_facts(state_groups(state), ("params", "ema_params")))
    return StateSummary({name: _combine(d) for name, d in digests.items()},
                        bool(np.isfinite(squares["params"]) and np.isfinite(squares["ema_params"])),
                        float(np.sqrt(squares["params"])))


def tree_digest_and_finite(tree) -> tuple[int, bool]:
    """(digest, every float finite) of one pytree, e.g. the EMA parameters alone."""
    digests, squares = jax.device_get(_facts({"tree": tree}, ("tree",)))
    return _combine(digests["tree"]), bool(np.isfinite(squares["tree"]))


def state_groups(state) -> dict:
    """The top-level fields of a TrainState (step, params, ema_params, opt_state, rng)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def verify(state, record: dict) -> str | None:
    """Why a restored state cannot be used (digest differs, parameters not finite), or None."""
    summary = summarize(state)
    saved = record.get("digest")
    if saved is not None:
        bad = sorted(name for name in saved if saved[name] != summary.digest.get(name))
        if bad:
            return f"the digest of its {', '.join(bad)} differs from the one saved with them"
    if not summary.finite:
        return "its parameters are not finite"
    return None


# ---------------------------------------------------------------------------- layouts and configs
def named_shapes(tree) -> dict:
    """{"a.b.c": shape} for the leaves of a pytree."""
    name = lambda path: ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                                 for k in path)
    return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def saved_param_shapes(item_dir) -> dict:
    """named_shapes of the `params` saved in a train-state checkpoint item, from its metadata
    (nothing is read but the metadata)."""
    absl_log = logging.getLogger("absl")  # quiet its note that the item has no step metadata file
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        meta = ocp.StandardCheckpointer().metadata(pathlib.Path(item_dir).absolute())
    finally:
        absl_log.setLevel(level)
    meta = getattr(meta, "item_metadata", meta)
    return named_shapes(getattr(meta, "tree", meta)["params"])


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs of a pytree (with shardings) for a restore target."""
    if shardings is None:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  tree, shardings)


def _as_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def config_fingerprint(config) -> dict:
    """The parts of a config (a ConfigDict or its dict) a checkpoint must agree with to be resumed."""
    c = _as_dict(config)
    return {"model": c["model"], "diffusion": c["diffusion"],
            "data": {k: c["data"][k] for k in ("image_size", "channels", "num_classes", "use_labels")
                     if k in c["data"]}}


def config_differences(old, new, prefix: str = "") -> list[str]:
    """["key.path was A, now B", ...] for every leaf where two nested dicts differ."""
    old, new = _as_dict(old), _as_dict(new)
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_differences(a, b, f"{prefix}{key}.")
        elif _normalise(a) != _normalise(b):
            changes.append(f"{prefix}{key} was {a!r}, now {b!r}")
    return changes


def _normalise(value):
    """Lists and tuples alike (a config read back from JSON has lists)."""
    return [_normalise(v) for v in value] if isinstance(value, (list, tuple)) else value
