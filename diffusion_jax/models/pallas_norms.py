"""DiT's adaLN LayerNorm as Pallas (Triton) kernels: one pass over the activations forward, one
backward.

`adaptive_layer_norm(x, shift, scale, epsilon, interpret)` computes what
`ops.adaptive_layer_norm` computes (LayerNorm over the last axis in float32 with the variance
as E[x^2] - E[x]^2, then `* (1 + scale) + shift` per example, returned in x.dtype) with the
same residuals (x and the per-row mean and 1/std). What the kernels change is the memory
traffic of the backward pass: XLA computes dx (two reductions over C per row) and
d_shift = sum_tokens g, d_scale = sum_tokens g * xhat (reductions over the tokens, a different
axis) in separate fusions that each read x and g again; the backward kernel here reads x and g
once, writes dx, and keeps the two token sums of its rows in registers, writing one partial sum
per program (a [B, S, C] float32 array, S programs per example, summed by XLA: no atomics,
so the result is deterministic).

Layout. x [B, T, C] is viewed as rows [B * T, C]; program (b, s) of the grid (B, S) owns the
rows of example b from s * rows_per_program, and walks them `block_rows` at a time. Triton
needs power-of-two tiles, so a tile is [block_rows, next_pow2(C)] with the columns past C
masked (loaded as 0, never stored).

The kernels run on NVIDIA GPUs through Pallas' Triton backend; `interpret=True` runs the same
kernel body with Pallas' interpreter on any backend (the tests compare it with float64
formulas on the CPU). `ops.adaptive_layer_norm(..., impl=...)` chooses between this and XLA.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_TILE_ELEMENTS = 4096       # elements of a [block_rows, C_pad] tile: 32 float32 a thread at 4 warps
_MIN_PROGRAMS = 1024        # backward grid size to aim for (an H100 has 132 SMs)


def available() -> bool:
    """Whether this jax ships Pallas' Triton API with masked loads (jax >= 0.7)."""
    try:
        from jax.experimental import pallas as pl  # noqa: F401
        from jax.experimental.pallas import triton as plgpu
    except ImportError:
        return False
    return hasattr(plgpu, "load") and hasattr(plgpu, "store") and hasattr(plgpu, "CompilerParams")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tiling(num_examples: int, tokens: int, channels: int) -> tuple[int, int, int]:
    """(padded channels, rows a tile, programs per example) for x [B, T, C]."""
    padded = _next_pow2(channels)
    block_rows = min(max(1, _TILE_ELEMENTS // padded), _next_pow2(tokens))
    blocks = math.ceil(tokens / block_rows)
    splits = min(blocks, max(1, math.ceil(_MIN_PROGRAMS / num_examples)))
    return padded, block_rows, splits


def _tile(block_rows, padded, first_row, tokens, channels, example):
    """Row and column indices of a tile of example `example` starting at token `first_row`,
    its mask, and the rows' indices in the [B * T, C] view."""
    rows = first_row + jnp.arange(block_rows)
    cols = jnp.arange(padded)
    row_ok = rows < tokens
    mask = row_ok[:, None] & (cols < channels)[None, :]
    flat_rows = example * tokens + rows
    return flat_rows, cols, row_ok, mask


def _row_params(ref, example, cols, channels):
    """Example `example`'s row of a flattened [B * C] per-example parameter, float32 [C_pad]."""
    from jax.experimental.pallas import triton as plgpu
    return plgpu.load(ref.at[example * channels + cols], mask=cols < channels, other=0.0).astype(jnp.float32)


def _forward_kernel(x_ref, shift_ref, scale_ref, y_ref, mean_ref, rstd_ref, *,
                    tokens, channels, padded, block_rows, epsilon):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    example, block = pl.program_id(0), pl.program_id(1)
    flat_rows, cols, row_ok, mask = _tile(block_rows, padded, block * block_rows, tokens, channels, example)
    x = plgpu.load(x_ref.at[flat_rows[:, None], cols[None, :]], mask=mask, other=0.0).astype(jnp.float32)
    mean = jnp.sum(x, axis=1) / channels
    var = jnp.maximum(jnp.sum(x * x, axis=1) / channels - mean * mean, 0.0)
    rstd = jax.lax.rsqrt(var + epsilon)
    shift = _row_params(shift_ref, example, cols, channels)
    scale = _row_params(scale_ref, example, cols, channels)
    y = (x - mean[:, None]) * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    plgpu.store(y_ref.at[flat_rows[:, None], cols[None, :]], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref.at[flat_rows], mean, mask=row_ok)
    plgpu.store(rstd_ref.at[flat_rows], rstd, mask=row_ok)


def _backward_kernel(x_ref, g_ref, scale_ref, mean_ref, rstd_ref, dx_ref, d_shift_ref, d_scale_ref, *,
                     tokens, channels, padded, block_rows, blocks_per_program, splits):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    example, split = pl.program_id(0), pl.program_id(1)
    one_plus_scale = 1.0 + _row_params(scale_ref, example, jnp.arange(padded), channels)

    def body(i, sums):
        first = (split * blocks_per_program + i) * block_rows
        flat_rows, cols, row_ok, mask = _tile(block_rows, padded, first, tokens, channels, example)
        index = (flat_rows[:, None], cols[None, :])
        x = plgpu.load(x_ref.at[index], mask=mask, other=0.0).astype(jnp.float32)
        g = plgpu.load(g_ref.at[index], mask=mask, other=0.0).astype(jnp.float32)
        mean = plgpu.load(mean_ref.at[flat_rows], mask=row_ok, other=0.0)
        rstd = plgpu.load(rstd_ref.at[flat_rows], mask=row_ok, other=0.0)
        xhat = (x - mean[:, None]) * rstd[:, None]     # 0 on masked rows (rstd 0), g is 0 off C
        ga = g * one_plus_scale[None, :]
        # dx = rstd * (g a - mean_C(g a) - xhat * mean_C(g a xhat)), a = 1 + scale (ops.py).
        mean_ga = jnp.sum(ga, axis=1) / channels
        mean_ga_xhat = jnp.sum(ga * xhat, axis=1) / channels
        dx = rstd[:, None] * (ga - mean_ga[:, None] - xhat * mean_ga_xhat[:, None])
        plgpu.store(dx_ref.at[index], dx.astype(dx_ref.dtype), mask=mask)
        d_shift, d_scale = sums
        return d_shift + jnp.sum(g, axis=0), d_scale + jnp.sum(g * xhat, axis=0)

    zeros = jnp.zeros((padded,), jnp.float32)
    d_shift, d_scale = jax.lax.fori_loop(0, blocks_per_program, body, (zeros, zeros))
    cols = jnp.arange(padded)
    out = (example * splits + split) * channels + cols
    plgpu.store(d_shift_ref.at[out], d_shift, mask=cols < channels)
    plgpu.store(d_scale_ref.at[out], d_scale, mask=cols < channels)


def _call(kernel, grid, out_shape, interpret, name, padded):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    warps = 4 if padded <= 1024 else 8
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, interpret=interpret, name=name,
                          compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1))


def _forward(x, shift, scale, epsilon, interpret):
    """x [B, T, C], shift/scale [B, C] -> y [B, T, C] (x.dtype), mean and rstd [B * T] float32."""
    B, T, C = x.shape
    padded, block_rows, _ = _tiling(B, T, C)
    kernel = functools.partial(_forward_kernel, tokens=T, channels=C, padded=padded,
                               block_rows=block_rows, epsilon=epsilon)
    rows = jax.ShapeDtypeStruct((B * T,), jnp.float32)
    y, mean, rstd = _call(kernel, (B, math.ceil(T / block_rows)),
                          (jax.ShapeDtypeStruct((B * T, C), x.dtype), rows, rows),
                          interpret, "adaptive_layer_norm_forward", padded)(
        x.reshape(B * T, C), shift.reshape(B * C), scale.reshape(B * C))
    return y.reshape(B, T, C), mean, rstd


def _backward(x, g, scale, mean, rstd, interpret):
    """-> dx [B, T, C] (x.dtype), d_shift and d_scale [B, C] float32."""
    B, T, C = x.shape
    padded, block_rows, splits = _tiling(B, T, C)
    blocks_per_program = math.ceil(math.ceil(T / block_rows) / splits)
    kernel = functools.partial(_backward_kernel, tokens=T, channels=C, padded=padded, block_rows=block_rows,
                               blocks_per_program=blocks_per_program, splits=splits)
    partial_sums = jax.ShapeDtypeStruct((B * splits * C,), jnp.float32)
    dx, d_shift, d_scale = _call(kernel, (B, splits),
                                 (jax.ShapeDtypeStruct((B * T, C), x.dtype), partial_sums, partial_sums),
                                 interpret, "adaptive_layer_norm_backward", padded)(
        x.reshape(B * T, C), g.reshape(B * T, C), scale.reshape(B * C), mean, rstd)
    per_example = lambda v: v.reshape(B, splits, C).sum(axis=1)
    return dx.reshape(B, T, C), per_example(d_shift), per_example(d_scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _adaptive_layer_norm(x, shift, scale, epsilon, interpret):
    return _forward(x, shift, scale, epsilon, interpret)[0]


def _adaptive_layer_norm_fwd(x, shift, scale, epsilon, interpret):
    y, mean, rstd = _forward(x, shift, scale, epsilon, interpret)
    return y, (x, shift, scale, mean, rstd)


def _adaptive_layer_norm_bwd(epsilon, interpret, residuals, g):
    x, shift, scale, mean, rstd = residuals
    dx, d_shift, d_scale = _backward(x, g, scale, mean, rstd, interpret)
    return dx, d_shift.astype(shift.dtype), d_scale.astype(scale.dtype)


_adaptive_layer_norm.defvjp(_adaptive_layer_norm_fwd, _adaptive_layer_norm_bwd)


def adaptive_layer_norm(x, shift, scale, epsilon: float = 1e-6, interpret: bool = False):
    """LayerNorm(x) * (1 + scale) + shift for x [B, ..., C], shift and scale [B, C]; x.dtype out.

    The Pallas version of `ops.adaptive_layer_norm` (same value, same gradient): runs on an
    NVIDIA GPU, or anywhere with `interpret=True` (slow: for tests).
    """
    B, C = x.shape[0], x.shape[-1]
    if shift.shape != (B, C) or scale.shape != (B, C):
        raise ValueError(f"shift {shift.shape} and scale {scale.shape} must be [B, C] = {(B, C)} for x {x.shape}")
    y = _adaptive_layer_norm(x.reshape(B, -1, C), shift, scale, float(epsilon), bool(interpret))
    return y.reshape(x.shape)
