"""Forward processes x_t = alpha(t) x0 + sigma(t) eps as a family: `make_process(name, **options)`
returns one ("ddpm", "vp", "edm", "flow"; `process_names()`), a pytree that passes through
`jit` and `scan`. A `Schedule` is accepted wherever a process is (`as_process`): it is the
"ddpm" member, bitwise the same. `targets` converts the model outputs (eps, x0, v, velocity)
into one another for any process.

Importing this package registers the members: each is one file that calls `register`.
"""
from diffusion_jax.processes import ddpm, edm, flow, vp  # register the processes
from diffusion_jax.processes.ddpm import as_process
from diffusion_jax.processes.registry import Process, make_process, process_names, register
from diffusion_jax.processes.targets import PREDICTIONS, from_prediction, prediction_target

__all__ = ["PREDICTIONS", "Process", "as_process", "ddpm", "edm", "flow", "from_prediction", "make_process",
           "prediction_target", "process_names", "register", "vp"]
