"""Condition kinds (see `registry`): class labels and text, each defined in its own module."""
from diffusion_jax.conditions import labels, text  # noqa: F401  (registers the kinds)
from diffusion_jax.conditions.registry import (NO_GUIDANCE, ConditionKind, by_index, condition_kind, conditional,
                                               describe_guidance, drop_condition, given_values, guidance_enabled,
                                               model_fields, read_values, register_kind, taking_kind)

__all__ = ["NO_GUIDANCE", "ConditionKind", "by_index", "condition_kind", "conditional", "describe_guidance",
           "drop_condition", "given_values", "guidance_enabled", "model_fields", "read_values", "register_kind",
           "taking_kind"]
