"""A diffusers `StableDiffusionPipeline` directory (model_index.json: unet, vae, text_encoder,
tokenizer, scheduler) as a JAX text-to-image pipeline, read without torch, diffusers or
transformers:

    pipe = load_pipeline("stable-diffusion-v1-5")            # a directory (or a Hub id, with hub)
    images = pipe(["a photo of a cat"], jax.random.key(0))   # [B, 512, 512, 3] in [0, 1]

The chain is the library's sampler the scheduler config names (`scheduler.pipeline_sampler`:
DDIM, Euler, Euler ancestral, DPM-Solver++(2M), UniPC, LCM on the scheduler's own timesteps), with
classifier-free guidance against the empty prompt's embeddings (or the negative prompts').
SDXL's base pipeline loads too: two text encoders (penultimate hidden states side by side, the
second's projected pooled embedding), the micro-conditioning time ids, zero embeddings for no
negative prompt (`force_zeros_for_empty_prompt`); its refiner is refused by name.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.files import read_json_object
from diffusion_jax.interop import files, scheduler
from diffusion_jax.interop.clip import TextEncoder
from diffusion_jax.interop.text_encoders import load_second_text_encoder, load_text_encoder_parts
from diffusion_jax.interop.tokenizer import CLIPTokenizer
from diffusion_jax.kept import ByContent, kept
from diffusion_jax.lora import merge
from diffusion_jax.models.text_encoder import (compiled_sdxl_condition, compiled_text_embeddings, sdxl_time_ids,
                                               sdxl_zero_null)
from diffusion_jax.processes import as_process

PIPELINE = "StableDiffusionPipeline"
SDXL = "StableDiffusionXLPipeline"
STEPS_QUANTUM = 50  # a pipeline's programs run any step count up to the next multiple of this
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = COMPONENTS + ("text_encoder_2", "tokenizer_2")


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
    """The pipeline's parts: `unet` and `vae` (`interop.Imported`), `text_encoder`, `tokenizer`,
    the scheduler's config and schedule; `clip_skip` as the pipeline's `encode_prompt` takes it."""

    unet: Any
    vae: Any
    text_encoder: TextEncoder
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    schedule: Any
    clip_skip: int = 0
    text_encoder_2: Optional[TextEncoder] = None  # SDXL's second encoder (with projection) and its tokenizer
    tokenizer_2: Optional[CLIPTokenizer] = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: no negative prompt guides against zero embeddings
    loras: dict = dataclasses.field(default_factory=dict)  # {"unet" / "text_encoder(_2)": LoraLayers} (`lora`)
    programs: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # compiled, per sampler

    @property
    def prediction(self) -> str:
        return scheduler.settings_from_scheduler(self.scheduler_config, False)["diffusion"]["prediction"]

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.get("scaling_factor", 0.18215))

    def encode_prompt(self, prompts):
        """The condition the U-Net gets: the text embeddings [B, 77, D]; for SDXL {"embeddings": both
        encoders' penultimate hidden states (clip_skip more layers back) side by side [B, 77, D1 + D2],
        "pooled": the second's projected pooled output [B, P], "time_ids": [B, 6], the
        micro-conditioning (original size, crop top-left (0, 0), target size: the image's)}."""
        ids = jnp.asarray(self.tokenizer(prompts))
        if self.text_encoder_2 is None:
            return compiled_text_embeddings(self.text_encoder.model, self.clip_skip)(
                self.text_encoder.params, ids, self.loras.get("text_encoder", ()))
        cond = compiled_sdxl_condition(self.text_encoder.model, self.text_encoder_2.model, self.clip_skip)(
            self.text_encoder.params, self.text_encoder_2.params, ids, jnp.asarray(self.tokenizer_2(prompts)),
            self.loras.get("text_encoder", ()), self.loras.get("text_encoder_2", ()))
        return {**cond, "time_ids": jnp.asarray(sdxl_time_ids(*self.image_size, len(prompts)))}

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images: the latents' size times the VAE's downsampling."""
        factor = 2 ** (len(self.vae.config.get("block_out_channels", [0])) - 1)
        return self.unet.input_shape[0] * factor, self.unet.input_shape[1] * factor

    def null_condition(self, negative_prompts, cond):
        """What guidance contrasts the prompts with: the negative prompts' condition, or (SDXL with
        force_zeros_for_empty_prompt and none given) zero embeddings and pooled embedding."""
        if negative_prompts is None and self.force_zeros_for_empty_prompt:
            return sdxl_zero_null(cond)
        return self.encode_prompt(negative_prompts if negative_prompts is not None else [""] * _batch(cond))

    def with_loras(self, loras) -> "StableDiffusion":
        """The pipeline with the LoRA files `loras` ([(path, weight), ...]: diffusers / PEFT or kohya
        format) on its U-Net and text encoder, in place of any it had; the base parameters are
        shared, never copied. Each call merges the U-Net's adapters first (`lora.merge`: the adapted
        kernels alone are new arrays); the text encoders' are computed inside their programs."""
        from diffusion_jax.interop.adapters import read_loras

        parts = {"unet": (self.unet.model, self.unet.input_shape, self.unet.params),
                 "text_encoder": (self.text_encoder.model, None, self.text_encoder.params)}
        if self.text_encoder_2 is not None:
            parts["text_encoder_2"] = (self.text_encoder_2.model, None, self.text_encoder_2.params)
        loras = read_loras(loras, parts)
        return dataclasses.replace(self, loras=loras)  # the same programs: merged parameters and adapters are arguments

    def __call__(self, prompts, key, *, num_steps: int = 50, guidance_scale: float = 7.5, method=None,
                 negative_prompts=None, x_T=None, **options) -> np.ndarray:
        """Images [B, H, W, 3] float32 in [0, 1] for `prompts` (a string or a list); `x_T` the
        starting latents [B, h, w, C] (NHWC; default drawn from `key`). `method=None` runs the
        scheduler's own chain; another method runs with `options`. The program is compiled once
        per sampler, latent shape and bound on the step count (the next multiple of
        `STEPS_QUANTUM`): other prompts, keys, guidance scales and step counts up to the bound reuse it."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise UsageError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        prompts = list(prompts)
        if guidance_scale is not None and (not isinstance(guidance_scale, (int, float, np.number))
                                           or isinstance(guidance_scale, bool) or not np.isfinite(guidance_scale)):
            raise UsageError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if not jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key) and jnp.shape(key) != (2,):
            raise UsageError(f"key must be a JAX random key (jax.random.key(seed)), got {type(key).__name__} "
                             f"{jnp.shape(key)}")
        cond = self.encode_prompt(prompts)
        negative = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else negative_prompts
        negative = None if negative is None else list(negative)
        if negative is not None and len(negative) != len(prompts):
            raise UsageError(f"{len(negative)} negative prompts for {len(prompts)} prompts: give one per prompt")
        if method is None:
            method, chosen, clip_x0 = scheduler.pipeline_sampler(self.scheduler_config)
            options = {**chosen, **options}
        else:
            clip_x0 = False
        from diffusion_jax.samplers import sampler_options
        from diffusion_jax.samplers.grids import check_num_steps, steps_bound

        grid, _ = sampler_options(method, as_process(self.schedule), options)  # with the sampler's own defaults
        limit = steps_bound(as_process(self.schedule), **grid)  # the grid's most steps (LCM's: original_steps)
        num_steps = check_num_steps(num_steps, limit)
        bound = min(-(-num_steps // STEPS_QUANTUM) * STEPS_QUANTUM, limit)
        guided = guidance_scale is not None and guidance_scale != 1.0
        program = self.program(method, bound, options, clip_x0, guided, (len(prompts), *self.unet.input_shape))
        images = program(merge(self.unet.params, self.loras.get("unet", ())), self.vae.params, cond,
                         self.null_condition(negative, cond) if guided else None,
                         key, None if x_T is None else jnp.asarray(x_T, jnp.float32),
                         jnp.float32(guidance_scale if guided else 1.0), jnp.int32(num_steps))
        return np.asarray(images, np.float32)

    def program(self, method: str, bound: int, options: dict, clip_x0: bool, guided: bool, shape) -> Any:
        """The jitted chain and decoder of one sampler, step bound and latent shape [B, h, w, C]: (U-Net
        params with its LoRA layers merged, VAE params, cond, null cond, key, x_T or None, guidance scale, num_steps) -> images
        [B, H, W, 3] in [0, 1]. Made once and kept (`chain_program`): a pipeline loaded again, with
        the same models and scheduler, runs the programs already traced and compiled."""
        signature = (method, int(bound), tuple(sorted(options.items())), bool(clip_x0), bool(guided), tuple(shape))
        if signature not in self.programs:
            self.programs[signature] = chain_program(self.unet.model, self.vae.model, ByContent(self.schedule),
                                                     self.prediction, self.vae_scale, signature)
        return self.programs[signature]


@kept(maxsize=16)
def chain_program(unet, vae, schedule: ByContent, prediction: str, scale: float, signature: tuple):
    """`StableDiffusion.program`'s jitted function for the U-Net and VAE modules, the scheduler's
    process, its prediction, the VAE's scaling factor and the sampler's signature (method, step
    bound, options, clip_x0, guided, latent shape); kept for the last 16 of them."""
    from diffusion_jax.samplers import guided_denoise_fn, sample

    method, bound, options, clip_x0, guided, shape = signature

    def run(unet_params, vae_params, cond, null, key, x_T, guidance_scale, num_steps):
        denoise = lambda x, t, y: unet.apply({"params": unet_params}, x, t, y)
        model = guided_denoise_fn(denoise, cond, *((null, guidance_scale) if guided else ()))
        latents = sample(model, schedule.tree, shape, key, method=method, num_steps=num_steps, max_steps=bound,
                         prediction=prediction, clip_x0=clip_x0, x_T=x_T, **dict(options))
        images = vae.apply({"params": vae_params}, latents / scale, method="decode")
        return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

    return jax.jit(run)


def _batch(cond) -> int:
    return jax.tree_util.tree_leaves(cond)[0].shape[0]


def load_pipeline(path, *, clip_skip: int = 0, loras=()) -> StableDiffusion:
    """The StableDiffusionPipeline or StableDiffusionXLPipeline saved in `path` (its model_index.json
    and component folders), with the LoRA files `loras` ([(path, weight), ...]) on its U-Net and
    text encoder(s) (`with_loras`)."""
    from diffusion_jax.interop import load_diffusers

    directory = files.resolve(str(path))
    if not (directory / "model_index.json").exists():
        raise FileNotFoundError(f"{directory} has no model_index.json: give a diffusers pipeline directory "
                                "(saved with save_pretrained)")
    index = read_json_object(directory / "model_index.json", "give a diffusers pipeline directory (saved with "
                                                             "save_pretrained) whose model_index.json is intact")
    name = index.get("_class_name")
    if name == "StableDiffusionXLImg2ImgPipeline":
        raise UsageError(f"{directory} is SDXL's refiner ({name}): the refiner is out of scope; SDXL's base "
                         f"({SDXL}) and Stable Diffusion 1.x and 2.x pipelines load")
    components = SDXL_COMPONENTS if name == SDXL else COMPONENTS
    missing = [c for c in components if not index.get(c) or index[c][0] is None]
    if name not in (PIPELINE, SDXL) or missing or (name == PIPELINE and "text_encoder_2" in index):
        raise UsageError(f"{directory} holds a {name}{' without ' + ', '.join(missing) if missing else ''}: "
                         f"load_pipeline reads a {PIPELINE} ({', '.join(COMPONENTS)}) or an {SDXL} (also "
                         "text_encoder_2, tokenizer_2)")
    check_component_folders(directory, components)
    unet, vae = load_diffusers(str(directory / "unet")), load_diffusers(str(directory / "vae"))
    config = read_json_object(directory / "scheduler" / "scheduler_config.json",
                              "give the pipeline's scheduler/scheduler_config.json intact")
    encoder, tokenizer = load_text_encoder_parts(directory)
    second = {}
    if name == SDXL:
        parts = load_second_text_encoder(directory, index)
        second = dict(text_encoder_2=parts.encoder, tokenizer_2=parts.tokenizer,
                      force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt)
        if vae.config.get("latents_mean") is not None or vae.config.get("latents_std") is not None:
            raise UsageError(f"{directory / 'vae'}: latents_mean / latents_std are not supported here")
    check_parts_fit(directory, unet, vae, encoder, tokenizer, second.get("text_encoder_2"))
    pipeline = StableDiffusion(unet, vae, encoder, tokenizer, config, scheduler.process_from_scheduler(config),
                               int(clip_skip), **second)
    return pipeline.with_loras(loras) if loras else pipeline


def check_component_folders(directory, components) -> None:
    """Each component a pipeline run uses has its folder (and the scheduler its config), or a
    UsageError names the one missing and the fix."""
    for component in components:
        where = pathlib.Path(component) / ("scheduler_config.json" if component == "scheduler" else "")
        if not (directory / where).exists():
            raise UsageError(f"{directory} has no {where}{'' if where.suffix else '/'}, which its model_index.json names: "
                             f"save the whole pipeline again (save_pretrained) or copy its {component}/ folder back")


def check_parts_fit(directory, unet, vae, encoder: TextEncoder, tokenizer: CLIPTokenizer,
                    encoder_2: Optional[TextEncoder] = None) -> None:
    """The parts work together: the U-Net is text-conditioned on the text encoder's width and takes
    the VAE's latent channels, and every id the tokenizer gives has a row in the encoder's
    embedding table (else its images would be NaN); each mismatch names the parts."""
    context = int(getattr(unet.model, "context_dim", 0) or 0)
    if not context:
        raise UsageError(f"{directory / 'unet'} is not a text-conditioned U-Net (UNet2DConditionModel)")
    width = encoder.model.hidden_size + (encoder_2.model.hidden_size if encoder_2 is not None else 0)
    if width != context:
        raise UsageError(f"{directory}: the text encoder{'s' if encoder_2 else ''}' width {width} is not the U-Net's "
                         f"cross_attention_dim {context}: the text_encoder/ and unet/ come from different pipelines")
    if encoder_2 is not None and unet.model.addition_embed_dim != \
            encoder_2.model.projection_dim + 6 * unet.model.addition_time_embed_dim:
        raise UsageError(f"{directory}: the U-Net's added embedding takes {unet.model.addition_embed_dim} numbers, not "
                         f"text_encoder_2's projection ({encoder_2.model.projection_dim}) and 6 time ids of "
                         f"{unet.model.addition_time_embed_dim}: the parts come from different pipelines")
    if unet.input_shape[2] != vae.model.latent_channels:
        raise UsageError(f"{directory}: the U-Net takes {unet.input_shape[2]} channels but the VAE makes "
                         f"{vae.model.latent_channels}-channel latents: the unet/ and vae/ come from different pipelines")
    if tokenizer.vocab_size > encoder.model.vocab_size:
        raise UsageError(f"{directory}: the tokenizer gives ids up to {tokenizer.vocab_size - 1} but the text encoder's "
                         f"embedding table has {encoder.model.vocab_size} rows: the tokenizer/ and text_encoder/ come "
                         "from different models")


def save_pipeline(out, unet, vae, text_encoder: TextEncoder, tokenizer: CLIPTokenizer,
                  scheduler_config: dict, second=None) -> pathlib.Path:
    """Write a StableDiffusionPipeline directory that diffusers and `load_pipeline` read:
    model_index.json, unet/ and vae/ (each an `Imported`-like (model, params, input_shape): the
    U-Net's latent shape, the VAE's image shape), text_encoder/, tokenizer/ and
    scheduler/scheduler_config.json; with `second` (`text_encoders.SecondTextEncoder`) a
    StableDiffusionXLPipeline, also text_encoder_2/ and tokenizer_2/. `out` must not hold a
    pipeline already."""
    from diffusion_jax.files import write_json_atomically
    from diffusion_jax.interop import save_diffusers
    from diffusion_jax.interop.clip import save_text_encoder
    from diffusion_jax.interop.tokenizer import save_tokenizer

    out = pathlib.Path(out)
    save_diffusers(out / "unet", unet.model, unet.params, input_shape=unet.input_shape)
    save_diffusers(out / "vae", vae.model, vae.params, input_shape=vae.input_shape)
    save_text_encoder(out / "text_encoder", text_encoder.model, text_encoder.params)
    save_tokenizer(out / "tokenizer", tokenizer)
    (out / "scheduler").mkdir(exist_ok=True)
    write_json_atomically(out / "scheduler" / "scheduler_config.json", scheduler_config)
    index = {"_class_name": PIPELINE, "_diffusers_version": "0.35.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", scheduler_config["_class_name"]], "safety_checker": [None, None],
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}
    if second is not None:
        save_text_encoder(out / "text_encoder_2", second.encoder.model, second.encoder.params)
        save_tokenizer(out / "tokenizer_2", second.tokenizer)
        index = {**{k: v for k, v in index.items() if k not in ("safety_checker", "requires_safety_checker")},
                 "_class_name": SDXL, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                 "tokenizer_2": ["transformers", "CLIPTokenizer"],
                 "force_zeros_for_empty_prompt": second.force_zeros_for_empty_prompt}
    write_json_atomically(out / "model_index.json", index)
    return out


# What `import` takes from each pipeline class: (the backbone's folder, whether its vae/ is the
# run's VAE, whether its text_encoder/ and tokenizer/ condition the run).
PIPELINE_PARTS = {"DDPMPipeline": ("unet", False, False), "DDIMPipeline": ("unet", False, False),
                  "DiTPipeline": ("transformer", True, False), PIPELINE: ("unet", True, True), SDXL: ("unet", True, True)}


def pipeline_parts(directory) -> Optional[tuple]:
    """(backbone subfolder, uses vae/, uses text_encoder/) of the pipeline in `directory` (by its
    model_index.json), its folders checked present, or None when `directory` is a single model's
    folder. A text pipeline's parts are checked to fit where they load (`load_pipeline`)."""
    directory = pathlib.Path(directory)
    if not (directory / "model_index.json").exists():
        return None
    index = read_json_object(directory / "model_index.json", "give the pipeline's model_index.json intact")
    name = index.get("_class_name")
    if name not in PIPELINE_PARTS:
        refiner = " (SDXL's refiner, out of scope)" if name == "StableDiffusionXLImg2ImgPipeline" else ""
        raise UsageError(f"{directory} holds a {name}{refiner}, which does not import as a run: pipelines that do are "
                         f"{sorted(PIPELINE_PARTS)} (or give one model's folder with --subfolder)")
    backbone, uses_vae, uses_text = PIPELINE_PARTS[name]
    text_parts = SDXL_COMPONENTS if name == SDXL else COMPONENTS
    check_component_folders(directory, text_parts if uses_text else (backbone,) + (("vae",) if uses_vae else ()))
    return PIPELINE_PARTS[name]
