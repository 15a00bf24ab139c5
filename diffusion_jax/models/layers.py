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


class Float32Norm(nn.Module):
    """GroupNorm (num_groups > 0) or LayerNorm (num_groups == 0) computed in float32, output
    cast back to the input dtype; `use_scale_bias=False` gives the affine-free LayerNorm of DiT."""

    num_groups: int = 32
    epsilon: float = 1e-6
    use_scale_bias: bool = True
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        kw = dict(epsilon=self.epsilon, dtype=jnp.float32, param_dtype=self.param_dtype,
                  use_scale=self.use_scale_bias, use_bias=self.use_scale_bias)
        if self.num_groups:
            if x.shape[-1] % self.num_groups:
                raise ValueError(f"channels {x.shape[-1]} are not divisible by the GroupNorm "
                                 f"groups {self.num_groups}: change the channel width or num_groups")
            y = nn.GroupNorm(num_groups=self.num_groups, **kw)(x)
        else:
            y = nn.LayerNorm(**kw)(x)
        return y.astype(dtype)


def dot_product_attention(q, k, v, implementation: Optional[str] = None):
    """softmax(q k^T / sqrt(d)) v for [B, L, heads, d] through `jax.nn.dot_product_attention`
    (cuDNN's fused flash kernel on GPU with implementation='cudnn'; XLA elsewhere)."""
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class MultiHeadSelfAttention(nn.Module):
    """Self-attention over tokens [B, L, C] with a fused qkv projection and an output projection.

    `zero_init_out` zero-initialises the output projection (the DDPM U-Net's proj_out).
    """

    num_heads: int
    zero_init_out: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        B, L, C = x.shape
        if C % self.num_heads:
            raise ValueError(f"width {C} is not divisible by num_heads {self.num_heads}")
        qkv = nn.Dense(3 * C, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(B, L, 3, self.num_heads, C // self.num_heads), 3, axis=2)
        h = dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.attention_impl)
        init = nn.initializers.zeros if self.zero_init_out else nn.linear.default_kernel_init
        return nn.Dense(C, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init,
                        name="proj")(h.reshape(B, L, C))
