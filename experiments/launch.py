"""`main` shared by the experiment modules: absl flags --workdir and --config.* overrides,
multi-host start-up, train, then evaluate.

    python -m experiments.digits_unet --workdir runs/digits --config.train.steps=2000
"""
from __future__ import annotations

import sys


def run(get_config, argv=None, evaluate_after: bool = True) -> None:
    from absl import flags
    from ml_collections import config_flags

    flags_ = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, pictures)", flag_values=flags_)
    flags.DEFINE_bool("evaluate", evaluate_after, "evaluate the run when training ends", flag_values=flags_)
    config_flags.DEFINE_config_dict("config", get_config(), "experiment config; override with "
                                    "--config.section.key=value", flag_values=flags_, lock_config=True)
    argv = sys.argv if argv is None else argv
    try:
        flags_(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}")
    if not flags_.workdir:
        sys.exit("error: --workdir is required")
    main(flags_.config, flags_.workdir, flags_.evaluate)


def main(config, workdir: str, evaluate: bool = True) -> None:
    from diffusion_jax.parallel import maybe_initialize_distributed

    maybe_initialize_distributed()
    from diffusion_jax.training import NonFiniteLoss, Preempted, train
    from diffusion_jax.training.checkpoint import CheckpointMismatch

    try:
        train(config, workdir)
    except Preempted as e:  # saved: the scheduler may restart the same command
        sys.exit(f"pre-empted: {e}")
    except NonFiniteLoss as e:
        sys.exit(f"stopped: {e}")
    except CheckpointMismatch as e:
        sys.exit(f"error: {e}")
    if evaluate:
        import pathlib

        import jax

        from diffusion_jax.evaluation import evaluate_run

        m = evaluate_run(workdir)
        if jax.process_index() == 0:
            out = pathlib.Path(workdir) / "eval"
            print(f"held-out noise prediction: MSE {m['noise_mse']:.4f}, RMSE {m['noise_rmse']:.4f}, "
                  f"MAE {m['noise_mae']:.4f}, R^2 {m['noise_r2']:.4f}"
                  + (f"; {m['bpd']['total_bpd']:.3f} bits/dim" if "bpd" in m else ""))
            for name in ("samples.png", "reverse_process.png", "per_timestep.png", "metrics.json", "report.md"):
                print(f"  {out / name}")
