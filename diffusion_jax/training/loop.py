"""The training loop: restore or start, train, and act every so many steps; never lose a run.

`train(config, workdir)` reads top to bottom:
  1. check the workdir, build the mesh, the batches and the compiled train step;
  2. restore the newest good checkpoint (or initialise a fresh state);
  3. run the steps, calling the periodic actions (log, sample, checkpoint) and stopping cleanly
     on SIGTERM / SIGINT (pre-emption: save, then raise `Preempted`);
  4. save the final state and pictures.
A non-finite loss stops the run and keeps the last good checkpoint. Process 0 alone writes logs
and pictures. Messages go through `logging` (the CLI shows them).
"""
from __future__ import annotations

import logging
import math
import pathlib
import signal
import time
import uuid
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import parallel, viz
from diffusion_jax.data import Batches, load_split, prefetch
from diffusion_jax.generation import make_generator
from diffusion_jax.training.checkpoint import (CheckpointMismatch, Checkpointer, abstract_like,
                                               config_fingerprint)
from diffusion_jax.training.logbook import MetricWriter
from diffusion_jax.training.state import TrainState
from diffusion_jax.training.step import TrainProgram, build_train_program

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT arrived; the state was saved and the run can resume."""


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


def make_batches(config) -> Batches:
    """This process's batches of the training split (batch i a pure function of seed and i)."""
    data = load_split(config.data, config.data.train_split, jax.process_index(), jax.process_count())
    return Batches(data, config.data.batch_size, config.seed, process_index=jax.process_index(),
                   process_count=jax.process_count(), random_flip=config.data.random_flip,
                   with_labels=config.data.use_labels)


def restore_or_init(ckpt: Checkpointer, program: TrainProgram, config, workdir) -> TrainState:
    """The newest good checkpoint's state, or a fresh one when the workdir has none."""
    state, _ = ckpt.restore_latest(abstract_like(program.state_shapes, program.shardings),
                                   _fingerprint_checker(config))
    if state is None:
        log.info("starting a new run in %s", workdir)
        return program.init(jax.random.PRNGKey(config.seed))
    log.info("resuming from step %d in %s", int(state.step), workdir)
    return state


class StopSignals:
    """Turns SIGTERM and SIGINT into a flag the loop checks after each step (a pre-emption:
    save, then stop), restoring the previous handlers on exit. Off the main thread, no-op."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, _frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Periodic(NamedTuple):
    """An action run after every `every` steps (0: never), given (step, state, metrics)."""

    every: int
    action: Callable


def train(config, workdir, *, stop_after: int | None = None) -> TrainState:
    """Trains (or resumes) the run in `workdir`; `stop_after` ends this call early at that step
    (checkpointing it), as a pre-emption would."""
    workdir = check_workdir(workdir)
    is_main = jax.process_index() == 0
    tc = config.train
    mesh = parallel.make_mesh(tc.fsdp)
    parallel.check_batch_divisible(config.data.batch_size, mesh)
    batches = make_batches(config)
    program = build_train_program(config, mesh)
    k = max(int(tc.steps_per_dispatch), 1)

    ckpt = Checkpointer(workdir, keep=tc.keep_ckpts)
    writer = MetricWriter(workdir, enabled=is_main)
    progress = None
    try:
        state = restore_or_init(ckpt, program, config, workdir)
        if is_main:
            (workdir / "config.json").write_text(config.to_json(indent=2))
        start = int(state.step)
        end = tc.steps if stop_after is None else min(tc.steps, stop_after)

        def save(step, state, metrics=None):
            if not _params_finite(state.params):
                log.warning("not saving step %d: parameters are not finite", step)
                return
            ckpt.save(step, state, {"step": step, "fingerprint": config_fingerprint(config),
                                    "jax": jax.__version__})

        sampler = SampleWriter(program, config, mesh, workdir, is_main)
        logger = LossLogger(writer, config.data.batch_size, start)
        periodic = [Periodic(tc.log_every, logger), Periodic(tc.sample_every, sampler),
                    Periodic(tc.ckpt_every, save)]

        progress = _progress_bar(is_main and tc.progress, start, end)
        make_batch = (lambda s: batches.stacked(s, k)) if k > 1 else batches
        steps = range(start, end - (end - start) % k, k)
        with StopSignals() as stop:
            for step, local in zip(steps, prefetch(make_batch, iter(steps))):
                state, metrics = program.step(state, parallel.global_batch(local, mesh, leading=int(k > 1)))
                done = step + k
                for p in periodic:
                    if p.every and done % p.every < k and done != end:
                        p.action(done, state, metrics)
                if progress is not None:
                    progress.update(k)
                    progress.set_postfix(logger.postfix, refresh=False)
                if stop.received:
                    save(done, state)
                    ckpt.wait()
                    raise Preempted(f"{stop.received} at step {done}: saved; run the same command to resume")
            if int(state.step) > start:
                logger(int(state.step), state, metrics)
            if int(state.step) > start or not ckpt.steps():
                save(int(state.step), state)
            if stop_after is None or end == tc.steps:
                sampler(int(state.step), state)
        ckpt.wait()
    finally:
        if progress is not None:
            progress.close()
        writer.close()
        ckpt.close()
    return state


def _progress_bar(enabled: bool, start: int, end: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=end, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)


class LossLogger:
    """Writes loss, MSE, gradient norm and images/s; a non-finite loss stops the run."""

    def __init__(self, writer: MetricWriter, batch_size: int, start: int):
        self.writer, self.batch_size = writer, batch_size
        self.last_time, self.last_step = time.perf_counter(), start
        self.postfix: dict = {}

    def __call__(self, step, state, metrics):
        m = jax.device_get(metrics)
        loss = float(m["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss} at step {step}: stopping; the last good checkpoint "
                                "is kept (lower the learning rate, check the data)")
        now = time.perf_counter()
        rate = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        self.writer.write(step, {"loss": loss, "mse": m["mse"], "grad_norm": m["grad_norm"],
                                 "images_per_sec": rate})
        self.postfix = {"loss": f"{loss:.4f}", "img_s": f"{rate:,.0f}"}


class SampleWriter:
    """A grid of samples from the EMA parameters, workdir/samples/step_XXXXXXXX.png."""

    def __init__(self, program: TrainProgram, config, mesh, workdir, is_main: bool):
        self.program, self.config, self.mesh = program, config, mesh
        self.workdir, self.is_main = workdir, is_main
        self.generate = None

    def __call__(self, step, state, metrics=None):
        n = self.config.train.num_sample_images
        if n <= 0:
            return
        if self.generate is None:
            self.generate = make_generator(self.program.model, self.program.schedule, self.config,
                                           batch_size=n, mesh=self.mesh)
        images = self.generate(state.ema_params, n, jax.random.PRNGKey(self.config.seed + 1))
        if self.is_main:
            viz.save_grid(images, self.workdir / "samples" / f"step_{step:08d}.png")
