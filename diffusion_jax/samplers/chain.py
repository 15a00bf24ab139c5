"""The reverse chain in one `lax.scan`, keeping every k-th state in a buffer when asked (never
all): what the driver's discrete samplers and the process samplers share."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def scan_chain(body: Callable, carry, inputs: dict, num_steps: int, trajectory_every=None):
    """Runs body(carry, inputs_i) -> (carry', (x before the step, its x0)) over the K =
    `num_steps` entries of `inputs` (which hold the step index "i"); carry[0] is the state x.
    Returns (x, None), or with `trajectory_every` k (x, {"x_t", "pred_x0": [ceil(K / k) + 1, ...]}):
    the state before every k-th step and its x0, then the final x in the last slot of both."""
    if trajectory_every is None:
        (x, _), _ = jax.lax.scan(lambda c, inp: (body(c, inp)[0], None), carry, inputs)
        return x, None
    every = int(trajectory_every)
    saved = -(-int(num_steps) // every)
    buffers = (jnp.zeros((saved + 1,) + carry[0].shape, jnp.float32),) * 2

    def body_traj(carry, inp):
        carry, (buf_x, buf_x0) = carry
        carry, (x_before, x0) = body(carry, inp)
        write, slot = inp["i"] % every == 0, inp["i"] // every
        buf_x = buf_x.at[slot].set(jnp.where(write, x_before, buf_x[slot]))
        buf_x0 = buf_x0.at[slot].set(jnp.where(write, x0, buf_x0[slot]))
        return (carry, (buf_x, buf_x0)), None

    ((x, _), (buf_x, buf_x0)), _ = jax.lax.scan(body_traj, (carry, buffers), inputs)
    return x, {"x_t": buf_x.at[saved].set(x), "pred_x0": buf_x0.at[saved].set(x)}
