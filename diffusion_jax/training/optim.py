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


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    c = optim_config
    warmup = max(int(c.warmup_steps), 0)
    if c.decay == "constant":
        after = optax.constant_schedule(c.learning_rate)
    elif c.decay == "cosine":
        after = optax.cosine_decay_schedule(c.learning_rate, max(total_steps - warmup, 1))
    else:
        raise UsageError(f"unknown optim.decay {c.decay!r}; choose 'constant' or 'cosine'")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, warmup), after], [warmup])


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
    c = optim_config
    lr = learning_rate_schedule(c, total_steps)
    if c.optimizer == "adam":
        opt = optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps)
    elif c.optimizer == "adamw":
        opt = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    else:
        raise UsageError(f"unknown optim.optimizer {c.optimizer!r}; choose 'adam' or 'adamw'")
    if c.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(c.grad_clip), opt)
    if c.skip_nonfinite:
        opt = optax.apply_if_finite(opt, max_consecutive_errors=1_000_000)
    if c.accumulate_steps > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=c.accumulate_steps)
    return opt
