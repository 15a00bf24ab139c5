"""diffusers `UNet2DModel` <-> this library's `UNet` (DDPM's U-Net: google/ddpm-cifar10-32,
ddpm-celebahq-256, ddpm-church-256 and the like).

Attention sits at a level of the U-Net in diffusers (`AttnDownBlock2D`) and at a resolution
here (`attn_resolutions`): at the config's `sample_size` they are the same thing, which is the
size a published U-Net is used at.
"""
from __future__ import annotations

from diffusion_jax.errors import UsageError
from diffusion_jax.interop.tensors import Entry, attention_entries, resnet_entries
from diffusion_jax.models.unet import UNet

CLASS_NAME = "UNet2DModel"

# UNet2DModel's defaults, for fields a config.json leaves out.
DEFAULTS = dict(sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
                time_embedding_type="positional", time_embedding_dim=None, freq_shift=0.0, flip_sin_to_cos=True,
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                mid_block_type="UNetMidBlock2D",
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1.0,
                downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0,
                act_fn="silu", attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
                norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
                num_class_embeds=None, num_train_timesteps=None)

# Fields diffusers' configs may leave null although their default is not.
NULLABLE = ("attention_head_dim", "norm_num_groups")
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
# Fields whose only supported value is the one given (anything else: an error naming the field).
_FIXED = dict(center_input_sample=False, time_embedding_type="positional", time_embedding_dim=None,
              mid_block_scale_factor=1, downsample_type="conv", upsample_type="conv", act_fn="silu",
              class_embed_type=None, num_class_embeds=None)


def _unsupported(field, value, why):
    return UsageError(f"UNet2DModel config field {field} = {value!r} is not supported: {why}")


def module_from_config(config: dict):
    """(UNet module, input shape (H, W, C)) of a UNet2DModel config.json dict."""
    c = {**DEFAULTS, **config}
    for field, value in _FIXED.items():
        if c[field] != value and not (field == "mid_block_scale_factor" and float(c[field]) == 1.0):
            raise _unsupported(field, c[field], f"this U-Net supports {value!r} only")
    for field, known in (("down_block_types", _DOWN), ("up_block_types", _UP)):
        for block in c[field]:
            if block not in known:
                raise _unsupported(field, block, f"supported block types are {sorted(known)}")
    if c["mid_block_type"] not in ("UNetMidBlock2D",):
        raise _unsupported("mid_block_type", c["mid_block_type"], "supported: 'UNetMidBlock2D'")
    if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        raise _unsupported("resnet_time_scale_shift", c["resnet_time_scale_shift"],
                           "supported: 'default', 'scale_shift'")
    if c["sample_size"] is None:
        raise _unsupported("sample_size", None, "the U-Net's attention is placed by resolution: set sample_size")
    widths = list(c["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        raise _unsupported("block_out_channels", widths, f"every width must be a multiple of the first ({ch})")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        raise _unsupported("attn_norm_num_groups", c["attn_norm_num_groups"],
                           "the attention's GroupNorm uses norm_num_groups")
    down_attn = [_DOWN[b] for b in c["down_block_types"]]
    if [_UP[b] for b in c["up_block_types"]] != down_attn[::-1]:
        raise _unsupported("up_block_types", list(c["up_block_types"]),
                           "attention in the up blocks must mirror the down blocks")
    if len(widths) != len(down_attn):
        raise _unsupported("block_out_channels", widths, "one width per down block is needed")
    size = c["sample_size"] if isinstance(c["sample_size"], int) else c["sample_size"][0]
    head_dim = c["attention_head_dim"]
    model = UNet(ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=c["layers_per_block"],
                 attn_resolutions=tuple(size // 2 ** level for level, a in enumerate(down_attn) if a),
                 num_heads=1, head_dim=head_dim, dropout=float(c["dropout"]), out_channels=c["out_channels"],
                 scale_shift_norm=c["resnet_time_scale_shift"] == "scale_shift", num_groups=c["norm_num_groups"],
                 norm_eps=float(c["norm_eps"]), flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
                 freq_shift=float(c["freq_shift"]), downsample_padding=int(c["downsample_padding"]),
                 mid_attn=bool(c["add_attention"]),
                 mid_attn_norm=c["resnet_time_scale_shift"] == "default" or c["attn_norm_num_groups"] is not None)
    return model, (size, size, c["in_channels"])


def config_from_module(model: UNet, input_shape) -> dict:
    """The UNet2DModel config.json dict of a U-Net used at input shape (H, W, C)."""
    problems = {"num_classes": model.num_classes, "resblock_updown": model.resblock_updown,
                "resamp_with_conv": not model.resamp_with_conv}
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise UsageError(f"UNet2DModel cannot represent this U-Net's {bad}: export supports unconditional "
                         "U-Nets with convolutional resampling")
    if model.num_heads != 1 and model.head_dim is None:
        raise UsageError("UNet2DModel sets attention heads by attention_head_dim: export a U-Net with "
                         "head_dim set (or num_heads=1)")
    size, _, channels = input_shape
    levels = len(model.ch_mult)
    attn = [size // 2 ** level in model.attn_resolutions for level in range(levels)]
    out = (model.out_channels or channels) * (2 if model.learn_sigma else 1)
    if not model.mid_attn_norm and model.scale_shift_norm is False:
        raise UsageError("UNet2DModel's mid-block attention always has a GroupNorm with default resnets")
    return {"_class_name": CLASS_NAME, "sample_size": size, "in_channels": channels, "out_channels": out,
            "center_input_sample": False, "time_embedding_type": "positional",
            "freq_shift": model.freq_shift, "flip_sin_to_cos": model.flip_sin_to_cos,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
            "mid_block_type": "UNetMidBlock2D", "block_out_channels": [model.ch * m for m in model.ch_mult],
            "layers_per_block": model.num_res_blocks, "mid_block_scale_factor": 1,
            "downsample_padding": model.downsample_padding, "downsample_type": "conv", "upsample_type": "conv",
            "dropout": model.dropout, "act_fn": "silu", "attention_head_dim": model.head_dim,
            "norm_num_groups": model.num_groups,
            "attn_norm_num_groups": model.num_groups if model.scale_shift_norm and model.mid_attn_norm else None,
            "norm_eps": model.norm_eps,
            "resnet_time_scale_shift": "scale_shift" if model.scale_shift_norm else "default",
            "add_attention": model.mid_attn}


def entries(model: UNet, input_shape):
    """The parameter table (see `tensors.Entry`) of a U-Net at input shape (H, W, C), and its
    (copy, original) tensor pairs (none)."""
    size = input_shape[0]
    mid = attention_entries("mid_attn", "mid_block.attentions.0", model.mid_attn_norm) if model.mid_attn else []
    return unet_entries(model, lambda level: size // 2 ** level in model.attn_resolutions,
                        lambda ours, theirs, level: attention_entries(ours, theirs), mid), []


def unet_entries(model: UNet, has_attn, attention, mid_attention: list) -> list:
    """The table of a U-Net with diffusers' block layout (down_blocks, mid_block, up_blocks):
    `has_attn(level)` says where `attention(ours, theirs, level)` entries go; `mid_attention` are the
    middle's. UNet2DModel's and UNet2DConditionModel's share it."""
    widths = [model.ch * m for m in model.ch_mult]
    levels = len(widths)
    table = [Entry(("conv_in",), "conv", "conv_in"),
             Entry(("temb_dense0",), "dense", "time_embedding.linear_1"),
             Entry(("temb_dense1",), "dense", "time_embedding.linear_2")]
    width = model.ch
    for level in range(levels):
        for i in range(model.num_res_blocks):
            table += resnet_entries(f"down{level}_res{i}", f"down_blocks.{level}.resnets.{i}", width != widths[level])
            width = widths[level]
            if has_attn(level):
                table += attention(f"down{level}_attn{i}", f"down_blocks.{level}.attentions.{i}", level)
        if level != levels - 1:
            table.append(Entry((f"down{level}_resample",), "conv", f"down_blocks.{level}.downsamplers.0.conv"))
    table += resnet_entries("mid_res0", "mid_block.resnets.0", False) + resnet_entries("mid_res1", "mid_block.resnets.1", False)
    table += mid_attention
    pushed = [model.ch]  # widths of the skip connections, popped from the end on the way up
    for level in range(levels):
        pushed += [widths[level]] * model.num_res_blocks + ([widths[level]] if level != levels - 1 else [])
    width = widths[-1]
    for block, level in enumerate(reversed(range(levels))):
        for i in range(model.num_res_blocks + 1):
            skip = pushed.pop()
            table += resnet_entries(f"up{level}_res{i}", f"up_blocks.{block}.resnets.{i}", width + skip != widths[level])
            width = widths[level]
            if has_attn(level):
                table += attention(f"up{level}_attn{i}", f"up_blocks.{block}.attentions.{i}", level)
        if level != 0:
            table.append(Entry((f"up{level}_resample",), "conv", f"up_blocks.{block}.upsamplers.0.conv"))
    table += [Entry(("norm_out",), "norm", "conv_norm_out"), Entry(("conv_out",), "conv", "conv_out")]
    return table


# diffusers' UNet2DModel checkpoints saved before its Attention class (google/ddpm-*) name the
# attention's tensors query/key/value/proj_attn/group_norm; diffusers renames them on load.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_deprecated_attention(tensors: dict) -> dict:
    """Tensors with the attention names of diffusers' current `Attention` class."""
    renamed = {}
    for name, value in tensors.items():
        parts = name.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _DEPRECATED_ATTENTION:
            name = ".".join(parts[:-2] + [_DEPRECATED_ATTENTION[parts[-2]], parts[-1]])
        renamed[name] = value
    return renamed
