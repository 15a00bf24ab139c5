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

import jax.numpy as jnp
import numpy as np

from diffusion_jax.conditions.registry import register_kind
from diffusion_jax.conditions.text import Text, clip_skip, text_encoder_source
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
    from diffusion_jax.models.text_encoder import sdxl_time_ids

    return sdxl_time_ids(int(config.data.image_size), int(config.data.image_size), batch)


def training_time_ids(config, data) -> np.ndarray:
    """float32 [N, 6] of a split: each image's original size and crop corner (`ImageData.sizes`, a
    folder's) and the run's image size; the sampling ones where the data keep no original sizes."""
    if data.sizes is None:
        return sampling_time_ids(config, len(data.images))
    size = int(config.data.image_size)
    target = np.broadcast_to(np.float32([size, size]), (len(data.sizes), 2))
    return np.concatenate([np.asarray(data.sizes, np.float32), target], axis=1)


class SDXL(Text):
    name = "sdxl"
    description = "SDXL text-conditioned (data.condition='sdxl')"

    def implied_by(self, config) -> bool:
        return False  # set by name: an SDXL run's text encoder also implies "text"

    def encoders(self, config) -> dict:
        (encoder, _), second = _parts(config)
        return {"text_encoder": encoder, "text_encoder_2": second.encoder}

    def inputs(self, config, prompts, time_ids=None):
        """{"ids", "ids_2": each tokenizer's ids int32 [B, L], "time_ids": float32 [B, 6] (default the
        sampling ones)}."""
        (_, tokenizer), second = _parts(config)
        return {"ids": np.asarray(tokenizer(list(prompts)), np.int32),
                "ids_2": np.asarray(second.tokenizer(list(prompts)), np.int32),
                "time_ids": sampling_time_ids(config, len(prompts)) if time_ids is None else time_ids}

    def training_inputs(self, config, data):
        if data.captions is None:
            return super().training_inputs(config, data)  # its error: the data have no captions
        return self.inputs(config, data.captions, training_time_ids(config, data))

    def condition(self, config, params: dict, inputs):
        from diffusion_jax.models.text_encoder import sdxl_condition

        encoders = self.encoders(config)
        cond = sdxl_condition(encoders["text_encoder"].model, encoders["text_encoder_2"].model, clip_skip(config))(
            params["text_encoder"], params["text_encoder_2"], inputs["ids"], inputs["ids_2"])
        return {**cond, "time_ids": jnp.asarray(inputs["time_ids"], jnp.float32)}

    def null(self, config, negative=None, adapters=None):
        from diffusion_jax.models.text_encoder import sdxl_zero_null

        cond = self.encoder(config, adapters)([negative or ""])
        if negative is None and _parts(config)[1].force_zeros_for_empty_prompt:
            return sdxl_zero_null(cond)
        return cond


SDXL_KIND = register_kind(SDXL())
