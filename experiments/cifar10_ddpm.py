"""The DDPM paper's CIFAR-10 recipe (Ho et al. 2020): 35.7M U-Net, linear schedule T = 1000,
Adam 2e-4 with 5,000 warm-up steps, clip 1.0, batch 128, dropout 0.1, random flips,
EMA 0.9999, 800k steps. Paper: FID 3.17, IS 9.46, <= 3.75 bits/dim.

    python -m experiments.cifar10_ddpm --workdir gs://bucket/runs/cifar10_ddpm
    python -m experiments.cifar10_ddpm --workdir runs/c10 --config.model.dtype=bfloat16
"""
from diffusion_jax.config import base_config


def get_config():
    c = base_config()
    c.data.name = "cifar10"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.image_size, c.data.channels, c.data.batch_size = 32, 3, 128
    c.data.random_flip = True
    c.model.name = "ddpm_cifar10"
    c.diffusion.schedule, c.diffusion.num_timesteps = "linear", 1000
    c.optim.learning_rate, c.optim.warmup_steps, c.optim.grad_clip = 2e-4, 5000, 1.0
    c.train.steps = 800_000
    c.train.ema_decay = 0.9999
    c.train.ckpt_every = 10_000
    c.train.sample_every = 50_000
    c.train.steps_per_dispatch = 1
    c.sample.method, c.sample.steps = "ddpm", 1000
    c.eval.num_samples = 50_000
    c.eval.bpd_examples = 1000
    return c


if __name__ == "__main__":
    from diffusion_jax.cli import run_experiment

    run_experiment(get_config)
