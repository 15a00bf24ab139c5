"""Layers shared by the backbones: timestep embeddings, attention, float32 GroupNorm, a Dense
layer with its GELU."""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.errors import UsageError
from diffusion_jax.models.ops import bias_gelu_tanh, group_norm

Dtype = Any


def timestep_embedding(t, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0) -> jnp.ndarray:
    """Sinusoidal embedding [B, dim] of (integer or real) timesteps t [B], in float32.

    Frequencies exp(-log(max_period) * i / (half - freq_shift)) for i < half, as [cos, sin]
    (`flip_sin_to_cos`, the improved-diffusion and DiT order) or [sin, cos]; an odd `dim` gets
    one zero column. The defaults are this library's presets; DDPM's original embedding (and
    diffusers' `google/ddpm-*` configs) is flip_sin_to_cos=False, freq_shift=1, diffusers' DiT
    flip_sin_to_cos=True, freq_shift=1.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    pair = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(pair, axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class GroupNorm32(nn.Module):
    """GroupNorm with learned per-channel scale and bias, computed in float32 and returned in
    the input's dtype (`ops.group_norm`); `silu=True` applies SiLU in the same op.

    `scale_shift` = (s, b), each [B, C], modulates per example: GroupNorm(x) (1 + s) + b (ADM's
    scale-shift norm), folded into the op's affine parameters.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    silu: bool = False
    param_dtype: Dtype = jnp.float32
    autodiff: bool = False  # True: JAX's autodiff instead of the hand-written gradient
    impl: Optional[str] = None  # "auto", "xla" or "pallas" (ops.resolve_ops_impl)

    @nn.compact
    def __call__(self, x, scale_shift=None):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        if scale_shift is not None:
            s, b = (v.astype(jnp.float32) for v in scale_shift)
            scale, bias = scale * (1 + s), bias * (1 + s) + b
        return group_norm(x, self.num_groups, scale, bias, self.epsilon, silu=self.silu, autodiff=self.autodiff,
                          impl=self.impl)


class DenseGELU(nn.Dense):
    """gelu_tanh(x kernel + bias): nn.Dense (its fields, parameters, initialisation and matrix
    product) followed by the tanh-GELU, with the bias add and the GELU one op
    (`ops.bias_gelu_tanh`, which keeps the product rather than product + bias for the
    backward pass and sums the bias's gradient in the same pass as the GELU's)."""

    autodiff: bool = False  # True: JAX's autodiff instead of the hand-written gradient
    impl: Optional[str] = None  # "auto", "xla" or "pallas" (ops.resolve_ops_impl)

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        h = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return bias_gelu_tanh(h, bias, autodiff=self.autodiff, impl=self.impl)


def resolve_attention_impl(implementation: Optional[str], dtype, head_dim: int,
                           backend: Optional[str] = None) -> str:
    """The attention kernel to use: "xla", or "cudnn" (cuDNN's fused flash attention).

    None or "auto" picks "cudnn" on a GPU for bfloat16 / float16 inputs whose head size the
    kernel supports (a multiple of 8, at most 128) and "xla" everywhere else; "xla" and
    "cudnn" are used as given.
    """
    if implementation not in (None, "auto", "xla", "cudnn"):
        raise UsageError(f"unknown attention implementation {implementation!r}; "
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
            raise UsageError(f"width {C} is not divisible by num_heads {self.num_heads}")
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


def embed_labels(y, batch: int, num_classes: int, features: int, param_dtype, name: str):
    """The class embedding float32 [batch, features] of labels y [batch] (cast to int32; None: the
    null class, index num_classes, which classifier-free guidance also uses). Called inside a
    module's compact method: the table is that module's nn.Embed `name`, num_classes + 1 rows."""
    labels = jnp.full((batch,), num_classes, jnp.int32) if y is None else jnp.asarray(y, jnp.int32)
    return nn.Embed(num_classes + 1, features, param_dtype=param_dtype, name=name)(labels).astype(jnp.float32)


def add_second_time(temb, t, r, embed_time, second_time: bool, param_dtype, name: str = "r_proj"):
    """The time embedding temb float32 [B, features] of a two-time model (`second_time`) plus that of
    its second time r [B] (MeanFlow's r, in the model-time units of t; default t): `embed_time` (the
    module's own time embedding, its weights shared with t's) through a zero-initialised Dense
    `name`, so that a one-time model's checkpoint given this layer computes the same function. A
    one-time model returns temb and refuses an r."""
    if not second_time:
        if r is not None:
            raise UsageError("r (a second time) given to a one-time model: set the model field second_time=True")
        return temb
    zeros = nn.initializers.zeros
    dense = nn.Dense(temb.shape[-1], kernel_init=zeros, bias_init=zeros, param_dtype=param_dtype, name=name)
    return temb + dense(embed_time(t if r is None else r))


def embed_vector(y, features: int, param_dtype, name: str):
    """The embedding float32 [batch, features] of a condition vector y [batch, cond_dim] (a kind's
    own encoding, its null included): Dense, SiLU, Dense, as the time embedding. Called inside a
    module's compact method; the layers are `name`_0 and `name`_1."""
    if y is None or jnp.ndim(y) != 2:
        raise UsageError(f"this model takes a condition vector y [B, cond_dim], got {None if y is None else jnp.shape(y)}")
    dense = lambda i: nn.Dense(features, dtype=jnp.float32, param_dtype=param_dtype, name=f"{name}_{i}")
    return dense(1)(nn.silu(dense(0)(jnp.asarray(y, jnp.float32))))
