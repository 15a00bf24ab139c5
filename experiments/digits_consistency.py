"""Consistency tuning on the digits (ECT's idea, Geng et al. 2024): a trained `digits_flow` run's model
tuned with the continuous-time consistency objective (objectives/consistency.py: its x0 made
constant along each ODE trajectory) into a one- or two-step generator.

    python -m experiments.digits_flow --workdir runs/digits_flow
    python -m experiments.digits_consistency --workdir runs/digits_consistency --config.train.init_from=runs/digits_flow
    python -m diffusion_jax sample --workdir runs/digits_consistency --method consistency --steps 2
"""
from experiments.digits_flow import get_config as flow_config


def get_config():
    c = flow_config()
    c.diffusion.objective = "consistency"
    c.train.steps = 600
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 0
    c.sample.method = "consistency"
    c.sample.steps = 1
    return c


if __name__ == "__main__":
    from diffusion_jax.cli import run_experiment

    run_experiment(get_config)
