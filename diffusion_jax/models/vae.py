"""The KL autoencoder of latent diffusion (Rombach et al. 2022; Stable Diffusion's VAE) as a
Flax Linen module, laid out as diffusers' `AutoencoderKL` so its checkpoints load exactly.

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4)
    mean, logvar = vae.apply(variables, x, method=vae.encode)   # x [B, H, W, 3] in [-1, 1]
    images = vae.apply(variables, z, method=vae.decode)          # z [B, H/f, W/f, 4]

f = 2^(levels - 1). The encoder is conv_in, per level `layers_per_block` residual blocks
(no time embedding) and a 2x downsample (stride-2 conv, input padded at the end) except at the
last level, a middle block (res, attention, res), GroupNorm-SiLU and conv_out to 2 x
latent_channels (mean and log-variance), then a 1x1 `quant_conv`. The decoder mirrors it from a
1x1 `post_quant_conv`, with `layers_per_block + 1` blocks a level and nearest-neighbour 2x
upsampling followed by a conv. Latent-diffusion backbones see `scaling_factor * z`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax import draws
from diffusion_jax.errors import UsageError
from diffusion_jax.models.layers import GroupNorm32
from diffusion_jax.models.unet import AttnBlock, ResBlock, _resample

Dtype = Any

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


def _conv(features, name, k=3, **kw):
    return nn.Conv(features, (k, k), padding="SAME" if k == 3 else "VALID", name=name, **kw)


def _middle(h, num_groups, epsilon, attention, kw):
    """Res, attention (one head over all channels), res, at the lowest resolution."""
    ch = h.shape[-1]
    h = ResBlock(ch, num_groups=num_groups, epsilon=epsilon, name="mid_res0", **kw)(h, None, False)
    if attention:
        h = AttnBlock(1, num_groups, epsilon, name="mid_attn", **kw)(h)
    return ResBlock(ch, num_groups=num_groups, epsilon=epsilon, name="mid_res1", **kw)(h, None, False)


class _Coder(nn.Module):
    """The fields the encoder and decoder share."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    num_groups: int = 32
    epsilon: float = 1e-6
    mid_attention: bool = True
    dtype: Dtype = jnp.float32


class Encoder(_Coder):
    """x [B, H, W, C] -> moments [B, H/f, W/f, 2 * latent_channels] (before quant_conv)."""

    latent_channels: int = 4

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype)
        h = _conv(self.block_out_channels[0], "conv_in", **kw)(x.astype(self.dtype))
        last = len(self.block_out_channels) - 1
        for level, ch in enumerate(self.block_out_channels):
            for i in range(self.layers_per_block):
                h = ResBlock(ch, num_groups=self.num_groups, epsilon=self.epsilon, name=f"down{level}_res{i}",
                             **kw)(h, None, False)
            if level != last:
                h = nn.Conv(ch, (3, 3), strides=(2, 2), padding="SAME", name=f"down{level}_resample", **kw)(h)
        h = _middle(h, self.num_groups, self.epsilon, self.mid_attention, kw)
        h = GroupNorm32(self.num_groups, self.epsilon, silu=True, name="norm_out")(h)
        return _conv(2 * self.latent_channels, "conv_out", **kw)(h)


class Decoder(_Coder):
    """z [B, h, w, latent_channels] (after post_quant_conv) -> images [B, h f, w f, out_channels]."""

    out_channels: int = 3

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype)
        h = _conv(self.block_out_channels[-1], "conv_in", **kw)(z.astype(self.dtype))
        h = _middle(h, self.num_groups, self.epsilon, self.mid_attention, kw)
        for level in reversed(range(len(self.block_out_channels))):
            for i in range(self.layers_per_block + 1):
                h = ResBlock(self.block_out_channels[level], num_groups=self.num_groups, epsilon=self.epsilon,
                             name=f"up{level}_res{i}", **kw)(h, None, False)
            if level != 0:
                h = _conv(h.shape[-1], f"up{level}_resample", **kw)(_resample(h, up=True))
        h = GroupNorm32(self.num_groups, self.epsilon, silu=True, name="norm_out")(h)
        return _conv(self.out_channels, "conv_out", **kw)(h).astype(jnp.float32)


class AutoencoderKL(nn.Module):
    """Encode images to a diagonal Gaussian over latents, decode latents to images (NHWC).

    `encode(x)` -> (mean, logvar), each [B, H/f, W/f, latent_channels], logvar clamped to
    LOGVAR_RANGE; `decode(z)` -> [B, H, W, in_channels]; `__call__(x)` decodes the mean (it
    creates every parameter: init with it). `scaling_factor` (0.18215 for Stable Diffusion's VAE)
    and `shift_factor` map z to the latents a backbone sees: (z - shift) * scale.
    """

    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    num_groups: int = 32
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    dtype: Dtype = jnp.float32

    def setup(self):
        common = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                      num_groups=self.num_groups, mid_attention=self.mid_attention, dtype=self.dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.in_channels, **common)
        one_by_one = lambda n: nn.Conv(n, (1, 1), dtype=self.dtype)
        self.quant_conv = one_by_one(2 * self.latent_channels) if self.use_quant_conv else None
        self.post_quant_conv = one_by_one(self.latent_channels) if self.use_post_quant_conv else None

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x):
        factor = self.downsample_factor
        if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
            raise UsageError(f"the VAE encodes NHWC images whose height and width are multiples of {factor}, "
                             f"got shape {x.shape}: resize the images (data.image_size)")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z)

    def __call__(self, x):
        return self.decode(self.encode(x)[0])


def sample_latent(key, mean, logvar):
    """z ~ N(mean, exp(logvar)), the posterior's sample (diffusers' `latent_dist.sample()`)."""
    return mean + jnp.exp(0.5 * logvar) * draws.normal(key, mean.shape, mean.dtype)
