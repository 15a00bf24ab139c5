"""MNIST's recipe on Fashion-MNIST (tensorflow-datasets), class-conditional with
classifier-free guidance (10% null labels in training, guidance scale 2 when sampling).

    python -m experiments.fashion_mnist_unet --workdir runs/fashion
"""
from diffusion_jax.config import base_config


def get_config():
    c = base_config()
    c.data.name = "fashion_mnist"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.image_size, c.data.channels, c.data.batch_size = 28, 1, 128
    c.data.random_flip = True
    c.data.use_labels, c.data.num_classes = True, 10
    c.model.name = "unet_mnist"
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 1000
    c.train.steps = 30_000
    c.train.ema_decay = 0.9995
    c.train.cond_dropout = 0.1
    c.train.ckpt_every = 2500
    c.train.sample_every = 5000
    c.sample.method, c.sample.steps = "ddim", 100
    c.sample.guidance_scale = 2.0
    return c


if __name__ == "__main__":
    from diffusion_jax.cli import run_experiment

    run_experiment(get_config)
