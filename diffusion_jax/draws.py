"""Random draws of any shape made as one flat draw, then reshaped.

Threefry numbers the elements of a draw in row-major order, so `normal(key, shape)` is bitwise
`jax.random.normal(key, shape)` (with partitionable threefry or without; typed or raw keys; under
vmap). What changes is the program: jax.random's draw of a [B, H, W, C] array carries an index per
axis through the hash, which XLA compiles 2-3x slower than one flat index (a standard normal draw
of [64, 8, 8, 1] on a CPU: 0.38 s against 0.14 s). Every draw the library makes of an image-shaped
array goes through here: a sampler chain on images compiles about 25% faster (BENCHMARKS.md).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _flat(draw, key, shape, *args, **kwargs):
    shape = tuple(int(n) for n in shape)
    return draw(key, *args, shape=(math.prod(shape),), **kwargs).reshape(shape)


def normal(key, shape, dtype=jnp.float32):
    """`jax.random.normal(key, shape, dtype)`."""
    return _flat(jax.random.normal, key, shape, dtype=dtype)


def uniform(key, shape, dtype=jnp.float32, minval=0.0, maxval=1.0):
    """`jax.random.uniform(key, shape, dtype, minval, maxval)`."""
    return _flat(jax.random.uniform, key, shape, dtype=dtype, minval=minval, maxval=maxval)


def rademacher(key, shape, dtype=jnp.int32):
    """`jax.random.rademacher(key, shape, dtype)`: -1 or 1 with equal probability."""
    return _flat(jax.random.rademacher, key, shape, dtype=dtype)
