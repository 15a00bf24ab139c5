"""Tiny runs shared by the training tests (and by the subprocesses they launch)."""
import jax
import numpy as np

from diffusion_jax.config import base_config


def tiny_config(steps=20, **changes):
    c = base_config()
    c.data.name = "digits"
    c.data.image_size, c.data.channels, c.data.batch_size = 8, 1, 16
    c.model.name = "dit_tiny"  # compiles ~3x faster than unet_tiny; the U-Net trains in test_evaluation
    c.diffusion.num_timesteps = 100
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 2
    c.train.steps = steps
    c.train.log_every = 5
    c.train.ckpt_every = 10
    c.train.num_sample_images = 0
    c.train.progress = False
    c.sample.steps = 5
    c.eval.num_examples = 64
    c.eval.num_samples = 16
    c.eval.bpd_examples = 4
    c.eval.ode_bpd = False  # the ODE likelihood of a DDPM run: test_evaluation's digits run shows it
    for key, value in changes.items():
        node = c
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return c


def state_arrays(state) -> dict:
    """Flattened host copies of params, EMA and optimizer state, keyed by path."""
    leaves = jax.tree_util.tree_leaves_with_path({"params": state.params, "ema": state.ema_params,
                                                  "opt": state.opt_state, "step": state.step})
    return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf)) for path, leaf in leaves}


def corrupt_checkpoint_data(workdir, step: int, seed: int = 0) -> list:
    """Writes 64 random bytes every 4 KiB into the array data files of a checkpoint's state (its
    params, EMA and optimizer state): the files are still there and the rest of the checkpoint
    is intact, but what they hold is not what was saved. Returns the files changed."""
    import pathlib
    state = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    files = sorted(f for f in state.glob("ocdbt.process_*/d/*") if f.stat().st_size > 4096)
    assert files, f"no array data under {state}"
    rng = np.random.default_rng(seed)
    for target in files:
        data = bytearray(target.read_bytes())
        for start in range(2048, len(data) - 64, 4096):
            data[start:start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        target.write_bytes(bytes(data))
    return files


def write_untrained_run(workdir, config, step: int = 1):
    """A run directory as training leaves it -- config.json and a verified checkpoint -- holding
    the initial parameters (no train step is compiled): for tests of what reads runs."""
    import pathlib

    from diffusion_jax import parallel
    from diffusion_jax.checkpoints import Checkpointer
    from diffusion_jax.training.step import build_train_program
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    program = build_train_program(config, parallel.make_mesh())
    state = program.init(jax.random.PRNGKey(config.seed))
    state = state.replace(step=state.step + step)
    ckpt = Checkpointer(workdir)
    ckpt.save(step, state, config)
    ckpt.close()
    (workdir / "config.json").write_text(config.to_json(indent=2))
    return workdir
