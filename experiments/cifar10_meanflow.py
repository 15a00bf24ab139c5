"""MeanFlow on CIFAR-10 (Geng et al. 2025): the class-conditional `dit_cifar` DiT of `cifar10_sit`
(same data, flow path, optimiser and step budget) made a two-time model u(x, t, r) of the average
velocity and trained with the MeanFlow objective (objectives/meanflow.py: the paper's (t, r)
sampler with 25% of r != t, logit-normal (-0.4, 1.0), adaptive weight p = 1). Classifier-free
guidance is folded into the target at `cifar10_dit`'s scale 1.5 (w = 1.5, kappa = 0), so the model
samples guided in one evaluation, with no guidance at sampling.

    python -m experiments.cifar10_meanflow --workdir runs/cifar10_meanflow
    python -m diffusion_jax evaluate --workdir runs/cifar10_meanflow   # FD at 1, 2 and 4 evaluations
    python -m diffusion_jax sample --workdir runs/cifar10_meanflow --method meanflow --steps 2 --labels 3
"""
from experiments.cifar10_sit import get_config as sit_config


def get_config():
    c = sit_config()
    c.model.second_time = True
    c.diffusion.objective = "meanflow"
    c.diffusion.objective_options.guidance = 1.5  # the guided velocity's scale, folded in (cond_dropout 0.1)
    c.sample.method, c.sample.steps, c.sample.guidance_scale = "meanflow", 1, 1.0
    return c


if __name__ == "__main__":
    from diffusion_jax.cli import run_experiment

    run_experiment(get_config)
