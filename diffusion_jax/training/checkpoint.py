"""Orbax checkpoints of the train state plus a JSON record (config, data position, versions).

`Checkpointer(workdir)` keeps the last K under workdir/checkpoints; saves are asynchronous where
Orbax supports it. `restore_latest` walks back from the newest step: a checkpoint that fails to
restore (corrupt, or partly written) is reported, set aside and the one before it used. A
checkpoint whose parameters do not fit the model (the code or the config changed since it was
written) is never skipped: that raises CheckpointMismatch, naming the parameters that differ. Orbax writes
into a temporary folder and renames it when complete, so a save cut short never looks finished.
"""
from __future__ import annotations

import json
import logging
import pathlib
import shutil
import time

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """The checkpoint in a workdir was written by a different model or config."""


class Checkpointer:
    def __init__(self, workdir, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, record: dict, force: bool = True) -> None:
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_record(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]

    def restore(self, step: int, abstract_state):
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
        return out["state"], out["record"]

    def check_params(self, step: int, abstract_params) -> None:
        """Raises CheckpointMismatch if the parameter names or shapes saved at `step` differ
        from `abstract_params` (a pytree of arrays or ShapeDtypeStructs)."""
        saved = saved_param_shapes(self.directory / str(step) / "state")
        expected = named_shapes(abstract_params)
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
            f"the checkpoint at step {step} in {self.directory} does not fit this model's parameters: "
            f"{'; '.join(p for p in parts if p)}. The model's code or config changed since it was "
            "written: resume with the version that wrote it, or train into a new --workdir")

    def restore_latest(self, abstract_state, check_record=None):
        """(state, record) of the newest checkpoint that restores, or (None, None) if none.

        `check_record(record)` may raise CheckpointMismatch, as does a checkpoint whose
        parameters do not fit `abstract_state.params`; neither is ever skipped over.
        """
        for step in reversed(self.steps()):
            try:
                record = self.restore_record(step)
                if check_record is not None:
                    check_record(record)
                self.check_params(step, abstract_state.params)
                return self.restore(step, abstract_state)
            except CheckpointMismatch:
                raise
            except Exception as e:  # corrupt or partial: report it, keep it aside, fall back
                aside = self.set_aside(step)
                log.warning("checkpoint %d is unreadable (%s: %s); moved it to %s and fell back to "
                            "the previous one", step, type(e).__name__, e, aside)
        return None, None

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


def named_shapes(tree) -> dict:
    """{"a.b.c": shape} for the leaves of a nested-dict pytree."""
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


def config_fingerprint(config) -> dict:
    """The parts of a config a checkpoint must agree with to be resumed."""
    return {"model": json.loads(config.model.to_json()), "image_size": config.data.image_size,
            "channels": config.data.channels, "num_classes": config.data.num_classes,
            "diffusion": json.loads(config.diffusion.to_json())}
