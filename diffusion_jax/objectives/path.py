"""What the objectives that follow the probability-flow path share: a continuous process, and a
point of the path with its own velocity."""
from __future__ import annotations

from diffusion_jax import draws
from diffusion_jax.errors import UsageError
from diffusion_jax.processes import as_process
from diffusion_jax.processes.targets import levels


def continuous_process(objective: str, process):
    """The process (a `Schedule` too), which must have continuous time: the objective differentiates
    the model along it."""
    process = as_process(process)
    if process.max_steps is not None:
        raise UsageError(f"objective {objective!r} differentiates the model along continuous time: the {process.name!r} "
                         "process has integer timesteps; use a continuous process (flow)")
    return process


def path_point(process, x0, t, key):
    """(x_t, v) [B, ...]: x_t = alpha(t) x0 + sigma(t) eps, eps ~ N(0, I) from `key`, and the sample's
    own velocity v = alpha'(t) x0 + sigma'(t) eps, at times t [B]."""
    eps = draws.normal(key, x0.shape)
    lv = levels(process, t, x0, derivatives=True)
    return lv.alpha * x0 + lv.sigma * eps, lv.d_alpha * x0 + lv.d_sigma * eps
