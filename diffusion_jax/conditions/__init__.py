"""Condition kinds (see `registry`): class labels, text and SDXL's, each defined in its own module."""
from diffusion_jax.conditions import labels, sdxl, text  # noqa: F401  (registers the kinds)
from diffusion_jax.conditions.registry import (NO_GUIDANCE, ConditionKind, broadcast_condition, by_index, condition_kind, conditional,
                                               describe_guidance, drop_condition, dropped_examples, given_values, guidance_enabled,
                                               model_fields, read_values, register_kind, taking_kind)

__all__ = ["NO_GUIDANCE", "ConditionKind", "broadcast_condition", "by_index", "condition_kind", "conditional", "describe_guidance",
           "drop_condition", "dropped_examples", "given_values", "guidance_enabled", "model_fields", "read_values", "register_kind",
           "taking_kind"]
