"""The PyTorch peer, measured on the same machine in the same session: diffusers' UNet2DModel
with the DDPM CIFAR-10 config (35.7M), DiTTransformer2DModel B/2 on a 32x32x4 latent, and a
DDPMScheduler ancestral loop (a Python loop over 1000 steps). One JSON line per measurement,
in the format of benchmarks.train / benchmarks.sample, so BENCHMARKS.md reports ratios.

    pip install torch diffusers        # in a separate environment; not a dependency
    python -m benchmarks.peer_diffusers --what unet_train,dit_train,ddpm_sample --compile

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


if __name__ == "__main__":
    main()
