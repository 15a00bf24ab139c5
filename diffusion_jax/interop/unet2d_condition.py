"""diffusers `UNet2DConditionModel` (Stable Diffusion 1.x and 2.x) <-> this library's text-conditioned
`UNet` (`context_dim` > 0: a `SpatialTransformer` at each attention level and in the middle).

SD 1.x: 1x1-convolution projections, 8 heads at every level (diffusers calls the head count
`attention_head_dim` there); SD 2.x: linear projections and a head count per block ([5, 10, 20,
20], 64-wide heads). SDXL: a transformer depth per block (`transformer_layers_per_block`) and the "text_time" added
embedding (`addition_embed_type`: the pooled text embedding and the micro-conditioning time ids
through an MLP added to the time embedding).
"""
from __future__ import annotations

from diffusion_jax.errors import UsageError
from diffusion_jax.interop.tensors import Entry, transformer2d_entries
from diffusion_jax.interop.unet2d import unet_entries
from diffusion_jax.models.unet import UNet

CLASS_NAME = "UNet2DConditionModel"

DEFAULTS = dict(sample_size=None, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
                freq_shift=0, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                downsample_padding=1, mid_block_scale_factor=1.0, dropout=0.0, act_fn="silu", norm_num_groups=32,
                norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1, attention_head_dim=8,
                num_attention_heads=None, dual_cross_attention=False, use_linear_projection=False,
                class_embed_type=None, addition_embed_type=None, num_class_embeds=None, upcast_attention=False,
                resnet_time_scale_shift="default", time_embedding_type="positional", time_embedding_dim=None,
                time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3,
                conv_out_kernel=3, encoder_hid_dim=None, encoder_hid_dim_type=None, attention_type="default",
                class_embeddings_concat=False, mid_block_only_cross_attention=None, cross_attention_norm=None,
                addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
NULLABLE = ("sample_size", "num_attention_heads", "norm_num_groups", "class_embed_type", "addition_embed_type",
            "num_class_embeds", "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act",
            "time_cond_proj_dim", "encoder_hid_dim", "encoder_hid_dim_type", "mid_block_only_cross_attention",
            "cross_attention_norm", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
            "attention_head_dim", "transformer_layers_per_block")
_DOWN = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
# Fields whose only supported value is this one.
_FIXED = dict(center_input_sample=False, only_cross_attention=False, act_fn="silu", dual_cross_attention=False,
              class_embed_type=None, num_class_embeds=None, resnet_time_scale_shift="default",
              time_embedding_type="positional", time_embedding_dim=None, time_embedding_act_fn=None,
              timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
              encoder_hid_dim=None, encoder_hid_dim_type=None, attention_type="default", class_embeddings_concat=False,
              mid_block_only_cross_attention=None, cross_attention_norm=None, mid_block_type="UNetMidBlock2DCrossAttn")


def _unsupported(field, value, why):
    return UsageError(f"{CLASS_NAME} config field {field} = {value!r} is not supported: {why}")


def _per_block(value, n: int, field: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise _unsupported(field, value, f"one value, or one per down block ({n})")
    return values


def module_from_config(config: dict):
    """(UNet module, input shape (H, W, C)) of a UNet2DConditionModel config.json dict."""
    c = {**DEFAULTS, **config}
    if c["addition_embed_type"] not in (None, "text_time"):
        raise _unsupported("addition_embed_type", c["addition_embed_type"], "None (SD 1.x, 2.x) or 'text_time' (SDXL)")
    added = 0
    if c["addition_embed_type"] == "text_time":
        added = c["addition_time_embed_dim"]
        if not isinstance(added, int) or added <= 0 or not isinstance(c["projection_class_embeddings_input_dim"], int):
            raise _unsupported("addition_time_embed_dim", added, "SDXL's text_time embedding needs "
                               "addition_time_embed_dim and projection_class_embeddings_input_dim (integers)")
    for field, value in _FIXED.items():
        if c[field] != value:
            raise _unsupported(field, c[field], f"this U-Net supports {value!r} only")
    if float(c["mid_block_scale_factor"]) != 1.0:
        raise _unsupported("mid_block_scale_factor", c["mid_block_scale_factor"], "1 only")
    for field, known in (("down_block_types", _DOWN), ("up_block_types", _UP)):
        for block in c[field]:
            if block not in known:
                raise _unsupported(field, block, f"supported block types are {sorted(known)}")
    widths = list(c["block_out_channels"])
    ch, n = widths[0], len(widths)
    if any(w % ch for w in widths):
        raise _unsupported("block_out_channels", widths, f"every width must be a multiple of the first ({ch})")
    down_attn = [_DOWN[b] for b in c["down_block_types"]]
    if len(down_attn) != n or [_UP[b] for b in c["up_block_types"]] != down_attn[::-1]:
        raise _unsupported("up_block_types", list(c["up_block_types"]),
                           "one block per width, cross-attention in the up blocks mirroring the down blocks")
    depths = _per_block(c["transformer_layers_per_block"] or 1, n, "transformer_layers_per_block")
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in depths):
        raise _unsupported("transformer_layers_per_block", c["transformer_layers_per_block"], "positive integers")
    reverse = c.get("reverse_transformer_layers_per_block")
    if reverse is not None and [_per_block(r, 1, "reverse_transformer_layers_per_block")[0] if isinstance(r, list) else r
                                for r in reverse] != depths[::-1]:
        raise _unsupported("reverse_transformer_layers_per_block", reverse, "the up blocks mirror the down blocks' depths")
    depth = depths[0] if len(set(depths)) == 1 else tuple(depths)
    # diffusers' legacy naming: attention_head_dim is the number of heads when num_attention_heads is unset
    heads = _per_block(c["num_attention_heads"] or c["attention_head_dim"], n, "attention_head_dim")
    for width, h in zip(widths, heads):
        if width % h:
            raise _unsupported("attention_head_dim", c["attention_head_dim"], f"{h} heads do not divide {width} channels")
    if c["sample_size"] is None:
        raise _unsupported("sample_size", None, "give the latent size the U-Net is used at")
    size = c["sample_size"] if isinstance(c["sample_size"], int) else c["sample_size"][0]
    model = UNet(ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=c["layers_per_block"],
                 attn_resolutions=(), attn_levels=tuple(i for i, a in enumerate(down_attn) if a),
                 level_heads=tuple(heads), dropout=float(c["dropout"]), out_channels=c["out_channels"],
                 num_groups=c["norm_num_groups"], norm_eps=float(c["norm_eps"]),
                 flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]),
                 downsample_padding=int(c["downsample_padding"]), context_dim=int(c["cross_attention_dim"]),
                 linear_projection=bool(c["use_linear_projection"]), transformer_depth=depth,
                 addition_time_embed_dim=int(added),
                 addition_embed_dim=int(c["projection_class_embeddings_input_dim"] or 0) if added else 0)
    return model, (size, size, c["in_channels"])


def config_from_module(model: UNet, input_shape) -> dict:
    """The UNet2DConditionModel config.json dict of a text-conditioned U-Net at input shape (H, W, C)."""
    size, _, channels = input_shape
    levels = len(model.ch_mult)
    attn = [level in model.attn_levels for level in range(levels)]
    return {**{k: v for k, v in DEFAULTS.items()}, "_class_name": CLASS_NAME, "sample_size": size,
            "in_channels": channels, "out_channels": model.out_channels or channels,
            "flip_sin_to_cos": model.flip_sin_to_cos, "freq_shift": int(model.freq_shift),
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
            "block_out_channels": [model.ch * m for m in model.ch_mult], "layers_per_block": model.num_res_blocks,
            "downsample_padding": model.downsample_padding, "dropout": model.dropout,
            "norm_num_groups": model.num_groups, "norm_eps": model.norm_eps,
            "cross_attention_dim": model.context_dim,
            "attention_head_dim": list(model.level_heads or [model.num_heads] * levels),
            "use_linear_projection": model.linear_projection,
            "transformer_layers_per_block": model.transformer_depth if isinstance(model.transformer_depth, int)
            else list(model.transformer_depth), **_text_time_config(model)}


def _text_time_config(model: UNet) -> dict:
    """SDXL's added-embedding fields (none for SD 1.x / 2.x)."""
    if not model.addition_time_embed_dim:
        return {}
    return {"addition_embed_type": "text_time", "addition_time_embed_dim": model.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": model.addition_embed_dim}


def entries(model: UNet, input_shape):
    """The parameter table (`tensors.Entry`) of a text-conditioned U-Net, and its copies (none)."""
    transformer = lambda ours, theirs, level: transformer2d_entries(ours, theirs, model.depth_at(level),
                                                                    model.linear_projection)
    added = [Entry(("add_emb_dense0",), "dense", "add_embedding.linear_1"),
             Entry(("add_emb_dense1",), "dense", "add_embedding.linear_2")] if model.addition_time_embed_dim else []
    return unet_entries(model, lambda level: level in model.attn_levels, transformer,
                        transformer("mid_attn", "mid_block.attentions.0", None) + added), []
