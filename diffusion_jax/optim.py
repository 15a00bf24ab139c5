"""Optax optimisers from a config: Adam/AdamW, warm-up then constant or cosine, global-norm
clipping, gradient accumulation, and skipping non-finite updates."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.errors import UsageError


def tree_norm(tree):
    """Global L2 norm of a pytree. On XLA:CPU its leaves are raveled into one float32 vector and
    reduced once: there each leaf's own reduction is two or three kernels, each compiled apart.
    Elsewhere optax's per-leaf norm: no copy of the gradients, nothing gathered across an fsdp mesh."""
    leaves = jax.tree.leaves(tree)
    if jax.default_backend() == "cpu" and leaves:
        flat = jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves])
        return jnp.sqrt(jnp.vdot(flat, flat))
    tree_module = getattr(optax, "tree", None)
    if tree_module is not None and hasattr(tree_module, "norm"):
        return tree_module.norm(tree)
    return optax.global_norm(tree)


# The learning rate after warm-up, by optim.decay: (config, steps after warm-up) -> schedule.
DECAYS = {"constant": lambda c, steps: optax.constant_schedule(c.learning_rate),
          "cosine": lambda c, steps: optax.cosine_decay_schedule(c.learning_rate, max(steps, 1))}
# The optimizer, by optim.optimizer: (config, learning-rate schedule) -> transformation.
OPTIMIZERS = {"adam": lambda c, lr: optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps),
              "adamw": lambda c, lr: optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)}


def _chosen(table: dict, key: str, value: str):
    if value not in table:
        raise UsageError(f"unknown {key} {value!r}; choose one of {tuple(table)}")
    return table[value]


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    c = optim_config
    warmup = max(int(c.warmup_steps), 0)
    after = _chosen(DECAYS, "optim.decay", c.decay)(c, total_steps - warmup)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, warmup), after], [warmup])


def _increment(count):
    """count + 1, staying at int32's largest (optax's safe increment)."""
    return jnp.minimum(count, jnp.iinfo(jnp.int32).max - 1) + 1


def clipped_and_finite(inner: optax.GradientTransformation, max_norm: float, skip_nonfinite: bool,
                       max_consecutive_errors: int = 1_000_000) -> optax.GradientTransformation:
    """`optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(max_norm), inner))` (either part
    left out by max_norm <= 0 or skip_nonfinite=False), with the same state tree, from one global
    norm of the updates: it clips them, and an update whose norm is not finite (a NaN or an infinity
    in any leaf, or a sum of squares past float32's range) is skipped. Optax computes a norm and a
    finiteness test for every leaf, the norm again inside the skip's `lax.cond`, and divides each
    leaf by the norm apart: thousands of small kernels for a model of many leaves, which XLA:CPU
    compiles one by one. Here the norm is `tree_norm`'s, the clipping one scale factor and the skip
    a select, which XLA fuses into the inner update's own kernels: Adam's update of a 400-leaf LoRA
    is 1,211 kernels (16 s to compile on XLA:CPU's classic emitters), against 5,603 as optax composes
    it and 4,406 with a norm per leaf and a `lax.cond` (BENCHMARKS.md, fifteenth session). XLA
    merges the norm with an identical one the train step takes of the same gradients (its grad_norm
    metric)."""
    clips = max_norm > 0

    def init(params):
        state = inner.init(params)
        state = (optax.EmptyState(), state) if clips else state
        if not skip_nonfinite:
            return state
        return optax.ApplyIfFiniteState(notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True),
                                        total_notfinite=jnp.zeros([], jnp.int32), inner_state=state)

    def apply(updates, norm, state, params):
        if not clips:
            return inner.update(updates, state, params)
        # optax.clip_by_global_norm's u / norm * max_norm above the limit, as one factor (within an ulp)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
        updates, inner_state = inner.update(updates, state[1], params)
        return updates, (state[0], inner_state)

    def update(updates, state, params=None):
        norm = tree_norm(updates)
        if not skip_nonfinite:
            return apply(updates, norm, state, params)
        finite = jnp.isfinite(norm)
        count = jnp.where(finite, jnp.zeros([], jnp.int32), _increment(state.notfinite_count))
        applied = finite | (count > max_consecutive_errors)
        new_updates, new_inner_state = apply(updates, norm, state.inner_state, params)
        # skipped: zero updates and the inner state as it was (optax's lax.cond, as selects)
        updates = jax.tree.map(lambda u: jnp.where(applied, u, jnp.zeros_like(u)), new_updates)
        inner_state = jax.tree.map(lambda new, old: jnp.where(applied, new, old), new_inner_state, state.inner_state)
        total = jnp.where(finite, state.total_notfinite, _increment(state.total_notfinite))
        return updates, optax.ApplyIfFiniteState(notfinite_count=count, last_finite=finite, total_notfinite=total,
                                                 inner_state=inner_state)

    return optax.GradientTransformation(init, update)


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
    c = optim_config
    opt = _chosen(OPTIMIZERS, "optim.optimizer", c.optimizer)(c, learning_rate_schedule(c, total_steps))
    if c.grad_clip > 0 or c.skip_nonfinite:
        opt = clipped_and_finite(opt, float(c.grad_clip), bool(c.skip_nonfinite))
    if c.accumulate_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=c.accumulate_steps)
    return opt
