"""The transformer a text-conditioned U-Net puts at its attention levels (diffusers'
`Transformer2DModel` with `BasicTransformerBlock`s, Stable Diffusion 1.x / 2.x):

  GroupNorm -> proj_in (1x1 conv, or a linear layer on the tokens: `linear_projection`) ->
  `depth` blocks of [LayerNorm, self-attention] + [LayerNorm, cross-attention to the context]
  + [LayerNorm, GEGLU feed-forward], each residual -> proj_out -> + the input.

Shapes: x [B, H, W, C] (C = heads x head size), context [B, L, D] (text embeddings),
context_mask [B, L] (1 = a token, 0 = padding) or None. q, k, v have no bias, the output
projection has one (diffusers' Attention with bias=False).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import GroupNorm32

Dtype = Any


class Attention(nn.Module):
    """Multi-head attention of the tokens x [B, N, C] to `context` [B, L, D] (x itself when None);
    `mask` [B, L] hides padding keys."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, mask=None):
        B, N, C = x.shape
        context = x if context is None else context.astype(self.dtype)
        heads = (self.num_heads, C // self.num_heads)
        project = lambda name, bias=False: nn.Dense(C, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
                                                    name=name)
        q = project("to_q")(x).reshape(B, N, *heads)
        k = project("to_k")(context).reshape(B, context.shape[1], *heads)
        v = project("to_v")(context).reshape(B, context.shape[1], *heads)
        if mask is not None:
            mask = (jnp.asarray(mask) > 0)[:, None, None, :]
        h = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return project("to_out", bias=True)(h.reshape(B, N, C))


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward (4x)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, context_mask=None):
        C = x.shape[-1]
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        attn = lambda name: Attention(self.num_heads, self.dtype, self.param_dtype, name=name)
        x = x + attn("attn1")(norm("norm1")(x))
        x = x + attn("attn2")(norm("norm2")(x), context, context_mask)
        hidden, gate = jnp.split(nn.Dense(8 * C, dtype=self.dtype, param_dtype=self.param_dtype,
                                          name="ff_proj")(norm("norm3")(x)), 2, axis=-1)
        return x + nn.Dense(C, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="ff_out")(hidden * jax.nn.gelu(gate, approximate=False))


class SpatialTransformer(nn.Module):
    num_heads: int
    depth: int = 1
    linear_projection: bool = False
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ops_impl: Optional[str] = None
    autodiff_ops: bool = False  # True: JAX's autodiff instead of the GroupNorm's hand-written gradient

    @nn.compact
    def __call__(self, x, context, context_mask=None):
        B, H, W, C = x.shape
        h = GroupNorm32(self.num_groups, 1e-6, param_dtype=self.param_dtype, autodiff=self.autodiff_ops,
                        impl=self.ops_impl, name="norm")(x)
        if self.linear_projection:
            project = lambda name: nn.Dense(C, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
            h = project("proj_in")(h.reshape(B, H * W, C))
        else:
            project = lambda name: nn.Conv(C, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name=name)
            h = project("proj_in")(h).reshape(B, H * W, C)
        for i in range(self.depth):
            h = TransformerBlock(self.num_heads, self.dtype, self.param_dtype, name=f"block{i}")(h, context,
                                                                                             context_mask)
        h = project("proj_out")(h) if self.linear_projection else project("proj_out")(h.reshape(B, H, W, C))
        return x + h.reshape(B, H, W, C)
