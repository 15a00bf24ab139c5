"""EDM on the digits: the quickstart's U-Net, data, optimiser and step budget, trained as EDM does
(x = x0 + sigma eps, the preconditioned model predicts x0, log-normal sigma, lambda(sigma)
weighting) and sampled with EDM's Heun sampler (18 steps, 35 model evaluations).

    python -m experiments.digits_edm --workdir runs/digits_edm
"""
from experiments.digits_unet import get_config as digits_config


def get_config():
    c = digits_config()
    c.diffusion.process = "edm"
    c.diffusion.prediction = "x0"
    c.diffusion.weighting = "edm"
    c.model.precondition = "edm"
    c.train.time_sampling = "lognormal"  # P_mean -1.2, P_std 1.2
    c.sample.method = "heun"
    c.sample.steps = 18
    c.sample.clip_x0 = False
    return c


if __name__ == "__main__":
    from diffusion_jax.cli import run_experiment

    run_experiment(get_config)
