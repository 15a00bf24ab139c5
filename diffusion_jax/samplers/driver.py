"""The reverse process from noise to data: any registered sampler on any process, in one loop.

`sample(denoise_fn, process, shape, key, ...)` is pure; jit it with the model, process and shape
closed over (they fix the program) and what users sweep as traced arguments:

    sampler = jax.jit(functools.partial(sample, denoise_fn, process, shape, method="ddim", max_steps=100))
    x0 = sampler(key, num_steps=50, eta=0.5)   # another key, step count (<= 100) or eta: the same program

Static (a new program): the model, process, shape, method, the grid options (`grids.py`), the
sampler's own choices, `prediction`, `clip_x0`, `trajectory_every`, `sharding`, `num_steps` unless
`max_steps` is given, what `edit` holds and whether `x_T` is given. Traced: `key`, `num_steps`
with `max_steps`, the samplers' number options (eta, s_churn, ...), `x_T`, the arrays of `edit`.
Guidance is the model's: `guided_denoise_fn` makes the (x, t) function `sample` takes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import draws
from diffusion_jax.errors import UsageError
from diffusion_jax.processes import as_process
from diffusion_jax.processes.targets import mean_channels
from diffusion_jax.samplers.grids import GRID_OPTIONS, Grid, grid_table, make_grid
from diffusion_jax.samplers.methods import denoised, model_output
from diffusion_jax.samplers.registry import StepContext, StepLevel, get_sampler


def check_options(method: str, options: dict) -> dict:
    """The options given to `method`, each checked and converted by its declaration (the grid's
    and the sampler's own); an option it does not take is an error naming those it does."""
    declared = {**GRID_OPTIONS, **get_sampler(method).options}
    unknown = set(options) - set(declared)
    if unknown:
        raise UsageError(f"sampler {method!r} has no option(s) {sorted(unknown)}; it takes {sorted(declared)}")
    return {k: declared[k].check(method, k, v) for k, v in options.items()}


def sampler_options(method: str, process, options: dict) -> tuple[dict, dict]:
    """(grid options, the sampler's own options) of `method` on `process`, checked (`check_options`),
    defaults filled in (a grid the sampler prefers where the process lets it choose)."""
    sampler, process = get_sampler(method), as_process(process)
    checked = check_options(method, options)
    grid = {k: o.default for k, o in GRID_OPTIONS.items()}
    grid.update(sampler.grid_defaults)
    grid["sigmas"] = process.default_sigmas(grid["sigmas"])
    grid.update({k: v for k, v in checked.items() if k in GRID_OPTIONS})
    own = {k: checked.get(k, o.default) for k, o in sampler.options.items()}
    sampler.check_options(method, own)
    return grid, own


def default_steps(method: str, process) -> int:
    limit = as_process(process).max_steps
    steps = get_sampler(method).default_steps
    return (limit or 1000) if steps is None else min(steps, limit or steps)


def sampling_grid(process, method: str, num_steps: Optional[int] = None, **options) -> Grid:
    """The grid `sample` walks for these settings (checks the method, step count and options)."""
    process = as_process(process)
    grid_options, _ = sampler_options(method, process, options)
    grid_options.pop("max_steps")
    return make_grid(process, default_steps(method, process) if num_steps is None else num_steps, **grid_options)


def model_calls(method: str, num_steps: int) -> int:
    """The model evaluations `num_steps` steps of `method` cost: Heun's 2K - 1, K for the others."""
    return get_sampler(method).model_calls(num_steps)


def guided_denoise_fn(denoise_fn: Callable, cond=None, null_cond=None, guidance_scale=None,
                      guidance_rescale=None) -> Callable:
    """denoise_fn(x, t[, cond]) as a function of (x, t), with classifier-free guidance (a two-time
    model's second time r= passed through).

    A condition is any pytree whose leaves have the batch axis first: class labels [B], text
    embeddings [B, L, D], or {"embeddings": ..., "mask": ...}; `null_cond` has the same structure,
    each leaf broadcast to its leaf of `cond` (the null label; the empty prompt's embeddings
    [1, L, D]; negative prompts' [B, L, D]). With `guidance_scale` s the conditional and null
    batches go through the model in one call, leaf by leaf concatenated, and out = out_uncond +
    s (out_cond - out_uncond) on the mean channels (for eps, x0, v or velocity alike, each linear
    in eps at fixed x_t); a learned variance (twice the channels) is the conditional one.
    `guidance_rescale` phi (Lin et al. 2023, eq. 15-16) mixes in the guided output rescaled to the
    conditional output's standard deviation per example: phi = 0 is plain guidance.
    """
    if guidance_scale is None:
        return denoise_fn if cond is None else (lambda x, t, **r: denoise_fn(x, t, cond, **r))
    if cond is None or null_cond is None:
        raise UsageError("guidance_scale needs both cond (the condition) and null_cond (the null condition)")

    def guided(x, t, **r):
        batch = x.shape[0]
        both = jax.tree_util.tree_map(
            lambda c, n: jnp.concatenate([c, jnp.broadcast_to(jnp.asarray(n, jnp.asarray(c).dtype), jnp.shape(c))]),
            cond, null_cond)
        out = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both,
                         **{k: jnp.concatenate([v, v]) for k, v in r.items()})
        mean_c, mean_u = mean_channels(out[:batch], x), mean_channels(out[batch:], x)
        mean = mean_u + guidance_scale * (mean_c - mean_u)
        if guidance_rescale is not None:
            axes = tuple(range(1, x.ndim))
            rescaled = mean * (jnp.std(mean_c, axis=axes, keepdims=True) / jnp.std(mean, axis=axes, keepdims=True))
            mean = guidance_rescale * rescaled + (1.0 - guidance_rescale) * mean
        return jnp.concatenate([mean, out[:batch, ..., x.shape[-1]:]], axis=-1)

    return guided


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Edit:
    """What a chain keeps of a given image.

    Inpainting: `known` [B, ...] and `mask` (1 = keep): after every step the kept pixels become
    `known` noised to the new level; `repaint_resamples` r > 1 takes each step r times, going back
    up between with the forward kernel (RePaint, jump length 1). SDEdit: `start_x` noised to the
    grid's first level at or below model time `start_step` (the model's units: DDPM's timestep,
    1000 t for "flow", sigma for "edm"), then the chain from there.
    """

    known: Any = None
    mask: Any = None
    start_x: Any = None
    repaint_resamples: int = dataclasses.field(default=1, metadata=dict(static=True))
    start_step: Optional[float] = dataclasses.field(default=None, metadata=dict(static=True))

    def check(self):
        if (self.known is None) != (self.mask is None):
            raise UsageError("inpainting needs both known (the image) and mask (1 = keep)")
        if self.repaint_resamples > 1 and self.known is None:
            raise UsageError("repaint_resamples > 1 needs known and mask (RePaint inpainting)")
        if (self.start_x is None) != (self.start_step is None):
            raise UsageError("SDEdit needs both start_x (the image) and start_step (the model time to noise it to)")


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
                      lambda k: constrain(draws.normal(k, shape)))
    if jnp.shape(key)[0] != shape[0]:
        raise UsageError(f"{jnp.shape(key)[0]} keys for a batch of {shape[0]}: give one key, or one per sample")

    def split(k):
        both = jax.vmap(jax.random.split)(k)
        return both[:, 0], both[:, 1]

    fold_in = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    normal = jax.vmap(lambda k: draws.normal(k, shape[1:]))
    return KeyOps(split, fold_in, lambda k: constrain(normal(k)))


def _chain_grid(process, method, num_steps, grid_options, edit):
    """(grid arrays [K + 1], the steps to run, the first step, the grid's alphas on the host): one
    grid for a fixed `num_steps`, or with `max_steps` the table's row of a (traced) `num_steps`."""
    bound = grid_options.pop("max_steps")
    if bound is None:
        grid = make_grid(process, default_steps(method, process) if num_steps is None else num_steps, **grid_options)
        start = 0 if edit.start_step is None else grid.num_steps - grid.starting_at(edit.start_step).num_steps
        return Grid(*(jnp.asarray(a) for a in grid)), grid.num_steps, start, grid.alpha[start:start + 1]
    table = grid_table(process, bound, **grid_options)
    if num_steps is None or (not isinstance(num_steps, jax.core.Tracer) and not 1 <= int(num_steps) <= bound):
        raise UsageError(f"num_steps must be in [1, max_steps = {bound}] with max_steps, got {num_steps!r}")
    row = jnp.asarray(num_steps, jnp.int32) - 1
    grid = Grid(*(jnp.asarray(a)[row] for a in table.grids))
    # a traced step count outside [1, bound] cannot be refused: its chain is NaN, never a clamped one
    grid = grid._replace(alpha=jnp.where((row >= 0) & (row < bound), grid.alpha, jnp.nan))
    steps = jnp.asarray(table.steps)[row]
    start = 0 if edit.start_step is None else jnp.argmax(grid.model_t <= edit.start_step)
    return grid, steps, start, table.grids.alpha[:, 0]


def sample(denoise_fn: Callable, process, shape, key, *, method: str = "ddpm", num_steps=None,
           prediction: str = "eps", clip_x0: bool = True, x_T=None, edit: Optional[Edit] = None,
           trajectory_every: Optional[int] = None, sharding=None, **options):
    """Generates a batch x0 of `shape` ([B, H, W, C]) with the sampler named `method`.

    Args:
      denoise_fn: (x_t, model time [B]) -> model output (`guided_denoise_fn` adds a condition and
        guidance); `process`: any process, or a DDPM `Schedule`.
      num_steps: the sampler's steps (its default when None); a traced value with the grid option
        `max_steps` (its bound). `options`: the grid's and the sampler's (`sampler_options`).
      key: one key for the batch, or one key per sample ([B] typed keys): then image i is a
        function of its own key alone (see `key_ops`).
      x_T: the starting noise [B, ...] (default: prior_std N(0, I) from `key`); `edit`: inpainting,
        RePaint and SDEdit (`Edit`).
      trajectory_every: also return {"x_t", "pred_x0": [N, *shape], "t": [N]}, the state before
        every k-th step and the final sample (N = ceil(K / k) + 1; "t" the model times, -1 at the end).
      sharding: a `jax.sharding.Sharding` for [B, ...] arrays (batch on a data axis); the noise
        is drawn as one global array, so every device gets its own noise and the result equals
        the unsharded one for the same key.
    Returns:
      x0 [B, ...] float32 (and the trajectory dict when `trajectory_every` is set).
    """
    shape, process, edit = tuple(shape), as_process(process), edit or Edit()
    edit.check()
    sampler = get_sampler(method)
    grid_options, own = sampler_options(method, process, options)
    grid, steps, start, first_alphas = _chain_grid(process, method, num_steps, grid_options, edit)
    if prediction == "eps" and np.any(first_alphas == 0.0):
        raise UsageError(f"an eps-prediction model cannot start a {process.name!r} chain where alpha = 0 (x0 cannot be "
                         "told from the noise there): train it to predict velocity, v or x0")
    constrain = (lambda a: a) if sharding is None else (lambda a: jax.lax.with_sharding_constraint(a, sharding))
    keys = key_ops(key, shape, constrain)
    ctx = StepContext(denoise_fn, process, prediction, clip_x0, steps - start, keys.normal,
                      {k: (jnp.asarray(v, jnp.float32) if sampler.options[k].traced else v) for k, v in own.items()})
    key_init, key_steps = keys.split(key)
    if x_T is not None:
        if jnp.shape(x_T) != shape:
            raise UsageError(f"x_T has shape {jnp.shape(x_T)}, the samples {shape}: give it in the model's layout "
                             "(NHWC), one per sample")
        x = constrain(jnp.asarray(x_T, jnp.float32))
    elif edit.start_x is not None:
        x = grid.alpha[start] * constrain(jnp.asarray(edit.start_x, jnp.float32)) + grid.sigma[start] * keys.normal(key_init)
    else:
        x = process.prior_std * keys.normal(key_init)
    known = None if edit.known is None else (jnp.asarray(edit.known, jnp.float32), jnp.asarray(edit.mask, jnp.float32))
    if known is not None and x_T is None and edit.start_x is None:
        x = _merge(x, known, grid.alpha[start], grid.sigma[start], keys.normal(keys.fold_in(key_init, 1)))

    def step(x, state, lv, key):
        """One step, then (inpainting) the known pixels noised to the new level."""
        k_step, k_known = keys.split(key)
        x_next, state, x0 = sampler.step(ctx, x, state, lv, k_step)
        if known is not None:
            x_next = _merge(x_next, known, lv.alpha_next, lv.sigma_next, keys.normal(k_known))
        return x_next, state, x0

    def repaint(x, state, lv, key):
        """RePaint (Lugmayr et al. 2022): r - 1 times, take the step and go back up with the
        forward kernel between the two levels, then take it for good."""
        def again(j, x_cur):
            k = keys.fold_in(key, j)
            x_next, _, _ = step(x_cur, state, lv, k)
            return lv.alpha / lv.alpha_next * x_next + jnp.sqrt(lv.var) * keys.normal(keys.fold_in(k, 7))

        x = jax.lax.fori_loop(0, edit.repaint_resamples - 1, again, x)
        return step(x, state, lv, keys.fold_in(key, edit.repaint_resamples))

    take = repaint if edit.repaint_resamples > 1 else step

    def body(i, carry):
        x, state, buffers = carry
        j = i - start
        lv = StepLevel(grid.t[i], grid.alpha[i], grid.sigma[i], grid.model_t[i], grid.t[i + 1], grid.alpha[i + 1],
                       grid.sigma[i + 1], grid.model_t[i + 1], grid.var[i], j)
        x_next, state, x0 = take(x, state, lv, keys.fold_in(key_steps, j))
        if buffers is not None:
            write, slot = j % trajectory_every == 0, j // trajectory_every
            buffers = tuple(b.at[slot].set(jnp.where(write, v, b[slot])) for b, v in zip(buffers, (x, x0)))
        return x_next, state, buffers

    slots = None
    if trajectory_every is not None:
        trajectory_every = int(trajectory_every)
        longest = (len(grid.var) if isinstance(steps, jax.Array) else steps) - (0 if isinstance(start, jax.Array) else start)
        slots = -(-longest // trajectory_every) + 1
    buffers = None if slots is None else (jnp.zeros((slots, *shape), jnp.float32),) * 2
    x, _, buffers = jax.lax.fori_loop(start, steps, body, (x, sampler.init_state(x), buffers))
    if buffers is None:
        return x
    last = -(-(steps - start) // trajectory_every)
    index = jnp.arange(slots)
    times = jnp.where(index < last, grid.model_t[jnp.minimum(start + index * trajectory_every, len(grid.var))], -1.0)
    return x, {"x_t": buffers[0].at[last].set(x), "pred_x0": buffers[1].at[last].set(x), "t": times}


def _merge(x, known, alpha, sigma, fresh):
    image, mask = known
    return mask * (alpha * image + sigma * fresh) + (1.0 - mask) * x


def encode(denoise_fn: Callable, process, x0, num_steps: int = 50, *, prediction: str = "eps"):
    """DDIM inversion: the deterministic DDIM update run forward from x0, taken as the state at the
    least noisy level of `sample(method="ddim", num_steps=num_steps)`'s grid, up to its noisiest.
    `decode(denoise_fn, process, encode(...), num_steps)` returns x0 up to the discretisation
    error, which falls as `num_steps` grows. x0 [B, ...] -> x_T [B, ...]."""
    process = as_process(process)
    grid = sampling_grid(process, "ddim", num_steps)
    ctx = StepContext(denoise_fn, process, prediction, False, num_steps, None, {})
    t, alpha, sigma, model_t = (jnp.asarray(a[:-1][::-1]) for a in (grid.t, grid.alpha, grid.sigma, grid.model_t))

    def body(x, j):
        x0_hat, eps = denoised(ctx, x, t[j], alpha[j], sigma[j], model_output(ctx, x, model_t[j]))
        return alpha[j + 1] * x0_hat + sigma[j + 1] * eps, None

    x, _ = jax.lax.scan(body, jnp.asarray(x0, jnp.float32), jnp.arange(grid.num_steps - 1))
    return x


def decode(denoise_fn: Callable, process, x_T, num_steps: int = 50, *, prediction: str = "eps"):
    """Deterministic DDIM (eta = 0, no clipping) from a given x_T: the inverse of `encode`."""
    return sample(denoise_fn, process, x_T.shape, jax.random.key(0), method="ddim", num_steps=num_steps,
                  prediction=prediction, clip_x0=False, x_T=x_T)
