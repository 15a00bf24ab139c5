"""Class labels: int32 [B], a learned embedding per class added to the time embedding; the null
label is the class count (guidance's other half and what dropout trains). A run has them with
data.use_labels (and data.num_classes)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffusion_jax.conditions.registry import ConditionKind, register_kind
from diffusion_jax.errors import UsageError


def num_classes(config) -> int:
    return int(config.data.num_classes)


class Labels(ConditionKind):
    name = "labels"
    description = "class-conditional (data.use_labels)"
    how_to_give = "use --labels 0,1,2 (classes of the run)"
    arguments = ("labels",)

    def implied_by(self, config) -> bool:
        return bool(config.data.use_labels)

    def check_config(self, config) -> None:
        if num_classes(config) < 1:
            raise UsageError("data.use_labels is True but data.num_classes is 0: set data.num_classes to the "
                             "number of classes (or use_labels=False for an unconditional model)")

    def model_fields(self, config) -> dict:
        return {"num_classes": num_classes(config)}

    def training_conditions(self, config, data):
        return np.asarray(data.labels, np.int32), None

    def values(self, config, given) -> np.ndarray:
        classes = num_classes(config)
        try:
            labels = np.asarray([int(v) for v in given], np.int64)
        except ValueError:
            raise UsageError(f"labels {given}: give class numbers, e.g. --labels 0,1,2") from None
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise UsageError(f"labels must be classes in [0, {classes}) for this {classes}-class run, got "
                             f"values in [{labels.min()}, {labels.max()}] (the null label {classes} is "
                             "used by guidance itself)")
        return labels.astype(np.int32)

    def default_values(self, config) -> np.ndarray:
        return np.arange(num_classes(config), dtype=np.int32)

    def encoder(self, config):
        return lambda values: jnp.asarray(np.asarray(values, np.int32))

    def null(self, config, negative=None):
        return np.int32(num_classes(config))

    def job_settings(self, values) -> dict:
        return {"labels": None if values is None else [int(v) for v in values]}

    def shard_labels(self, values) -> np.ndarray:
        return np.asarray(values, np.int32)


register_kind(Labels())
