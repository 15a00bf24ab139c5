"""A class-conditional DiT on CIFAR-10 pixels (patch 2, S-size width), learned sigma with the
hybrid loss, AdamW 1e-4, classifier-free guidance.

    python -m experiments.cifar10_dit --workdir runs/cifar10_dit
"""
from diffusion_jax.config import base_config


def get_config():
    c = base_config()
    c.data.name = "cifar10"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.image_size, c.data.channels, c.data.batch_size = 32, 3, 256
    c.data.random_flip = True
    c.data.use_labels, c.data.num_classes = True, 10
    c.model.name = "dit_cifar"
    c.diffusion.schedule = "linear"
    c.diffusion.variance = "learned_range"
    c.optim.optimizer, c.optim.learning_rate, c.optim.weight_decay = "adamw", 1e-4, 0.0
    c.optim.warmup_steps = 1000
    c.train.steps = 400_000
    c.train.cond_dropout = 0.1
    c.train.ckpt_every = 10_000
    c.sample.method, c.sample.steps, c.sample.guidance_scale = "ddim", 50, 1.5
    return c


if __name__ == "__main__":
    from diffusion_jax.cli import run_experiment

    run_experiment(get_config)
