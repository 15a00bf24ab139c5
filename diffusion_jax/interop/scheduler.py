"""diffusers scheduler configs (`DDPMScheduler`, `DDIMScheduler`, `DPMSolverMultistepScheduler`,
...) <-> a run's `diffusion` settings and its sampler's `clip_x0`; and
`FlowMatchEulerDiscreteScheduler` configs <-> the "flow" process (`flow_process_options`,
`flow_scheduler_config`)."""
from __future__ import annotations

import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.interop.files import check_field_types
from diffusion_jax.processes import make_process
from diffusion_jax.schedules import (Schedule, cosine_betas, rescale_zero_terminal_snr, scaled_linear_betas,
                                     schedule_from_betas)

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
              "fixed_large_log": "fixed_large", "learned_range": "learned_range"}


# The scheduler config fields read here, with diffusers' defaults (their types are checked).
DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
            "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0,
            "rescale_betas_zero_snr": False, "thresholding": False, "trained_betas": (0.0001,)}


def _unsupported(field, value, why):
    return UsageError(f"scheduler config field {field} = {value!r} is not supported: {why}")


def betas_from_scheduler(config: dict) -> np.ndarray:
    """The float64 betas [T] a scheduler config describes (as diffusers computes them)."""
    check_field_types(config, DEFAULTS, nullable=("trained_betas",))
    T = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    beta_schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], np.float64)
    elif beta_schedule == "linear":
        betas = np.linspace(start, end, T, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = scaled_linear_betas(T, start, end)
    elif beta_schedule == "squaredcos_cap_v2":
        betas = cosine_betas(T)
    else:
        raise _unsupported("beta_schedule", beta_schedule, "linear, scaled_linear, squaredcos_cap_v2 or trained_betas")
    return rescale_zero_terminal_snr(betas) if config.get("rescale_betas_zero_snr") else betas


def settings_from_scheduler(config: dict, learn_sigma: bool) -> dict:
    """{"diffusion": {...}, "sample": {"clip_x0": ...}} of a scheduler_config.json dict.

    A model that predicts its variance (learn_sigma) is "learned_range" whatever the scheduler
    says: the variance is the model's output, not the scheduler's choice. A
    FlowMatchEulerDiscreteScheduler makes a "flow" run of a velocity model, sampled with Euler.
    """
    if is_flow_scheduler(config):
        if learn_sigma:
            raise UsageError("a flow-matching model predicts the velocity only: this one also predicts a variance "
                             "(out_channels = 2 x in_channels), which the flow process does not use")
        return {"diffusion": {"process": "flow", "process_options": flow_process_options(config),
                              "prediction": "velocity"},
                "sample": {"clip_x0": False, "method": "euler"}}
    check_field_types(config, DEFAULTS, nullable=("trained_betas",))
    T = int(config.get("num_train_timesteps", 1000))
    beta_schedule = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if config.get("trained_betas") is not None:
        raise _unsupported("trained_betas", "[...]", "a run's config names its schedule: give it by beta_schedule")
    if beta_schedule == "linear":  # this library's linear betas scale with 1000 / T; diffusers' do not
        schedule, options = "linear", {"beta_start": start * T / 1000, "beta_end": end * T / 1000}
    elif beta_schedule == "scaled_linear":
        schedule, options = "scaled_linear", {"beta_start": start, "beta_end": end}
    elif beta_schedule == "squaredcos_cap_v2":
        schedule, options = "cosine", {}
    else:
        raise _unsupported("beta_schedule", beta_schedule, "linear, scaled_linear or squaredcos_cap_v2")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise _unsupported("prediction_type", prediction, f"one of {sorted(_PREDICTIONS)}")
    variance = config.get("variance_type") or "fixed_small"
    if variance not in _VARIANCES:
        raise _unsupported("variance_type", variance, f"one of {sorted(_VARIANCES)}")
    if config.get("thresholding"):
        raise _unsupported("thresholding", True, "dynamic thresholding is not implemented; clip_sample is")
    clip = bool(config.get("clip_sample", False))
    if clip and float(config.get("clip_sample_range", 1.0)) != 1.0:
        raise _unsupported("clip_sample_range", config["clip_sample_range"], "x0 is clipped to [-1, 1]")
    diffusion = {"schedule": schedule, "num_timesteps": T, "schedule_options": options,
                 "prediction": _PREDICTIONS[prediction],
                 "variance": "learned_range" if learn_sigma else _VARIANCES[variance],
                 "zero_terminal_snr": bool(config.get("rescale_betas_zero_snr", False))}
    return {"diffusion": diffusion, "sample": {"clip_x0": clip}}


def scheduler_config(schedule: Schedule, prediction: str = "eps", variance: str = "fixed_small",
                     clip_x0: bool = True) -> dict:
    """A DDPMScheduler config.json dict of `schedule`: by its diffusers name when its betas are
    one of diffusers' named schedules (linear, scaled_linear, squaredcos_cap_v2), else the betas
    themselves (trained_betas)."""
    betas = np.asarray(schedule.betas, np.float64)
    endpoint = lambda b: float(str(np.float32(b)))  # 1e-4, not the float32 value's 9.99999975e-05
    inverse = {v: k for k, v in _PREDICTIONS.items()}
    config = {"_class_name": "DDPMScheduler", "num_train_timesteps": int(betas.shape[0]),
              "prediction_type": inverse[prediction], "variance_type": variance, "clip_sample": bool(clip_x0),
              "clip_sample_range": 1.0, "timestep_spacing": "leading", "steps_offset": 0}
    for name in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        candidate = {**config, "beta_schedule": name, "beta_start": endpoint(betas[0]),
                     "beta_end": endpoint(betas[-1])}
        if np.allclose(betas_from_scheduler(candidate), betas, rtol=1e-6, atol=0):
            return candidate
    return {**config, "beta_schedule": "linear", "trained_betas": betas.tolist()}


# ---------------------------------------------------------------------------- flow matching
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
FLOW_DEFAULTS = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
                 "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                 "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False}
# Fields whose only supported value is diffusers' default (the grid would differ otherwise).
_FLOW_FIXED = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
               "time_shift_type", "stochastic_sampling")


def is_flow_scheduler(config: dict) -> bool:
    return config.get("_class_name") == FLOW_SCHEDULER


def process_from_scheduler(config: dict):
    """The process a scheduler config describes: a "flow" process for a FlowMatchEulerDiscreteScheduler,
    else the DDPM `Schedule` of its betas."""
    if is_flow_scheduler(config):
        return make_process("flow", **flow_process_options(config))
    return schedule_from_betas(betas_from_scheduler(config))


def flow_process_options(config: dict) -> dict:
    """The "flow" process options (`make_process("flow", **options)`) of a FlowMatchEulerDiscreteScheduler
    config.json dict: num_train_timesteps, shift, use_dynamic_shifting, base_shift, max_shift; a
    field the process does not model (Karras/exponential/beta sigmas, a terminal shift, inverted
    sigmas, the linear time shift, stochastic sampling) is an error naming it."""
    if config.get("_class_name", FLOW_SCHEDULER) != FLOW_SCHEDULER:
        raise _unsupported("_class_name", config.get("_class_name"), f"a flow run needs a {FLOW_SCHEDULER}")
    check_field_types(config, {k: v for k, v in FLOW_DEFAULTS.items() if v is not None},
                      nullable=("base_shift", "max_shift"))
    c = {**FLOW_DEFAULTS, **config}
    for field in _FLOW_FIXED:
        if c[field] != FLOW_DEFAULTS[field]:
            raise _unsupported(field, c[field], f"the flow process follows diffusers' default ({FLOW_DEFAULTS[field]!r})")
    return {"num_train_timesteps": int(c["num_train_timesteps"]), "shift": float(c["shift"]),
            "use_dynamic_shifting": bool(c["use_dynamic_shifting"]),
            "base_shift": float(c["base_shift"] if c["base_shift"] is not None else 0.5),
            "max_shift": float(c["max_shift"] if c["max_shift"] is not None else 1.15)}


def process_scheduler_config(process, prediction: str) -> dict:
    """The diffusers scheduler config.json dict of a continuous process and what its model predicts
    (`SCHEDULERS_OF_PROCESSES`); a process diffusers has no scheduler for here is an error."""
    if process.name not in SCHEDULERS_OF_PROCESSES:
        raise UsageError(f"export writes a run's diffusers scheduler: a {process.name!r} process has none here yet "
                         f"(those of {sorted(SCHEDULERS_OF_PROCESSES)} and DDPM runs do)")
    to_config, predicts = SCHEDULERS_OF_PROCESSES[process.name]
    if prediction != predicts:
        config = to_config(process)
        raise UsageError(f"diffusers' {config['_class_name']} runs {predicts}-prediction models: this run predicts "
                         f"{prediction!r}")
    return to_config(process)


def flow_scheduler_config(process) -> dict:
    """The FlowMatchEulerDiscreteScheduler config.json dict of a "flow" process (its grid equals
    the process's `default_grid`; `mu` is a sampling argument, not part of the config)."""
    return {**FLOW_DEFAULTS, "_class_name": FLOW_SCHEDULER, "num_train_timesteps": int(process.num_train_timesteps),
            "shift": float(process.shift), "use_dynamic_shifting": bool(process.use_dynamic_shifting),
            "base_shift": float(process.base_shift), "max_shift": float(process.max_shift)}


# A continuous process's diffusers scheduler: (its config of the process, the prediction its models make).
SCHEDULERS_OF_PROCESSES = {"flow": (flow_scheduler_config, "velocity")}


# ---------------------------------------------------------------------------- pipelines' schedulers
# diffusers' default timestep_spacing of each scheduler class a pipeline may name.
_SPACING_DEFAULTS = {"DDIMScheduler": "leading", "PNDMScheduler": "leading", "EulerDiscreteScheduler": "linspace",
                     "EulerAncestralDiscreteScheduler": "linspace", "DPMSolverMultistepScheduler": "linspace",
                     "UniPCMultistepScheduler": "linspace", "DDPMScheduler": "leading"}
# Fields a pipeline's scheduler may set only to diffusers' default here: (class, field, default).
_FIXED = (("DPMSolverMultistepScheduler", "final_sigmas_type", "zero"), ("DPMSolverMultistepScheduler", "solver_order", 2),
          ("UniPCMultistepScheduler", "final_sigmas_type", "zero"), ("UniPCMultistepScheduler", "solver_order", 2),
          ("UniPCMultistepScheduler", "solver_type", "bh2"), ("UniPCMultistepScheduler", "predict_x0", True),
          ("UniPCMultistepScheduler", "lower_order_final", True), ("UniPCMultistepScheduler", "disable_corrector", []),
          ("UniPCMultistepScheduler", "solver_p", None))
_UNMODELLED = ("use_beta_sigmas", "use_flow_sigmas", "use_lu_lambdas", "thresholding")


def pipeline_sampler(config: dict) -> tuple[str, dict, bool]:
    """(method, its options, clip_x0) that run the chain a pipeline's scheduler config names, step
    for step, for any step count: DDIM (with set_alpha_to_one), Euler, Euler ancestral,
    DPM-Solver++(2M) (and its SDE form), UniPC and LCM on the scheduler's own timesteps or sigmas;
    PNDM's PLMS, which is not registered here, runs as its nearest, DPM-Solver++(2M) on PNDM's
    timesteps. A field whose effect is not modelled is an error naming it."""
    name = config.get("_class_name", "DDIMScheduler")
    spacing = config.get("timestep_spacing", _SPACING_DEFAULTS.get(name, "leading"))
    if spacing not in ("linspace", "leading", "trailing"):
        raise _unsupported("timestep_spacing", spacing, "linspace, leading or trailing")
    for cls, field, default in _FIXED:
        if name == cls and config.get(field, default) != default:
            raise _unsupported(field, config[field], f"{cls} runs here with {field} = {default!r}")
    for field in _UNMODELLED:
        if config.get(field):
            raise _unsupported(field, config[field], "its grid or update is not modelled here")
    if name == "LCMScheduler":  # its own skipping timesteps: timestep_spacing and steps_offset do not apply
        return "lcm", {"sigmas": "lcm", "original_steps": int(config.get("original_inference_steps", 50)),
                       "timestep_scaling": float(config.get("timestep_scaling", 10.0))}, bool(config.get("clip_sample", False))
    grid = {"sigmas": "process", "spacing": spacing, "steps_offset": int(config.get("steps_offset", 0) or 0)}
    if config.get("use_karras_sigmas"):
        grid = {"sigmas": "karras"}
    elif config.get("use_exponential_sigmas"):
        grid = {"sigmas": "exponential"}
    elif name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        grid.update(sigmas="model")  # fractional linspace timesteps
    elif name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        grid.update(points="steps+1")
    if name == "DDIMScheduler":
        return "ddim", {**grid, "last_step_to": "x0" if config.get("set_alpha_to_one", True) else "t0"}, \
            bool(config.get("clip_sample", True))
    if name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        return ("euler" if name == "EulerDiscreteScheduler" else "euler_ancestral"), grid, False
    if name == "DPMSolverMultistepScheduler":
        algorithm = config.get("algorithm_type", "dpmsolver++")
        methods = {"dpmsolver++": "dpm++_2m", "sde-dpmsolver++": "dpm++_2m_sde"}
        if algorithm not in methods:
            raise _unsupported("algorithm_type", algorithm, "dpmsolver++ or sde-dpmsolver++")
        return methods[algorithm], grid, False
    if name == "UniPCMultistepScheduler":
        return "unipc", grid, False
    if name == "DDPMScheduler":
        variance = _VARIANCES.get(config.get("variance_type") or "fixed_small")
        if variance is None:
            raise _unsupported("variance_type", config["variance_type"], f"one of {sorted(_VARIANCES)}")
        return "ddpm", {**grid, "variance": variance}, bool(config.get("clip_sample", True))
    if name == "PNDMScheduler":
        return "dpm++_2m", grid, False
    raise _unsupported("_class_name", name, "a pipeline runs DDPMScheduler, DDIMScheduler, PNDMScheduler, "
                       "EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, "
                       "UniPCMultistepScheduler or LCMScheduler")
