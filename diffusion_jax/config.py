"""The base ml_collections config of a training run; experiments/ modules override fields.

Every field is typed by its default, so a command-line override of the wrong type, or of a key
that does not exist, is an error naming the key (ml_collections' locked ConfigDict).
"""
from __future__ import annotations

import pathlib

import ml_collections

from diffusion_jax.errors import UsageError
from diffusion_jax.samplers import check_options, get_sampler, sampling_grid


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
    c.data.use_labels = False       # feed class labels to the model (the condition kind "labels")
    c.data.condition = ""           # a condition kind by name ("labels", "text", "sdxl", "module:name"); "" = the
                                    # one its settings imply (use_labels: labels; model.text_encoder: text)
    c.data.num_classes = 0
    c.data.data_dir = ""            # tfds data_dir ("" = default)
    c.data.caption_feature = ""     # a tfds data set's captions: "captions/text" (coco_captions), "label" (class names)

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet_digits"    # a preset of diffusion_jax.models.PRESETS
    c.model.dtype = "float32"       # activations; parameters stay float32
    c.model.remat = False
    c.model.vae = ""                # latent diffusion: a diffusers AutoencoderKL directory or repository
                                    # id; the backbone trains on its scaled latents (see latents.py)
    c.model.text_encoder = ""       # text conditioning: a Stable Diffusion pipeline's directory (its
                                    # text_encoder/ and tokenizer/, frozen); the condition is the embeddings
    c.model.clip_skip = 0           # condition on the text encoder's output this many layers before the last
    c.model.second_time = False     # a two-time model u(x, t, r) (MeanFlow): r embedded as t, added through
                                    # a zero-initialised projection; a one-time run's checkpoint loads into it
    c.model.overrides = ml_collections.ConfigDict()  # any other module field, e.g. ch, dropout:
                                                     # --config.model.overrides.ch=16
    c.model.precondition = ""       # "edm": EDM's preconditioning around the backbone (process edm,
                                    # prediction x0)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.process = "ddpm"    # ddpm | vp | edm | flow (diffusion_jax.processes); ddpm's schedule
                                    # is schedule, num_timesteps, schedule_options, zero_terminal_snr
    c.diffusion.process_options = ml_collections.ConfigDict()  # a continuous process's options, e.g.
                                                               # --config.diffusion.process_options.shift=3.0
    c.diffusion.schedule = "linear"
    c.diffusion.schedule_options = ml_collections.ConfigDict()  # the beta function's, e.g. beta_start
    c.diffusion.num_timesteps = 1000
    c.diffusion.prediction = "eps"
    c.diffusion.variance = "fixed_small"
    c.diffusion.weighting = "none"
    c.diffusion.vlb_weight = 0.001
    c.diffusion.objective = "denoise"  # denoise (the denoising loss) | meanflow (objectives/: a two-time model's
                                       # average velocity, model.second_time=True, a continuous process)
    c.diffusion.objective_options = ml_collections.ConfigDict()  # e.g. meanflow's ratio, time_mean, adaptive_p
    c.diffusion.zero_terminal_snr = False  # rescale the betas to abar_T = 0 (needs prediction "v")

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
    c.optim.skip_nonfinite = True   # drop updates whose gradients' global norm is not finite

    c.train = ml_collections.ConfigDict()
    c.train.steps = 800_000
    c.train.ema_decay = 0.9999
    c.train.ema_warmup = True       # decay min(ema_decay, (1 + step) / (10 + step))
    c.train.cond_dropout = 0.0      # the condition's dropout to the null condition (null label, empty
                                    # prompt) for classifier-free guidance (the train step's, never a backbone's)
    c.train.steps_per_dispatch = 1  # K train steps in one lax.scan per device call
    c.train.log_every = 100
    c.train.ckpt_every = 5000
    c.train.keep_ckpts = 3
    c.train.sample_every = 0        # 0: only at the end
    c.train.num_sample_images = 64
    c.train.fsdp = 1                # devices on the fsdp mesh axis (1 = replicated params)
    c.train.progress = True
    c.train.restart = False         # start again from step 0 when checkpoints exist but none restores
    c.train.init_from = ""          # a new run starts from this run's EMA parameters (its workdir; a one-time
                                    # model's into a two-time model: the projection of r added at zero)
    c.train.init_from_step = -1     # its checkpoint (-1: the newest, pinned when the run's program is built)
    c.train.divergence_factor = 100.0  # stop when the loss or the parameter norm grows this much (0: off)
    c.train.time_sampling = "uniform"  # a continuous process's training times: uniform | logit_normal |
                                       # lognormal (edm) | mode; ddpm: t ~ U{0..T-1}
    c.train.time_sampling_options = ml_collections.ConfigDict()  # e.g. .mean=0.0 .std=1.0 (logit_normal)

    c.sample = ml_collections.ConfigDict()
    c.sample.method = "ddim"
    c.sample.steps = 100
    c.sample.eta = 0.0
    c.sample.clip_x0 = True
    c.sample.guidance_scale = 1.0   # classifier-free guidance: 1 = none, > 1 guided, 0 = unconditional
    c.sample.guidance_rescale = 0.0  # phi of Lin et al. 2023 (0 = plain guidance, 0.7 theirs)
    c.sample.options = ml_collections.ConfigDict()  # the method's own options, e.g.
                                                    # --config.sample.options.sigmas=karras

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 512       # held-out (x0, t, noise) triples for the metrics
    c.eval.num_samples = 64
    c.eval.bpd_examples = 64        # held-out images for bits/dim (T model calls each)
    c.eval.ode_bpd = True           # a "ddpm" run's probability-flow ODE likelihood beside its bound
    c.eval.seed = 1234
    c.eval.fid_stats = ""           # reference .npz (fid-stats); "" = no FID

    # LoRA fine-tuning (rank > 0): only low-rank adapters on the layers named by `targets` train, on
    # the frozen EMA parameters of the run `base`; checkpoints hold the adapters (`lora`).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 0.0              # 0: alpha = rank (the adapters' scale alpha / rank is 1)
    c.lora.targets = "to_q,to_k,to_v,to_out.0"  # diffusers module names (or their ends), comma-separated
    c.lora.base = ""                # the run whose model the adapters adapt (its workdir)
    c.lora.base_step = -1           # its checkpoint (-1: the newest, pinned when the LoRA run's program is built)
    c.lora.text_encoder = False     # also adapters on the text encoder(s)' attention (TEXT_ENCODER_TARGETS), as
                                    # diffusers' LoRA scripts' --train_text_encoder
    return c


TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # diffusers' LoRA scripts' text encoder targets


def with_lora_section(config):
    """A run's config with the `lora` section (its defaults where a run written before LoRA, or before
    one of its settings, has none)."""
    with config.unlocked():
        if config.get("lora") is None:
            config.lora = base_config().lora
        for key, value in base_config().lora.items():
            if key not in config.lora:
                config.lora[key] = value
    return config


def trains_text_encoder(config) -> bool:
    """Whether a LoRA run trains adapters on its text encoder(s) too (lora.text_encoder)."""
    section = lora_settings(config)
    return bool(section is not None and section.get("text_encoder", False))


def lora_settings(config):
    """The run's LoRA section when it trains adapters (lora.rank > 0), else None (runs written
    before LoRA have no section)."""
    section = config.get("lora") if hasattr(config, "get") else None
    return section if section and int(section.get("rank", 0) or 0) > 0 else None


def lora_scale(section) -> float:
    """alpha / rank of a LoRA section (alpha 0: 1)."""
    return float(section.get("alpha", 0.0) or section.rank) / int(section.rank)


def lora_targets(section) -> list:
    return [t.strip() for t in str(section.targets).split(",") if t.strip()]


def _at_least(config, key: str, minimum, what: str = "") -> None:
    node = config
    for part in key.split("."):
        node = node[part]
    if not isinstance(node, (int, float)) or isinstance(node, bool) or node < minimum:
        raise UsageError(f"{key} must be {'an integer ' if isinstance(minimum, int) else ''}>= {minimum}"
                         f"{what}, got {node!r}: set --config.{key}=...")


def validate_config(config) -> None:
    """Checks every training setting a user can pass before anything runs; a UsageError names
    the setting and what it accepts."""
    from diffusion_jax.diffusion import VARIANCES
    from diffusion_jax.losses import WEIGHTINGS
    from diffusion_jax.processes import PREDICTIONS, process_names
    from diffusion_jax.optim import DECAYS, OPTIMIZERS
    from diffusion_jax.samplers import sampler_names
    from diffusion_jax.schedules import SCHEDULE_NAMES

    for key, minimum, what in (
            ("train.steps", 1, " (the step to train to)"), ("data.batch_size", 1, ""),
            ("data.image_size", 1, ""), ("data.channels", 1, ""), ("data.num_classes", 0, ""),
            ("train.log_every", 1, ""), ("train.ckpt_every", 1, ""), ("train.keep_ckpts", 1, ""),
            ("train.sample_every", 0, " (0: only at the end)"), ("train.num_sample_images", 0, ""),
            ("train.steps_per_dispatch", 1, ""), ("train.fsdp", 1, ""), ("diffusion.num_timesteps", 1, ""),
            ("optim.warmup_steps", 0, ""), ("optim.accumulate_steps", 1, ""), ("optim.grad_clip", 0.0, ""),
            ("optim.learning_rate", 0.0, ""), ("sample.steps", 1, ""), ("eval.num_examples", 1, ""),
            ("eval.num_samples", 1, ""), ("eval.bpd_examples", 0, ""), ("train.ema_decay", 0.0, ""),
            ("train.divergence_factor", 0.0, " (0 disables the check)")):
        _at_least(config, key, minimum, what)
    if config.optim.learning_rate <= 0:
        raise UsageError(f"optim.learning_rate must be > 0, got {config.optim.learning_rate}")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise UsageError(f"train.ema_decay must be in [0, 1), got {config.train.ema_decay}")
    if not 0.0 <= config.train.cond_dropout < 1.0:
        raise UsageError(f"train.cond_dropout must be in [0, 1), got {config.train.cond_dropout}")
    for key, value, allowed in (("diffusion.prediction", config.diffusion.prediction, PREDICTIONS),
                                ("diffusion.variance", config.diffusion.variance, VARIANCES),
                                ("diffusion.weighting", config.diffusion.weighting, WEIGHTINGS),
                                ("diffusion.process", config.diffusion.get("process", "ddpm"), process_names()),
                                ("diffusion.schedule", config.diffusion.schedule, SCHEDULE_NAMES),
                                ("sample.method", config.sample.method, sampler_names()),
                                ("optim.optimizer", config.optim.optimizer, tuple(OPTIMIZERS)),
                                ("optim.decay", config.optim.decay, tuple(DECAYS))):
        if value not in allowed:
            raise UsageError(f"unknown {key} {value!r}; choose one of {tuple(allowed)}")
    from diffusion_jax.conditions import condition_kind, guidance_enabled

    kind = condition_kind(config)
    if kind is not None:
        kind.check_config(config)
    if config.train.cond_dropout > 0 and kind is None:
        raise UsageError(f"train.cond_dropout is {config.train.cond_dropout} but the run has no condition "
                         "(no data.condition, data.use_labels is False, no model.text_encoder): dropout trains "
                         "classifier-free guidance of a conditional model; set it to 0, or give the run a condition")
    validate_lora(config)
    if config.train.get("init_from", ""):
        check_run_directory("train.init_from", config.train.init_from, "the run to start from")
    from diffusion_jax.builders import build_process

    guidance_enabled(config, config.sample.guidance_scale)
    process = build_process(config)
    validate_process_settings(config, process)
    sampler_settings(config, process)


def check_run_directory(setting: str, path, what: str) -> None:
    """A setting that names a run: its workdir must hold the run's config.json."""
    path = str(path or "")
    if not path or not (pathlib.Path(path) / "config.json").exists():
        raise UsageError(f"{setting} {path!r} is not a run: give the workdir of {what}")


def validate_lora(config) -> None:
    """lora.rank a whole number >= 0; with rank > 0, a finite alpha >= 0, targets, and a base run."""
    section = config.get("lora")
    if section is None:
        return
    rank = section.get("rank", 0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise UsageError(f"lora.rank must be a whole number >= 0 (0: no LoRA), got {rank!r}")
    if rank == 0:
        return
    alpha = section.get("alpha", 0.0)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha < float("inf"):
        raise UsageError(f"lora.alpha must be a finite number >= 0 (0: alpha = rank), got {alpha!r}")
    if not lora_targets(section):
        raise UsageError("lora.targets names no layer: give diffusers module names, e.g. to_q,to_k,to_v,to_out.0")
    check_run_directory("lora.base", section.get("base", ""), "the run whose model the adapters adapt (an imported "
                        "pipeline's, or any trained run's)")
    if config.train.get("init_from", ""):
        raise UsageError("train.init_from and lora.base both given: a LoRA run starts from its base run's model; "
                         "drop train.init_from")
    if section.get("text_encoder", False):
        from diffusion_jax.conditions import condition_kind

        kind = condition_kind(config)
        if kind is None or not kind.encoders(config):
            raise UsageError("lora.text_encoder is True but this run has no text encoder: it trains adapters on a "
                             "text run's encoder(s); set it to False")
        if config.train.cond_dropout > 0:
            raise UsageError(f"lora.text_encoder is True with train.cond_dropout {config.train.cond_dropout}: the "
                             "null condition is the frozen encoder's, not the adapted one's, so it is not trained "
                             "with dropout (as diffusers' LoRA scripts do not); set train.cond_dropout=0")


def validate_process_settings(config, process) -> None:
    """The run's objective on its process: prediction, variance, weighting, time sampling and
    preconditioning, each checked by the code that uses it, on two times traced abstractly
    (`jax.eval_shape`: the options' errors are raised, nothing is compiled or run)."""
    import jax
    import jax.numpy as jnp

    from diffusion_jax.likelihood import discrete_schedule
    from diffusion_jax.losses import loss_weight, sample_times
    from diffusion_jax.processes import as_process
    from diffusion_jax.processes.registry import noisy_end
    from diffusion_jax.processes.targets import levels

    d, process = config.diffusion, as_process(process)
    if d.variance == "learned_range" and discrete_schedule(process) is None:
        raise UsageError(f"diffusion.variance 'learned_range' trains with a discrete posterior's variational bound: a "
                         f"{process.name!r} run has none; set --config.diffusion.variance=fixed_small")
    def weights(key):
        times = sample_times(process, key, 2, config.train.time_sampling,
                             **dict(config.train.get("time_sampling_options", {})))
        lv = levels(process, times, times, derivatives=d.prediction == "velocity")
        return loss_weight(process, lv, d.prediction, d.weighting)

    jax.eval_shape(weights, jax.ShapeDtypeStruct((2,), jnp.uint32))  # a PRNGKey's
    if d.prediction == "eps" and noisy_end(process)[0] == 0.0:
        raise UsageError(f"diffusion.prediction 'eps' cannot be sampled: the {process.name!r} process's noisy end has "
                         "alpha = 0, where a noise prediction says nothing of x0; predict velocity, v or x0")
    validate_objective(config, process)
    if config.model.get("precondition", "") not in ("", "edm"):
        raise UsageError(f"unknown model.precondition {config.model.precondition!r}; choose '' or 'edm'")
    if config.model.get("precondition", "") == "edm" and (getattr(process, "sigma_data", None) is None
                                                          or d.prediction != "x0"):
        raise UsageError("model.precondition 'edm' makes the model an x0 predictor of sigma: it needs "
                         f"diffusion.process='edm' and diffusion.prediction='x0' (got {process.name!r}, "
                         f"{d.prediction!r})")


def validate_objective(config, process) -> None:
    """diffusion.objective is the denoising loss or one of `objectives.OBJECTIVES`, with its options;
    each trains on a continuous process, with neither another weighting nor a learned variance;
    meanflow a two-time model (model.second_time) of the average velocity (prediction "velocity")."""
    from diffusion_jax.objectives import GUIDED, OBJECTIVES, TWO_TIME, folds_guidance, objective_options

    d = config.diffusion
    objective = d.get("objective", "denoise")
    if objective != "denoise" and objective not in OBJECTIVES:
        raise UsageError(f"unknown diffusion.objective {objective!r}; choose one of {('denoise',) + tuple(OBJECTIVES)}")
    if objective == "denoise":
        if d.get("objective_options"):
            raise UsageError(f"diffusion.objective_options {dict(d.objective_options)} given for the denoising "
                             "objective, which takes none: drop them, or choose the objective they belong to")
        return
    options = objective_options(objective, dict(d.get("objective_options", {})))
    if objective in GUIDED and folds_guidance(options) and config.train.cond_dropout <= 0:
        raise UsageError(f"objective {objective!r} folds classifier-free guidance into its target (guidance "
                         f"{options['guidance']:g}, guidance_mix {options['guidance_mix']:g}): it needs a conditional run "
                         "that also trains the null condition: set a condition (data.use_labels) and "
                         "train.cond_dropout > 0 (the paper's 0.1), or drop those options")
    wants = [("diffusion.weighting", d.weighting, "none"), ("diffusion.variance", d.variance, "fixed_small")]
    if objective in TWO_TIME:
        wants += [("model.second_time", bool(config.model.get("second_time", False)), True),
                  ("diffusion.prediction", d.prediction, "velocity")]
    wrong = [f"{key} {value!r}" for key, value, want in wants if value != want]
    if process.max_steps is not None:
        wrong.append(f"diffusion.process {process.name!r} (integer timesteps)")
    if wrong:
        what = "a two-time model of the average velocity" if objective in TWO_TIME else "a consistency function"
        settings = ", ".join(f"{key} {want!r}" for key, _, want in wants)
        raise UsageError(f"objective {objective!r} trains {what} on a continuous process (flow): set {settings}; "
                         f"got {', '.join(wrong)}")


def sampler_settings(config, process, method=None, steps=None, options=None, eta=None):
    """(method, steps, options) to sample a run with: the arguments, else config.sample. The
    config's `sample.options` and `sample.eta` belong to its own method and apply to it only;
    `options` (and `eta`, DDIM's option of that name) are added on top, every one checked by
    the sampler's declaration of it. Checked here, before any work is done: an eta for a
    sampler without one is an error, not ignored."""
    s = config.sample
    own = method is None or method == s.method
    method = s.method if method is None else method
    steps = s.steps if steps is None else steps
    options = dict(options or {})
    if eta is not None:
        if "eta" in options and options["eta"] != eta:
            raise UsageError(f"eta given twice with different values ({eta} and --option eta="
                             f"{options['eta']}): give it once")
        options["eta"] = eta
    merged = {**(dict(s.get("options", {})) if own else {}), **options}
    config_eta = float(s.get("eta", 0.0)) if own else 0.0
    if "eta" in get_sampler(method).options:
        merged.setdefault("eta", config_eta)
    elif "eta" in merged:
        raise UsageError(f"eta = {merged['eta']} given, but sampler {method!r} has no eta (only ddim takes "
                         "one): drop --eta, or choose --method ddim")
    elif config_eta:
        raise UsageError(f"the run's config sets sample.eta = {s.eta} but its sampler {method!r} has no eta: "
                         "set --config.sample.eta=0 or choose --method ddim")
    if "variance" in get_sampler(method).options:  # the ancestral sampler's variance is the model's
        merged.setdefault("variance", config.diffusion.variance)
    sampling_grid(process, method, steps, **merged)  # a bad method, step count or option: now
    return method, steps, check_options(method, merged)


# ---------------------------------------------------------------------------- what a checkpoint must agree with
def _as_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def config_fingerprint(config) -> dict:
    """The parts of a config (a ConfigDict or its dict) a checkpoint must agree with to be resumed.
    Settings added later are left out at their defaults, so older runs still resume."""
    c = _as_dict(config)
    model, diffusion = dict(c["model"]), dict(c["diffusion"])
    for section, key, default in ((model, "precondition", ""), (model, "text_encoder", ""), (model, "clip_skip", 0),
                                  (model, "second_time", False), (diffusion, "process", "ddpm"),
                                  (diffusion, "process_options", {}), (diffusion, "objective", "denoise"),
                                  (diffusion, "objective_options", {})):
        if section.get(key, default) == default:
            section.pop(key, None)
    data = {k: c["data"][k] for k in ("image_size", "channels", "num_classes", "use_labels") if k in c["data"]}
    if c["data"].get("condition", ""):
        data["condition"] = c["data"]["condition"]
    fingerprint = {"model": model, "diffusion": diffusion, "data": data}
    lora = dict(c.get("lora") or {})
    if int(lora.get("rank", 0) or 0) > 0:  # the adapters' layout and the model they adapt
        fingerprint["lora"] = {k: lora.get(k) for k in ("rank", "alpha", "targets", "base", "base_step")}
        if lora.get("text_encoder"):
            fingerprint["lora"]["text_encoder"] = True
    return fingerprint


# Settings renamed since runs were written: (section, old name, new name). A run's config.json is
# read through `migrate_config`, so an older run reads, trains and resumes as it did.
RENAMED = (("train", "label_dropout", "cond_dropout"),)


def migrate_config(config: dict) -> dict:
    """A run's config dict with renamed settings under their current names."""
    for section, old, new in RENAMED:
        part = config.get(section)
        if isinstance(part, dict) and old in part and new not in part:
            part[new] = part.pop(old)
    return config
