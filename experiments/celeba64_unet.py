"""CelebA at 64x64 (center crop, resize), a DDPM-style U-Net, cosine schedule.

    python -m experiments.celeba64_unet --workdir runs/celeba64
"""
from diffusion_jax.config import base_config


def get_config():
    c = base_config()
    c.data.name = "celeb_a"
    c.data.train_split, c.data.eval_split = "train", "validation"
    c.data.image_size, c.data.channels, c.data.batch_size = 64, 3, 128
    c.data.random_flip = True
    c.model.name = "unet_celeba64"
    c.diffusion.schedule = "cosine"
    c.optim.learning_rate, c.optim.warmup_steps = 2e-4, 5000
    c.train.steps = 500_000
    c.train.ckpt_every = 10_000
    c.sample.method, c.sample.steps = "ddim", 100
    return c


if __name__ == "__main__":
    from diffusion_jax.cli import run_experiment

    run_experiment(get_config)
