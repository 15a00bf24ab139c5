"""The reverse process from noise to data: any registered sampler, run in one `lax.scan`.

`sample(denoise_fn, schedule, shape, key, ...)` is pure; jit it with the model, schedule and
shape closed over (they fix the program) and everything users sweep as traced arguments:

    sampler = jax.jit(functools.partial(sample, denoise_fn, schedule, shape, method="ddim",
                                        num_steps=50))
    x0 = sampler(key, eta=0.5)           # a new key or eta: same compiled program

Static (change the program): `denoise_fn`, `schedule`, `shape`, `method`, `num_steps`, the
sampler's grid options (`spacing`, `sigmas`, `rho`), `prediction`, `variance`, `clip_x0`,
`start_step`, `trajectory_every`, `repaint_resamples`, `sharding`, and whether
`cond`/`known`/`start_x`/`x_T`/`guidance_rescale` are given. Traced: `key`, `eta`, the
sampler's step options (`s_churn`, `s_tmin`, `s_tmax`, `s_noise`), `guidance_scale`,
`guidance_rescale`, `cond`, `null_cond`, `known`, `mask`, `start_x`, `x_T`.

The samplers (`sampler_names()`) live in `discrete.py` and `sigma.py`; guidance, inpainting
(RePaint), SDEdit and the trajectory buffer wrap any of them here.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.diffusion import mean_channels, predict_x0_eps, q_sample, split_model_output
from diffusion_jax.processes.ddpm import ddpm_schedule
from diffusion_jax.samplers.chain import scan_chain
from diffusion_jax.samplers.process import process_method, sample_process
from diffusion_jax.samplers.registry import Grid, StepContext, concrete_schedule, get_sampler
from diffusion_jax.schedules import Schedule


def sampling_grid(schedule: Schedule, method: str, num_steps: int | None = None,
                  start_step: int | None = None, **options) -> Grid:
    """The grid `sample` walks for these settings (checks the method, step count and options)."""
    sampler = get_sampler(method)
    grid_options, _ = sampler.split_options(options)
    if num_steps is None:
        num_steps = sampler.default_steps(schedule.num_timesteps)
    with jax.ensure_compile_time_eval():  # host values even when called under jit
        grid = sampler.make_grid(schedule, num_steps, **grid_options)
    return grid if start_step is None else grid.starting_at(start_step)


def model_calls(method: str, schedule, num_steps: int) -> int:
    """The model evaluations `num_steps` steps of `method` cost on `schedule` (a DDPM schedule or a
    process): Heun's 2K - 1, K for the others."""
    if ddpm_schedule(schedule) is None:
        return process_method(method, schedule).model_calls(num_steps)
    return get_sampler(method).model_calls(num_steps)


def guided_denoise_fn(denoise_fn: Callable, cond=None, null_cond=None, guidance_scale=None,
                      variance: str = "fixed_small", guidance_rescale=None) -> Callable:
    """denoise_fn(x, t[, cond]) as a function of (x, t) with classifier-free guidance.

    A condition is any pytree whose leaves have the batch axis first: class labels [B], text
    embeddings [B, L, D], or {"embeddings": ..., "mask": ...}; `null_cond` has the same structure,
    each leaf broadcast to its leaf of `cond` (the null label; the empty prompt's embeddings
    [1, L, D]; negative prompts' [B, L, D]). With `guidance_scale` s the conditional and null
    batches go through the model in one call, leaf by leaf concatenated, and out = out_uncond +
    s (out_cond - out_uncond) on the mean channels (for eps, x0, v or velocity alike, each linear
    in eps at fixed x_t); a learned variance is the conditional one. `guidance_rescale` phi (Lin
    et al. 2023, eq. 15-16) mixes in the guided output rescaled to the conditional output's
    standard deviation per example: phi = 0 is plain guidance.
    """
    if guidance_scale is None:
        if cond is None:
            return denoise_fn
        return lambda x, t: denoise_fn(x, t, cond)
    if cond is None or null_cond is None:
        raise UsageError("guidance_scale needs both cond (the condition) and null_cond (the null condition)")

    def guided(x, t):
        batch = x.shape[0]
        both = jax.tree_util.tree_map(
            lambda c, n: jnp.concatenate([c, jnp.broadcast_to(jnp.asarray(n, jnp.asarray(c).dtype), jnp.shape(c))]),
            cond, null_cond)
        out = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        out_c, out_u = out[:batch], out[batch:]
        mean_c, var_c = split_model_output(out_c, x, variance)
        mean_u, _ = split_model_output(out_u, x, variance)
        mean = mean_u + guidance_scale * (mean_c - mean_u)
        if guidance_rescale is not None:
            axes = tuple(range(1, x.ndim))
            rescaled = mean * (jnp.std(mean_c, axis=axes, keepdims=True)
                               / jnp.std(mean, axis=axes, keepdims=True))
            mean = guidance_rescale * rescaled + (1.0 - guidance_rescale) * mean
        return mean if var_c is None else jnp.concatenate([mean, var_c], axis=-1)

    return guided


def _check_wrappers(known, mask, repaint_resamples, start_x, start_step):
    if (known is None) != (mask is None):
        raise UsageError("inpainting needs both known (the image) and mask (1 = keep)")
    if repaint_resamples > 1 and known is None:
        raise UsageError("repaint_resamples > 1 needs known and mask (RePaint inpainting)")
    if start_x is not None and start_step is None:
        raise UsageError("start_x (SDEdit) needs start_step, the timestep to noise it to")


def sample(denoise_fn: Callable, schedule: Schedule, shape, key, *, method: str = "ddpm",
           num_steps: int | None = None, eta=None, prediction: str = "eps",
           variance: str = "fixed_small", clip_x0: bool = True, guidance_scale=None,
           guidance_rescale=None, cond=None, null_cond=None, known=None, mask=None,
           repaint_resamples: int = 1, start_x=None, start_step: int | None = None, x_T=None,
           trajectory_every: int | None = None, sharding=None, **options):
    """Generates a batch x0 of `shape` ([B, H, W, C]) with the sampler named `method`.

    Args:
      denoise_fn: (x_t, t_model) -> model output, or (x_t, t_model, cond) when `cond` is given.
      num_steps: the sampler's steps (its default when None); `options` are its grid and step
        options (see `get_sampler(method)`, each declared with its range); `eta` is the option
        of that name (DDIM's): given to a sampler without it, it is an error, not ignored.
      known, mask: inpainting; after every step the pixels with mask = 1 are replaced by `known`
        noised to the level of the new state (by `known` itself at the end).
        `repaint_resamples` r > 1 re-noises each step's result back to the step's level r - 1
        times (RePaint, jump length 1).
      start_x, start_step: image-to-image (SDEdit): start_x noised to the grid's first step at
        or below model timestep `start_step` (a continuous process: its model time, 1000 t for
        "flow", sigma for "edm"), then the chain from there.
      key: one key for the batch, or one key per sample ([B] typed keys): then image i is a
        function of its own key alone (see `key_ops`).
      x_T: the starting noise (default: drawn from `key`); the DDIM decoder of `encode`.
      trajectory_every: also return {"x_t", "pred_x0": [N, *shape], "t": [N]}, the state before
        every k-th step and the final sample (N = ceil(K / k) + 1 for K steps).
      sharding: a `jax.sharding.Sharding` for [B, ...] arrays (batch on a data axis); the noise
        is drawn as one global array, so every device gets its own noise and the result equals
        the unsharded one for the same key.
    Returns:
      x0 [B, ...] float32 (and the trajectory dict when `trajectory_every` is set).
    """
    shape = tuple(shape)
    constrain = (lambda a: a) if sharding is None else (lambda a: jax.lax.with_sharding_constraint(a, sharding))
    _check_wrappers(known, mask, repaint_resamples, start_x, start_step)
    if ddpm_schedule(schedule) is None:  # a continuous-time process: samplers/process.py
        if eta is not None or variance != "fixed_small":
            raise UsageError(f"{'eta' if eta is not None else 'variance'} is not available on a {schedule.name!r} "
                             "process: euler_ancestral and dpm++_2m_sde are its stochastic samplers; a learned "
                             "variance needs DDPM")
        model = guided_denoise_fn(denoise_fn, cond, null_cond, guidance_scale, variance, guidance_rescale)
        return sample_process(model, schedule, shape, key, method=method, num_steps=num_steps,
                              prediction=prediction, clip_x0=clip_x0, x_T=x_T,
                              keys=key_ops(key, shape, constrain), options=options,
                              trajectory_every=trajectory_every, known=known, mask=mask,
                              repaint_resamples=repaint_resamples, start_x=start_x, start_step=start_step)
    schedule, sampler = ddpm_schedule(schedule), get_sampler(method)
    if eta is not None:
        options = dict(options, eta=eta)
    _, step_options = sampler.split_options(options)
    grid = sampling_grid(concrete_schedule(schedule), method, num_steps, start_step, **options)
    keys = key_ops(key, shape, constrain)
    normal = keys.normal
    model = guided_denoise_fn(denoise_fn, cond, null_cond, guidance_scale, variance, guidance_rescale)
    ctx = StepContext(model, grid.schedule, prediction, variance, clip_x0, grid.num_steps, normal,
                      {k: jnp.asarray(v, jnp.float32) for k, v in step_options.items()})
    key_init, key_steps = keys.split(key)
    if x_T is not None:
        x = constrain(jnp.asarray(x_T, jnp.float32).reshape(shape))
    elif start_x is not None:
        x = grid.signal[0] * constrain(start_x.astype(jnp.float32)) + grid.noise[0] * normal(key_init)
    else:
        x = normal(key_init)
    step = _with_known(sampler.step, known, mask, keys)
    if known is not None and x_T is None and start_x is None:
        x = _merge_known(x, known, mask, grid.signal[0], grid.noise[0], normal(keys.fold_in(key_init, 1)))
    if repaint_resamples > 1:
        step = _with_repaint(step, repaint_resamples, keys)
    return _run(step, ctx, x, sampler.init_state(x), grid, key_steps, keys, trajectory_every)


class KeyOps(NamedTuple):
    """How the chain derives its noise: from one key for the batch, or from one key per sample."""

    split: Callable    # key -> (key, key)
    fold_in: Callable  # (key, int) -> key
    normal: Callable   # key -> standard normal noise [B, ...] of the batch's shape (and sharding)


def key_ops(key, shape, constrain) -> KeyOps:
    """KeyOps for `key`: a single key (a typed key of shape (), or a raw uint32 [2]) draws the
    batch's noise as one array; a key per sample (typed [B], or raw uint32 [B, 2]) draws sample
    i's noise, at every step, from its own key alone, so an image does not depend on the batch
    it was sampled in (its size, its other members, the devices it was split over)."""
    typed = jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key)
    if jnp.ndim(key) == (0 if typed else 1):
        return KeyOps(lambda k: tuple(jax.random.split(k)), jax.random.fold_in,
                      lambda k: constrain(jax.random.normal(k, shape, jnp.float32)))
    if jnp.shape(key)[0] != shape[0]:
        raise UsageError(f"{jnp.shape(key)[0]} keys for a batch of {shape[0]}: give one key, or one per sample")

    def split(k):
        both = jax.vmap(jax.random.split)(k)
        return both[:, 0], both[:, 1]

    fold_in = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    normal = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))
    return KeyOps(split, fold_in, lambda k: constrain(normal(k)))


def _merge_known(x, known, mask, signal, noise, fresh):
    noised = signal * known.astype(jnp.float32) + noise * fresh
    return mask * noised + (1.0 - mask) * x


def _with_known(step, known, mask, keys):
    """The step, then (when inpainting) the known pixels noised to the new state's level."""

    def known_step(ctx, x, state, inputs, key):
        k_step, k_known = keys.split(key)  # split even without inpainting: one key scheme
        x_next, state, x0 = step(ctx, x, state, inputs, k_step)
        if known is not None:
            x_next = _merge_known(x_next, known, mask, inputs["signal_next"], inputs["noise_next"],
                                  keys.normal(k_known))
        return x_next, state, x0

    return known_step


def _with_repaint(step, resamples, keys):
    """RePaint (Lugmayr et al. 2022): r - 1 times, take the step and re-noise its result back
    to the step's level with the forward kernel between the two levels, then take it for good."""

    def repaint_step(ctx, x, state, inputs, key):
        ratio = (inputs["signal"] / inputs["signal_next"]) ** 2  # abar_now / abar_next

        def resample(j, x_cur):
            k = keys.fold_in(key, j)
            x_next, _, _ = step(ctx, x_cur, state, inputs, k)
            return jnp.sqrt(ratio) * x_next + jnp.sqrt(1.0 - ratio) * keys.normal(keys.fold_in(k, 7))

        x = jax.lax.fori_loop(0, resamples - 1, resample, x)
        return step(ctx, x, state, inputs, keys.fold_in(key, resamples))

    return repaint_step


def _run(step, ctx, x, state, grid: Grid, key, keys, trajectory_every):
    """The chain in one lax.scan, keeping every k-th state in a buffer when asked (never all)."""
    K = grid.num_steps
    inputs = {k: jnp.asarray(v) for k, v in grid.steps.items()}
    inputs.update(i=jnp.arange(K), signal=jnp.asarray(grid.signal[:-1]),
                  signal_next=jnp.asarray(grid.signal[1:]), noise_next=jnp.asarray(grid.noise[1:]))

    def body(carry, inp):
        x, state = carry
        x_next, state, x0 = step(ctx, x, state, inp, keys.fold_in(key, inp["i"]))
        return (x_next, state), (x, x0)

    x, trajectory = scan_chain(body, (x, state), inputs, K, trajectory_every)
    if trajectory is None:
        return x
    return x, {**trajectory, "t": jnp.append(jnp.asarray(grid.model_t[::int(trajectory_every)]), -1)}


def encode(denoise_fn: Callable, schedule: Schedule, x0, num_steps: int = 50, *,
           prediction: str = "eps", cond=None):
    """DDIM inversion: runs the deterministic DDIM update forward from x0 to x_{T-1}.

    The grid is the one `sample(method="ddim", num_steps=num_steps)` walks down, so
    `decode(denoise_fn, schedule, encode(...), num_steps)` returns x0 up to the discretisation
    error, which falls as `num_steps` grows. x0 [B, ...] -> x_T [B, ...].
    """
    grid = np.asarray(sampling_grid(schedule, "ddim", num_steps).steps["t"])[::-1]
    model = guided_denoise_fn(denoise_fn, cond)
    B = x0.shape[0]

    def body(x, inputs):
        t, t_next = inputs
        tt = jnp.full((B,), t, jnp.int32)
        out = model(x, schedule.timesteps[tt])
        x0_hat, eps = predict_x0_eps(schedule, mean_channels(out, x), x, tt, prediction, clip_x0=False)
        return q_sample(schedule, x0_hat, jnp.full((B,), t_next, jnp.int32), eps), None

    x = x0.astype(jnp.float32)
    if len(grid) > 1:
        x, _ = jax.lax.scan(body, x, (jnp.asarray(grid[:-1]), jnp.asarray(grid[1:])))
    return x


def decode(denoise_fn: Callable, schedule: Schedule, x_T, num_steps: int = 50, *,
           prediction: str = "eps", cond=None):
    """Deterministic DDIM (eta = 0, no clipping) from a given x_T: the inverse of `encode`."""
    return sample(denoise_fn, schedule, x_T.shape, jax.random.key(0), method="ddim",
                  num_steps=num_steps, eta=0.0, prediction=prediction, clip_x0=False, cond=cond,
                  x_T=x_T)
