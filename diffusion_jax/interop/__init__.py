"""Published diffusers checkpoints in and out: `UNet2DModel`, `DiTTransformer2DModel` and
`AutoencoderKL` load into this library's Flax modules with the same outputs, and trained modules
save back to directories diffusers' `from_pretrained` reads.

    unet = load_diffusers("google/ddpm-cifar10-32")          # or a local directory
    eps = unet.apply(x_t, t)                                  # NHWC in, NHWC out
    vae = load_diffusers("stabilityai/sd-vae-ft-ema")
    mean, logvar = vae.encode(images); images = vae.decode(z)
    save_diffusers("out/unet", unet.model, unet.params, unet.schedule, input_shape=unet.input_shape)

Neither torch nor diffusers is needed (torch only to read a legacy `.bin` weights file).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp

from diffusion_jax.errors import UsageError
from diffusion_jax.interop import dit, files, scheduler, unet2d, unet2d_condition, vae
from diffusion_jax.interop.tensors import params_from_tensors, tensors_from_params
from diffusion_jax.models import abstract_init, param_shapes
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.unet import UNet
from diffusion_jax.models.vae import AutoencoderKL
from diffusion_jax.schedules import Schedule, schedule_from_betas

log = logging.getLogger(__name__)

ARCHITECTURES = {unet2d.CLASS_NAME: unet2d, unet2d_condition.CLASS_NAME: unet2d_condition, dit.CLASS_NAME: dit,
                 dit.LEGACY_CLASS_NAME: dit, vae.CLASS_NAME: vae}
_BY_MODULE = {UNet: unet2d, DiT: dit, AutoencoderKL: vae}


@dataclasses.dataclass(frozen=True)
class Imported:
    """A loaded diffusers model: the Flax module, its float32 params, the diffusers config, the
    input shape (H, W, C) it was published for, and the schedule (None without a scheduler
    config next to it; a "flow" process for a FlowMatchEulerDiscreteScheduler) with the run
    settings it maps to (`scheduler.settings_from_scheduler`)."""

    model: Any
    params: Any
    config: dict
    input_shape: tuple
    schedule: Any = None
    scheduler_config: Optional[dict] = None

    def apply(self, x, t, y=None):
        """The backbone's output [B, H, W, C_out] for x [B, H, W, C], timesteps t [B], labels y."""
        return _compiled(self.model, "__call__")({"params": self.params}, x, t, y)

    def encode(self, x):
        """(mean, logvar) of the VAE's latent for images x [B, H, W, C] in [-1, 1]."""
        return _compiled(self.model, "encode")({"params": self.params}, x)

    def decode(self, z):
        """Images [B, H, W, C] of latents z (unscaled: divide a backbone's latents by scaling_factor)."""
        return _compiled(self.model, "decode")({"params": self.params}, z)


@functools.lru_cache(maxsize=32)
def _compiled(model, method: str):
    """model.apply(variables, *args, method=method), jit-compiled once per module and method."""
    return jax.jit(functools.partial(model.apply, method=method))


def architecture(config: dict, where):
    name = config.get("_class_name")
    if name not in ARCHITECTURES:
        raise UsageError(f"{where}: diffusers class {name!r} is not supported; supported classes are "
                         f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def load_diffusers(source: str, subfolder: Optional[str] = None) -> Imported:
    """Load a diffusers model directory (or Hub repository id, with `subfolder` for a pipeline's
    component: "unet", "transformer", "vae") into this library's Flax module."""
    directory = files.resolve(str(source))
    if subfolder:
        directory = directory / subfolder
        if not directory.is_dir():
            raise FileNotFoundError(f"{source} has no subfolder {subfolder!r}")
    config = files.read_config(directory)
    architecture(config, directory / files.CONFIG)  # an unsupported class is named before the weights are read
    imported = from_state_dict(config, files.read_tensors(directory), where=str(directory))
    scheduler_cfg = files.read_scheduler(directory) if not isinstance(imported.model, AutoencoderKL) else None
    if scheduler_cfg:
        imported = dataclasses.replace(imported, scheduler_config=scheduler_cfg,
                                       schedule=scheduler.process_from_scheduler(scheduler_cfg))
    log.info("loaded %s from %s", config["_class_name"], directory)
    return imported


def from_state_dict(config: dict, tensors: dict, where: str = "state dict") -> Imported:
    """The Flax module and params of a diffusers config dict and its state dict {name: array}."""
    arch = architecture(config, where)
    files.check_field_types(config, arch.DEFAULTS, getattr(arch, "NULLABLE", ()))
    model, input_shape = arch.module_from_config(config)
    table, copies = arch.entries(model, input_shape)
    params = params_from_tensors(table, unet2d.rename_deprecated_attention(tensors),
                                 expected_params(model, input_shape), f"{config['_class_name']} ({where})", copies)
    return Imported(model, jax.tree_util.tree_map(jnp.asarray, params), config, input_shape)


def entries_of(imported: Imported) -> list:
    """The parameter table (`tensors.Entry`) of an imported model: its diffusers module names."""
    return entries_for(imported.model, imported.input_shape)


def entries_for(model, input_shape) -> list:
    """The parameter table (`tensors.Entry`) of one of this library's models at input shape (H, W, C):
    the diffusers module name of each of its parameters."""
    return _architecture_of(model).entries(model, tuple(input_shape))[0]


def _architecture_of(model):
    arch = unet2d_condition if getattr(model, "context_dim", 0) else _BY_MODULE.get(type(model))
    if arch is None:
        raise UsageError(f"a {type(model).__name__} has no diffusers counterpart: supported are "
                         f"{sorted(c.__name__ for c in _BY_MODULE)}")
    return arch


def expected_params(model, input_shape):
    """The module's params tree of ShapeDtypeStructs (nothing allocated)."""
    if isinstance(model, AutoencoderKL):
        return abstract_init(model, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return param_shapes(model, input_shape)


def save_diffusers(path, model, params, schedule: Optional[Schedule] = None, *, input_shape,
                   prediction: str = "eps", variance: Optional[str] = None, clip_x0: bool = True) -> pathlib.Path:
    """Write `model` with `params` as a diffusers model directory (config.json and
    diffusion_pytorch_model.safetensors), and `schedule` as scheduler/scheduler_config.json (a
    DDPMScheduler with `prediction`, `variance` (default: learned_range for a model that
    learns sigma, else fixed_small) and `clip_x0`). `input_shape` (H, W, C) is the size the
    model is for (diffusers' sample_size)."""
    arch = _architecture_of(model)
    input_shape = tuple(input_shape)
    config = arch.config_from_module(model, input_shape)
    table, copies = arch.entries(model, input_shape)
    tensors = tensors_from_params(table, jax.device_get(params), copies)
    path = pathlib.Path(path)
    files.write_model(path, config, tensors)
    if schedule is not None:
        variance = variance or ("learned_range" if getattr(model, "learn_sigma", False) else "fixed_small")
        sched = scheduler.scheduler_config(schedule, prediction, variance, clip_x0)
        (path / "scheduler").mkdir(exist_ok=True)
        (path / files.SCHEDULER).write_text(json.dumps(sched, indent=2) + "\n")
    log.info("saved %s to %s", config["_class_name"], path)
    return path


__all__ = ["ARCHITECTURES", "Imported", "entries_of", "from_state_dict", "load_diffusers", "save_diffusers"]
