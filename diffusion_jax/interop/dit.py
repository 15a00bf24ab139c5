"""diffusers `DiTTransformer2DModel` <-> this library's `DiT` (facebook/DiT-XL-2-256 and -512).

diffusers keeps a copy of the timestep and label embedders in every block (each block's
AdaLayerNormZero owns one) and uses block 0's; the DiT here has one. Import checks that the
copies are identical, export writes them.
"""
from __future__ import annotations

from diffusion_jax.errors import UsageError
from diffusion_jax.interop.tensors import Entry
from diffusion_jax.models.dit import DiT

CLASS_NAME = "DiTTransformer2DModel"
# facebook/DiT-XL-2-256 and -512 predate that class: their config says Transformer2DModel with
# norm_type "ada_norm_zero" and a patch size, which diffusers loads as a DiTTransformer2DModel.
LEGACY_CLASS_NAME = "Transformer2DModel"

DEFAULTS = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None, num_layers=28,
                dropout=0.0, norm_num_groups=32, attention_bias=True, sample_size=32, patch_size=2,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False,
                norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5)
_FIXED = dict(dropout=0.0, attention_bias=True, activation_fn="gelu-approximate", norm_type="ada_norm_zero",
              norm_elementwise_affine=False)
# diffusers' CombinedTimestepLabelEmbeddings: 256 frequencies, sin/cos flipped, shift 1.
FREQ_DIM, FREQ_SHIFT = 256, 1.0
_EMBEDDER = "norm1.emb"


def module_from_config(config: dict):
    """(DiT module, input shape (H, W, C)) of a DiTTransformer2DModel config.json dict."""
    c = {**DEFAULTS, **config}
    if config.get("_class_name") == LEGACY_CLASS_NAME:
        for field in ("cross_attention_dim", "num_vector_embeds", "caption_channels"):
            if config.get(field) is not None:
                raise UsageError(f"Transformer2DModel config field {field} = {config[field]!r} is not supported: "
                                 "only its DiT form (ada_norm_zero, patch_size, no cross-attention) loads")
        if config.get("norm_type") != "ada_norm_zero" or not config.get("patch_size"):
            raise UsageError(f"Transformer2DModel config field norm_type = {config.get('norm_type')!r} is not "
                             "supported: only its DiT form (norm_type 'ada_norm_zero' with a patch_size) loads")
    for field, value in _FIXED.items():
        if c[field] != value and not (field == "dropout" and float(c[field]) == 0.0):
            raise UsageError(f"DiTTransformer2DModel config field {field} = {c[field]!r} is not supported: "
                             f"this DiT supports {value!r} only")
    if not c["num_embeds_ada_norm"]:
        raise UsageError("DiTTransformer2DModel config field num_embeds_ada_norm must be the number of classes")
    in_ch = c["in_channels"]
    out_ch = c["out_channels"] or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise UsageError(f"DiTTransformer2DModel config field out_channels = {out_ch} is not supported: "
                         f"in_channels ({in_ch}) or twice that (learned sigma)")
    model = DiT(patch_size=c["patch_size"], hidden=c["num_attention_heads"] * c["attention_head_dim"],
                depth=c["num_layers"], num_heads=c["num_attention_heads"], num_classes=c["num_embeds_ada_norm"],
                learn_sigma=out_ch == 2 * in_ch, freq_dim=FREQ_DIM, freq_shift=FREQ_SHIFT,
                mlp_norm_eps=float(c["norm_eps"]))
    size = c["sample_size"]
    return model, (size, size, in_ch)


def config_from_module(model: DiT, input_shape) -> dict:
    """The DiTTransformer2DModel config.json dict of a DiT used at input shape (H, W, C)."""
    size, width, channels = input_shape
    problems = []
    if size != width:
        problems.append(f"a square input (got {size}x{width})")
    if not model.num_classes:
        problems.append("class labels (num_classes > 0)")
    if (model.freq_dim, model.freq_shift) != (FREQ_DIM, FREQ_SHIFT):
        problems.append(f"freq_dim={FREQ_DIM}, freq_shift={FREQ_SHIFT} (diffusers' timestep embedding)")
    if model.hidden % model.num_heads or model.mlp_ratio != 4.0 or model.out_channels not in (None, channels):
        problems.append("hidden divisible by num_heads, mlp_ratio 4, out_channels = input channels")
    if problems:
        raise UsageError("DiTTransformer2DModel cannot represent this DiT; it needs " + "; ".join(problems))
    return {"_class_name": CLASS_NAME, "num_attention_heads": model.num_heads,
            "attention_head_dim": model.hidden // model.num_heads, "in_channels": channels,
            "out_channels": channels * (2 if model.learn_sigma else 1), "num_layers": model.depth,
            "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": size,
            "patch_size": model.patch_size, "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": model.num_classes, "upcast_attention": False, "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False, "norm_eps": model.mlp_norm_eps}


def _embedder_names(block: int):
    prefix = f"transformer_blocks.{block}.{_EMBEDDER}"
    return [f"{prefix}.timestep_embedder.linear_1.weight", f"{prefix}.timestep_embedder.linear_1.bias",
            f"{prefix}.timestep_embedder.linear_2.weight", f"{prefix}.timestep_embedder.linear_2.bias",
            f"{prefix}.class_embedder.embedding_table.weight"]


def entries(model: DiT, input_shape):
    """The parameter table of a DiT, and its (copy, original) tensor pairs."""
    first = f"transformer_blocks.0.{_EMBEDDER}"
    table = [Entry(("x_embedder",), "conv", "pos_embed.proj"),
             Entry(("t_embedder_fc1",), "dense", f"{first}.timestep_embedder.linear_1"),
             Entry(("t_embedder_fc2",), "dense", f"{first}.timestep_embedder.linear_2"),
             Entry(("y_embedder",), "embed", f"{first}.class_embedder.embedding_table"),
             Entry(("final_adaLN_modulation",), "dense", "proj_out_1"),
             Entry(("final_linear",), "dense", "proj_out_2")]
    for i in range(model.depth):
        theirs = f"transformer_blocks.{i}"
        table += [Entry((f"block{i}", "adaLN_modulation"), "dense", f"{theirs}.norm1.linear"),
                  Entry((f"block{i}", "attn", "qkv"), "qkv", f"{theirs}.attn1"),
                  Entry((f"block{i}", "attn", "proj"), "dense", f"{theirs}.attn1.to_out.0"),
                  Entry((f"block{i}", "mlp_fc1"), "dense", f"{theirs}.ff.net.0.proj"),
                  Entry((f"block{i}", "mlp_fc2"), "dense", f"{theirs}.ff.net.2")]
    copies = [(copy, original) for i in range(1, model.depth)
              for copy, original in zip(_embedder_names(i), _embedder_names(0))]
    return table, copies
