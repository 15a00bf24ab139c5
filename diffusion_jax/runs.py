"""A training run read back from its workdir: its config, model, schedule and the EMA
parameters of its newest good checkpoint (or of a chosen step), read-only.

    run = load_run("runs/digits")
    generate = make_generator(run.model, run.schedule, run.config, batch_size=64)
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any, NamedTuple

import jax
import ml_collections

from diffusion_jax.errors import UsageError
from diffusion_jax.builders import build_model, build_schedule, input_shape
from diffusion_jax.files import read_json_object
from diffusion_jax.models import param_shapes
from diffusion_jax.parallel import make_mesh, replicated
from diffusion_jax.schedules import Schedule
from diffusion_jax.training.checkpoint import CheckpointMismatch, Checkpointer

log = logging.getLogger(__name__)


class Run(NamedTuple):
    config: ml_collections.ConfigDict
    model: Any
    ema_params: Any
    schedule: Schedule
    step: int


def load_config(workdir) -> ml_collections.ConfigDict:
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no run in {workdir!r}: {path} is missing (train into it first)")
    return ml_collections.ConfigDict(read_json_object(path, "the run's config.json is damaged: restore it from "
                                                            "a config.STEP.json beside it, or train a new run"))


def load_run(workdir, step: int | None = None) -> Run:
    """The config, model, EMA params and schedule of a run: its newest checkpoint that restores
    and verifies (a corrupt one is skipped with a warning, never moved: this is read-only), or
    the checkpoint at `step`, which must be good."""
    config = load_config(workdir)
    model = build_model(config)
    abstract = param_shapes(model, input_shape(config))
    everywhere = replicated(make_mesh())  # restored onto every device, ready for sharded sampling
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=everywhere), abstract)
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train the run first")
        if step is not None and step not in steps:
            raise UsageError(f"no checkpoint at step {step} in {workdir}; available: {steps}")
        for s in ([step] if step is not None else reversed(steps)):
            try:
                return Run(config, model, ckpt.restore_ema(s, abstract), build_schedule(config), s)
            except (CheckpointMismatch, PermissionError, MemoryError):
                raise
            except Exception as e:
                reason = f"{type(e).__name__}: {str(e)[:200]}"
                if step is not None:
                    raise UsageError(f"the checkpoint at step {s} in {workdir} cannot be used ({reason}): "
                                     f"choose another of {steps}") from None
                log.warning("checkpoint %d cannot be used (%s); trying the previous one", s, reason)
        raise FileNotFoundError(f"no usable checkpoint in {ckpt.directory}: every one of {steps} is corrupt")
    finally:
        ckpt.close()
