"""Pallas (Triton) kernels for the memory-bound ops of `ops.py`: DiT's adaLN LayerNorm and the
U-Net's GroupNorm (+ SiLU), each forward and backward reading the activations from memory once,
and the backward pass of a bias add + activation (the DiT MLP's bias + GELU) with the bias's
gradient summed in the same pass.

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

`group_norm(x, num_groups, scale, bias, epsilon, silu)` computes `ops.group_norm` (statistics
over each group's channels and all positions, variance as E[x^2] - E[x]^2, per-example affine,
optional SiLU) with its residuals (x and the per-channel copies of the group statistics).
Program (b, p) of the grid (B, P) owns a block of whole groups of example b, a slab
[S, channels of the block] of x [B, S, C], and makes two passes over it: the statistics
(forward) or the gradient sums (backward) per channel, pooled per group in registers, then the
output. The slab is a few tens of kilobytes, so the second pass reads it from L2 rather than
memory, where XLA's reduction and elementwise fusions read x (and g) from memory twice. No
cross-program sums: a block holds whole groups, and d_scale, d_bias are per channel.

`bias_activation(h, bias, value_fn, slope_fn)` is value_fn(h + bias) for a matrix product's
output h [..., N], computed by XLA (an elementwise fusion); its backward kernel reads h and g
once, writes dh = g * slope_fn(h + bias) and sums dh over the rows for the bias, a [S, N]
float32 partial sum per group of rows summed by XLA (deterministic, like the adaLN's).

The kernels run on NVIDIA GPUs through Pallas' Triton backend; `interpret=True` runs the same
kernel body with Pallas' interpreter on any backend (the tests compare it with float64
formulas on the CPU). `ops.adaptive_layer_norm`, `ops.group_norm` and `ops.bias_gelu_tanh`
choose between these and XLA's (`impl=`, `ops.resolve_ops_impl`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from diffusion_jax.errors import UsageError

_TILE_ELEMENTS = 4096       # elements of a [block_rows, C_pad] tile: 32 float32 a thread at 4 warps
_MIN_PROGRAMS = 1024        # backward grid size to aim for (an H100 has 132 SMs)
_GROUP_BLOCK_CHANNELS = 32  # channels a GroupNorm program aims for (64 bytes of a bfloat16 row)


def available() -> bool:
    """Whether this jax ships the Pallas Triton API the kernels use (masked loads, pl.loop)."""
    try:
        from jax.experimental import pallas as pl
        from jax.experimental.pallas import triton as plgpu
    except ImportError:
        return False
    return all(hasattr(plgpu, name) for name in ("load", "store", "CompilerParams")) and hasattr(pl, "loop")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tiling(num_examples: int, tokens: int, channels: int) -> tuple[int, int, int]:
    """(padded channels, rows a tile, programs per example) for x [B, T, C]."""
    padded = _next_pow2(channels)
    block_rows = min(max(1, _TILE_ELEMENTS // padded), _next_pow2(tokens))
    blocks = math.ceil(tokens / block_rows)
    splits = min(blocks, max(1, math.ceil(_MIN_PROGRAMS / num_examples)))
    return padded, block_rows, splits


def _row_tile(first, block_rows, num_rows, offset, cols, col_ok):
    """`block_rows` rows from row `first` of `num_rows` (a 2-D view's rows `offset` + row) over
    the columns `cols` [C_pad]: (the tile's index for `ref.at`, the rows' view indices, the row
    mask [R], the tile mask [R, C_pad])."""
    rows = first + jnp.arange(block_rows)
    row_ok = rows < num_rows
    flat = offset + rows
    return (flat[:, None], cols[None, :]), flat, row_ok, row_ok[:, None] & col_ok[None, :]


def _load_f32(ref, index, mask):
    """ref[index] in float32, 0 where `mask` is False."""
    from jax.experimental.pallas import triton as plgpu
    return plgpu.load(ref.at[index], mask=mask, other=0.0).astype(jnp.float32)


def _forward_kernel(x_ref, shift_ref, scale_ref, y_ref, mean_ref, rstd_ref, *,
                    tokens, channels, padded, block_rows, epsilon):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    example, block = pl.program_id(0), pl.program_id(1)
    cols = jnp.arange(padded)
    col_ok = cols < channels
    index, flat_rows, row_ok, mask = _row_tile(block * block_rows, block_rows, tokens, example * tokens, cols, col_ok)
    x = _load_f32(x_ref, index, mask)
    mean = jnp.sum(x, axis=1) / channels
    var = jnp.maximum(jnp.sum(x * x, axis=1) / channels - mean * mean, 0.0)
    rstd = jax.lax.rsqrt(var + epsilon)
    shift = _load_f32(shift_ref, example * channels + cols, col_ok)
    scale = _load_f32(scale_ref, example * channels + cols, col_ok)
    y = (x - mean[:, None]) * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    plgpu.store(y_ref.at[index], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref.at[flat_rows], mean, mask=row_ok)
    plgpu.store(rstd_ref.at[flat_rows], rstd, mask=row_ok)


def _backward_kernel(x_ref, g_ref, scale_ref, mean_ref, rstd_ref, dx_ref, d_shift_ref, d_scale_ref, *,
                     tokens, channels, padded, block_rows, blocks_per_program, splits):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    example, split = pl.program_id(0), pl.program_id(1)
    cols = jnp.arange(padded)
    col_ok = cols < channels
    one_plus_scale = 1.0 + _load_f32(scale_ref, example * channels + cols, col_ok)

    def body(i, sums):
        first = (split * blocks_per_program + i) * block_rows
        index, flat_rows, row_ok, mask = _row_tile(first, block_rows, tokens, example * tokens, cols, col_ok)
        x = _load_f32(x_ref, index, mask)
        g = _load_f32(g_ref, index, mask)
        mean = _load_f32(mean_ref, flat_rows, row_ok)
        rstd = _load_f32(rstd_ref, flat_rows, row_ok)
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
    out = (example * splits + split) * channels + cols
    plgpu.store(d_shift_ref.at[out], d_shift, mask=col_ok)
    plgpu.store(d_scale_ref.at[out], d_scale, mask=col_ok)


def _call(kernel, grid, out_shape, interpret, name, padded):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    warps = 4 if padded <= 1024 else 8
    return pl.pallas_call(kernel, grid=grid, out_shape=out_shape, interpret=interpret, name=name,
                          compiler_params=plgpu.CompilerParams(num_warps=warps))


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
        raise UsageError(f"shift {shift.shape} and scale {scale.shape} must be [B, C] = {(B, C)} for x {x.shape}")
    y = _adaptive_layer_norm(x.reshape(B, -1, C), shift, scale, float(epsilon), bool(interpret))
    return y.reshape(x.shape)


def _group_tiling(positions: int, channels: int, num_groups: int) -> tuple[int, int, int, int]:
    """(groups a program, its padded channels, rows a tile, programs per example)."""
    group_size = channels // num_groups
    groups = max(1, min(num_groups, _GROUP_BLOCK_CHANNELS // group_size))
    padded = _next_pow2(groups * group_size)
    block_rows = min(max(1, _TILE_ELEMENTS // padded), _next_pow2(positions))
    return groups, padded, block_rows, math.ceil(num_groups / groups)


def _group_slab(example, program, positions, channels, group_size, groups, padded):
    """The block's channel indices (global, [C_pad]), their validity and the group-pooling
    matrix [C_pad, C_pad] (1 where two valid channels share a group)."""
    local = jnp.arange(padded)
    cols = program * groups * group_size + local
    valid = (local < groups * group_size) & (cols < channels)
    same = jax.lax.div(local[:, None], group_size) == jax.lax.div(local[None, :], group_size)
    pool = same & valid[:, None] & valid[None, :]
    return cols, valid, pool


def _pool(pool, per_channel, count):
    """Per-channel sums [C_pad] -> each channel's group mean (sum over the group / count)."""
    return jnp.sum(jnp.where(pool, per_channel[None, :], 0.0), axis=1) / count


def _silu_and_slope(z):
    """SiLU(z) and its derivative sigmoid(z) (1 + z (1 - sigmoid(z)))."""
    sig = 1.0 / (1.0 + jnp.exp(-z))
    return z * sig, sig * (1.0 + z * (1.0 - sig))


def _group_forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, positions, channels,
                          group_size, groups, padded, block_rows, epsilon, silu):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    example, program = pl.program_id(0), pl.program_id(1)
    cols, valid, pool = _group_slab(example, program, positions, channels, group_size, groups, padded)
    tiles = pl.cdiv(positions, block_rows)

    tile = lambda i: _row_tile(i * block_rows, block_rows, positions, example * positions, cols, valid)

    def moments(i, sums):
        index, _, _, mask = tile(i)
        x = _load_f32(x_ref, index, mask)
        return sums[0] + jnp.sum(x, axis=0), sums[1] + jnp.sum(x * x, axis=0)

    zeros = jnp.zeros((padded,), jnp.float32)
    total, total_sq = jax.lax.fori_loop(0, tiles, moments, (zeros, zeros))
    count = positions * group_size
    mean = _pool(pool, total, count)
    rstd = jax.lax.rsqrt(jnp.maximum(_pool(pool, total_sq, count) - mean * mean, 0.0) + epsilon)
    flat = example * channels + cols
    a, b = _load_f32(scale_ref, flat, valid), _load_f32(bias_ref, flat, valid)

    @pl.loop(0, tiles)
    def _(i):
        index, _, _, mask = tile(i)
        z = (_load_f32(x_ref, index, mask) - mean[None, :]) * (rstd * a)[None, :] + b[None, :]
        y = _silu_and_slope(z)[0] if silu else z
        plgpu.store(y_ref.at[index], y.astype(y_ref.dtype), mask=mask)

    plgpu.store(mean_ref.at[flat], mean, mask=valid)
    plgpu.store(rstd_ref.at[flat], rstd, mask=valid)


def _group_backward_kernel(x_ref, g_ref, scale_ref, bias_ref, mean_ref, rstd_ref, dx_ref, d_scale_ref, d_bias_ref, *,
                           positions, channels, group_size, groups, padded, block_rows, silu):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    example, program = pl.program_id(0), pl.program_id(1)
    cols, valid, pool = _group_slab(example, program, positions, channels, group_size, groups, padded)
    tiles = pl.cdiv(positions, block_rows)
    flat = example * channels + cols
    a, b = _load_f32(scale_ref, flat, valid), _load_f32(bias_ref, flat, valid)
    mean, rstd = _load_f32(mean_ref, flat, valid), _load_f32(rstd_ref, flat, valid)

    def xhat_and_dz(i):
        index, _, _, mask = _row_tile(i * block_rows, block_rows, positions, example * positions, cols, valid)
        xhat = (_load_f32(x_ref, index, mask) - mean[None, :]) * rstd[None, :]
        dz = _load_f32(g_ref, index, mask)
        if silu:
            dz = dz * _silu_and_slope(xhat * a[None, :] + b[None, :])[1]
        return index, mask, xhat, dz

    def sums(i, acc):
        _, _, xhat, dz = xhat_and_dz(i)
        return acc[0] + jnp.sum(dz * xhat, axis=0), acc[1] + jnp.sum(dz, axis=0)

    zeros = jnp.zeros((padded,), jnp.float32)
    d_a, d_b = jax.lax.fori_loop(0, tiles, sums, (zeros, zeros))
    # dx = rstd (dz a - mean_g(dz a) - xhat mean_g(dz a xhat)), means over the group's channels
    # and positions: the per-channel sums a d_b and a d_a pooled (ops.py).
    count = positions * group_size
    mean_dxhat, mean_dxhat_xhat = _pool(pool, a * d_b, count), _pool(pool, a * d_a, count)

    @pl.loop(0, tiles)
    def _(i):
        index, mask, xhat, dz = xhat_and_dz(i)
        dx = rstd[None, :] * (dz * a[None, :] - mean_dxhat[None, :] - xhat * mean_dxhat_xhat[None, :])
        plgpu.store(dx_ref.at[index], dx.astype(dx_ref.dtype), mask=mask)

    plgpu.store(d_scale_ref.at[flat], d_a, mask=valid)
    plgpu.store(d_bias_ref.at[flat], d_b, mask=valid)


def _group_call(kernel, x, num_groups, out_shape, interpret, name, **static):
    B, S, C = x.shape
    groups, padded, block_rows, programs = _group_tiling(S, C, num_groups)
    kernel = functools.partial(kernel, positions=S, channels=C, group_size=C // num_groups, groups=groups,
                               padded=padded, block_rows=block_rows, **static)
    return _call(kernel, (B, programs), out_shape, interpret, name, padded)


def _group_forward(x, scale, bias, num_groups, epsilon, silu, interpret):
    """x [B, S, C], scale/bias [B, C] float32 -> y (x.dtype), mean and rstd [B, C] float32 (each
    channel's group statistics)."""
    B, S, C = x.shape
    per_channel = jax.ShapeDtypeStruct((B * C,), jnp.float32)
    y, mean, rstd = _group_call(_group_forward_kernel, x, num_groups,
                                (jax.ShapeDtypeStruct((B * S, C), x.dtype), per_channel, per_channel),
                                interpret, "group_norm_forward", epsilon=epsilon, silu=silu)(
        x.reshape(B * S, C), scale.reshape(B * C), bias.reshape(B * C))
    return y.reshape(B, S, C), mean.reshape(B, C), rstd.reshape(B, C)


def _group_backward(x, g, scale, bias, mean, rstd, num_groups, silu, interpret):
    """-> dx [B, S, C] (x.dtype), d_scale and d_bias [B, C] float32."""
    B, S, C = x.shape
    per_channel = jax.ShapeDtypeStruct((B * C,), jnp.float32)
    dx, d_scale, d_bias = _group_call(_group_backward_kernel, x, num_groups,
                                      (jax.ShapeDtypeStruct((B * S, C), x.dtype), per_channel, per_channel),
                                      interpret, "group_norm_backward", silu=silu)(
        x.reshape(B * S, C), g.reshape(B * S, C), scale.reshape(B * C), bias.reshape(B * C),
        mean.reshape(B * C), rstd.reshape(B * C))
    return dx.reshape(B, S, C), d_scale.reshape(B, C), d_bias.reshape(B, C)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _group_norm(x, scale, bias, num_groups, epsilon, silu, interpret):
    return _group_forward(x, scale, bias, num_groups, epsilon, silu, interpret)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, silu, interpret):
    y, mean, rstd = _group_forward(x, scale, bias, num_groups, epsilon, silu, interpret)
    return y, (x, scale, bias, mean, rstd)


def _group_norm_bwd(num_groups, epsilon, silu, interpret, residuals, g):
    x, scale, bias, mean, rstd = residuals
    return _group_backward(x, g, scale, bias, mean, rstd, num_groups, silu, interpret)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x, num_groups: int, scale, bias, epsilon: float = 1e-6, silu: bool = False,
               interpret: bool = False):
    """GroupNorm (+ SiLU) of x [B, ..., C] with per-example affine scale, bias [B, C] (float32);
    returns x.dtype. The Pallas version of `ops.group_norm` (same value and gradient; the
    caller broadcasts a [C] affine and reduces its gradient): runs on an NVIDIA GPU, or anywhere
    with `interpret=True` (slow: for tests)."""
    B, C = x.shape[0], x.shape[-1]
    if C % num_groups:
        raise UsageError(f"channels {C} are not divisible by the GroupNorm groups {num_groups}")
    if scale.shape != (B, C) or bias.shape != (B, C):
        raise UsageError(f"scale {scale.shape} and bias {bias.shape} must be [B, C] = {(B, C)} for x {x.shape}")
    y = _group_norm(x.reshape(B, -1, C), scale.astype(jnp.float32), bias.astype(jnp.float32), int(num_groups),
                    float(epsilon), bool(silu), bool(interpret))
    return y.reshape(x.shape)


_BIAS_BLOCK_COLUMNS = 256   # columns a bias + activation backward program owns


def _bias_tiling(rows: int, columns: int) -> tuple[int, int, int, int]:
    """(columns a program, rows a tile, column blocks, row groups) for h [rows, columns]."""
    block_cols = min(_BIAS_BLOCK_COLUMNS, _next_pow2(columns))
    block_rows = min(max(1, _TILE_ELEMENTS // block_cols), _next_pow2(rows))
    column_blocks = math.ceil(columns / block_cols)
    splits = min(math.ceil(rows / block_rows), max(1, math.ceil(_MIN_PROGRAMS / column_blocks)))
    return block_cols, block_rows, column_blocks, splits


def _bias_activation_backward_kernel(h_ref, bias_ref, g_ref, dh_ref, d_bias_ref, *, rows, columns, block_rows,
                                     block_cols, tiles_per_program, slope_fn):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    split, column_block = pl.program_id(0), pl.program_id(1)
    cols = column_block * block_cols + jnp.arange(block_cols)
    col_ok = cols < columns
    bias = plgpu.load(bias_ref.at[cols], mask=col_ok, other=0.0)

    def body(i, d_bias):
        index, _, _, mask = _row_tile((split * tiles_per_program + i) * block_rows, block_rows, rows, 0, cols, col_ok)
        h = plgpu.load(h_ref.at[index], mask=mask, other=0.0)   # h.dtype: the add rounds as the forward's
        g = _load_f32(g_ref, index, mask)
        u = (h + bias[None, :]).astype(jnp.float32)
        dh = (g * slope_fn(u)).astype(dh_ref.dtype)       # 0 where masked: g is 0 there
        plgpu.store(dh_ref.at[index], dh, mask=mask)
        return d_bias + jnp.sum(dh.astype(jnp.float32), axis=0)

    d_bias = jax.lax.fori_loop(0, tiles_per_program, body, jnp.zeros((block_cols,), jnp.float32))
    plgpu.store(d_bias_ref.at[split * columns + cols], d_bias, mask=col_ok)


def _bias_activation_backward(h, bias, g, slope_fn, interpret):
    """h, g [R, N] and bias [N] (h.dtype) -> dh [R, N] (h.dtype), d_bias [N] float32."""
    R, N = h.shape
    block_cols, block_rows, column_blocks, splits = _bias_tiling(R, N)
    tiles_per_program = math.ceil(math.ceil(R / block_rows) / splits)
    kernel = functools.partial(_bias_activation_backward_kernel, rows=R, columns=N, block_rows=block_rows,
                               block_cols=block_cols, tiles_per_program=tiles_per_program, slope_fn=slope_fn)
    dh, d_bias = _call(kernel, (splits, column_blocks),
                       (jax.ShapeDtypeStruct((R, N), h.dtype), jax.ShapeDtypeStruct((splits * N,), jnp.float32)),
                       interpret, "bias_activation_backward", block_cols)(h, bias, g)
    return dh, d_bias.reshape(splits, N).sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _bias_activation(h, bias, value_fn, slope_fn, interpret):
    return value_fn(h + bias.astype(h.dtype))


def _bias_activation_fwd(h, bias, value_fn, slope_fn, interpret):
    return _bias_activation(h, bias, value_fn, slope_fn, interpret), (h, bias)


def _bias_activation_bwd(value_fn, slope_fn, interpret, residuals, g):
    h, bias = residuals
    N = h.shape[-1]
    dh, d_bias = _bias_activation_backward(h.reshape(-1, N), bias.astype(h.dtype), g.reshape(-1, N), slope_fn,
                                           interpret)
    return dh.reshape(h.shape), d_bias.astype(bias.dtype)


_bias_activation.defvjp(_bias_activation_fwd, _bias_activation_bwd)


def bias_activation(h, bias, value_fn, slope_fn, interpret: bool = False):
    """value_fn(h + bias) for h [..., N] and bias [N] (the add rounded to h.dtype), whose
    backward pass is one Pallas kernel: dh = g * slope_fn(h + bias) in h.dtype and the bias's
    gradient (dh summed over the leading axes, float32). value_fn maps an h.dtype array to
    h.dtype; slope_fn a float32 array to float32 (traced inside the kernel). Runs on an NVIDIA
    GPU, or anywhere with `interpret=True` (slow: for tests)."""
    if bias.shape != h.shape[-1:]:
        raise UsageError(f"bias {bias.shape} must be [N] = {h.shape[-1:]} for h {h.shape}")
    return _bias_activation(h, bias, value_fn, slope_fn, bool(interpret))
