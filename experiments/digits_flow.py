"""Rectified flow on the digits: the quickstart's U-Net, data, optimiser and step budget, trained
as flow matching (x_t = (1 - t) x0 + t eps, velocity prediction, logit-normal times: SD3's and
SiT's objective) and sampled with Euler on diffusers' flow grid.

    python -m experiments.digits_flow --workdir runs/digits_flow
"""
from experiments.digits_unet import get_config as digits_config


def get_config():
    c = digits_config()
    c.diffusion.process = "flow"
    c.diffusion.prediction = "velocity"
    c.train.time_sampling = "logit_normal"  # mean 0, std 1
    c.sample.method = "euler"
    c.sample.steps = 50
    return c


if __name__ == "__main__":
    from diffusion_jax.cli import run_experiment

    run_experiment(get_config)
