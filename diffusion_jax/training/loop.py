"""The training loop: restore or start, train, and act every so many steps; never lose a run.

`train(config, workdir)` reads top to bottom:
  1. validate the config, check and lock the workdir, build the mesh, batches and train step;
  2. restore the newest good checkpoint (corrupt ones are set aside; one that does not fit the
     config stops the run) or start fresh, then write config.json;
  3. run the steps, calling the periodic actions (log, sample, checkpoint) and stopping cleanly
     on SIGTERM / SIGINT (pre-emption: save, then raise `Preempted`);
  4. save the final state and pictures.
Every save first passes the divergence guard (finite loss and parameters, no blow-up), so a
checkpoint on disk is always one worth resuming. Process 0 alone writes logs, pictures and
config.json. Messages go through `logging` (the CLI shows them).
"""
from __future__ import annotations

import logging
import math
import signal
import time
from typing import Callable, NamedTuple

import jax

from diffusion_jax import latents, parallel, viz
from diffusion_jax.conditions import condition_kind
from diffusion_jax.data import Batches, load_split, prefetch
from diffusion_jax.data.pipeline import stacked_batches
from diffusion_jax.errors import NoUsableCheckpoint, NonFiniteLoss, Preempted, WorkdirLocked
from diffusion_jax.generation import make_generator
from diffusion_jax.checkpoints import Checkpointer, abstract_like, summarize
from diffusion_jax.config import trains_text_encoder, validate_config
from diffusion_jax.training.logbook import MetricWriter
from diffusion_jax.training.state import TrainState
from diffusion_jax.training.step import TrainProgram, build_train_program
from diffusion_jax.workdir import WorkdirLock, check_workdir, write_config

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLoss", "Preempted", "train"]


def make_batches(config) -> Batches:
    """This process's batches of the training split (batch i a pure function of seed and i)."""
    data = load_split(config.data, config.data.train_split, jax.process_index(), jax.process_count())
    kind = condition_kind(config)
    conditions, encode = kind.training_conditions(config, data) if kind else (None, None)
    if trains_text_encoder(config):  # the encoders run in the train step, with their adapters: their inputs
        conditions, encode = kind.training_inputs(config, data), None
    batches = Batches(data, config.data.batch_size, config.seed, process_index=jax.process_index(),
                      process_count=jax.process_count(), random_flip=config.data.random_flip, conditions=conditions)
    if latents.vae_source(config):
        batches = latents.LatentBatches(batches, config, jax.process_index())
    return batches if encode is None else EncodedBatches(batches, encode)


class EncodedBatches:
    """Batch i of `batches` with its "cond" (what the condition kind's data gave, e.g. caption ids)
    through `encode` (e.g. the frozen text encoder: embeddings [b, L, D])."""

    def __init__(self, batches, encode: Callable):
        self.batches, self.encode = batches, encode

    def __call__(self, step: int) -> dict:
        batch = dict(self.batches(step))
        batch["cond"] = self.encode(batch["cond"])
        return batch


def restore_or_init(ckpt: Checkpointer, program: TrainProgram, config, workdir) -> TrainState:
    """The newest good checkpoint's state; a fresh one when the workdir has none, or when every
    checkpoint was unreadable and config.train.restart says to start again."""
    had = ckpt.steps()
    state, _ = ckpt.restore_latest(abstract_like(program.state_shapes, program.shardings), config)
    if state is not None:
        log.info("resuming from step %d in %s", int(state.step), workdir)
        return state
    if had and not config.train.restart:
        raise NoUsableCheckpoint(
            f"none of the {len(had)} checkpoints in {workdir} (steps {had}) could be restored; they were "
            f"moved to {workdir / 'unreadable_checkpoints'}. Nothing was overwritten. To start this run again "
            "from step 0, pass --config.train.restart=True")
    log.info("starting a new run in %s%s", workdir, " (train.restart: the unreadable checkpoints were set "
             "aside)" if had else "")
    return program.init(jax.random.PRNGKey(config.seed))


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


def _lock_workdir(workdir) -> WorkdirLock | None:
    """Process 0 takes the workdir's lock; every process learns whether it got it."""
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    failure = None
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirLocked as e:
            failure = e
    if parallel.agree_across_processes(int(failure is not None), "workdir_lock"):
        raise failure or WorkdirLocked(f"workdir {workdir} is in use by another trainer (see process 0)")
    return lock


def train(config, workdir, *, stop_after: int | None = None) -> TrainState:
    """Trains (or resumes) the run in `workdir`; `stop_after` ends this call early at that step
    (checkpointing it), as a pre-emption would."""
    validate_config(config)
    workdir = check_workdir(workdir)
    is_main = jax.process_index() == 0
    tc = config.train
    mesh = parallel.make_mesh(tc.fsdp)
    parallel.check_batch_divisible(config.data.batch_size, mesh)
    batches = make_batches(config)
    program = build_train_program(config, mesh)
    k = int(tc.steps_per_dispatch)

    lock = _lock_workdir(workdir)
    ckpt = Checkpointer(workdir, keep=tc.keep_ckpts)
    writer = progress = None
    try:
        state = restore_or_init(ckpt, program, config, workdir)
        start = int(state.step)
        if is_main:
            changes = write_config(workdir, config, start)
            if changes:
                log.info("settings changed since step %d (the previous config is kept as config.%d.json): %s",
                         start, start, "; ".join(changes))
        end = tc.steps if stop_after is None else min(tc.steps, stop_after)
        writer = MetricWriter(workdir, enabled=is_main)
        guard = DivergenceGuard(tc.divergence_factor, state, ckpt)

        def save(step, state, metrics):
            ckpt.save(step, state, config, guard.check(step, state, metrics))

        sampler = SampleWriter(program, config, mesh, workdir, is_main)
        logger = LossLogger(writer, config.data.batch_size, start, guard)
        periodic = [Periodic(tc.log_every, logger), Periodic(tc.sample_every, sampler),
                    Periodic(tc.ckpt_every, save)]

        progress = _progress_bar(is_main and tc.progress, start, end)
        make_batch = (lambda s: stacked_batches(batches, s, k)) if k > 1 else batches
        steps = range(start, end - (end - start) % k, k)
        metrics = None
        started = time.perf_counter()
        with StopSignals() as stop:
            for step, local in zip(steps, prefetch(make_batch, iter(steps))):
                state, metrics = program.step(state, parallel.global_batch(local, mesh, leading=int(k > 1)))
                done = step + k
                if step == start:
                    guard.observe(done, metrics)  # the loss of the parameters this run started from
                    log.info("first step in %.1f s (compilation, or loading it from the cache, included)",
                             time.perf_counter() - started)
                for p in periodic:
                    if p.every and done % p.every < k and done != end:
                        p.action(done, state, metrics)
                if progress is not None:
                    progress.update(k)
                    progress.set_postfix(logger.postfix, refresh=False)
                if stop.received:
                    save(done, state, metrics)
                    ckpt.wait()
                    raise Preempted(f"{stop.received} at step {done}: saved; run the same command to resume")
            if metrics is not None:
                logger(int(state.step), state, metrics)
            if metrics is not None or not ckpt.steps():
                save(int(state.step), state, metrics)
            if stop_after is None or end == tc.steps:
                sampler(int(state.step), state)
        ckpt.wait()
    finally:
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        ckpt.close()
        if lock is not None:
            lock.release()
    return state


def _progress_bar(enabled: bool, start: int, end: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=end, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)


class DivergenceGuard:
    """Decides whether a state may be kept: its loss finite and at most `factor` times the
    lowest loss seen in this run, its parameters finite and their norm at most `factor` times
    the norm the run started from. Otherwise the run stops (NonFiniteLoss), saving nothing."""

    def __init__(self, factor: float, start_state, ckpt: Checkpointer):
        self.factor, self.ckpt = float(factor), ckpt
        self.start_norm = summarize(start_state).param_norm
        self.lowest = math.inf

    def observe(self, step: int, metrics) -> float:
        """The step's loss, after stopping the run if it is not finite."""
        loss = float(jax.device_get(metrics["loss"]))
        if not math.isfinite(loss):
            self._stop(f"the loss at step {step} is {loss}")
        self.lowest = min(self.lowest, loss)
        return loss

    def check(self, step: int, state, metrics):
        """The state's summary (digests for its checkpoint record) once it passes."""
        loss = self.observe(step, metrics) if metrics is not None else None
        summary = summarize(state)
        if not summary.finite:
            self._stop(f"the parameters at step {step} are not finite")
        if not self.factor:
            return summary
        if loss is not None and loss > self.factor * self.lowest:
            self._stop(f"the run diverged: the loss at step {step} ({loss:.4g}) is over {self.factor:g}x the "
                       f"lowest of this run ({self.lowest:.4g})")
        if summary.param_norm > self.factor * max(self.start_norm, 1e-12):
            self._stop(f"the run diverged: the parameter norm at step {step} ({summary.param_norm:.4g}) is "
                       f"over {self.factor:g}x the one this run started from ({self.start_norm:.4g})")
        return summary

    def _stop(self, reason: str):
        self.ckpt.wait()
        steps = self.ckpt.steps()
        kept = f"the last good checkpoint (step {steps[-1]}) is kept" if steps else "no checkpoint was saved"
        raise NonFiniteLoss(f"{reason}: stopping without saving; {kept}. Lower the learning rate or check "
                            "the data (train.divergence_factor sets the divergence check; 0 turns it off)")


class LossLogger:
    """Writes loss, MSE, gradient norm and images/s; a non-finite loss stops the run."""

    def __init__(self, writer: MetricWriter, batch_size: int, start: int, guard: DivergenceGuard):
        self.writer, self.batch_size, self.guard = writer, batch_size, guard
        self.last_time, self.last_step = time.perf_counter(), start
        self.postfix: dict = {}

    def __call__(self, step, state, metrics):
        loss = self.guard.observe(step, metrics)
        m = jax.device_get(metrics)
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
        images = self.generate(self.program.model_params(state.ema_params), n, jax.random.PRNGKey(self.config.seed + 1),
                               condition_adapters=self.program.condition_adapters(state.ema_params))
        if self.is_main:
            viz.save_grid(images, self.workdir / "samples" / f"step_{step:08d}.png")
