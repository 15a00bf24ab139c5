"""Backbones with one interface, `model.apply(variables, x_t, t, y=None, train=False, rngs=...)`,
NHWC in and the same spatial shape out, and a registry of published presets.

    model = create_model("ddpm_cifar10", dtype=jnp.bfloat16)
    params = model.init(key, x, t)["params"]
    denoise_fn = lambda x_t, t: model.apply({"params": params}, x_t, t)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.compile_effort import jit_once
from diffusion_jax.errors import UsageError
from diffusion_jax.kept import kept
from diffusion_jax.models.dit import DiT, DiTBlock, sincos_pos_embed_2d
from diffusion_jax.models.layers import timestep_embedding
from diffusion_jax.models.unet import UNet


class Preset(NamedTuple):
    """A named configuration: the module class, its fields and the input it was published for."""

    cls: type
    kwargs: dict
    input_shape: tuple  # (H, W, C)
    note: str = ""


def _dit(patch, hidden, depth, heads, shape=(32, 32, 4), **kw):
    return Preset(DiT, dict(patch_size=patch, hidden=hidden, depth=depth, num_heads=heads, **kw), shape)


_DIT_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}

PRESETS: dict[str, Preset] = {
    # DDPM (Ho et al. 2020): 35.7M parameters on CIFAR-10, 114M at 256x256.
    "ddpm_cifar10": Preset(UNet, dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                                      attn_resolutions=(16,), dropout=0.1), (32, 32, 3), "35.7M"),
    "ddpm_celebahq256": Preset(UNet, dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                                          attn_resolutions=(16,), dropout=0.0), (256, 256, 3), "114M"),
    "ddpm_lsun256": Preset(UNet, dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                                      attn_resolutions=(16,), dropout=0.0), (256, 256, 3), "114M"),
    # Small U-Nets that train on a CPU.
    "unet_digits": Preset(UNet, dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                     dropout=0.0, num_groups=8, resamp_with_conv=False), (8, 8, 1),
                          "0.6M; ~1,000 img/s training on 2 CPU cores"),
    "unet_mnist": Preset(UNet, dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,),
                                    dropout=0.1, num_groups=16), (28, 28, 1)),
    "unet_cifar_small": Preset(UNet, dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2,
                                          attn_resolutions=(8,), dropout=0.1), (32, 32, 3)),
    "unet_celeba64": Preset(UNet, dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                                       attn_resolutions=(16,), dropout=0.1), (64, 64, 3)),
    "unet_tiny": Preset(UNet, dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                                   dropout=0.0, num_groups=8), (8, 8, 1), "tests"),
    # Small DiTs for pixel data and tests.
    "dit_tiny": _dit(2, 64, 2, 2, (8, 8, 1), num_classes=10, learn_sigma=False),
    "dit_mnist": _dit(4, 256, 6, 4, (28, 28, 1), num_classes=10, learn_sigma=False),
    "dit_cifar": _dit(2, 384, 12, 6, (32, 32, 3), num_classes=10, learn_sigma=False),
    # Stable Diffusion's text-conditioned U-Nets on 4-channel latents (diffusers' UNet2DConditionModel):
    # 1.x with CLIP ViT-L/14's 768-wide embeddings, 8 heads, 1x1 projections (859,520,964
    # parameters); 2.x with OpenCLIP ViT-H's 1024, 64-wide heads, linear projections (865,910,724).
    "sd15_unet": Preset(UNet, dict(ch=320, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(),
                                   attn_levels=(0, 1, 2), level_heads=(8, 8, 8, 8), context_dim=768,
                                   dropout=0.0, norm_eps=1e-5, downsample_padding=1), (64, 64, 4), "860M"),
    "sd21_unet": Preset(UNet, dict(ch=320, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(),
                                   attn_levels=(0, 1, 2), level_heads=(5, 10, 20, 20), context_dim=1024,
                                   linear_projection=True, dropout=0.0, norm_eps=1e-5, downsample_padding=1),
                        (96, 96, 4), "866M"),
    # SDXL's base U-Net: 3 levels, no attention at the first, 2 and 10 transformer blocks at the others,
    # 64-wide heads, 2048-wide text embeddings, the "text_time" added embedding (2,567,463,684)
    "sdxl_unet": Preset(UNet, dict(ch=320, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), attn_levels=(1, 2),
                                   level_heads=(5, 10, 20), context_dim=2048, linear_projection=True,
                                   transformer_depth=(1, 2, 10), addition_time_embed_dim=256, addition_embed_dim=2816,
                                   dropout=0.0, norm_eps=1e-5, downsample_padding=1), (128, 128, 4), "2.6B"),
}
# DiT (Peebles & Xie 2022) on a 32x32x4 latent, ImageNet classes, learned sigma:
# S/2 33M, B/2 130M, L/2 458M, XL/2 675M parameters; patch 4 and 8 variants too.
for _size, (_hidden, _depth, _heads) in _DIT_SIZES.items():
    for _patch in (2, 4, 8):
        PRESETS[f"dit_{_size}{_patch}"] = _dit(_patch, _hidden, _depth, _heads)


def create_model(name: str, **overrides) -> nn.Module:
    """The preset `name` as a Flax module, with any field overridden (e.g. dtype, learn_sigma)."""
    if name not in PRESETS:
        raise UsageError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[name]
    fields = set(preset.cls.__dataclass_fields__) - {"parent", "name"}
    unknown = set(overrides) - fields
    if unknown:
        raise UsageError(f"unknown option(s) {sorted(unknown)} for {preset.cls.__name__} preset "
                         f"{name!r}; options: {sorted(fields)}")
    return preset.cls(**{**preset.kwargs, **{k: _frozen(v) for k, v in overrides.items()}})


def _frozen(value):
    """A list (as a run's config.json gives a sequence) as a tuple, nested ones too: a module of
    hashable fields has its parameter shapes traced once (`param_shapes`)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def example_condition(model: nn.Module, batch: int = 1):
    """A condition of the right shape for initialising `model`: text embeddings [B, 77, D] for a
    text-conditioned one, a vector [B, cond_dim] for one that takes a condition vector, else None
    (labels are optional)."""
    context_dim, cond_dim = getattr(model, "context_dim", 0), getattr(model, "cond_dim", 0)
    if context_dim and getattr(model, "addition_time_embed_dim", 0):  # SDXL: the pooled embedding and time ids
        ids = 6
        return {"embeddings": jnp.zeros((batch, 77, context_dim), jnp.float32), "time_ids": jnp.zeros((batch, ids)),
                "pooled": jnp.zeros((batch, model.addition_embed_dim - ids * model.addition_time_embed_dim))}
    if context_dim:
        return jnp.zeros((batch, 77, context_dim), jnp.float32)
    return jnp.zeros((batch, cond_dim), jnp.float32) if cond_dim else None


def param_shapes(model: nn.Module, input_shape, batch: int = 1):
    """The parameter tree as ShapeDtypeStructs of `model` at inputs [batch, *input_shape] (with a
    timestep and the model's example condition): `abstract_init`'s."""
    x = jax.ShapeDtypeStruct((batch, *tuple(input_shape)), jnp.float32)
    return abstract_init(model, x, jax.ShapeDtypeStruct((batch,), jnp.int32), condition=True)


def abstract_init(model: nn.Module, *inputs: jax.ShapeDtypeStruct, condition: bool = False):
    """`model.init(key, *inputs)["params"]` as ShapeDtypeStructs (jax.eval_shape: nothing is
    allocated), with `example_condition(model, batch)` after the inputs if `condition`. Traced once
    per module and input shapes (`kept`: loading a pipeline's parts again traces nothing), a fresh
    copy of the tree each call."""
    return jax.tree_util.tree_map(lambda s: s, _abstract_init(model, inputs, condition))


def with_second_time(params, model: nn.Module, input_shape):
    """A one-time model's parameters for its two-time form `model` (`second_time=True`): the layers it
    adds (the zero-initialised projection of the second time) as zeros, so it computes the same
    function for any r until they train."""
    added = {k: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), v)
             for k, v in param_shapes(model, input_shape).items() if k not in params}
    return {**params, **added}


@kept(maxsize=64)
def _abstract_init(model: nn.Module, inputs: tuple, condition: bool):
    extra = (example_condition(model, inputs[0].shape[0]),) if condition else ()
    return jax.eval_shape(lambda k, *xs: model.init(k, *xs, *extra), jax.random.key(0), *inputs)["params"]


def count_params(tree) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def init_params(model: nn.Module, key, input_shape, batch: int = 1):
    """Initial parameters for inputs of shape [batch, *input_shape]."""
    x = jnp.zeros((batch, *input_shape), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    return jit_once(model.init)({"params": key, "dropout": key}, x, t, example_condition(model, batch))["params"]


__all__ = ["DiT", "DiTBlock", "PRESETS", "Preset", "UNet", "abstract_init", "count_params", "create_model",
           "init_params", "param_shapes", "sincos_pos_embed_2d", "timestep_embedding"]
