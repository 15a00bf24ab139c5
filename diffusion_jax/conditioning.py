"""Conditions, decided in one place: what a run's model is conditioned on, how a condition is made
(class labels, prompts through the run's frozen text encoder, captions of a data split), how it is
dropped (the train step) and batched (by sample index), and what the null condition is.

A condition is a pytree with a leading batch axis: class labels int32 [B], or text embeddings
float32 [B, L, D]. The null condition (guidance's other half, and what dropout trains) is the null
label (the class count) or the embeddings [1, L, D] of the empty (or negative) prompt, broadcast
leaf by leaf.

Classifier-free guidance follows diffusers and DiT: out = out_uncond + s (out_cond - out_uncond),
so s = 1 is the conditional model without guidance (the default), s > 1 is guided and s = 0 is
the unconditional model. `guidance_enabled` is the one place that decides it.

    encode = prompt_encoder(config)
    cond = encode(["a photo of a cat"])         # text embeddings [B, 77, D]
    null = null_condition(config)               # the empty prompt's [1, 77, D], or the null label
"""
from __future__ import annotations

import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.builders import num_model_classes
from diffusion_jax.errors import UsageError
from diffusion_jax.files import read_text

NO_GUIDANCE = 1.0


# What the run is conditioned on.

def text_encoder_source(config) -> str:
    """The run's text encoder ("random", a pipeline directory or a Hub id; "" for a run without
    text conditioning)."""
    return str(config.model.get("text_encoder", "") or "")


def text_conditioned(config) -> bool:
    """Whether the run's model is conditioned on text embeddings (model.text_encoder is set)."""
    return bool(text_encoder_source(config))


def conditional(config) -> bool:
    return bool(num_model_classes(config)) or text_conditioned(config)


def guidance_enabled(config, guidance_scale: float) -> bool:
    """Whether sampling at `guidance_scale` runs the guided (condition + null condition) model.

    A class- or text-conditional run is guided at any scale but 1; an unconditional run has
    nothing to guide, so a scale other than 1 is an error rather than silently ignored.
    """
    if not conditional(config):
        if float(guidance_scale) != NO_GUIDANCE:
            raise UsageError(
                f"guidance scale {guidance_scale} given, but this run is unconditional "
                "(data.use_labels is False, no model.text_encoder): classifier-free guidance needs a "
                "class- or text-conditional model; drop the guidance scale (1 = no guidance)")
        return False
    return float(guidance_scale) != NO_GUIDANCE


def describe_guidance(config, guidance_scale: float) -> str:
    """How samples at `guidance_scale` were conditioned, for reports and logs."""
    if not conditional(config):
        return "no guidance (unconditional model)"
    if not guidance_enabled(config, guidance_scale):
        return "no guidance (conditional model, scale 1)"
    return f"classifier-free guidance scale {float(guidance_scale):g}"


# Class labels.

def sample_labels(config, num_samples: int):
    """Class labels for samples (0, 1, ..., cycling), or None for an unconditional run."""
    classes = num_model_classes(config)
    return None if not classes else np.arange(num_samples, dtype=np.int32) % classes


def labels_by_index(config, labels, index: np.ndarray):
    """The labels of samples `index` [N]: labels[i % len(labels)], by default i % classes (None
    for an unconditional run)."""
    classes = num_model_classes(config)
    if not classes:
        return None
    cycle = np.arange(classes, dtype=np.int32) if labels is None else np.asarray(labels, np.int32)
    return cycle[index % len(cycle)]


def check_labels(config, labels) -> np.ndarray | None:
    """labels as int32 [N] after checking they are classes of this run (never the null label)."""
    if labels is None:
        return None
    if text_conditioned(config):
        raise UsageError("labels given, but this run is text-conditioned (model.text_encoder): give prompts "
                         "(--prompt TEXT, or --prompts FILE) instead of labels")
    classes = num_model_classes(config)
    if not classes:
        raise UsageError("labels given, but this run is unconditional (data.use_labels is False): "
                         "drop the labels")
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise UsageError(f"labels must be classes in [0, {classes}) for this {classes}-class run, got "
                         f"values in [{labels.min()}, {labels.max()}] (the null label {classes} is "
                         "used by guidance itself)")
    return labels.astype(np.int32)


# Prompts, through the run's frozen text encoder.

def _clip_skip(config) -> int:
    return int(config.model.get("clip_skip", 0) or 0)


def _tokenizer(config):
    from diffusion_jax.interop.text_encoders import text_encoder_parts
    return text_encoder_parts(text_encoder_source(config))[1]


def _ids_encoder(config) -> Callable:
    """ids int32 [B, L] -> embeddings [B, L, D] (jitted; the parameters an argument, not constants)."""
    from diffusion_jax.interop.text_encoders import text_encoder_parts
    from diffusion_jax.models.text_encoder import compiled_text_embeddings

    encoder = text_encoder_parts(text_encoder_source(config))[0]
    encode = compiled_text_embeddings(encoder.model, _clip_skip(config))
    return lambda ids: encode(encoder.params, jnp.asarray(ids))


def prompt_encoder(config) -> Callable:
    """prompts (a list of strings) -> text embeddings [B, L, D] (float32, on device)."""
    if not text_conditioned(config):
        raise UsageError("prompts given, but this run is not text-conditioned (model.text_encoder is unset): "
                         "use --labels for a class-conditional run, or nothing")
    encode_ids, tokenizer = _ids_encoder(config), _tokenizer(config)
    return lambda prompts: encode_ids(tokenizer(prompts))


def read_prompts(path) -> list:
    """The prompts of a text file, one a line (blank lines skipped); an empty file is an error."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file {path}: give a text file with one prompt a line")
    prompts = [line.strip() for line in read_text(path, "the prompts file").splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"the prompts file {path} holds no prompt: write one prompt a line")
    return prompts


def prompts_by_index(prompts, index: np.ndarray) -> list:
    """Sample i's prompt: prompts[i % len(prompts)]."""
    return [prompts[int(i) % len(prompts)] for i in index]


# The null condition, and dropping to it.

def null_condition(config, negative_prompt: str = ""):
    """The condition guidance contrasts with and the train step drops to: the embeddings [1, L, D]
    of the negative (default empty) prompt for a text run, else the null label (the class count)."""
    if text_conditioned(config):
        return prompt_encoder(config)([negative_prompt or ""])
    return np.int32(num_model_classes(config))


def drop_condition(key, cond, probability: float, null):
    """The condition (a pytree, batch axis first: labels [B], text embeddings [B, L, D]) with each
    example's replaced by the null condition (`null`, broadcast leaf by leaf: the null label, the
    empty prompt's embeddings [1, L, D]) with `probability` (classifier-free guidance training).
    This is the only place conditions are dropped: backbones never do it."""
    if cond is None or probability <= 0:
        return cond
    first = jax.tree_util.tree_leaves(cond)[0]
    dropped = jax.random.bernoulli(key, probability, first.shape[:1])

    def drop(c, n):
        where = dropped.reshape(dropped.shape + (1,) * (c.ndim - 1))
        return jnp.where(where, jnp.asarray(n, c.dtype), c)

    return jax.tree_util.tree_map(drop, cond, null)


# The captions of a data split, as a text run's per-example conditions.

def caption_ids(config, data) -> np.ndarray:
    """int32 [N, L]: the tokenized captions of a split (`data.captions`), for a text-conditioned
    run's batches; a split without captions is an error naming what to give."""
    if data.captions is None:
        raise UsageError(f"this run is text-conditioned (model.text_encoder) but data {config.data.name!r} has no "
                         "captions: give a folder with NAME.txt beside each image (or captions.jsonl), a tfds "
                         "data set with data.caption_feature, or the digits")
    return np.asarray(_tokenizer(config)(list(data.captions)), np.int32)


EMBEDDINGS_IN_MEMORY = 256 * 2 ** 20  # bytes: a split's caption embeddings computed once below this


def caption_conditions(config, data) -> tuple[np.ndarray, bool]:
    """(per-example conditions of a split, whether they are embeddings already): the frozen text
    encoder's embeddings [N, L, D] of every caption, computed once, when they fit in
    EMBEDDINGS_IN_MEMORY; else the caption ids [N, L], encoded a batch at a time (`TextBatches`)."""
    from diffusion_jax.interop.text_encoders import text_encoder_parts

    ids = caption_ids(config, data)
    width = text_encoder_parts(text_encoder_source(config))[0].model.hidden_size
    if ids.size * width * 4 > EMBEDDINGS_IN_MEMORY:
        return ids, False
    encode = _ids_encoder(config)
    return np.concatenate([np.asarray(encode(ids[i:i + 256])) for i in range(0, len(ids), 256)]), True


class TextBatches:
    """Batch i of a `data.pipeline.Batches` (or `latents.LatentBatches`) whose "cond" holds caption
    ids, with them turned into the frozen text encoder's embeddings [b, L, D]."""

    def __init__(self, batches, config):
        self.batches = batches
        self.encode_ids = _ids_encoder(config)

    def __call__(self, step: int) -> dict:
        batch = dict(self.batches(step))
        batch["cond"] = np.asarray(self.encode_ids(batch["cond"]))
        return batch
