"""LoRA files on a run's or a pipeline's parts: each file is read against the tables of diffusers
module names of the backbone (`unet`, or `transformer` for a DiT) and the text encoder, checked to
fit their parameters, and the adapters of several files concatenated (`lora`).

A run samples with LoRAs through its config: `with_sample_loras(config, [(file, weight), ...])`
sets `sample.loras`, which the generator (the backbone's adapters) and the text condition (the
text encoder's) read through `run_loras`.
"""
from __future__ import annotations

import copy
import hashlib
import pathlib

from diffusion_jax import lora
from diffusion_jax.errors import UsageError


BACKBONES = ("unet", "transformer")


def backbone_component(model) -> str:
    """The component name a LoRA file gives the backbone: diffusers' `transformer` for a DiT."""
    from diffusion_jax.models.dit import DiT

    return "transformer" if isinstance(model, DiT) else "unet"


def read_loras(specs, parts: dict, skip=()) -> dict:
    """{component: LoraLayers} of the LoRA files `specs` ([(path, weight), ...]) on `parts`
    ({component: (module, input shape or None for a text encoder, params or their shapes)}), every
    layer checked to fit its kernel; the tensors of the components in `skip` are left out."""
    from diffusion_jax import interop
    from diffusion_jax.interop import clip

    tables = {component: (clip.entries(module) if shape is None else interop.entries_for(module, shape))
              for component, (module, shape, _) in parts.items()}
    layers = {component: () for component in parts}
    for path, weight in specs:
        for component, adapted in lora.read_lora(path, tables, weight, skip).items():
            lora.check_fits(adapted, parts[component][2], str(path))
            layers[component] += adapted
    return {component: value for component, value in layers.items() if value}


def with_sample_loras(config, specs):
    """A copy of a run's config that samples with the LoRA files `specs` ([(path, weight), ...]):
    `sample.loras` [[absolute path, weight], ...]."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.sample.loras = [[str(pathlib.Path(path).resolve()), float(weight)] for path, weight in specs]
    return config


def sample_loras(config) -> list:
    """[(path, weight), ...] of a run's config (none without `sample.loras`)."""
    return [(str(path), float(weight)) for path, weight in (config.sample.get("loras") or [])]


def run_loras(config, parts: dict, skip=()) -> dict:
    """{component: LoraLayers} of the run's `sample.loras` on its `parts` (as `read_loras` takes them:
    the generator gives the backbone, the text condition the text encoder); the tensors of the
    components in `skip`, the run's other parts, are left to the reader of those."""
    specs = sample_loras(config)
    return read_loras(specs, parts, skip) if specs else {}


def lora_file_records(specs) -> list:
    """What a generate job records of its LoRA files: each path, weight and sha256."""
    out = []
    for path, weight in specs:
        path = pathlib.Path(path)
        if not path.is_file():
            raise UsageError(f"no LoRA file {path}: give a .safetensors file")
        out.append({"file": str(path.resolve()), "weight": float(weight),
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return out
