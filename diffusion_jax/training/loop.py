"""The training loop: resume, train, log, checkpoint, sample; never lose a run.

`train(config, workdir)` resumes from the newest good checkpoint in workdir (or starts fresh),
runs to config.train.steps and returns the final TrainState. It saves every ckpt_every steps,
at the end, and on SIGTERM (pre-emption) before exiting; a non-finite loss stops the run with
a message and keeps the last good checkpoint. Process 0 alone writes logs and pictures.
"""
from __future__ import annotations

import math
import pathlib
import signal
import time
import uuid

import jax
import jax.numpy as jnp

from diffusion_jax import parallel, viz
from diffusion_jax.data import Batches, load_split, prefetch
from diffusion_jax.runs import make_generator
from diffusion_jax.training.checkpoint import (CheckpointMismatch, Checkpointer, abstract_like,
                                               config_fingerprint)
from diffusion_jax.training.logbook import MetricWriter
from diffusion_jax.training.state import TrainState
from diffusion_jax.training.step import build_train_program


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Preempted(RuntimeError):
    """SIGTERM arrived; the state was saved and the run can resume."""


def check_workdir(workdir) -> pathlib.Path:
    """Creates `workdir` and checks it is writable, with a probe file of the caller's own (the
    processes of a multi-host run check the shared directory at the same moment)."""
    path = pathlib.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"workdir {str(path)!r} is not writable ({e.strerror}): "
                              "choose another --workdir") from None
    return path


def _fingerprint_checker(config):
    expected = config_fingerprint(config)

    def check(record):
        found = record.get("fingerprint")
        if found is not None and found != expected:
            diff = sorted(k for k in expected if expected[k] != found.get(k))
            raise CheckpointMismatch(
                f"the checkpoint in this workdir was written by a different config (differs in "
                f"{diff}): use a new --workdir, or the config the run was started with")
    return check


def _params_finite(params) -> bool:
    """Every entry finite (a norm would overflow for large but finite weights)."""
    return all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree_util.tree_leaves(params))


def train(config, workdir, *, stop_after: int | None = None) -> TrainState:
    """Trains (or resumes) the run in `workdir`; `stop_after` ends this call early at that step
    (checkpointing it), as a pre-emption would."""
    workdir = check_workdir(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        (workdir / "config.json").write_text(config.to_json(indent=2))
    tc = config.train
    mesh = parallel.make_mesh(tc.fsdp)
    parallel.check_batch_divisible(config.data.batch_size, mesh)
    # tfds sources load only this process's shard; digits and folders are read whole everywhere.
    local_shard = config.data.name != "digits" and not config.data.name.startswith("folder:") \
        and jax.process_count() > 1
    data = load_split(config.data, config.data.train_split, jax.process_index(), jax.process_count())
    batches = Batches(data, config.data.batch_size, config.seed, process_index=jax.process_index(),
                      process_count=jax.process_count(), random_flip=config.data.random_flip,
                      local_shard=local_shard, with_labels=config.data.use_labels)

    program = build_train_program(config, mesh)
    model, schedule, step_fn, shardings = program.model, program.schedule, program.step, program.shardings
    k = max(int(tc.steps_per_dispatch), 1)

    ckpt = Checkpointer(workdir, keep=tc.keep_ckpts)
    state, record = ckpt.restore_latest(abstract_like(program.state_shapes, shardings),
                                        _fingerprint_checker(config))
    if state is None:
        state = program.init(jax.random.PRNGKey(config.seed))
        if is_main:
            print(f"starting a new run in {workdir}", flush=True)
    elif is_main:
        print(f"resuming from step {int(state.step)} in {workdir}", flush=True)

    start = int(state.step)
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    writer = MetricWriter(workdir, enabled=is_main)
    generator = None

    def save(step_state):
        if not _params_finite(step_state.params):
            print("not saving: parameters are not finite", flush=True)
            return
        ckpt.save(int(step_state.step), step_state, {
            "step": int(step_state.step), "fingerprint": config_fingerprint(config),
            "data_position": int(step_state.step), "jax": jax.__version__})

    def save_samples(step_state):
        nonlocal generator
        if tc.num_sample_images <= 0:
            return
        if generator is None:
            generator = make_generator(model, schedule, config, batch_size=tc.num_sample_images, mesh=mesh)
        images = generator(step_state.ema_params, tc.num_sample_images, jax.random.PRNGKey(config.seed + 1))
        if is_main:
            viz.save_grid(images, workdir / "samples" / f"step_{int(step_state.step):08d}.png")

    preempted = {"flag": False}
    previous_handler = None
    try:
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))
    except ValueError:  # not the main thread: no handler
        pass

    progress = None
    if is_main and tc.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=end, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)

    make_batch = (lambda s: batches.stacked(s, k)) if k > 1 else batches
    steps = range(start, end - (end - start) % k, k)
    t_last, step_last, metrics = time.perf_counter(), start, None
    try:
        for step, local in zip(steps, prefetch(make_batch, iter(steps))):
            batch = parallel.global_batch(local, mesh, leading=1 if k > 1 else 0)
            state, metrics = step_fn(state, batch)
            done = step + k
            if done % tc.log_every < k or done == end:
                m = jax.device_get(metrics)
                if not math.isfinite(float(m["loss"])):
                    raise NonFiniteLoss(f"loss is {float(m['loss'])} at step {done}: stopping; the last "
                                        "good checkpoint is kept (lower the learning rate, check the data)")
                now = time.perf_counter()
                rate = (done - step_last) * config.data.batch_size / max(now - t_last, 1e-9)
                t_last, step_last = now, done
                writer.write(done, {"loss": m["loss"], "mse": m["mse"], "grad_norm": m["grad_norm"],
                                    "images_per_sec": rate})
                if progress is not None:
                    progress.set_postfix(loss=f"{float(m['loss']):.4f}", img_s=f"{rate:,.0f}")
            if progress is not None:
                progress.update(k)
            if tc.sample_every and done % tc.sample_every < k:
                save_samples(state)
            if done % tc.ckpt_every < k and done != end:
                save(state)
            if preempted["flag"]:
                save(state)
                ckpt.wait()
                raise Preempted(f"SIGTERM at step {done}: saved; run the same command to resume")
        if int(state.step) > start or not ckpt.steps():
            save(state)
        if stop_after is None or end == tc.steps:
            save_samples(state)
        ckpt.wait()
    finally:
        if progress is not None:
            progress.close()
        writer.close()
        ckpt.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return state
