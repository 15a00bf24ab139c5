"""Condition kinds: what a run's model is conditioned on, decided in one place per kind.

A kind (class labels, text, or one a user defines) says, in one file:
  - when a run has it: `data.condition = NAME` names it; `implied_by(config)` selects it without
    that (labels: data.use_labels; text: model.text_encoder), so older runs keep their kind;
  - what the model receives: `model_fields(config)`, module fields of the backbone (num_classes for
    labels; cond_dim for a vector condition y [B, cond_dim] added to the time embedding);
  - what the data gives: `training_conditions(config, data)`, per-example conditions [N, ...] of a
    split and, when they are encoded a batch at a time, the function that does it;
  - what a user gives at sampling: `values(config, given)` checks a list (from Python, the CLI's
    `--condition`, the named `arguments` it takes: `--labels`, `--prompt`; or a file read by
    `read_values`; `given_values` is the one entry); `default_values` when nothing is given;
    sample i gets values[i % len(values)];
  - `encoder(config)`: a batch of values -> the model's condition [B, ...] (a pytree, batch first:
    SDXL's is a dict of arrays); `encoders(config)`: the frozen networks it runs, by the names LoRA
    files give them (a LoRA file's text encoder layers go there, not to the backbone);
  - `null(config, negative)`: the null condition, broadcast leaf by leaf (guidance's other half,
    and what dropout trains), and what a generate job records (`job_settings`, `shard_labels`).

Dropout and guidance are the same for every kind (`drop_condition`, samplers' guided_denoise_fn).
Classifier-free guidance follows diffusers and DiT: out = out_uncond + s (out_cond - out_uncond),
so s = 1 is the conditional model without guidance, s > 1 is guided and s = 0 the unconditional
model; `guidance_enabled` decides it.

A kind outside the library: subclass `ConditionKind`, `register_kind(MyKind())`, and set
`data.condition = "my.module:name"` (the module is imported, which registers it).
"""
from __future__ import annotations

import importlib
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.files import read_text

NO_GUIDANCE = 1.0


class ConditionKind:
    """One kind of condition; subclasses override what differs (see the module docstring)."""

    name = ""
    description = ""   # what the run is, for messages: "class-conditional (data.use_labels)"
    how_to_give = ""   # what a user gives at sampling, for messages
    file_key = "conditions"  # a generate job's settings name its file {file_key}_file, {file_key}_sha256
    arguments: tuple = ()    # the named arguments (ARGUMENTS) that give its values besides conditions=
    # whether null(config) is computed from files the config names (a text encoder's embedding of
    # the empty prompt): a program holding it is then not decided by the config alone
    null_from_files = False

    def implied_by(self, config) -> bool:
        return False

    def check_config(self, config) -> None:
        pass

    def model_fields(self, config) -> dict:
        return {}

    def training_conditions(self, config, data) -> tuple[np.ndarray, Callable | None]:
        raise NotImplementedError

    def values(self, config, given) -> list:
        return list(given)

    def default_values(self, config) -> list:
        raise UsageError(f"this run is {self.description}: give its conditions ({self.how_to_give})")

    def encoder(self, config) -> Callable:
        raise NotImplementedError

    def null(self, config, negative=None):
        raise NotImplementedError

    def encoders(self, config) -> dict:
        """{component: encoder} of the frozen networks the kind's encoder runs, by the names LoRA files
        give them (the text encoders; none for a kind without one)."""
        return {}

    def job_settings(self, values) -> dict:
        return {} if values is None else {"conditions": [str(v) for v in values]}

    def shard_labels(self, values) -> np.ndarray | None:
        return None


KINDS: dict[str, ConditionKind] = {}


def register_kind(kind: ConditionKind) -> ConditionKind:
    KINDS[kind.name] = kind
    return kind


def condition_kind(config) -> ConditionKind | None:
    """The run's condition kind: data.condition's ("module:name" imports the module first), else the
    one kind its settings imply; None for an unconditional run."""
    name = str(config.data.get("condition", "") or "")
    if ":" in name and name not in KINDS:
        module = name.split(":")[0]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UsageError(f"data.condition {name!r}: cannot import {module} ({e}); give a module on the "
                             "Python path that registers the kind") from None
    if name:
        if name not in KINDS:
            raise UsageError(f"unknown data.condition {name!r}; choose one of {tuple(KINDS)}, or "
                             "'module:name' for a kind a module registers")
        return KINDS[name]
    implied = [k for k in KINDS.values() if k.implied_by(config)]
    if len(implied) > 1:
        raise UsageError(f"this run's settings imply the conditions {[k.name for k in implied]}: a run has one "
                         "(data.use_labels=False for a text run)")
    return implied[0] if implied else None


def conditional(config) -> bool:
    return condition_kind(config) is not None


def model_fields(config) -> dict:
    """The backbone's condition fields: none unless the run's kind sets them."""
    kind = condition_kind(config)
    return {"num_classes": 0, "cond_dim": 0, **(kind.model_fields(config) if kind else {})}


def describe(kind: ConditionKind | None) -> str:
    return kind.description if kind else "unconditional (no data.condition, data.use_labels or model.text_encoder)"


# What a user gives, by argument, in messages; a kind takes conditions= and its own `arguments`.
ARGUMENTS = {"conditions": "conditions", "labels": "labels", "prompts": "prompts", "negative_prompt": "a negative prompt"}


def taking_kind(config, argument: str) -> ConditionKind:
    """The run's kind, when it takes `argument` (an ARGUMENTS key); else the error naming what was
    given and what to give instead."""
    kind = condition_kind(config)
    if kind is None or (argument != "conditions" and argument not in kind.arguments):
        takers = [k.description for k in KINDS.values() if argument in k.arguments]  # the library's kind first
        wanted = f", not {takers[0]}" if takers and argument != "conditions" else ""
        raise UsageError(f"{ARGUMENTS[argument]} given, but this run is {describe(kind)}{wanted}: "
                         f"{kind.how_to_give if kind else 'drop them'}")
    return kind


def given_values(config, **given):
    """The checked values of the conditions a user gave for sampling, by argument: conditions= (the
    run's own kind), labels=, prompts= (refused by a run of another kind); None when nothing was."""
    values = None
    for argument, value in given.items():
        if value is not None:
            values = taking_kind(config, argument).values(config, list(value))
            if not len(values):
                raise UsageError(f"{ARGUMENTS[argument]} given but empty: give at least one, or none for the "
                                 "default")
    return values


def read_values(path, what: str = "conditions") -> list:
    """The values of a text file, one a line (blank lines skipped); an empty file is an error."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file {path}: give a text file with one value a line")
    values = [line.strip() for line in read_text(path, f"the {what} file").splitlines() if line.strip()]
    if not values:
        raise UsageError(f"the {what} file {path} holds no value: write one a line")
    return values


def by_index(values, index) -> list:
    """Sample i's value: values[i % len(values)], for each i of `index`."""
    return [values[int(i) % len(values)] for i in index]


def guidance_enabled(config, guidance_scale: float) -> bool:
    """Whether sampling at `guidance_scale` runs the guided (condition + null condition) model: at
    any scale but 1 for a conditional run; an unconditional run refuses a scale other than 1."""
    if not conditional(config):
        if float(guidance_scale) != NO_GUIDANCE:
            raise UsageError(
                f"guidance scale {guidance_scale} given, but this run is {describe(None)}: classifier-free "
                "guidance needs a conditional model; drop the guidance scale (1 = no guidance)")
        return False
    return float(guidance_scale) != NO_GUIDANCE


def describe_guidance(config, guidance_scale: float) -> str:
    """How samples at `guidance_scale` were conditioned, for reports and logs."""
    if not conditional(config):
        return "no guidance (unconditional model)"
    if not guidance_enabled(config, guidance_scale):
        return "no guidance (conditional model, scale 1)"
    return f"classifier-free guidance scale {float(guidance_scale):g}"


def broadcast_condition(cond, batch: int):
    """A condition of batch 1 (or a scalar's leaves, e.g. the null label) repeated to `batch`, leaf by leaf."""
    return jax.tree_util.tree_map(lambda c: jnp.broadcast_to(c, (batch, *jnp.shape(c)[1:])), cond)


def dropped_examples(key, cond, probability: float):
    """[B] bool: the examples whose condition `drop_condition(key, cond, probability, ...)` drops."""
    first = jax.tree_util.tree_leaves(cond)[0]
    return jax.random.bernoulli(key, probability, first.shape[:1])


def drop_condition(key, cond, probability: float, null):
    """The condition (a pytree, batch axis first) with each example's replaced by `null` (broadcast
    leaf by leaf) with `probability` (classifier-free guidance training). The only place
    conditions are dropped: backbones never do it."""
    if cond is None or probability <= 0:
        return cond
    dropped = dropped_examples(key, cond, probability)

    def drop(c, n):
        where = dropped.reshape(dropped.shape + (1,) * (c.ndim - 1))
        return jnp.where(where, jnp.asarray(n, c.dtype), c)

    return jax.tree_util.tree_map(drop, cond, null)
