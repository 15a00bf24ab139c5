"""The DDPM / ADM U-Net (Ho et al. 2020; Dhariwal & Nichol 2021) as a Flax Linen module.

`UNet()(x_t [B, H, W, C], t [B], y [B] or None, train) -> [B, H, W, out]`, out = C, or 2C with
`learn_sigma`. DDPM's layout: conv_in, per level `num_res_blocks` residual blocks (attention at
the resolutions in `attn_resolutions`) then a 2x downsample, a middle block (res, attention,
res), the mirror image upwards with skip concatenations (`num_res_blocks + 1` blocks a level),
GroupNorm, SiLU and a zero-initialised conv_out. ADM's options: scale-shift norm, resblock
up/down sampling, several heads, class conditioning.

Text conditioning (Stable Diffusion's UNet2DConditionModel): with `context_dim` > 0 every
attention block is a `SpatialTransformer` (self-attention, cross-attention to the text
embeddings, GEGLU) at the levels `attn_levels` and in the middle, with `level_heads` heads per
level; the condition `y` is then the text embeddings [B, L, context_dim], or a mapping
{"embeddings": [B, L, D], "mask": [B, L]} (1 = a token).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.errors import UsageError
from diffusion_jax.models.layers import (add_second_time, GroupNorm32, MultiHeadSelfAttention, embed_labels, embed_vector,
                                        timestep_embedding)
from diffusion_jax.models.transformer2d import SpatialTransformer

Dtype = Any


def _resample(x, up: bool):
    """2x nearest-neighbour upsampling (a broadcast, so its gradient is a 2x2 sum rather than
    the scatter of a gather-based resize) or 2x2 average pooling of x [B, H, W, C]."""
    B, H, W, C = x.shape
    if up:
        return jnp.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding (added, or scale-shift), GroupNorm-SiLU-dropout-
    zero-initialised conv, with a 1x1 (NIN) shortcut when the width changes; `resample` = "up"
    or "down" resamples both paths inside the block (ADM's resblock_updown). `temb` None (an
    autoencoder's block) has no time embedding and no `temb_proj`."""

    out_ch: int
    dropout: float = 0.0
    scale_shift_norm: bool = False
    resample: Optional[str] = None
    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    autodiff_ops: bool = False
    ops_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, temb, train: bool):
        conv = lambda feats, name, init=nn.linear.default_kernel_init, k=3: nn.Conv(
            feats, (k, k), padding="SAME" if k == 3 else "VALID", dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=init, name=name)
        norm_silu = lambda name: GroupNorm32(self.num_groups, self.epsilon, silu=True, param_dtype=self.param_dtype,
                                             autodiff=self.autodiff_ops, impl=self.ops_impl, name=name)
        h = norm_silu("norm1")(x)
        if self.resample:
            h, x = _resample(h, self.resample == "up"), _resample(x, self.resample == "up")
        h = conv(self.out_ch, "conv1")(h)
        if temb is None:
            h = norm_silu("norm2")(h)
        else:
            h = self._add_time(h, temb, norm_silu)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.out_ch, "conv2", nn.initializers.zeros)(h)
        if x.shape[-1] != self.out_ch:
            x = conv(self.out_ch, "nin_shortcut", k=1)(x)
        return x + h

    def _add_time(self, h, temb, norm_silu):
        """norm2 + SiLU of h with the time embedding added before it, or as scale and shift."""
        emb = nn.Dense((2 if self.scale_shift_norm else 1) * self.out_ch, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="temb_proj")(nn.silu(temb))
        if self.scale_shift_norm:
            return norm_silu("norm2")(h, scale_shift=jnp.split(emb, 2, axis=-1))
        return norm_silu("norm2")(h + emb[:, None, None, :])


class AttnBlock(nn.Module):
    """GroupNorm then self-attention over the H*W positions, zero-initialised output, residual.

    `head_dim` set: C // head_dim heads (diffusers' `attention_head_dim`), else `num_heads`.
    `normalize=False` drops the GroupNorm (diffusers' mid-block attention with scale-shift
    resnets and no `attn_norm_num_groups`).
    """

    num_heads: int = 1
    num_groups: int = 32
    epsilon: float = 1e-6
    head_dim: Optional[int] = None
    normalize: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    autodiff_ops: bool = False
    ops_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        h = x
        if self.normalize:
            h = GroupNorm32(self.num_groups, self.epsilon, param_dtype=self.param_dtype, autodiff=self.autodiff_ops,
                            impl=self.ops_impl, name="norm")(x)
        heads = C // self.head_dim if self.head_dim else self.num_heads
        h = MultiHeadSelfAttention(heads, zero_init_out=True, dtype=self.dtype,
                                   param_dtype=self.param_dtype,
                                   attention_impl=self.attention_impl, name="attn")(h.reshape(B, H * W, C))
        return x + h.reshape(B, H, W, C)


class UNet(nn.Module):
    """DDPM / ADM U-Net predicting the noise (or x0 / v) of x_t [B, H, W, C] in NHWC.

    H and W must be divisible by 2^(len(ch_mult) - 1); every width ch * mult by `num_groups`;
    each entry of `attn_resolutions` must be one of the resolutions the net visits.
    `num_classes` > 0 adds a label embedding (index num_classes is the null label, used when
    y is None) to the time embedding. `remat` rematerialises each block in the backward pass.

    Fields for published (diffusers `UNet2DModel`) checkpoints, whose defaults are the presets':
    `norm_eps` (GroupNorm epsilon), `head_dim` (attention heads of head_dim channels instead of
    `num_heads`), `flip_sin_to_cos` and `freq_shift` (see `timestep_embedding`),
    `downsample_padding` (0: pad the stride-2 conv's input by one row and column at the end, as
    DDPM's TensorFlow "SAME"; 1: one on each side), `mid_attn` and `mid_attn_norm` (the middle
    block's attention, and its GroupNorm).
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    num_heads: int = 1
    dropout: float = 0.1
    out_channels: Optional[int] = None
    learn_sigma: bool = False
    num_classes: int = 0
    cond_dim: int = 0  # > 0: y is a condition vector [B, cond_dim] (a condition kind's), added to temb
    scale_shift_norm: bool = False
    resblock_updown: bool = False
    resamp_with_conv: bool = True
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention_impl: Optional[str] = None
    autodiff_ops: bool = False  # True: JAX's autodiff instead of ops.py's hand-written gradients
    ops_impl: Optional[str] = None  # the GroupNorms' implementation: "auto", "xla", "pallas" (ops.resolve_ops_impl)
    norm_eps: float = 1e-6
    head_dim: Optional[int] = None
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 0
    mid_attn: bool = True
    mid_attn_norm: bool = True
    context_dim: int = 0  # > 0: text conditioning (cross-attention), y the embeddings
    attn_levels: Optional[Sequence[int]] = None  # levels with attention (instead of attn_resolutions)
    level_heads: Optional[Sequence[int]] = None  # heads of each level's transformers (the middle: the last's)
    linear_projection: bool = False  # the transformers' proj_in / proj_out: linear (SD 2) or 1x1 conv (SD 1)
    transformer_depth: Any = 1  # blocks of each transformer: one for all, or one per level (the middle: the last's)
    addition_time_embed_dim: int = 0  # > 0: SDXL's "text_time" embedding (y then also has "pooled", "time_ids")
    addition_embed_dim: int = 0  # its MLP's input: the pooled embedding's width + 6 x addition_time_embed_dim
    second_time: bool = False  # a two-time model u(x, t, r) (MeanFlow): r embedded as t, added through a zero init

    def depth_at(self, level: Optional[int]) -> int:
        """The transformer depth at a level (None: the middle block)."""
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return tuple(self.transformer_depth)[-1 if level is None else level]

    def check_input(self, x):
        if x.ndim != 4:
            raise UsageError(f"x must be NHWC [B, H, W, C], got shape {x.shape}")
        factor = 2 ** (len(self.ch_mult) - 1)
        H, W = x.shape[1:3]
        if H % factor or W % factor:
            raise UsageError(f"image size {H}x{W} is not divisible by 2^(levels-1) = {factor} "
                             f"for ch_mult {tuple(self.ch_mult)}: resize the images or use fewer levels")
        visited = {H // 2**i for i in range(len(self.ch_mult))}
        missing = sorted(set(self.attn_resolutions) - visited) if self.attn_levels is None else []
        if missing:
            raise UsageError(f"attention resolution(s) {missing} never occur: this U-Net visits "
                             f"{sorted(visited, reverse=True)} for {H}x{W} inputs")
        for mult in self.ch_mult:
            if (self.ch * mult) % self.num_groups:
                raise UsageError(f"channels {self.ch * mult} (ch {self.ch} x mult {mult}) are not "
                                 f"divisible by the GroupNorm groups {self.num_groups}")

    def _has_attention(self, level: int, resolution: int) -> bool:
        if self.attn_levels is not None:
            return level in self.attn_levels
        return resolution in self.attn_resolutions

    @nn.compact
    def __call__(self, x, t, y=None, train: bool = False, r=None):
        """x [B, H, W, C], t [B] (model time), y the condition; r [B] the second time of a two-time
        model (`second_time`; default t), refused by a one-time model."""
        self.check_input(x)
        B, H, W, C = x.shape
        context, context_mask = None, None
        if self.context_dim:
            if y is None:
                raise UsageError("this U-Net is text-conditioned: give y, the text embeddings [B, L, "
                                 f"{self.context_dim}] (the empty prompt's for no condition)")
            context, context_mask = (y["embeddings"], y.get("mask")) if isinstance(y, dict) else (y, None)
        out_ch = self.out_channels or C
        out_ch = 2 * out_ch if self.learn_sigma else out_ch
        dense = lambda n, name: nn.Dense(n, dtype=jnp.float32, param_dtype=self.param_dtype, name=name)
        dense0, dense1 = dense(4 * self.ch, "temb_dense0"), dense(4 * self.ch, "temb_dense1")
        embed_time = lambda s: dense1(nn.silu(dense0(timestep_embedding(
            s, self.ch, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift))))
        temb = add_second_time(embed_time(t), t, r, embed_time, self.second_time, self.param_dtype)
        if self.num_classes:
            temb = temb + embed_labels(y, B, self.num_classes, 4 * self.ch, self.param_dtype, "label_emb")
        if self.cond_dim:
            temb = temb + embed_vector(y, 4 * self.ch, self.param_dtype, "cond_emb")
        if self.addition_time_embed_dim:
            temb = temb + self._text_time_embedding(y, B, dense)
        temb = temb.astype(self.dtype)

        levels = len(self.ch_mult)
        block_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, autodiff_ops=self.autodiff_ops,
                      ops_impl=self.ops_impl)
        res = lambda ch, name, resample=None: block_cls(
            ch, self.dropout, self.scale_shift_norm, resample, self.num_groups, self.norm_eps, name=name, **common)
        self_attn = lambda name, normalize=True: AttnBlock(
            self.num_heads, self.num_groups, self.norm_eps, self.head_dim, normalize,
            attention_impl=self.attention_impl, name=name, **common)

        def attn(name, normalize=True, level=None):
            if not self.context_dim:
                return self_attn(name, normalize)
            heads = (self.level_heads or [self.num_heads] * levels)[levels - 1 if level is None else level]
            block = SpatialTransformer(heads, self.depth_at(level), self.linear_projection, self.num_groups,
                                       self.dtype, self.param_dtype, self.ops_impl, self.autodiff_ops, name=name)
            return lambda h: block(h, context, context_mask)
        down_padding = "SAME" if self.downsample_padding == 0 else [(self.downsample_padding,) * 2] * 2
        conv = lambda ch, name, padding="SAME", **kw: nn.Conv(ch, (3, 3), padding=padding, name=name,
                                                              dtype=self.dtype, param_dtype=self.param_dtype, **kw)

        hs = [conv(self.ch, "conv_in")(x.astype(self.dtype))]
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = res(self.ch * mult, f"down{level}_res{i}")(hs[-1], temb, train)
                if self._has_attention(level, h.shape[1]):
                    h = attn(f"down{level}_attn{i}", level=level)(h)
                hs.append(h)
            if level != levels - 1:
                if self.resblock_updown:
                    hs.append(res(hs[-1].shape[-1], f"down{level}_resample", "down")(hs[-1], temb, train))
                elif self.resamp_with_conv:
                    hs.append(conv(hs[-1].shape[-1], f"down{level}_resample", down_padding,
                                   strides=(2, 2))(hs[-1]))
                else:
                    hs.append(_resample(hs[-1], up=False))

        h = hs[-1]
        h = res(h.shape[-1], "mid_res0")(h, temb, train)
        if self.mid_attn:
            h = attn("mid_attn", self.mid_attn_norm)(h)
        h = res(h.shape[-1], "mid_res1")(h, temb, train)

        for level in reversed(range(levels)):
            for i in range(self.num_res_blocks + 1):
                h = res(self.ch * self.ch_mult[level], f"up{level}_res{i}")(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
                if self._has_attention(level, h.shape[1]):
                    h = attn(f"up{level}_attn{i}", level=level)(h)
            if level != 0:
                if self.resblock_updown:
                    h = res(h.shape[-1], f"up{level}_resample", "up")(h, temb, train)
                else:
                    h = _resample(h, up=True)
                    if self.resamp_with_conv:
                        h = conv(h.shape[-1], f"up{level}_resample")(h)
        h = GroupNorm32(self.num_groups, self.norm_eps, silu=True, param_dtype=self.param_dtype,
                        autodiff=self.autodiff_ops, impl=self.ops_impl, name="norm_out")(h)
        out = conv(out_ch, "conv_out", kernel_init=nn.initializers.zeros)(h)
        return out.astype(jnp.float32)

    def _text_time_embedding(self, y, batch: int, dense):
        """SDXL's added embedding: MLP([pooled text embedding [B, P], sinusoidal embeddings of the
        time ids [B, n] (original size, crop top-left, target size), each addition_time_embed_dim
        wide]) -> [B, 4 ch], added to the time embedding."""
        if not isinstance(y, dict) or "pooled" not in y or "time_ids" not in y:
            raise UsageError("this U-Net takes SDXL's added conditions: give y = {'embeddings': [B, L, D], 'pooled': "
                             "[B, P] (the second text encoder's pooled embedding), 'time_ids': [B, 6]}")
        ids = jnp.asarray(y["time_ids"], jnp.float32)
        times = timestep_embedding(ids.reshape(-1), self.addition_time_embed_dim, flip_sin_to_cos=self.flip_sin_to_cos,
                                   freq_shift=self.freq_shift).reshape(batch, -1)
        added = jnp.concatenate([jnp.asarray(y["pooled"], jnp.float32), times], axis=-1)
        if added.shape[-1] != self.addition_embed_dim:
            raise UsageError(f"SDXL's added embedding takes {self.addition_embed_dim} numbers, got {added.shape[-1]}: "
                             f"a pooled embedding of {y['pooled'].shape[-1]} and {ids.shape[-1]} time ids")
        return dense(4 * self.ch, "add_emb_dense1")(nn.silu(dense(4 * self.ch, "add_emb_dense0")(added)))
