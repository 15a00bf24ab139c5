"""MeanFlow on ImageNet 256x256 (Geng et al. 2025, the paper's B/2 recipe): DiT-B/2 on the 32x32x4
latents of Stable Diffusion's VAE, class-conditional, a two-time model u(x, t, r) trained from
scratch with the MeanFlow objective on the flow path: (t, r) logit-normal (-0.4, 1.0) with 25% of
r != t, adaptive weight p = 1, the labels dropped 10% of the time, and classifier-free guidance
folded into the target (w = 1, kappa = 0.5 over all times: the guided velocity of scale
w / (1 - kappa) = 2). Adam (0.9, 0.95) at 1e-4, batch 256, EMA 0.9999, 240 epochs (1.2M steps);
one evaluation an image, no guidance at sampling. The paper reports FID-50K 6.17 at one evaluation
for this size. For a user's accelerator: ImageNet is tfds' manual download (`imagenet2012`, the
archives in `data_dir`/downloads/manual) and the VAE a diffusers AutoencoderKL directory or Hub id.

    python -m experiments.imagenet256_meanflow --workdir runs/imagenet256_meanflow \\
        --config.data.data_dir=/data/tfds --config.model.vae=/models/sd-vae-ft-ema
    python -m diffusion_jax generate --workdir runs/imagenet256_meanflow --out samples --num_samples 50000
"""
from diffusion_jax.config import base_config


def get_config():
    c = base_config()
    c.data.name = "imagenet2012"
    c.data.train_split, c.data.eval_split = "train", "validation"
    c.data.image_size, c.data.channels, c.data.batch_size = 256, 3, 256
    c.data.random_flip = True
    c.data.use_labels, c.data.num_classes = True, 1000
    c.model.name = "dit_b2"
    c.model.vae = "stabilityai/sd-vae-ft-ema"
    c.model.dtype = "bfloat16"
    c.model.second_time = True
    c.model.overrides.learn_sigma = False
    c.diffusion.process = "flow"
    c.diffusion.prediction = "velocity"
    c.diffusion.objective = "meanflow"
    c.diffusion.objective_options.guidance = 1.0
    c.diffusion.objective_options.guidance_mix = 0.5
    c.optim.optimizer, c.optim.learning_rate, c.optim.b2 = "adam", 1e-4, 0.95
    c.optim.warmup_steps = 0
    c.train.steps = 1_200_000  # 240 epochs of 1.28M images at batch 256
    c.train.cond_dropout = 0.1
    c.train.ckpt_every = 10_000
    c.sample.method, c.sample.steps, c.sample.guidance_scale = "meanflow", 1, 1.0
    c.sample.clip_x0 = False
    return c


if __name__ == "__main__":
    from diffusion_jax.cli import run_experiment

    run_experiment(get_config)
