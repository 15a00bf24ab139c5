"""Class conditioning, decided in one place: which classes a run's model takes, the labels of
samples (given, checked, cycled by sample index), and whether a guidance scale guides.

Classifier-free guidance follows diffusers and DiT: out = out_uncond + s (out_cond - out_uncond),
so s = 1 is the conditional model without guidance (the default), s > 1 is guided and s = 0 is
the unconditional model (the null label). `guidance_enabled` is the one place that decides it.
"""
from __future__ import annotations

import numpy as np

from diffusion_jax.builders import num_model_classes
from diffusion_jax.errors import UsageError

NO_GUIDANCE = 1.0


def text_encoder_source(config) -> str:
    """The run's text encoder directory, or "random" ("" for a run without text conditioning)."""
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
                "(data.use_labels is False): classifier-free guidance needs a class-conditional "
                "model; drop the guidance scale (1 = no guidance)")
        return False
    return float(guidance_scale) != NO_GUIDANCE


def describe_guidance(config, guidance_scale: float) -> str:
    """How samples at `guidance_scale` were conditioned, for reports and logs."""
    if not conditional(config):
        return "no guidance (unconditional model)"
    if not guidance_enabled(config, guidance_scale):
        return "no guidance (conditional model, scale 1)"
    return f"classifier-free guidance scale {float(guidance_scale):g}"


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
