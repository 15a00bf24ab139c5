"""Optax optimisers from a config: Adam/AdamW, warm-up then constant or cosine, global-norm
clipping, gradient accumulation, and skipping non-finite updates."""
from __future__ import annotations

import optax

from diffusion_jax.errors import UsageError


def tree_norm(tree):
    """Global L2 norm of a pytree (optax.tree.norm where this optax has it)."""
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


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
    c = optim_config
    opt = _chosen(OPTIMIZERS, "optim.optimizer", c.optimizer)(c, learning_rate_schedule(c, total_steps))
    if c.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(c.grad_clip), opt)
    if c.skip_nonfinite:
        opt = optax.apply_if_finite(opt, max_consecutive_errors=1_000_000)
    if c.accumulate_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=c.accumulate_steps)
    return opt
