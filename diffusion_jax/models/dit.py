"""The Diffusion Transformer (Peebles & Xie 2022) as a Flax Linen module.

`DiT()(x_t [B, H, W, C], t [B], y [B] or None, train) -> [B, H, W, out]` (out = 2C with
`learn_sigma`; `train` is accepted for the backbones' common interface: the DiT has no dropout). Patchify (a p x p conv), add the fixed 2-D sin-cos position embedding, run
`depth` adaLN-Zero blocks conditioned on c = time embedding + label embedding, a final adaLN
layer and a linear map to p*p*out per token, unpatchify. Every modulation and the final linear
are zero-initialised, so the model outputs zeros at initialisation.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.models.layers import (add_second_time, DenseGELU, MultiHeadSelfAttention, embed_labels, embed_vector,
                                        timestep_embedding)
from diffusion_jax.models.ops import adaptive_layer_norm

Dtype = Any


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """[grid_h * grid_w, dim] fixed sin-cos embedding (MAE / DiT): half the channels encode the
    row, half the column, each as [sin, cos] of omega = 1 / 10000^(2i / (dim / 2))."""
    if dim % 4:
        raise UsageError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos embedding")

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1).astype(np.float32)


class DiTBlock(nn.Module):
    """adaLN-Zero block: c -> (shift, scale, gate) x 2 for the attention and MLP branches."""

    hidden: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    fused_qkv: bool = True
    autodiff_ops: bool = False
    mlp_norm_eps: float = 1e-6
    ops_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, c):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = nn.Dense(6 * self.hidden, kernel_init=nn.initializers.zeros, name="adaLN_modulation",
                       **kw)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = adaptive_layer_norm(x, shift_msa, scale_msa, autodiff=self.autodiff_ops, impl=self.ops_impl)
        h = MultiHeadSelfAttention(self.num_heads, attention_impl=self.attention_impl,
                                   fused_qkv=self.fused_qkv, name="attn", **kw)(h)
        x = x + gate_msa[:, None, :] * h
        h = adaptive_layer_norm(x, shift_mlp, scale_mlp, self.mlp_norm_eps, autodiff=self.autodiff_ops,
                                 impl=self.ops_impl)
        h = DenseGELU(int(self.hidden * self.mlp_ratio), autodiff=self.autodiff_ops, impl=self.ops_impl,
                      name="mlp_fc1", **kw)(h)
        h = nn.Dense(self.hidden, name="mlp_fc2", **kw)(h)
        return x + gate_mlp[:, None, :] * h


class DiT(nn.Module):
    """Diffusion Transformer on NHWC inputs whose H and W are divisible by `patch_size`.

    `num_classes` > 0 adds a label embedding with a null class (index num_classes) used when
    y is None. The module never drops labels itself: the train step replaces a fraction
    `train.cond_dropout` of them with the null class (classifier-free guidance training), so
    one setting decides it for every backbone.

    `freq_shift` (see `timestep_embedding`) and `mlp_norm_eps` (the MLP branch's LayerNorm
    epsilon) are 0 and 1e-6 in the DiT paper's code and 1 and 1e-5 in diffusers'
    `DiTTransformer2DModel`, whose checkpoints load with diffusers' values.
    """

    patch_size: int = 2
    hidden: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    cond_dim: int = 0  # > 0: y is a condition vector [B, cond_dim] (a condition kind's), added to c
    learn_sigma: bool = True
    out_channels: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention_impl: Optional[str] = None
    fused_qkv: bool = True  # see MultiHeadSelfAttention
    autodiff_ops: bool = False  # True: JAX's autodiff instead of ops.py's hand-written gradients
    ops_impl: Optional[str] = None  # adaLN LayerNorm's and bias + GELU's: "auto", "xla", "pallas" (ops.resolve_ops_impl)
    freq_dim: int = 256
    freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6
    second_time: bool = False  # a two-time model u(x, t, r) (MeanFlow): r embedded as t, added through a zero init

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False, r=None):
        """x [B, H, W, C], t [B] (model time), y the condition; r [B] the second time of a two-time
        model (`second_time`; default t), refused by a one-time model."""
        if x.ndim != 4:
            raise UsageError(f"x must be NHWC [B, H, W, C], got shape {x.shape}")
        B, H, W, C = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise UsageError(f"image size {H}x{W} is not divisible by the patch size {p}: "
                             "choose a patch size that divides the image size, or resize")
        out_ch = self.out_channels or C
        out_ch = 2 * out_ch if self.learn_sigma else out_ch
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        h = nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID", name="x_embedder",
                    **kw)(x.astype(self.dtype))
        gh, gw = H // p, W // p
        h = h.reshape(B, gh * gw, self.hidden)
        h = h + jnp.asarray(sincos_pos_embed_2d(self.hidden, gh, gw), self.dtype)[None]

        fc1 = nn.Dense(self.hidden, param_dtype=self.param_dtype, name="t_embedder_fc1")
        fc2 = nn.Dense(self.hidden, param_dtype=self.param_dtype, name="t_embedder_fc2")
        embed_time = lambda s: fc2(nn.silu(fc1(timestep_embedding(s, self.freq_dim, freq_shift=self.freq_shift))))
        c = add_second_time(embed_time(t), t, r, embed_time, self.second_time, self.param_dtype)
        if self.num_classes:
            c = c + embed_labels(y, B, self.num_classes, self.hidden, self.param_dtype, "y_embedder")
        if self.cond_dim:
            c = c + embed_vector(y, self.hidden, self.param_dtype, "cond_embedder")
        c = c.astype(self.dtype)

        block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
        for i in range(self.depth):
            h = block_cls(self.hidden, self.num_heads, self.mlp_ratio, attention_impl=self.attention_impl,
                          fused_qkv=self.fused_qkv, autodiff_ops=self.autodiff_ops,
                          mlp_norm_eps=self.mlp_norm_eps, ops_impl=self.ops_impl, name=f"block{i}",
                          **kw)(h, c)

        shift, scale = jnp.split(nn.Dense(2 * self.hidden, kernel_init=nn.initializers.zeros,
                                          name="final_adaLN_modulation", **kw)(nn.silu(c)), 2, axis=-1)
        h = adaptive_layer_norm(h, shift, scale, autodiff=self.autodiff_ops, impl=self.ops_impl)
        h = nn.Dense(p * p * out_ch, kernel_init=nn.initializers.zeros, name="final_linear", **kw)(h)
        h = h.reshape(B, gh, gw, p, p, out_ch).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(B, H, W, out_ch).astype(jnp.float32)
