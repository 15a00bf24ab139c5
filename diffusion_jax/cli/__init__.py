"""`python -m diffusion_jax train|sample|generate|evaluate|import|export|prepare|fid|fid-stats`, and
`run_experiment`, the entry point of the experiment modules (one module a command, one argparse
parser; a command's module registers its subparser and the function that runs it). Both go through one error boundary (`main`): a user's mistake
is one line `error: ...` (exit 2), a run that stops for a reason it states exits 1; the
traceback shows only with --debug or DIFFUSION_JAX_DEBUG=1.

  train     --config experiments/digits_unet.py --workdir DIR [--config.train.steps=N ...] [--evaluate]
  sample    --workdir DIR --num_samples N [--method NAME --steps K --option KEY=VALUE --seed S
            --guidance_scale G --labels 0,1,2 --eta E --checkpoint STEP] --out FILE.npz
  generate  --workdir DIR --num_samples N --out DIR [--shard_size 1000 --batch_size B and sample's
            options]: a resumable batch job of uint8 shards whose images do not depend on B
  evaluate  --workdir DIR [--checkpoint STEP --num_samples N --sampler NAME --steps K
            --option KEY=VALUE --seed S --fid_stats REF.npz --inception_weights FILE]
  import    --from DIR_OR_REPO --workdir RUN [--subfolder transformer --vae DIR_OR_REPO --config.KEY=VALUE]: a
            diffusers model as a run (its step-0 checkpoint); `train --workdir RUN` fine-tunes it
  export    --workdir RUN --out DIR [--checkpoint STEP]: the run's EMA model in diffusers' format
  prepare   --dataset NAME|folder:PATH --split S --image_size N --channels C --out DIR [--shard_size K]:
            the split as uint8 ArrayRecord shards in DIR/S, for data.name=array_record:DIR (resumable)

The samplers (NAME) are the registry's (`samplers.sampler_names()`; `sample --help` lists them).
  fid       --samples DIR --ref REF.npz [--features digits|inception --inception_weights FILE]
  fid-stats --dataset NAME --split train --out FILE.npz [--samples DIR --features digits|inception
            --inception_weights FILE --image_size S --channels C --max_images N]
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

from diffusion_jax.cli import arguments, diffusers, evaluate, fid, prepare, sample, train
from diffusion_jax.cli.overrides import overrides_of
from diffusion_jax.cli.train import run_experiment
from diffusion_jax.errors import UsageError

DEBUG_ENV = "DIFFUSION_JAX_DEBUG"


class _Format(logging.Formatter):
    def format(self, record):
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def configure_logging():
    """The library's log messages on stdout (INFO as they are, warnings marked) and not on to
    other handlers. Returns a function that puts logging back as it was."""
    logger = logging.getLogger("diffusion_jax")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Format())
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def restore():
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]

    return restore


@contextlib.contextmanager
def cli_logging():
    """`configure_logging` while a command runs; afterwards logging is as it was."""
    restore = configure_logging()
    try:
        yield
    finally:
        restore()

# The commands, in the order --help lists them: each module's register(subparsers).
COMMAND_MODULES = (train, sample, evaluate, fid, diffusers, prepare)


def build_parser():
    p = arguments.Parser(prog="python -m diffusion_jax", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--debug", action="store_true", help="show the traceback of any error")
    sub = p.add_subparsers(dest="command", required=True, parser_class=arguments.Parser)
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def dispatch(argv) -> None:
    args, rest = build_parser().parse_known_args(argv)
    if getattr(args, "takes_overrides", False):
        return args.run(args, overrides_of(rest))
    if rest:
        raise UsageError(f"unrecognized arguments: {' '.join(rest)} (see python -m diffusion_jax {args.command} --help)")
    return args.run(args)


# ---------------------------------------------------------------------------- the error boundary
def boundary(command, argv) -> None:
    """Runs command(argv) with the persistent compilation cache on (`compilation_cache`, with the
    executables found without tracing: a command line runs the library's own code) and freed host
    memory kept for reuse (`host_memory`: XLA's CPU buffers without a page fault a step). A
    user's mistake (exit 2) or a stated stop or failure (exit 1) is one line on stderr, never a
    traceback (unless --debug or DIFFUSION_JAX_DEBUG=1); a bug (any other exception) keeps its
    traceback."""
    from diffusion_jax.compilation_cache import enable_compilation_cache
    from diffusion_jax.host_memory import keep_freed_memory

    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        with cli_logging():
            enable_compilation_cache(executables=True)
            keep_freed_memory()
            command(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        code = exit_code(e)
        if code is None:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(code)


def exit_code(error: Exception) -> int | None:
    """2 for a user's mistake (a `UsageError`, or a path that is missing, not allowed or of the
    wrong kind), 1 for a stated stop or an operating-system failure (a full disk), None for
    anything else: a bug, whose traceback is shown (a ValueError from NumPy or Flax too)."""
    from diffusion_jax.errors import RunStopped

    if isinstance(error, (UsageError, FileNotFoundError, PermissionError, NotADirectoryError,
                          IsADirectoryError)):
        return 2
    if isinstance(error, (RunStopped, OSError)):
        return 1
    return None


def main(argv=None) -> None:
    boundary(dispatch, sys.argv[1:] if argv is None else list(argv))


__all__ = ["boundary", "build_parser", "cli_logging", "configure_logging", "exit_code", "main", "run_experiment"]
