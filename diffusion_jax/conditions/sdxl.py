"""SDXL: prompts through both of an SDXL pipeline's frozen text encoders, and the micro-conditioning
of Podell et al. 2023 (each training image's original size, the top-left corner of its crop, the
target size). A run has it with data.condition = "sdxl" (an imported StableDiffusionXLPipeline
sets it) and model.text_encoder, the pipeline's directory. The condition is the tree

    {"embeddings": [B, 77, D1 + D2]  both encoders' penultimate hidden states side by side,
     "pooled":     [B, P]            the second encoder's projected pooled output,
     "time_ids":   [B, 6]            (original H, W, crop top, crop left, target H, W)}

At sampling the time ids are the run's image size with no crop, as diffusers' pipeline gives them.
The null condition (guidance's other half, what cond_dropout trains) is, with the pipeline's
force_zeros_for_empty_prompt (SDXL's), zero embeddings and pooled output, as SDXL was trained; without
it, or for a negative prompt, that prompt's; its time ids are the sampling ones.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.conditions.registry import register_kind
from diffusion_jax.conditions.text import EMBEDDINGS_IN_MEMORY, Text, text_encoder_source
from diffusion_jax.errors import UsageError


def _parts(config):
    from diffusion_jax.interop.text_encoders import second_text_encoder_parts, text_encoder_parts

    source = text_encoder_source(config)
    if not source:
        raise UsageError("data.condition is 'sdxl' but model.text_encoder is not set: give the SDXL pipeline's "
                         "directory (import the pipeline, which sets both)")
    return text_encoder_parts(source), second_text_encoder_parts(source)


def sampling_time_ids(config, batch: int) -> np.ndarray:
    """float32 [batch, 6]: the run's image size, no crop, the image size."""
    size = int(config.data.image_size)
    return np.tile(np.float32([size, size, 0, 0, size, size]), (batch, 1))


def training_time_ids(config, data) -> np.ndarray:
    """float32 [N, 6] of a split: each image's original size and crop corner (`ImageData.sizes`, a
    folder's) and the run's image size; the sampling ones where the data keep no original sizes."""
    if data.sizes is None:
        return sampling_time_ids(config, len(data.images))
    size = int(config.data.image_size)
    target = np.broadcast_to(np.float32([size, size]), (len(data.sizes), 2))
    return np.concatenate([np.asarray(data.sizes, np.float32), target], axis=1)


def ids_encoder(config):
    """{"ids": int32 [B, L], "ids_2": int32 [B, L], "time_ids": [B, 6]} -> the condition (jitted; the
    LoRA files of sample.loras on either encoder)."""
    from diffusion_jax.interop.adapters import BACKBONES, run_loras
    from diffusion_jax.models.text_encoder import compiled_sdxl_condition

    (encoder, _), second = _parts(config)
    encode = compiled_sdxl_condition(encoder.model, second.encoder.model, int(config.model.get("clip_skip", 0) or 0))
    parts = {"text_encoder": (encoder.model, None, encoder.params),
             "text_encoder_2": (second.encoder.model, None, second.encoder.params)}
    loras = run_loras(config, parts, skip=BACKBONES)

    def condition(batch):
        cond = encode(encoder.params, second.encoder.params, jnp.asarray(batch["ids"]), jnp.asarray(batch["ids_2"]),
                      loras.get("text_encoder", ()), loras.get("text_encoder_2", ()))
        return {**cond, "time_ids": jnp.asarray(batch["time_ids"], jnp.float32)}
    return condition


class SDXL(Text):
    name = "sdxl"
    description = "SDXL text-conditioned (data.condition='sdxl')"

    def implied_by(self, config) -> bool:
        return False  # set by name: an SDXL run's text encoder also implies "text"

    def adapted_parts(self, config) -> tuple:
        return ("text_encoder", "text_encoder_2")

    def _ids(self, config, prompts) -> dict:
        (_, tokenizer), second = _parts(config)
        return {"ids": np.asarray(tokenizer(list(prompts)), np.int32),
                "ids_2": np.asarray(second.tokenizer(list(prompts)), np.int32)}

    def training_conditions(self, config, data):
        """Every caption's condition through the frozen encoders, with `training_time_ids`, computed once
        when the embeddings fit in EMBEDDINGS_IN_MEMORY; else the captions' ids and time ids, and the
        encoders to run a batch at a time."""
        if data.captions is None:
            return super().training_conditions(config, data)  # its error: the data have no captions
        given = {**self._ids(config, data.captions), "time_ids": training_time_ids(config, data)}
        encode, ((encoder, _), second) = ids_encoder(config), _parts(config)
        width = encoder.model.hidden_size + second.encoder.model.hidden_size
        if given["ids"].size * width * 4 > EMBEDDINGS_IN_MEMORY:
            return given, lambda batch: jax.tree_util.tree_map(np.asarray, encode(batch))
        parts = [encode(jax.tree_util.tree_map(lambda v: v[i:i + 256], given)) for i in range(0, len(data.captions), 256)]
        return jax.tree_util.tree_map(lambda *leaves: np.concatenate(leaves), *parts), None

    def encoder(self, config):
        """prompts (a list of strings) -> the condition, with the sampling time ids."""
        encode = ids_encoder(config)
        return lambda prompts: encode({**self._ids(config, prompts), "time_ids": sampling_time_ids(config, len(prompts))})

    def null(self, config, negative=None):
        cond = self.encoder(config)([negative or ""])
        if negative is None and _parts(config)[1].force_zeros_for_empty_prompt:
            return {**cond, "embeddings": jnp.zeros_like(cond["embeddings"]), "pooled": jnp.zeros_like(cond["pooled"])}
        return cond


SDXL_KIND = register_kind(SDXL())
