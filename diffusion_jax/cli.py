"""`python -m diffusion_jax train|sample|generate|evaluate|import|export|prepare|fid|fid-stats`, and
`run_experiment`, the entry point of the experiment modules. Both go through one error boundary (`main`): a user's mistake
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

import argparse
import contextlib
import logging
import os
import pathlib
import sys

from diffusion_jax.errors import UsageError
from diffusion_jax.files import ensure_writable_dir
from diffusion_jax.samplers import sampler_names

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


# ---------------------------------------------------------------------------- train
# Open-ended parts of the locked config: their keys cannot be flags, so they are parsed here.
OPEN_ENDED = {"--config.model.overrides.": ("model", "overrides", "a field of the model, e.g. ch=16"),
              "--config.sample.options.": ("sample", "options", "a sampler option, e.g. sigmas='karras'")}


def _literal(text: str):
    """A command-line value as a Python literal (16, 0.1, (1, 2), True), else the string."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _split_open_ended(argv) -> tuple[list, dict]:
    """(other arguments, {(section, name): {field: value}}) for the OPEN_ENDED arguments."""
    rest, found = [], {}
    for arg in argv:
        prefix = next((p for p in OPEN_ENDED if arg.startswith(p)), None)
        if prefix is None:
            rest.append(arg)
            continue
        section, name, example = OPEN_ENDED[prefix]
        field, sep, value = arg[len(prefix):].partition("=")
        if not sep or not field.isidentifier():
            raise UsageError(f"{arg!r}: write {prefix}FIELD=VALUE ({example})")
        found.setdefault((section, name), {})[field] = _literal(value)
    return rest, found


def _chain(error):
    """`error` and the exceptions it was raised while handling, outermost first."""
    while error is not None:
        yield error
        error = error.__context__ or error.__cause__


def _unknown_config_key(error, argv):
    """'--config.KEY: ...' when `error` says the config has no such key (ml_collections raises
    a KeyError naming one part of the dotted name, wrapped, with a suggestion if it has one)."""
    messages = [str(c.args[0]) for c in _chain(error) if isinstance(c, KeyError) and c.args]
    if not messages:
        return None
    key = messages[-1].strip("'\"")
    hints = [line for m in messages for line in m.splitlines() if line.startswith("Did you mean")]
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--config.") and key in name.split(".")[1:]:
            return (f"{name}: the config has no setting '{key}'"
                    + (f" ({hints[0]})" if hints else " (check the spelling against the experiment file)"))
    return None


def _parse_train_flags(argv, define_config) -> tuple:
    """(config, workdir, evaluate) from absl flags: --workdir, --evaluate and the config flag
    that `define_config(flag_values, argv)` defines, with its --config.section.key=value
    overrides (argv[0] is the program name)."""
    from absl import flags

    argv, open_ended = _split_open_ended(argv)
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, pictures)", flag_values=fv)
    flags.DEFINE_bool("evaluate", None, "evaluate the run when training ends", flag_values=fv)
    try:
        define_config(fv, argv)  # registers the --config.KEY overrides it finds in argv
        fv(argv)
        config = fv.config
        if config is not None:
            config.to_dict()  # a config file that failed to load raises only when read
    except (flags.Error, OSError, KeyError, AttributeError, TypeError) as e:
        # a bad flag, a mistyped key or value in an override, a config file that is missing
        unknown = _unknown_config_key(e, argv)
        if unknown:
            raise UsageError(unknown) from None
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        raise UsageError(lines[-1] if lines else repr(e)) from None
    if config is None or not fv.workdir:
        raise UsageError("train needs --config FILE and --workdir DIR" if argv[0] == "train"
                         else f"{argv[0]} needs --workdir DIR")
    with config.unlocked():
        for (section, name), values in open_ended.items():
            if name not in config[section]:
                config[section][name] = {}
            config[section][name].update(values)
    return config, fv.workdir, fv.evaluate


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


def _train(argv) -> None:
    from ml_collections import config_flags

    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        return _train_existing_run(argv)
    for i, arg in enumerate(argv):  # the config file itself, before ml_collections wraps its absence
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.partition("--config=")[2]
        if path and not os.path.isfile(path.split(":")[0]):
            raise UsageError(f"--config: no such file {path!r} (give the path of an experiment file, "
                             "e.g. experiments/digits_unet.py)")

    def config_file(fv, args):
        config_flags.DEFINE_config_file("config", None, "experiment file with get_config()",
                                        flag_values=fv, lock_config=True, sys_argv=args)

    config, workdir, evaluate = _parse_train_flags(["train"] + argv, config_file)
    train_and_report(config, workdir, bool(evaluate))


def _flag_value(argv, name: str):
    """The value of --name VALUE or --name=VALUE in argv, else None."""
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _config_dict_flag(config):
    """A `define_config` for _parse_train_flags of a ready config (overridable by --config.KEY=VALUE)."""
    from ml_collections import config_flags

    def define(fv, args):
        config_flags.DEFINE_config_dict("config", config, "the run's config; override with --config.KEY=VALUE",
                                        flag_values=fv, lock_config=True, sys_argv=args)

    return define


def _train_existing_run(argv) -> None:
    """`train --workdir RUN [--config.KEY=VALUE ...]`: continue the run with its own config.json."""
    from diffusion_jax.runs import load_config

    workdir = _flag_value(argv, "workdir")
    if not workdir:
        raise UsageError("train needs --config FILE and --workdir DIR (or only --workdir DIR of an existing run)")
    config, workdir, evaluate = _parse_train_flags(["train"] + argv, _config_dict_flag(load_config(workdir)))
    train_and_report(config, workdir, bool(evaluate))


def _import(args, overrides) -> None:
    from diffusion_jax.interop import load_diffusers
    from diffusion_jax.interop.runs import run_config, write_imported_run
    from diffusion_jax.models import count_params
    from diffusion_jax.training.config import base_config

    imported = load_diffusers(args.source, args.subfolder)
    config, workdir, _ = _parse_train_flags(["import", f"--workdir={args.workdir}", *overrides],
                                            _config_dict_flag(run_config(imported, base_config(), args.vae)))
    write_imported_run(imported, config, workdir)
    print(f"imported {imported.config['_class_name']} ({count_params(imported.params):,} parameters) into "
          f"{workdir}: sample, evaluate or train it (train --workdir {workdir} --config.train.steps=N)")


def _prepare(args) -> None:
    import ml_collections

    from diffusion_jax.data.prepare import prepare
    from diffusion_jax.parallel import maybe_initialize_distributed

    maybe_initialize_distributed()
    import jax

    data = ml_collections.ConfigDict(dict(name=args.dataset, image_size=args.image_size, channels=args.channels,
                                          data_dir=args.data_dir))
    done = prepare(data, args.split, args.out, shard_size=args.shard_size, process_index=jax.process_index(),
                   process_count=jax.process_count(), progress=jax.process_index() == 0)
    if "shards" in done:
        print(f"prepared {done['count']} images ({args.image_size}x{args.image_size}x{args.channels}, "
              f"{len(done['shards'])} shards) in {args.out}/{args.split}: train with "
              f"--config.data.name=array_record:{args.out}")
    else:
        print(f"this process's shards of {args.out}/{args.split} are done; the others are still being written")


def _export(args) -> None:
    from diffusion_jax.interop.runs import export_run

    out = export_run(args.workdir, args.out, args.checkpoint)
    print(f"wrote {out} (diffusers format: config.json, diffusion_pytorch_model.safetensors, scheduler/)")


def run_experiment(get_config, argv=None) -> None:
    """`python -m experiments.NAME --workdir DIR [--config.section.key=value ...] [--noevaluate]`:
    train the experiment's config, then evaluate it (through the CLI's error boundary)."""
    from ml_collections import config_flags

    def config_dict(fv, args):
        config_flags.DEFINE_config_dict("config", get_config(), "experiment config; override with "
                                        "--config.section.key=value", flag_values=fv, lock_config=True,
                                        sys_argv=args)

    def command(args):
        config, workdir, evaluate = _parse_train_flags(args, config_dict)
        train_and_report(config, workdir, True if evaluate is None else evaluate)

    _boundary(command, sys.argv if argv is None else list(argv))


# ---------------------------------------------------------------------------- sample, evaluate, fid-stats
def _sample(args):
    import jax
    import numpy as np

    from diffusion_jax import viz
    from diffusion_jax.generation import make_generator
    from diffusion_jax.parallel import maybe_initialize_distributed
    from diffusion_jax.runs import load_run

    out = sample_path(args.out)
    ensure_writable_dir(out.parent, "--out")
    if args.num_samples < 1 or args.batch_size < 1:
        raise UsageError(f"--num_samples and --batch_size must be at least 1, got {args.num_samples} "
                         f"and {args.batch_size}")
    labels = parse_labels(args.labels)
    maybe_initialize_distributed()
    run = load_run(args.workdir, args.checkpoint)
    generate = make_generator(run.model, run.schedule, run.config,
                              batch_size=min(args.num_samples, args.batch_size),
                              method=args.method, steps=args.steps,
                              options=parse_options(args.option), eta=args.eta)
    images = generate(run.ema_params, args.num_samples, jax.random.PRNGKey(args.seed),
                      guidance_scale=args.guidance_scale, labels=labels)
    if jax.process_index() == 0:
        np.savez_compressed(out, samples=images.astype(np.float32))
        png = viz.save_grid(images[:256], out.with_suffix(".png"))
        print(f"wrote {images.shape[0]} samples {images.shape[1:]} to {out} and {png} "
              f"(checkpoint step {run.step}, EMA parameters)")


def sample_path(out) -> pathlib.Path:
    """Where `sample --out OUT` writes: OUT itself when it ends in .npz, OUT/samples.npz when OUT is
    an existing directory, else OUT.npz (and the grid beside it, as .png)."""
    out = pathlib.Path(out)
    if out.suffix == ".npz":
        return out
    return out / "samples.npz" if out.is_dir() else out.with_name(out.name + ".npz")


OPTION_HELP = ("a sampler option, repeatable: sigmas=karras|exponential|model, "
               "spacing=linspace|leading|trailing, rho=7, s_churn=..., s_tmin, s_tmax, s_noise")


def parse_options(items: list[str]) -> dict:
    """--option KEY=VALUE ... as a dict (the sampler checks the keys)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--option {item!r}: write --option KEY=VALUE, e.g. --option sigmas=karras")
        options[key] = _literal(value)
    return options


def _generate(args):
    from diffusion_jax.generate_job import generate_samples
    from diffusion_jax.parallel import maybe_initialize_distributed

    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {args.num_samples}")
    ensure_writable_dir(args.out, "--out")
    maybe_initialize_distributed()
    manifest = generate_samples(args.workdir, args.out, args.num_samples, seed=args.seed, method=args.method,
                                steps=args.steps, options=parse_options(args.option), eta=args.eta,
                                guidance_scale=args.guidance_scale, labels=parse_labels(args.labels),
                                checkpoint=args.checkpoint, batch_size=args.batch_size,
                                shard_size=args.shard_size)
    import jax

    if jax.process_index() == 0:
        print(f"{args.num_samples} samples in {len(manifest['shards'])} verified shards in {args.out} "
              f"({manifest['method']}, {manifest['steps']} steps, checkpoint {manifest['checkpoint']}); "
              f"manifest: {pathlib.Path(args.out) / 'manifest.json'}")


def parse_labels(text: str | None) -> list[int] | None:
    """--labels "0,1,2" as a list of ints (the generator checks them against the run)."""
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--labels {text!r}: give comma-separated class numbers, e.g. --labels 0,1,2") from None


def _evaluate(args):
    import json

    from diffusion_jax.evaluation import evaluate_run

    from diffusion_jax.runs import load_config

    load_config(args.workdir)  # a run is there: before any folder is made for its report
    out_dir = pathlib.Path(args.out or pathlib.Path(args.workdir) / "eval")
    ensure_writable_dir(out_dir, "--out" if args.out else "the run's eval/ folder (or choose --out DIR)")
    m = evaluate_run(args.workdir, checkpoint=args.checkpoint, num_samples=args.num_samples,
                     sampler=args.sampler, steps=args.steps, seed=args.seed, fid_stats=args.fid_stats,
                     inception_weights=args.inception_weights, out_dir=out_dir,
                     sampler_options=parse_options(args.option))
    summary = {k: m[k] for k in ("noise_mse", "noise_rmse", "noise_mae", "noise_r2", "checkpoint_step")}
    if "bpd" in m:
        summary["bits_per_dim"] = m["bpd"]["total_bpd"]
    for key in ("fid", "digits_fd"):
        if key in m:
            summary[key] = m[key]
    print(json.dumps(summary, indent=2))


def _fid(args):
    import jax

    from diffusion_jax.evaluation.shard_fid import fid_of_shards
    from diffusion_jax.parallel import maybe_initialize_distributed

    maybe_initialize_distributed()
    result = fid_of_shards(args.samples, args.ref, args.features, args.inception_weights, args.out)
    if jax.process_index() == 0:
        print(f"FID {result['fid']:.4f} of {result['n']} samples in {args.samples} against {args.ref} "
              f"({result['features']}); written to {args.out or pathlib.Path(args.samples) / 'fid.json'}")


def _fid_stats(args):
    import ml_collections

    from diffusion_jax.data import load_split
    from diffusion_jax.evaluation.frechet import feature_statistics, save_statistics
    from diffusion_jax.evaluation.shard_fid import feature_extractor

    if args.samples:  # statistics of a directory of shards, pooled exactly over the processes
        import jax

        from diffusion_jax.evaluation.frechet import statistics_from_sums
        from diffusion_jax.evaluation.shard_fid import shard_feature_sums
        from diffusion_jax.parallel import maybe_initialize_distributed

        maybe_initialize_distributed()
        sums = shard_feature_sums(args.samples, feature_extractor(args.features, args.inception_weights)[0])
        mu, sigma = statistics_from_sums(sums)
        if jax.process_index() == 0:
            print(f"wrote statistics of {sums.count} images ({len(mu)} features, {jax.process_count()} "
                  f"process(es)) to {save_statistics(args.out, mu, sigma)}")
        return
    if not args.dataset:
        raise UsageError("fid-stats needs --dataset NAME (or --samples DIR)")
    data_config = ml_collections.ConfigDict(dict(name=args.dataset, image_size=args.image_size,
                                                 channels=args.channels, data_dir=args.data_dir))
    images = load_split(data_config, args.split).model_range(slice(0, args.max_images or None))
    if len(images) < 2:
        raise UsageError(f"statistics need at least 2 images, the split {args.split!r} of {args.dataset!r} gives "
                         f"{len(images)}{' with --max_images ' + str(args.max_images) if args.max_images else ''}")
    features = feature_extractor(args.features, args.inception_weights)[0](images)
    mu, sigma = feature_statistics(features)
    print(f"wrote statistics of {len(features)} images ({features.shape[1]} features) to "
          f"{save_statistics(args.out, mu, sigma)}")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the boundary prints it) instead of usage + exit."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def at_least(minimum: int):
    """An argparse type: an integer >= minimum, else a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def finite_float(text: str) -> float:
    """An argparse type: a finite real number."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _sampler_arguments(p, labels_help: str) -> None:
    """The sampler settings `sample` and `generate` share, declared once."""
    p.add_argument("--method", choices=sampler_names(), help="the sampler (default: the run's sample.method)")
    p.add_argument("--steps", type=at_least(1), help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=OPTION_HELP)
    p.add_argument("--eta", type=finite_float, help="DDIM's eta in [0, 1] (ddim only; same as --option eta=E)")
    p.add_argument("--guidance_scale", type=finite_float,
                   help="classifier-free guidance: 1 = none (the default), > 1 guided, 0 = unconditional")
    p.add_argument("--labels", help=labels_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=at_least(0), help="the checkpoint's step (default: the newest good one)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m diffusion_jax", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--debug", action="store_true", help="show the traceback of any error")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a run (or continue one)", allow_abbrev=False,
                       epilog="Any setting of the config is overridden by --config.SECTION.KEY=VALUE, e.g. "
                              "--config.train.steps=2000 --config.model.overrides.ch=16.")
    t.add_argument("--config", help="an experiment file with get_config(), e.g. experiments/digits_unet.py; "
                                    "leave it out to continue the run in --workdir with its own config.json")
    t.add_argument("--workdir", required=True, help="the run's directory (checkpoints, logs, pictures)")
    t.add_argument("--evaluate", action="store_true", help="evaluate the run when training ends")
    t.add_argument("--noevaluate", dest="evaluate", action="store_false", help=argparse.SUPPRESS)
    s = sub.add_parser("sample", help="samples from a run's EMA parameters")
    s.add_argument("--workdir", required=True, help="the run to sample")
    s.add_argument("--out", required=True, help="FILE.npz (and FILE.png beside it), or a directory")
    s.add_argument("--num_samples", type=at_least(1), default=64)
    s.add_argument("--batch_size", type=at_least(1), default=256)
    _sampler_arguments(s, "comma-separated class labels, cycled")
    g = sub.add_parser("generate", help="a batch job: N samples as verified, resumable shards (uint8)")
    g.add_argument("--workdir", required=True, help="the run to sample")
    g.add_argument("--num_samples", type=at_least(1), required=True)
    g.add_argument("--out", required=True, help="a directory every process can write")
    g.add_argument("--batch_size", type=at_least(1), default=256, help="per call; the images do not depend on it")
    g.add_argument("--shard_size", type=at_least(1), default=1000)
    _sampler_arguments(g, "comma-separated class labels: sample i gets labels[i %% len(labels)]")
    e = sub.add_parser("evaluate", help="metrics, bits/dim, samples and report of a run")
    e.add_argument("--workdir", required=True, help="the run to evaluate")
    e.add_argument("--checkpoint", type=at_least(0))
    e.add_argument("--num_samples", type=at_least(1))
    e.add_argument("--sampler", choices=sampler_names())
    e.add_argument("--steps", type=at_least(1))
    e.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=OPTION_HELP)
    e.add_argument("--seed", type=int)
    e.add_argument("--fid_stats", help="reference statistics .npz (from fid-stats) to compute FID against")
    e.add_argument("--inception_weights", help="converted FID Inception .npz (see evaluation/inception.py)")
    e.add_argument("--out", help="where to write the report (default: the run's eval/ folder)")
    q = sub.add_parser("fid", help="FID of a directory of generated shards against reference statistics")
    q.add_argument("--samples", required=True, help="the --out directory of a finished generate job")
    q.add_argument("--ref", required=True, help="reference statistics .npz (from fid-stats)")
    q.add_argument("--features", choices=["inception", "digits"], default="inception")
    q.add_argument("--inception_weights", default=None)
    q.add_argument("--out", help="where to write the JSON result (default SAMPLES/fid.json)")
    m = sub.add_parser("import", help="a diffusers model as a run", allow_abbrev=False,
                       epilog="Settings of the run made are overridden by --config.SECTION.KEY=VALUE.")
    m.add_argument("--from", dest="source", required=True, help="a diffusers model directory or Hub repository id")
    m.add_argument("--workdir", required=True, help="the new run's directory")
    m.add_argument("--subfolder", help="the model's subfolder in a pipeline: unet, transformer")
    m.add_argument("--vae", default="", help="latent diffusion: the AutoencoderKL (a directory, a repository id, "
                                             "or a pipeline with a vae/ folder)")
    r = sub.add_parser("prepare", help="a data set split as ArrayRecord shards (data.name=array_record:DIR)")
    r.add_argument("--dataset", required=True, help="digits, folder:PATH or a tfds name")
    r.add_argument("--image_size", type=at_least(1), required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--split", default="train")
    r.add_argument("--channels", type=at_least(1), default=3)
    r.add_argument("--shard_size", type=at_least(1), default=10_000)
    r.add_argument("--data_dir", default="")
    x = sub.add_parser("export", help="a run's EMA model as a diffusers model directory")
    x.add_argument("--workdir", required=True, help="the run to export")
    x.add_argument("--out", required=True, help="a new or empty directory")
    x.add_argument("--checkpoint", type=at_least(0))
    f = sub.add_parser("fid-stats", help="reference feature statistics of a dataset split or of shards")
    f.add_argument("--out", required=True, help="the statistics file to write (.npz)")
    f.add_argument("--dataset", help="a dataset (digits, folder:PATH, a tfds name); or --samples")
    f.add_argument("--samples", help="a directory of shards (generate's --out) instead of a dataset")
    f.add_argument("--split", default="train")
    f.add_argument("--features", choices=["inception", "digits"], default="inception")
    f.add_argument("--inception_weights", default=None)
    f.add_argument("--image_size", type=at_least(1), default=299)
    f.add_argument("--channels", type=at_least(1), default=3)
    f.add_argument("--data_dir", default="")
    f.add_argument("--max_images", type=at_least(0), default=0, help="use the first N images (0: all)")
    return p


COMMANDS_WITH_CONFIG = ("train", "import")  # they take --config.SECTION.KEY=VALUE overrides too


def config_overrides(rest: list[str]) -> list[str]:
    """The --config.KEY=VALUE (or --config.KEY VALUE) arguments argparse left over; anything else
    is an unrecognized argument."""
    bad = [a for i, a in enumerate(rest) if not a.startswith("--config.")
           and not (i and rest[i - 1].startswith("--config.") and "=" not in rest[i - 1] and not a.startswith("-"))]
    if bad:
        raise UsageError(f"unrecognized arguments: {' '.join(bad)} (see --help)")
    return rest


def _dispatch(argv) -> None:
    args, rest = build_parser().parse_known_args(argv)
    if args.command not in COMMANDS_WITH_CONFIG:
        if rest:
            raise UsageError(f"unrecognized arguments: {' '.join(rest)} (see python -m diffusion_jax "
                             f"{args.command} --help)")
    elif args.command == "train":
        config_overrides(rest)
        return _train(argv[argv.index("train") + 1:])
    else:
        return _import(args, config_overrides(rest))
    {"sample": _sample, "generate": _generate, "evaluate": _evaluate, "fid": _fid,
     "fid-stats": _fid_stats, "export": _export, "prepare": _prepare}[args.command](args)


# ---------------------------------------------------------------------------- the error boundary
def _boundary(command, argv) -> None:
    """Runs command(argv) with the persistent compilation cache on (`compilation_cache`). A
    user's mistake (exit 2) or a stated stop or failure (exit 1) is one line on stderr, never a
    traceback (unless --debug or DIFFUSION_JAX_DEBUG=1); a bug (any other exception) keeps its
    traceback."""
    from diffusion_jax.compilation_cache import enable_compilation_cache

    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        with cli_logging():
            enable_compilation_cache()
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
    _boundary(_dispatch, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    main()
