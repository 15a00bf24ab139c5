"""`train --config FILE --workdir DIR [--config.KEY=VALUE ...] [--evaluate]` (or `train --workdir
RUN` to continue a run with its own config.json; `train --workdir NEW --config.lora.base=RUN
--config.lora.rank=R` starts a LoRA run on RUN's settings), and `run_experiment`, the entry point of the
experiment modules (`python -m experiments.NAME --workdir DIR`)."""
from __future__ import annotations

import argparse
import os
import sys

from diffusion_jax.cli import overrides as config_overrides
from diffusion_jax.cli.arguments import Parser

def train_and_report(config, workdir: str, evaluate: bool) -> None:
    """Trains (or resumes) the run, then optionally evaluates it and prints the summary."""
    from diffusion_jax.parallel import maybe_initialize_distributed

    maybe_initialize_distributed()
    import jax

    from diffusion_jax.training import train

    train(config, workdir)
    if not evaluate:
        return
    from diffusion_jax.evaluation import evaluate_run

    m = evaluate_run(workdir)
    if jax.process_index() == 0:
        print(f"held-out noise prediction: MSE {m['noise_mse']:.4f}, RMSE {m['noise_rmse']:.4f}, "
              f"MAE {m['noise_mae']:.4f}, R^2 {m['noise_r2']:.4f}"
              + (f"; {m['bpd']['total_bpd']:.3f} bits/dim" if "bpd" in m else ""))
        for name in ("samples.png", "reverse_process.png", "per_timestep.png", "metrics.json", "report.md"):
            print(f"  {os.path.join(workdir, 'eval', name)}")


def register(sub) -> None:
    t = sub.add_parser("train", help="train a run (or continue one)", allow_abbrev=False,
                       epilog="Any setting of the config is overridden by --config.SECTION.KEY=VALUE, e.g. "
                              "--config.train.steps=2000 --config.model.overrides.ch=16.")
    t.add_argument("--config", help="an experiment file with get_config(), e.g. experiments/digits_unet.py; "
                                    "leave it out to continue the run in --workdir with its own config.json")
    add_run_arguments(t, evaluate_default=False)
    t.set_defaults(run=train_command, takes_overrides=True)


def add_run_arguments(p, evaluate_default: bool) -> None:
    p.add_argument("--workdir", required=True, help="the run's directory (checkpoints, logs, pictures)")
    p.add_argument("--evaluate", action="store_true", default=evaluate_default,
                   help="evaluate the run when training ends" + (" (the default)" if evaluate_default else ""))
    p.add_argument("--noevaluate", dest="evaluate", action="store_false",
                   help="do not evaluate" if evaluate_default else argparse.SUPPRESS)


def train_command(args, overrides) -> None:
    from diffusion_jax.runs import load_config

    base = override_value(overrides, "lora.base")
    if args.config:
        config = config_overrides.from_file(args.config, overrides)
    elif base and not os.path.exists(os.path.join(args.workdir, "config.json")):
        from diffusion_jax.config import with_lora_section  # a new LoRA run: the base run's settings

        config = config_overrides.from_dict(with_lora_section(load_config(base)), overrides)
    else:
        config = config_overrides.from_dict(load_config(args.workdir), overrides)
    train_and_report(config, args.workdir, bool(args.evaluate))


def override_value(overrides: list, key: str):
    """The value `--config.KEY=VALUE` (or `--config.KEY VALUE`) gives, or None."""
    flag = f"--config.{key}"
    for i, argument in enumerate(overrides):
        if argument.startswith(flag + "="):
            return argument[len(flag) + 1:]
        if argument == flag and i + 1 < len(overrides):
            return overrides[i + 1]
    return None


def run_experiment(get_config, argv=None) -> None:
    """`python -m experiments.NAME --workdir DIR [--config.section.key=value ...] [--noevaluate]`:
    train the experiment's config, then evaluate it (through the CLI's error boundary)."""
    from diffusion_jax.cli import boundary

    argv = sys.argv if argv is None else list(argv)

    def command(args):
        p = Parser(prog=os.path.basename(args[0]) if args else "experiment", allow_abbrev=False,
                   epilog="Any setting of the experiment's config is overridden by --config.SECTION.KEY=VALUE.")
        add_run_arguments(p, evaluate_default=True)
        parsed, rest = p.parse_known_args(args[1:])
        config = config_overrides.from_dict(get_config(), config_overrides.overrides_of(rest))
        train_and_report(config, parsed.workdir, parsed.evaluate)

    boundary(command, argv)
