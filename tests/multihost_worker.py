"""One process of the multi-host test: train a tiny run for 3 steps, stop, resume to 6, and
write the final parameters (run by tests/test_multihost.py, never collected by pytest)."""
import sys

import numpy as np

sys.path.insert(0, sys.argv[3])

from diffusion_jax.cli import configure_logging  # noqa: E402
from diffusion_jax.parallel import maybe_initialize_distributed  # noqa: E402

configure_logging()  # the library's messages on stdout, as the CLI shows them

maybe_initialize_distributed()

import jax  # noqa: E402

from diffusion_jax.training import train  # noqa: E402
from tests.train_helpers import state_arrays, tiny_config  # noqa: E402

workdir, out = sys.argv[1], sys.argv[2]
config = tiny_config(6, **{"data.batch_size": 8, "train.ckpt_every": 3, "train.log_every": 1})
train(config, workdir, stop_after=3)
state = train(config, workdir)
arrays = state_arrays(state)  # replicated parameters: every process holds them whole
if jax.process_index() == 0:
    np.savez(out, **arrays)
print(f"process {jax.process_index()} of {jax.process_count()} with {jax.local_device_count()} "
      f"local devices finished at step {int(state.step)}", flush=True)
