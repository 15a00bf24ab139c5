"""diffusers `AutoencoderKL` <-> this library's `AutoencoderKL` (stabilityai/sd-vae-ft-ema and
-mse, the VAE of DiT and Stable Diffusion)."""
from __future__ import annotations

from diffusion_jax.errors import UsageError
from diffusion_jax.interop.tensors import Entry, attention_entries, resnet_entries
from diffusion_jax.models.vae import AutoencoderKL

CLASS_NAME = "AutoencoderKL"

DEFAULTS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
                act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.18215,
                shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True, use_quant_conv=True,
                use_post_quant_conv=True, mid_block_add_attention=True)


def module_from_config(config: dict):
    """(AutoencoderKL module, image shape (H, W, C)) of an AutoencoderKL config.json dict."""
    c = {**DEFAULTS, **config}
    levels = len(c["block_out_channels"])
    checks = [("act_fn", c["act_fn"] == "silu", "'silu' only"),
              ("out_channels", c["out_channels"] == c["in_channels"], "equal to in_channels"),
              ("down_block_types", list(c["down_block_types"]) == ["DownEncoderBlock2D"] * levels,
               "DownEncoderBlock2D, one per width"),
              ("up_block_types", list(c["up_block_types"]) == ["UpDecoderBlock2D"] * levels,
               "UpDecoderBlock2D, one per width"),
              ("latents_mean", c["latents_mean"] is None and c["latents_std"] is None, "None (per-channel "
               "latent statistics are not supported)")]
    for field, ok, allowed in checks:
        if not ok:
            raise UsageError(f"AutoencoderKL config field {field} = {c[field]!r} is not supported: {allowed}")
    model = AutoencoderKL(in_channels=c["in_channels"], latent_channels=c["latent_channels"],
                          block_out_channels=tuple(c["block_out_channels"]), layers_per_block=c["layers_per_block"],
                          num_groups=c["norm_num_groups"], mid_attention=bool(c["mid_block_add_attention"]),
                          use_quant_conv=bool(c["use_quant_conv"]), use_post_quant_conv=bool(c["use_post_quant_conv"]),
                          scaling_factor=float(c["scaling_factor"]), shift_factor=float(c["shift_factor"] or 0.0))
    size = c["sample_size"] if isinstance(c["sample_size"], int) else c["sample_size"][0]
    return model, (size, size, c["in_channels"])


def config_from_module(model: AutoencoderKL, input_shape) -> dict:
    levels = len(model.block_out_channels)
    return {"_class_name": CLASS_NAME, "in_channels": model.in_channels, "out_channels": model.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(model.block_out_channels), "layers_per_block": model.layers_per_block,
            "act_fn": "silu", "latent_channels": model.latent_channels, "norm_num_groups": model.num_groups,
            "sample_size": input_shape[0], "scaling_factor": model.scaling_factor,
            "shift_factor": model.shift_factor or None, "use_quant_conv": model.use_quant_conv,
            "use_post_quant_conv": model.use_post_quant_conv, "mid_block_add_attention": model.mid_attention}


def _middle(ours, theirs, attention):
    table = resnet_entries((ours, "mid_res0"), f"{theirs}.mid_block.resnets.0", False, temb=False)
    table += resnet_entries((ours, "mid_res1"), f"{theirs}.mid_block.resnets.1", False, temb=False)
    return table + (attention_entries((ours, "mid_attn"), f"{theirs}.mid_block.attentions.0") if attention else [])


def entries(model: AutoencoderKL, input_shape):
    """The parameter table of an AutoencoderKL, and its (copy, original) pairs (none)."""
    widths = list(model.block_out_channels)
    levels = len(widths)
    table = [Entry(("encoder", "conv_in"), "conv", "encoder.conv_in")]
    width = widths[0]
    for level in range(levels):
        for i in range(model.layers_per_block):
            table += resnet_entries(("encoder", f"down{level}_res{i}"), f"encoder.down_blocks.{level}.resnets.{i}",
                             width != widths[level], temb=False)
            width = widths[level]
        if level != levels - 1:
            table.append(Entry(("encoder", f"down{level}_resample"), "conv",
                               f"encoder.down_blocks.{level}.downsamplers.0.conv"))
    table += _middle("encoder", "encoder", model.mid_attention)
    table += [Entry(("encoder", "norm_out"), "norm", "encoder.conv_norm_out"),
              Entry(("encoder", "conv_out"), "conv", "encoder.conv_out"),
              Entry(("decoder", "conv_in"), "conv", "decoder.conv_in")]
    table += _middle("decoder", "decoder", model.mid_attention)
    width = widths[-1]
    for block, level in enumerate(reversed(range(levels))):
        for i in range(model.layers_per_block + 1):
            table += resnet_entries(("decoder", f"up{level}_res{i}"), f"decoder.up_blocks.{block}.resnets.{i}",
                             width != widths[level], temb=False)
            width = widths[level]
        if level != 0:
            table.append(Entry(("decoder", f"up{level}_resample"), "conv",
                               f"decoder.up_blocks.{block}.upsamplers.0.conv"))
    table += [Entry(("decoder", "norm_out"), "norm", "decoder.conv_norm_out"),
              Entry(("decoder", "conv_out"), "conv", "decoder.conv_out")]
    if model.use_quant_conv:
        table.append(Entry(("quant_conv",), "conv", "quant_conv"))
    if model.use_post_quant_conv:
        table.append(Entry(("post_quant_conv",), "conv", "post_quant_conv"))
    return table, []
