"""Text: prompts through the run's frozen text encoder (CLIP's, from a Stable Diffusion pipeline
directory or "random"), the embeddings [B, L, D] a U-Net attends to (model.overrides.context_dim).
The null condition is the embeddings [1, L, D] of the empty prompt, or of a negative prompt. A run
has it with model.text_encoder; its data are the captions of a split (`data.captions`).

    encode = TEXT.encoder(config)
    cond = encode(["a photo of a cat"])         # text embeddings [B, 77, D]

A kind of text (this one, SDXL's) says which encoders it runs (`encoders`), what a prompt becomes
before them (`inputs`: token ids) and the condition they make of it (`condition`, a pure function of
the encoders' parameters); the rest is shared: the encoders run jitted, with the LoRA files of
sample.loras and a LoRA run's own adapters on them, and a LoRA run that trains the encoders'
adapters (lora.text_encoder) runs `condition` inside its train step on the batch's `inputs`.
"""
from __future__ import annotations

import jax
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


_COMPILED = {}  # (kind, text encoder source, clip_skip) -> the jitted condition


def clip_skip(config) -> int:
    return int(config.model.get("clip_skip", 0) or 0)


class Text(ConditionKind):
    name = "text"
    description = "text-conditioned (model.text_encoder)"
    how_to_give = "give prompts (--prompt TEXT, or --prompts FILE)"
    file_key = "prompts"  # a generate job's settings: prompts_file, prompts_sha256
    arguments = ("prompts", "negative_prompt")
    null_from_files = True  # the encoders' embedding of the empty prompt

    def implied_by(self, config) -> bool:
        return bool(text_encoder_source(config))

    def encoders(self, config) -> dict:
        """{component: TextEncoder} the condition runs, by the names LoRA files give them."""
        return {"text_encoder": _parts(config)[0]}

    def inputs(self, config, prompts):
        """What the encoders take for `prompts`: token ids int32 [B, L]."""
        return np.asarray(_parts(config)[1](list(prompts)), np.int32)

    def training_inputs(self, config, data):
        """`inputs` of a split's captions [N, ...]."""
        if data.captions is None:
            raise UsageError(f"this run is {self.description} but data {config.data.name!r} has no captions: give a "
                             "folder with NAME.txt beside each image (or captions.jsonl), a tfds data set with "
                             "data.caption_feature, or the digits")
        return self.inputs(config, data.captions)

    def condition(self, config, params: dict, inputs):
        """The condition of `inputs` [B, ...] with the encoders' parameters {component: params}
        (traceable): the embeddings [B, L, D] (clip_skip layers before the last, as diffusers)."""
        from diffusion_jax.models.text_encoder import text_embeddings

        return text_embeddings(self.encoders(config)["text_encoder"].model, params["text_encoder"], inputs,
                               clip_skip=clip_skip(config))

    def encode(self, config, adapters=None):
        """inputs -> the condition, jitted once per kind, encoders and clip_skip; with the LoRA files of
        sample.loras and `adapters` ({component: LoraLayers}, a LoRA run's) on the encoders."""
        from diffusion_jax.interop.adapters import BACKBONES, run_loras
        from diffusion_jax.lora import with_adapters

        encoders = self.encoders(config)
        key = (self.name, text_encoder_source(config), clip_skip(config))
        if key not in _COMPILED:
            _COMPILED[key] = jax.jit(lambda params, layers, inputs: self.condition(
                config, {c: with_adapters(p, layers.get(c, ())) for c, p in params.items()}, inputs))
        files = run_loras(config, {c: (e.model, None, e.params) for c, e in encoders.items()}, skip=BACKBONES)
        layers = {c: files.get(c, ()) + tuple((adapters or {}).get(c, ())) for c in encoders}
        params = {c: e.params for c, e in encoders.items()}
        return lambda inputs: _COMPILED[key](params, layers, inputs)

    def training_conditions(self, config, data):
        """Every caption's condition through the frozen encoders, computed once when the embeddings fit in
        EMBEDDINGS_IN_MEMORY; else the captions' `inputs` and the encoders to run a batch at a time."""
        inputs, encode = self.training_inputs(config, data), self.encode(config)
        width = sum(e.model.hidden_size for e in self.encoders(config).values())
        rows = len(data.captions)
        if rows * 77 * width * 4 > EMBEDDINGS_IN_MEMORY:
            return inputs, lambda batch: jax.tree_util.tree_map(np.asarray, encode(batch))
        parts = [encode(jax.tree_util.tree_map(lambda v: v[i:i + 256], inputs)) for i in range(0, rows, 256)]
        return jax.tree_util.tree_map(lambda *leaves: np.concatenate([np.asarray(x) for x in leaves]), *parts), None

    def values(self, config, given) -> list:
        return [str(v) for v in given]

    def default_values(self, config) -> list:
        return [""]  # the empty prompt

    def encoder(self, config, adapters=None):
        """prompts (a list of strings) -> the condition (text embeddings [B, L, D], float32, on device)."""
        encode = self.encode(config, adapters)
        return lambda prompts: encode(self.inputs(config, prompts))

    def null(self, config, negative=None, adapters=None):
        return self.encoder(config, adapters)([negative or ""])


TEXT = register_kind(Text())
