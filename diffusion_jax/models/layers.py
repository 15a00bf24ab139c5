"""Layers shared by the backbones: timestep embeddings, attention, float32 normalisation."""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def timestep_embedding(t, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """Sinusoidal embedding [B, dim] of (integer or real) timesteps t [B], in float32.

    Frequencies exp(-log(max_period) * i / half) for i < half, as [cos, sin] (improved-diffusion
    and DiT order); an odd `dim` gets one zero column.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def group_norm(x, num_groups: int, scale=None, bias=None, epsilon: float = 1e-6):
    """GroupNorm of x [B, ..., C] in float32: each example's C channels are split into
    `num_groups` groups and normalised over the group's channels and all spatial positions,
    then scaled and shifted per channel (scale, bias [C] or None). Returns float32.

    The moments are taken per channel over space first ([B, ..., C] -> [B, C], a reduction
    whose kept axis is the contiguous one) and then pooled within each group; this equals the
    direct reduction over (space, C / G) and avoids XLA's slow reduction with a kept axis
    between reduced ones. Variance is E[x^2] - E[x]^2 in float32, as flax's fast variance.
    """
    B, C = x.shape[0], x.shape[-1]
    if C % num_groups:
        raise ValueError(f"channels {C} are not divisible by the GroupNorm groups {num_groups}: "
                         "change the channel width or num_groups")
    xf = x.astype(jnp.float32)
    space = tuple(range(1, x.ndim - 1))
    mean_c, sq_mean_c = jnp.mean(xf, axis=space), jnp.mean(jnp.square(xf), axis=space)  # [B, C]
    mean = mean_c.reshape(B, num_groups, -1).mean(-1)                                   # [B, G]
    var = jnp.maximum(sq_mean_c.reshape(B, num_groups, -1).mean(-1) - jnp.square(mean), 0.0)
    per_channel = lambda g: jnp.repeat(g, C // num_groups, axis=-1)                     # [B, C]
    a = per_channel(jax.lax.rsqrt(var + epsilon))
    if scale is not None:
        a = a * scale.astype(jnp.float32)
    b = -per_channel(mean) * a
    if bias is not None:
        b = b + bias.astype(jnp.float32)
    shape = (B,) + (1,) * (x.ndim - 2) + (C,)
    return xf * a.reshape(shape) + b.reshape(shape)


class Float32Norm(nn.Module):
    """GroupNorm (num_groups > 0, see `group_norm`) or LayerNorm (num_groups == 0) computed in
    float32, output cast back to the input dtype; `use_scale_bias=False` gives the affine-free
    LayerNorm of DiT."""

    num_groups: int = 32
    epsilon: float = 1e-6
    use_scale_bias: bool = True
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dtype = x.dtype
        if self.num_groups:
            scale = bias = None
            if self.use_scale_bias:
                scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
                bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
            y = group_norm(x, self.num_groups, scale, bias, self.epsilon)
        else:
            y = nn.LayerNorm(epsilon=self.epsilon, dtype=jnp.float32, param_dtype=self.param_dtype,
                             use_scale=self.use_scale_bias, use_bias=self.use_scale_bias)(x.astype(jnp.float32))
        return y.astype(dtype)


def resolve_attention_impl(implementation: Optional[str], dtype, head_dim: int,
                           backend: Optional[str] = None) -> str:
    """The attention kernel to use: "xla", or "cudnn" (cuDNN's fused flash attention).

    None or "auto" picks "cudnn" on a GPU for bfloat16 / float16 inputs whose head size the
    kernel supports (a multiple of 8, at most 128) and "xla" everywhere else; "xla" and
    "cudnn" are used as given.
    """
    if implementation not in (None, "auto", "xla", "cudnn"):
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         "choose 'auto', 'xla' or 'cudnn'")
    if implementation in ("xla", "cudnn"):
        return implementation
    backend = backend or jax.default_backend()
    fused_ok = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    fused_ok = fused_ok and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if backend in ("gpu", "cuda") and fused_ok else "xla"


def dot_product_attention(q, k, v, implementation: Optional[str] = None):
    """softmax(q k^T / sqrt(d)) v for q, k, v [B, L, heads, d] through
    `jax.nn.dot_product_attention`, with the kernel `resolve_attention_impl` picks."""
    impl = resolve_attention_impl(implementation, q.dtype, q.shape[-1])
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


class MultiHeadSelfAttention(nn.Module):
    """Self-attention over tokens [B, L, C]: q, k, v projections, attention, output projection.

    `fused_qkv` computes q, k and v with one [C, 3C] matrix product ("qkv"); False uses three
    [C, C] ones ("q", "k", "v"): the same function and parameter count, and outputs already in
    the [B, L, heads, d] layout a fused attention kernel reads, where the fused product needs a
    copy to split them (and one to join their gradients). `zero_init_out` zero-initialises the
    output projection (the DDPM U-Net's proj_out).
    """

    num_heads: int
    zero_init_out: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None  # None / "auto", "xla" or "cudnn"
    fused_qkv: bool = True

    @nn.compact
    def __call__(self, x):
        B, L, C = x.shape
        if C % self.num_heads:
            raise ValueError(f"width {C} is not divisible by num_heads {self.num_heads}")
        heads = (self.num_heads, C // self.num_heads)
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.fused_qkv:
            qkv = dense(3 * C, "qkv")(x).reshape(B, L, 3, *heads)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q, k, v = (dense(C, name)(x).reshape(B, L, *heads) for name in ("q", "k", "v"))
        h = dot_product_attention(q, k, v, self.attention_impl)
        init = nn.initializers.zeros if self.zero_init_out else nn.linear.default_kernel_init
        return nn.Dense(C, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init,
                        name="proj")(h.reshape(B, L, C))
