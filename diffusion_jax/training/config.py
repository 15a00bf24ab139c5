"""The base ml_collections config of a training run; experiments/ modules override fields.

Every field is typed by its default, so a command-line override of the wrong type, or of a key
that does not exist, is an error naming the key (ml_collections' locked ConfigDict).
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"          # digits | folder:/path | any tfds image dataset name
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_size = 8           # H = W the model sees (resize / center-crop)
    c.data.channels = 1
    c.data.batch_size = 128         # global batch, over all processes and devices
    c.data.random_flip = False      # random horizontal flips, drawn per example and step
    c.data.use_labels = False       # feed class labels to the model
    c.data.num_classes = 0
    c.data.data_dir = ""            # tfds data_dir ("" = default)

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet_digits"    # a preset of diffusion_jax.models.PRESETS
    c.model.dtype = "float32"       # activations; parameters stay float32
    c.model.remat = False
    c.model.overrides = ml_collections.ConfigDict()  # any other module field, e.g. ch, dropout

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    c.diffusion.prediction = "eps"
    c.diffusion.variance = "fixed_small"
    c.diffusion.weighting = "none"
    c.diffusion.vlb_weight = 0.001

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "adam"      # adam | adamw
    c.optim.learning_rate = 2e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 5000
    c.optim.decay = "constant"      # constant | cosine (to 0 at train.steps)
    c.optim.grad_clip = 1.0         # global-norm clip; 0 disables
    c.optim.accumulate_steps = 1    # optax.MultiSteps gradient accumulation
    c.optim.skip_nonfinite = True   # drop updates whose gradients are not finite

    c.train = ml_collections.ConfigDict()
    c.train.steps = 800_000
    c.train.ema_decay = 0.9999
    c.train.ema_warmup = True       # decay min(ema_decay, (1 + step) / (10 + step))
    c.train.label_dropout = 0.0     # null-label probability for classifier-free guidance (the
                                    # train step's; backbones never drop labels themselves)
    c.train.steps_per_dispatch = 1  # K train steps in one lax.scan per device call
    c.train.log_every = 100
    c.train.ckpt_every = 5000
    c.train.keep_ckpts = 3
    c.train.sample_every = 0        # 0: only at the end
    c.train.num_sample_images = 64
    c.train.fsdp = 1                # devices on the fsdp mesh axis (1 = replicated params)
    c.train.progress = True

    c.sample = ml_collections.ConfigDict()
    c.sample.method = "ddim"
    c.sample.steps = 100
    c.sample.eta = 0.0
    c.sample.clip_x0 = True
    c.sample.guidance_scale = 1.0   # classifier-free guidance: 1 = none, > 1 guided, 0 = unconditional

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 512       # held-out (x0, t, noise) triples for the metrics
    c.eval.num_samples = 64
    c.eval.bpd_examples = 64        # held-out images for bits/dim (T model calls each)
    c.eval.seed = 1234
    c.eval.fid_stats = ""           # reference .npz (fid-stats); "" = no FID
    return c
