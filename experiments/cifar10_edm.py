"""EDM's CIFAR-10 recipe (Karras et al. 2022, Table 7, unconditional VP column) on this project's
35.7M `ddpm_cifar10` U-Net (EDM's DDPM++ has 56M): x = x0 + sigma eps, the preconditioned model
predicts x0, log-normal sigma (P_mean -1.2, P_std 1.2), lambda(sigma) weighting; Adam 1e-3, batch
512, learning-rate ramp over 10M images, 200M images in all, EMA half-life 0.5M images, dropout
0.13; sampled with EDM's Heun (18 steps, 35 model evaluations). EDM: FID 1.97 unconditional
(with its non-leaking augmentation, which is not here; without it the paper's ablation is ~2.4).

    python -m experiments.cifar10_edm --workdir runs/cifar10_edm
"""
from diffusion_jax.config import base_config

BATCH = 512


def get_config():
    c = base_config()
    c.data.name = "cifar10"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.image_size, c.data.channels, c.data.batch_size = 32, 3, BATCH
    c.data.random_flip = True
    c.model.name = "ddpm_cifar10"
    c.model.overrides.dropout = 0.13
    c.model.precondition = "edm"
    c.diffusion.process = "edm"  # sigma_min 0.002, sigma_max 80, sigma_data 0.5, rho 7
    c.diffusion.prediction = "x0"
    c.diffusion.weighting = "edm"
    c.train.time_sampling = "lognormal"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 10_000_000 // BATCH
    c.optim.decay = "constant"
    c.train.steps = 200_000_000 // BATCH
    c.train.ema_decay = 0.5 ** (BATCH / 500_000)  # a half-life of 0.5M images
    c.train.ema_warmup = False
    c.train.ckpt_every = 10_000
    c.sample.method, c.sample.steps = "heun", 18
    c.sample.clip_x0 = False
    c.eval.num_samples = 50_000
    return c


if __name__ == "__main__":
    from diffusion_jax.cli import run_experiment

    run_experiment(get_config)
