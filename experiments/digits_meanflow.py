"""MeanFlow on the digits, from scratch: the quickstart's U-Net made a two-time model u(x, t, r) of
the average velocity on the flow path (objectives/meanflow.py), trained with the paper's (t, r)
sampler (25% of r != t) and adaptive weight, sampled in one jump from noise to data.

    python -m experiments.digits_meanflow --workdir runs/digits_meanflow
    python -m diffusion_jax sample --workdir runs/digits_meanflow --method meanflow --steps 2
"""
from experiments.digits_flow import get_config as flow_config


def get_config():
    c = flow_config()
    c.model.second_time = True
    c.diffusion.objective = "meanflow"
    c.sample.method = "meanflow"
    c.sample.steps = 1
    return c


if __name__ == "__main__":
    from diffusion_jax.cli import run_experiment

    run_experiment(get_config)
