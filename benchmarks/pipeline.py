"""Stable Diffusion text-to-image throughput: `load_pipeline(DIR)(prompts, key)` (prompt encoding,
the guided chain and the VAE decoder; one jitted program), one JSON line per batch size with the
first call (compilation included) and the steady-state seconds and images/s.

    python -m benchmarks.pipeline --write /tmp/sd15 --size sd15 --batch 1 --batch 4   # 512x512, DDIM-50
    python -m benchmarks.peer_diffusers --what sd_pipeline --pipeline /tmp/sd15         # PyTorch, same weights
    python -m benchmarks.pipeline --pipeline /tmp/sd15 --batch 4 --lora 16:0.8          # + a rank-16 LoRA
    python -m benchmarks.pipeline --write /tmp/sdxl --size sdxl --batch 4 --steps 30 --guidance_scale 5

`--write DIR --size sd15` first writes a Stable Diffusion 1.5 pipeline with random weights (the
published shapes: U-Net 859,520,964 parameters, text encoder 123,060,480, VAE 83,653,863; a
character-level tokenizer, as no vocabulary is downloaded) through the library's own writers, so
diffusers' PyTorch peer reads the same weights; `--size sdxl` SDXL's base at 1024x1024 (U-Net
2,567,463,684, CLIP ViT-L and OpenCLIP bigG with its projection, Euler); `tiny` and `sdxl_tiny` are
CPU-sized ones for a dry run. The scheduler is SD 1.5's DDIM (scaled-linear betas, leading
spacing, steps_offset 1), SDXL's Euler. `--lora RANK:WEIGHT` times the pipeline with a random LoRA
of that rank on every attention projection of the U-Net (diffusers' default targets) at that weight:
what an adapter costs a step, computed inside the program on the base weights.
"""
from __future__ import annotations

import argparse
import pathlib
import time

import jax
import numpy as np

from benchmarks.common import emit, peak_memory_bytes

SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1, "clip_sample": False,
             "set_alpha_to_one": False, "timestep_spacing": "leading"}
SDXL_SCHEDULER = {**SCHEDULER, "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
                  "use_karras_sigmas": False, "timestep_spacing": "leading"}
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu")
TINY_CLIP = dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu")
# SDXL's second encoder (OpenCLIP ViT-bigG/14 as CLIPTextModelWithProjection) by size; None: not SDXL
SECOND_ENCODERS = {"sdxl": dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                architectures=["CLIPTextModelWithProjection"]),
                   "sdxl_tiny": dict(TINY_CLIP, projection_dim=16, hidden_act="gelu",
                                     architectures=["CLIPTextModelWithProjection"])}
SIZES = {  # (U-Net preset, its overrides, text encoder config, VAE config)
    "sd15": ("sd15_unet", {}, CLIP_L,
             dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, sample_size=512)),
    "tiny": ("sd15_unet", dict(ch=32, ch_mult=(1, 2), attn_levels=(0,), level_heads=(2, 2), context_dim=32, num_groups=8),
             TINY_CLIP, dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, sample_size=16)),
    "sdxl": ("sdxl_unet", {}, CLIP_L, dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                           norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)),
    "sdxl_tiny": ("sdxl_unet", dict(ch=32, ch_mult=(1, 2), attn_levels=(1,), level_heads=(2, 2), context_dim=64,
                                    transformer_depth=(1, 2), addition_time_embed_dim=8, addition_embed_dim=64,
                                    num_groups=8),
                  TINY_CLIP, dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, sample_size=16,
                                  scaling_factor=0.13025)),
}
PROMPT = "a photograph of an astronaut riding a horse"


def _random_params(shapes, seed: int):
    """N(0, 0.02) float32 arrays of a tree of ShapeDtypeStructs (weights to time, not to look at)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: 0.02 * rng.standard_normal(s.shape, dtype=np.float32), shapes)


def vae_config(size: str) -> dict:
    """The AutoencoderKL config.json of a size."""
    fields = SIZES[size][3]
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * len(fields["block_out_channels"]),
            "up_block_types": ["UpDecoderBlock2D"] * len(fields["block_out_channels"]), **fields}


def write_random_pipeline(out, size: str) -> pathlib.Path:
    """A StableDiffusionPipeline directory of the `size` shapes with random weights."""
    from diffusion_jax.interop import Imported, clip, expected_params, vae
    from diffusion_jax.interop.pipeline import save_pipeline
    from diffusion_jax.interop.text_encoders import character_tokenizer
    from diffusion_jax.models import PRESETS, create_model

    from diffusion_jax.interop.text_encoders import SecondTextEncoder

    preset, unet_fields, text_config, _ = SIZES[size]
    unet = create_model(preset, **unet_fields)
    vae_model, image_shape = vae.module_from_config(vae_config(size))
    factor = vae_model.downsample_factor
    latent = (image_shape[0] // factor, image_shape[1] // factor, vae_model.latent_channels)
    assert "tiny" in size or latent == PRESETS[preset].input_shape
    encoder = clip.module_from_config(text_config)
    tokenizer = character_tokenizer()
    second = None
    if size in SECOND_ENCODERS:
        encoder_2 = clip.module_from_config(SECOND_ENCODERS[size])
        second = SecondTextEncoder(clip.TextEncoder(encoder_2, _random_params(clip.param_shapes(encoder_2), 3),
                                                    SECOND_ENCODERS[size]), tokenizer, True)
    return save_pipeline(
        out, Imported(unet, _random_params(expected_params(unet, latent), 0), {}, latent),
        Imported(vae_model, _random_params(expected_params(vae_model, image_shape), 1), {}, image_shape),
        clip.TextEncoder(encoder, _random_params(clip.param_shapes(encoder), 2), text_config), tokenizer,
        SDXL_SCHEDULER if second else SCHEDULER, second)


def write_random_lora(out, directory, rank: int) -> pathlib.Path:
    """A LoRA file of rank `rank` on every attention projection of the pipeline's U-Net (to_q, to_k,
    to_v, to_out.0: diffusers' default targets), N(0, 0.02) factors, alpha = rank."""
    from diffusion_jax.interop import entries_for
    from diffusion_jax.interop.pipeline import load_pipeline
    from diffusion_jax.lora import adapter_layers, adapter_spec, init_adapters, write_lora

    unet = load_pipeline(directory).unet
    spec = adapter_spec(entries_for(unet.model, unet.input_shape), ["to_q", "to_k", "to_v", "to_out.0"])
    shapes = jax.eval_shape(lambda key: init_adapters(key, spec, unet.params, rank), jax.random.key(0))
    return write_lora(out, {"unet": adapter_layers(_random_params(shapes, 4), spec, 1.0)})


def measure(directory, batch: int, steps: int, repeats: int, guidance_scale: float = 7.5, lora=None) -> dict:
    """`lora`: (file, weight, rank) of a LoRA on the U-Net, or None."""
    from diffusion_jax.interop import scheduler
    from diffusion_jax.interop.pipeline import load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(directory, loras=[lora[:2]] if lora else ())
    load_s = time.perf_counter() - start
    prompts = [PROMPT] * batch
    start = time.perf_counter()
    pipe(prompts, jax.random.key(0), num_steps=steps, guidance_scale=guidance_scale)
    first_s = time.perf_counter() - start
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        images = pipe(prompts, jax.random.key(i + 1), num_steps=steps, guidance_scale=guidance_scale)
        seconds.append(time.perf_counter() - start)  # __call__ returns host arrays: the work is done
    s = float(np.median(seconds))
    start = time.perf_counter()  # another step count: the same program (a traced step count), no compilation
    pipe(prompts, jax.random.key(99), num_steps=max(1, steps // 2), guidance_scale=guidance_scale)
    half_s = time.perf_counter() - start
    memory = peak_memory_bytes()
    return {"bench": "pipeline", "model": pathlib.Path(directory).name, "batch": batch, "steps": steps,
            "method": scheduler.pipeline_sampler(pipe.scheduler_config)[0], "guidance_scale": guidance_scale, "image_size": list(images.shape[1:]),
            "dtype": "float32", "seconds": round(s, 3), "images_per_sec": round(batch / s, 3),
            "first_call_s": round(first_s, 2), "half_steps_call_s": round(half_s, 3),
            "programs": len(pipe.programs), "load_s": round(load_s, 2),
            "lora": None if lora is None else {"rank": lora[2], "weight": lora[1], "layers": len(pipe.loras["unet"])},
            "peak_memory_gb": None if memory is None else round(memory / 2 ** 30, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", help="a StableDiffusionPipeline directory to time (or where --write puts one)")
    p.add_argument("--write", help="first write a random-weight pipeline of --size here")
    p.add_argument("--size", choices=sorted(SIZES), default="sd15")
    p.add_argument("--batch", type=int, action="append", help="prompts per call (repeatable; default 1)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--lora", metavar="RANK:WEIGHT", help="also time it with a random LoRA of this rank at this weight")
    args = p.parse_args(argv)
    directory = args.write or args.pipeline
    if directory is None:
        p.error("give --pipeline DIR, or --write DIR")
    if args.write and not (pathlib.Path(args.write) / "model_index.json").exists():
        start = time.perf_counter()
        write_random_pipeline(args.write, args.size)
        print(f"wrote a random {args.size} pipeline to {args.write} in {time.perf_counter() - start:.1f} s", flush=True)
    lora = None
    if args.lora:
        rank, weight = args.lora.split(":")
        lora = (write_random_lora(pathlib.Path(directory) / f"lora_r{rank}.safetensors", directory, int(rank)),
                float(weight), int(rank))
    for batch in args.batch or [1]:
        emit(measure(directory, batch, args.steps, args.repeats, args.guidance_scale))
        if lora:
            emit(measure(directory, batch, args.steps, args.repeats, args.guidance_scale, lora))


if __name__ == "__main__":
    main()
