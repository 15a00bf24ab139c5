"""Text: prompts through the run's frozen text encoder (CLIP's, from a Stable Diffusion pipeline
directory or "random"), the embeddings [B, L, D] a U-Net attends to (model.overrides.context_dim).
The null condition is the embeddings [1, L, D] of the empty prompt, or of a negative prompt. A run
has it with model.text_encoder; its data are the captions of a split (`data.captions`).

    encode = TEXT.encoder(config)
    cond = encode(["a photo of a cat"])         # text embeddings [B, 77, D]
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from diffusion_jax.conditions.registry import ConditionKind, register_kind
from diffusion_jax.errors import UsageError

EMBEDDINGS_IN_MEMORY = 256 * 2 ** 20  # bytes: a split's caption embeddings computed once below this


def text_encoder_source(config) -> str:
    """The run's text encoder ("random", a pipeline directory or a Hub id; "" for a run without
    text conditioning)."""
    return str(config.model.get("text_encoder", "") or "")


def _parts(config):
    from diffusion_jax.interop.text_encoders import text_encoder_parts
    return text_encoder_parts(text_encoder_source(config))


def ids_encoder(config) -> Callable:
    """ids int32 [B, L] -> embeddings [B, L, D] (jitted; the parameters an argument, not constants)."""
    from diffusion_jax.models.text_encoder import compiled_text_embeddings

    from diffusion_jax.interop.adapters import BACKBONES, run_loras

    encoder = _parts(config)[0]
    encode = compiled_text_embeddings(encoder.model, int(config.model.get("clip_skip", 0) or 0))
    parts = {"text_encoder": (encoder.model, None, encoder.params)}
    loras = run_loras(config, parts, skip=BACKBONES).get("text_encoder", ())  # LoRA files' layers on the encoder (sample.loras)
    return lambda ids: encode(encoder.params, jnp.asarray(ids), loras)


class Text(ConditionKind):
    name = "text"
    description = "text-conditioned (model.text_encoder)"
    how_to_give = "give prompts (--prompt TEXT, or --prompts FILE)"
    file_key = "prompts"  # a generate job's settings: prompts_file, prompts_sha256
    arguments = ("prompts", "negative_prompt")

    def implied_by(self, config) -> bool:
        return bool(text_encoder_source(config))

    def training_conditions(self, config, data):
        """The frozen encoder's embeddings [N, L, D] of every caption, computed once when they fit in
        EMBEDDINGS_IN_MEMORY; else the caption ids [N, L] and the encoder to run a batch at a time."""
        if data.captions is None:
            raise UsageError(f"this run is text-conditioned (model.text_encoder) but data {config.data.name!r} has "
                             "no captions: give a folder with NAME.txt beside each image (or captions.jsonl), a tfds "
                             "data set with data.caption_feature, or the digits")
        encoder, tokenizer = _parts(config)
        ids = np.asarray(tokenizer(list(data.captions)), np.int32)
        encode = ids_encoder(config)
        if ids.size * encoder.model.hidden_size * 4 > EMBEDDINGS_IN_MEMORY:
            return ids, lambda batch_ids: np.asarray(encode(batch_ids))
        return np.concatenate([np.asarray(encode(ids[i:i + 256])) for i in range(0, len(ids), 256)]), None

    def adapted_parts(self, config) -> tuple:
        return ("text_encoder",)

    def values(self, config, given) -> list:
        return [str(v) for v in given]

    def default_values(self, config) -> list:
        return [""]  # the empty prompt

    def encoder(self, config) -> Callable:
        """prompts (a list of strings) -> text embeddings [B, L, D] (float32, on device)."""
        encode_ids, tokenizer = ids_encoder(config), _parts(config)[1]
        return lambda prompts: encode_ids(tokenizer(list(prompts)))

    def null(self, config, negative=None):
        return self.encoder(config)([negative or ""])


TEXT = register_kind(Text())
