"""transformers' `CLIPTextModel` (a pipeline's text_encoder/: config.json, model.safetensors) <->
this library's `CLIPTextEncoder`, and the CLIP tokenizer (tokenizer/: vocab.json, merges.txt)
through the `tokenizers` library; neither needs torch or transformers.

The state dict's names are transformers' with or without the "text_model." prefix (Stable
Diffusion's checkpoints have it, transformers 5 writes without); export writes it, which both
read.
"""
from __future__ import annotations

import logging
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.errors import UsageError
from diffusion_jax.interop import files
from diffusion_jax.interop.tensors import Entry, params_from_tensors, tensors_from_params
from diffusion_jax.models import abstract_init
from diffusion_jax.models.text_encoder import ACTIVATIONS, CLIPTextEncoder

log = logging.getLogger(__name__)

CLASS_NAME = "CLIPTextModel"
WITH_PROJECTION = "CLIPTextModelWithProjection"  # SDXL's second text encoder
PROJECTION = "text_projection"
WEIGHTS = "model.safetensors"
PREFIX = "text_model."
# CLIPTextConfig's fields read here, with transformers' defaults (types checked).
DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                eos_token_id=49407, bos_token_id=49406, pad_token_id=1, attention_dropout=0.0, projection_dim=512)
NULLABLE = ("projection_dim", "pad_token_id", "bos_token_id", "layer_norm_eps", "attention_dropout")


def module_from_config(config: dict) -> CLIPTextEncoder:
    """The encoder of a CLIPTextConfig config.json dict (a CLIPTextModelWithProjection's with its
    projection)."""
    architectures = config.get("architectures") or [CLASS_NAME]
    if CLASS_NAME not in architectures and WITH_PROJECTION not in architectures:
        raise UsageError(f"text encoder config architectures = {config['architectures']!r} is not supported: "
                         f"a {CLASS_NAME} or a {WITH_PROJECTION} loads")
    files.check_field_types(config, DEFAULTS, NULLABLE)
    c = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if c["hidden_act"] not in ACTIVATIONS:
        raise UsageError(f"text encoder config field hidden_act = {c['hidden_act']!r} is not supported: "
                         f"choose one of {sorted(ACTIVATIONS)}")
    eos = c["eos_token_id"][0] if isinstance(c["eos_token_id"], list) else c["eos_token_id"]
    return CLIPTextEncoder(vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
                           intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
                           num_heads=int(c["num_attention_heads"]), max_positions=int(c["max_position_embeddings"]),
                           activation=c["hidden_act"], layer_norm_eps=float(c["layer_norm_eps"]),
                           eos_token_id=int(eos),
                           projection_dim=int(c["projection_dim"]) if WITH_PROJECTION in architectures else 0)


def config_from_module(model: CLIPTextEncoder) -> dict:
    return {"architectures": [WITH_PROJECTION if model.projection_dim else CLASS_NAME], "model_type": "clip_text_model",
            "vocab_size": model.vocab_size,
            "hidden_size": model.hidden_size, "intermediate_size": model.intermediate_size,
            "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
            "max_position_embeddings": model.max_positions, "hidden_act": model.activation,
            "layer_norm_eps": model.layer_norm_eps, "eos_token_id": model.eos_token_id, "bos_token_id": 49406,
            "pad_token_id": 1, "attention_dropout": 0.0, "projection_dim": model.projection_dim or 512}


def entries(model: CLIPTextEncoder) -> list:
    """The table of Flax parameters <-> transformers tensors (without the text_model. prefix)."""
    table = [Entry(("token_embedding",), "embed", "embeddings.token_embedding"),
             Entry(("position_embedding",), "embed", "embeddings.position_embedding"),
             Entry(("final_layer_norm",), "norm", "final_layer_norm")]
    for i in range(model.num_layers):
        ours, theirs = f"layers_{i}", f"encoder.layers.{i}"
        table += [Entry((ours, "layer_norm1"), "norm", f"{theirs}.layer_norm1"),
                  Entry((ours, "layer_norm2"), "norm", f"{theirs}.layer_norm2"),
                  Entry((ours, "fc1"), "dense", f"{theirs}.mlp.fc1"),
                  Entry((ours, "fc2"), "dense", f"{theirs}.mlp.fc2")]
        table += [Entry((ours, "self_attn", p), "dense", f"{theirs}.self_attn.{p}")
                  for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    if model.projection_dim:  # outside text_model. in the state dict
        table.append(Entry(("text_projection",), "linear", PROJECTION))
    return table


def param_shapes(model: CLIPTextEncoder):
    return abstract_init(model, jax.ShapeDtypeStruct((1, model.max_positions), jnp.int32))


class TextEncoder(NamedTuple):
    model: CLIPTextEncoder
    params: dict
    config: dict


def load_text_encoder(directory) -> TextEncoder:
    """A transformers CLIPTextModel directory (config.json, model.safetensors) as a TextEncoder."""
    directory = pathlib.Path(directory)
    config = files.read_config(directory)
    model = module_from_config(config)
    tensors = {(name[len(PREFIX):] if name.startswith(PREFIX) else name): value
               for name, value in files.read_tensors(directory, WEIGHTS, "pytorch_model.bin").items()
               if not name.endswith("position_ids")}  # a buffer older checkpoints saved
    params = params_from_tensors(entries(model), tensors, param_shapes(model), f"{CLASS_NAME} ({directory})")
    return TextEncoder(model, jax.tree_util.tree_map(jnp.asarray, params), config)


def save_text_encoder(directory, model: CLIPTextEncoder, params) -> pathlib.Path:
    """Write a transformers CLIPTextModel directory (the text_model. names)."""
    directory = pathlib.Path(directory)
    tensors = {(k if k.startswith(PROJECTION + ".") else PREFIX + k): v
               for k, v in tensors_from_params(entries(model), params).items()}
    files.write_model(directory, config_from_module(model), tensors, WEIGHTS)
    return directory
