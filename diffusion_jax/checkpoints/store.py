"""Orbax checkpoints of the train state with a JSON record, verified on every restore
(`integrity`: digests and layouts; `config`: what a checkpoint must agree with).

A save writes the state (asynchronously where Orbax can; its small replicated arrays packed into
a few buffers, `packing`) and a record: the step, the run's config, the layout of the state (the
name and shape of every array), the packing plan and a digest of every array's bits. Orbax
writes into a temporary folder and renames it when complete, so a save cut short never looks
finished; the digest catches what Orbax cannot (bytes changed on disk that still decompress,
which it restores as garbage without complaint).

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
import logging
import pathlib
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffusion_jax.checkpoints import packing
from diffusion_jax.checkpoints.integrity import StateSummary, named_shapes, saved_param_shapes, state_groups, summarize, verify
from diffusion_jax.config import config_fingerprint
from diffusion_jax.errors import CheckpointMismatch, UsageError
from diffusion_jax.files import differences
from diffusion_jax.parallel import agree_across_processes

log = logging.getLogger(__name__)

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
        """Saves `state` (a TrainState) at `step` with its record (config, layout, packing plan, digest);
        `summary` is `summarize(state)` when the caller has it already."""
        summary = summarize(state) if summary is None else summary
        groups = state_groups(state)
        item, plan = packing.pack(groups)
        record = {"step": int(step), "config": config.to_dict(), "jax": jax.__version__,
                  "layout": {name: named_shapes(tree) for name, tree in groups.items()},
                  "digest": summary.digest, "packed": plan}
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(item), record=ocp.args.JsonSave(record)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_record(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]

    # ------------------------------------------------------------------------ the one restore path
    def restore_latest(self, abstract, config, *, fields=None, step=None, read_only: bool = False):
        """(restored, record) of the newest checkpoint that restores and verifies, or (None, None)
        when none does. Used by training and by the read-only commands alike.

        fields: None restores the whole TrainState (`abstract`: its ShapeDtypeStructs); a tuple of
          its field names restores those alone (`abstract`: {field: abstract tree}), as a dict.
        step: only this checkpoint, which must be good (else a UsageError naming why).
        read_only: a corrupt checkpoint is skipped with a warning and left where it is (sample,
          evaluate, export); otherwise it is set aside (`set_aside_steps` lists them: training).
        A checkpoint that does not fit `config` / `abstract` raises CheckpointMismatch.
        """
        self.set_aside_steps = []
        for s in ([step] if step is not None else reversed(self.steps())):
            outcome, detail = self._attempt(s, abstract, config, fields)
            outcome = agree_across_processes(outcome, f"restore_{s}")
            if outcome == OK:
                return detail
            if outcome == CORRUPT:
                reason = detail if isinstance(detail, str) else "on another process"
                if step is not None:
                    raise UsageError(f"the checkpoint at step {s} in {self.directory.parent} cannot be used "
                                     f"({reason}): choose another of {self.steps()}")
                if read_only:
                    log.warning("checkpoint %d cannot be used (%s); trying the previous one", s, reason)
                    continue
                aside = self.set_aside(s)
                self.set_aside_steps.append(s)
                log.warning("checkpoint %d is unreadable (%s); moved it to %s and fell back to the "
                            "previous one", s, reason, aside)
                continue
            if isinstance(detail, Exception):
                raise detail
            raise RuntimeError(f"restoring the checkpoint at step {s} failed on another process")
        return None, None

    def _attempt(self, step: int, abstract, config, fields):
        """(outcome, (restored, record) | reason | exception) of restoring one checkpoint here."""
        try:
            record = self.restore_record(step)
            if not isinstance(record, dict) or "step" not in record:
                raise UsageError("its record is malformed")
        except (PermissionError, MemoryError) as e:
            return ERROR, e
        except Exception as e:
            return CORRUPT, f"its record cannot be read: {type(e).__name__}"
        groups = state_groups(abstract) if fields is None else {f: abstract[f] for f in fields}
        try:
            self._check_fits(step, record, groups, config)
        except CheckpointMismatch as e:
            return MISMATCH, e
        try:
            restored = self._read(step, abstract, groups, fields, record.get("packed"))
        except (PermissionError, MemoryError) as e:
            return ERROR, e
        except Exception as e:  # the layout fits, so an array that cannot be read is corrupt
            return CORRUPT, f"its arrays cannot be read: {type(e).__name__}: {str(e)[:200]}"
        problem = verify(state_groups(restored) if fields is None else restored, record)
        if problem:
            return CORRUPT, problem
        return OK, (restored, record)

    def _read(self, step: int, abstract, groups: dict, fields, plan):
        """The arrays of checkpoint `step`: the TrainState of `abstract` (fields None), or {field:
        tree} of `groups`. plan: the record's packing plan; None for a checkpoint written before
        packing, one Orbax array per leaf of the TrainState."""
        read = lambda args: self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]
        if plan is None and fields is None:
            return read(ocp.args.PyTreeRestore(abstract, restore_args=_restore_args(abstract)))
        if plan is None:
            return read(ocp.args.PyTreeRestore(item=groups, restore_args=_restore_args(groups), partial_restore=True))
        item, restore_args = packing.restore_target(groups, plan)
        unpacked = packing.unpack(read(ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                              partial_restore=fields is not None)), groups, plan)
        return unpacked if fields is not None else dataclasses.replace(abstract, **unpacked)

    def _check_fits(self, step: int, record: dict, groups: dict, config) -> None:
        """CheckpointMismatch unless the checkpoint was written by a config that agrees with
        `config` and holds arrays of the layout of `groups` ({field of the TrainState: tree})."""
        saved_config = record.get("config")
        if saved_config is not None:
            changed = differences(config_fingerprint(saved_config), config_fingerprint(config))
            if changed:
                raise CheckpointMismatch(
                    f"the checkpoint at step {step} in this workdir was written by a different config "
                    f"({'; '.join(changed)}): use a new --workdir, or the config the run was started with")
        layout = record.get("layout")
        if layout is None:  # a record without a layout: the parameters from Orbax's metadata
            for name in ("params", "ema_params"):
                if name in groups:
                    self.check_params(step, groups[name])
            return
        for name in ("params", "ema_params"):
            if name in groups:
                _raise_on_param_difference(step, self.directory, _as_shapes(layout.get(name, {})),
                                           named_shapes(groups[name]))
        if "opt_state" in groups and _as_shapes(layout.get("opt_state", {})) != named_shapes(groups["opt_state"]):
            changed = differences((saved_config or {}).get("optim", {}), config.optim.to_dict(), "optim.")
            raise CheckpointMismatch(
                f"the optimizer state saved at step {step} has another structure than this config's "
                f"({'; '.join(changed) or 'the optimizer code changed'}): the optimizer, clipping on or off, "
                "gradient accumulation and skip_nonfinite cannot change on resume; resume with the settings "
                "the run was written with, or train into a new --workdir")

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
