"""The PyTorch peer, measured on the same machine in the same session: diffusers' UNet2DModel
with the DDPM CIFAR-10 config (35.7M), DiTTransformer2DModel B/2 on a 32x32x4 latent, and a
DDPMScheduler ancestral loop (a Python loop over 1000 steps), and Stable Diffusion's guided DDIM
chain and decoder on a pipeline directory. One JSON line per measurement,
in the format of benchmarks.train / benchmarks.sample, so BENCHMARKS.md reports ratios.

    pip install torch diffusers        # in a separate environment; not a dependency
    python -m benchmarks.peer_diffusers --what unet_train,dit_train,ddpm_sample --compile
    python -m benchmarks.peer_diffusers --what sd_pipeline --pipeline /tmp/sd15   # benchmarks.pipeline --write

Training: AdamW, bf16 autocast (parameters float32), MSE to the noise, synthetic data.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time


def _emit(record):
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(json.dumps({**record, "peer": "diffusers", "torch": torch.__version__, "device_kind": device,
                      "date": datetime.date.today().isoformat()}), flush=True)


def ddpm_cifar10_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       dropout=0.1, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0)


def dit_b2():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=12, attention_head_dim=64, in_channels=4, out_channels=8,
                                 num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_throughput(name, model, shape, batch, steps, compile_model, device, labels=False):
    import torch

    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compile_model else model
    x0 = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 1000, (batch,), device=device) if labels else None
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device), 0)

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            out = forward(x_t, t, class_labels=y).sample if labels else forward(x_t, t).sample
            loss = torch.mean((out[:, : shape[0]].float() - noise) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    _sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync()
    seconds = (time.perf_counter() - t0) / steps
    _emit({"bench": "train", "model": name, "batch": batch, "dtype": "bf16-autocast", "compiled": compile_model,
           "images_per_sec": round(batch / seconds, 1), "step_ms": round(1e3 * seconds, 3),
           "warmup_s": round(warmup_s, 2), "loss": float(loss.detach()),
           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)})


def ddpm_sampling(batch, steps, device):
    import torch
    from diffusers import DDPMScheduler

    model = ddpm_cifar10_unet().to(device).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    x = torch.randn(batch, 3, 32, 32, device=device)
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
        for t in scheduler.timesteps:
            out = model(x, t).sample
            x = scheduler.step(out.float(), t, x).prev_sample
    _sync()
    seconds = time.perf_counter() - t0
    _emit({"bench": "sample", "model": "ddpm_cifar10", "method": "ddpm", "steps": steps, "batch": batch,
           "seconds": round(seconds, 3), "samples_per_sec": round(batch / seconds, 2)})


def sd_pipeline(directory, batches, steps, device, guidance_scale=7.5, repeats=3):
    """StableDiffusionPipeline's (or StableDiffusionXLPipeline's) chain on the pipeline in `directory`
    (unet/, vae/, scheduler/ read with diffusers; the scheduler its config names): the latents and
    the 2B-row guided U-Net call of every step, the VAE decoder; random text embeddings (and, for
    SDXL, pooled embeddings and the micro-conditioning time ids) stand in for the CLIP encoders (one
    forward a call, not timed), so transformers is not needed. float16 (the usual GPU setting) and
    float32; float32 on a CPU."""
    import json
    import pathlib

    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    directory = pathlib.Path(directory)
    scheduler_class = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    dtypes = [torch.float16, torch.float32] if device.startswith("cuda") else [torch.float32]
    for dtype in dtypes:
        unet = UNet2DConditionModel.from_pretrained(directory / "unet", torch_dtype=dtype).to(device).eval()
        vae = AutoencoderKL.from_pretrained(directory / "vae", torch_dtype=dtype).to(device).eval()
        scheduler = getattr(diffusers, scheduler_class).from_pretrained(directory / "scheduler")
        size, width = unet.config.sample_size, unet.config.cross_attention_dim
        for batch in batches:
            text = torch.randn(2 * batch, 77, width, device=device, dtype=dtype)
            added = None
            if unet.config.addition_embed_type == "text_time":  # SDXL: pooled embedding [2B, P], time ids [2B, 6]
                pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
                image = size * 2 ** (len(vae.config.block_out_channels) - 1)
                added = {"text_embeds": torch.randn(2 * batch, pooled, device=device, dtype=dtype),
                         "time_ids": torch.tensor([[image, image, 0, 0, image, image]] * 2 * batch, device=device,
                                                  dtype=dtype)}

            def run(seed):
                generator = torch.Generator(device).manual_seed(seed)
                latents = torch.randn(batch, 4, size, size, generator=generator, device=device, dtype=dtype)
                scheduler.set_timesteps(steps)
                latents = latents * scheduler.init_noise_sigma
                for t in scheduler.timesteps:
                    model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                    uncond, cond = unet(model_input, t, encoder_hidden_states=text,
                                        added_cond_kwargs=added).sample.chunk(2)
                    latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
                images = vae.decode(latents / vae.config.scaling_factor).sample
                _sync()
                return images

            with torch.no_grad():
                t0 = time.perf_counter()
                run(0)
                first_s = time.perf_counter() - t0
                seconds = []
                for i in range(repeats):
                    t0 = time.perf_counter()
                    images = run(i + 1)
                    seconds.append(time.perf_counter() - t0)
            s = sorted(seconds)[len(seconds) // 2]
            _emit({"bench": "pipeline", "model": directory.name, "batch": batch, "steps": steps, "method": scheduler_class,
                   "guidance_scale": guidance_scale, "image_size": list(images.shape[2:]) + [3],
                   "dtype": str(dtype).replace("torch.", ""), "seconds": round(s, 3),
                   "images_per_sec": round(batch / s, 3), "first_call_s": round(first_s, 2)})


def main(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="unet_train,dit_train,ddpm_sample")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--compiled_only", action="store_true", help="with --compile, skip the eager training runs")
    p.add_argument("--unet_batch", type=int, default=128)
    p.add_argument("--dit_batch", type=int, default=256)
    p.add_argument("--sample_batch", type=int, default=256)
    p.add_argument("--sample_steps", type=int, default=1000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--pipeline", help="sd_pipeline: a StableDiffusionPipeline directory (benchmarks.pipeline --write)")
    p.add_argument("--sd_batch", type=int, action="append", help="sd_pipeline: prompts per call (repeatable; 1)")
    p.add_argument("--sd_steps", type=int, default=50)
    p.add_argument("--sd_repeats", type=int, default=3)
    p.add_argument("--sd_guidance_scale", type=float, default=7.5)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    what = args.what.split(",")
    modes = [False, True] if args.compile else [False]
    if args.compile and args.compiled_only:
        modes = [True]
    for compiled in modes:
        if "unet_train" in what:
            train_throughput("ddpm_cifar10", ddpm_cifar10_unet(), (3, 32, 32), args.unet_batch, args.steps,
                             compiled, device)
        if "dit_train" in what:
            train_throughput("dit_b2", dit_b2(), (4, 32, 32), args.dit_batch, args.steps, compiled, device,
                             labels=True)
    if "ddpm_sample" in what:
        ddpm_sampling(args.sample_batch, args.sample_steps, device)
    if "sd_pipeline" in what:
        if not args.pipeline:
            p.error("--what sd_pipeline needs --pipeline DIR (written by benchmarks.pipeline --write)")
        sd_pipeline(args.pipeline, args.sd_batch or [1], args.sd_steps, device, args.sd_guidance_scale,
                    repeats=args.sd_repeats)


if __name__ == "__main__":
    main()
