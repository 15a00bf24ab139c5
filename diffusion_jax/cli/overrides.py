"""A run's config on the command line: an experiment file or a ready config, with its
--config.SECTION.KEY=VALUE overrides applied by ml_collections' config_flags exactly as documented
(each value typed by the setting it replaces; a key the config has not is an error naming it).
argparse reads every other argument; this module reads only the overrides it leaves."""
from __future__ import annotations

import os

from diffusion_jax.cli.arguments import literal
from diffusion_jax.errors import UsageError

# Open-ended parts of the locked config: their keys cannot be flags, so they are parsed here.
OPEN_ENDED = {"--config.model.overrides.": ("model", "overrides", "a field of the model, e.g. ch=16"),
              "--config.sample.options.": ("sample", "options", "a sampler option, e.g. sigmas='karras'"),
              "--config.diffusion.process_options.": ("diffusion", "process_options", "a process option, e.g. shift=3.0"),
              "--config.diffusion.objective_options.": ("diffusion", "objective_options",
                                                        "an objective's option, e.g. ratio=0.5"),
              "--config.train.time_sampling_options.": ("train", "time_sampling_options",
                                                        "a time-sampling option, e.g. std=1.0")}


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
        found.setdefault((section, name), {})[field] = literal(value)
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
    from diffusion_jax.config import RENAMED

    renamed = {f"--config.{section}.{old}": f"--config.{section}.{new}" for section, old, new in RENAMED}
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--config.") and key in name.split(".")[1:]:
            if name in renamed:
                return f"{name}: the setting was renamed: use {renamed[name]}"
            return (f"{name}: the config has no setting '{key}'"
                    + (f" ({hints[0]})" if hints else " (check the spelling against the experiment file)"))
    return None




def is_override(argument: str) -> bool:
    return argument.startswith("--config.")


def overrides_of(rest: list[str]) -> list[str]:
    """The --config.KEY=VALUE (or --config.KEY VALUE) arguments argparse left over; anything else
    is an unrecognized argument."""
    bad = [a for i, a in enumerate(rest) if not is_override(a)
           and not (i and is_override(rest[i - 1]) and "=" not in rest[i - 1] and not a.startswith("-"))]
    if bad:
        raise UsageError(f"unrecognized arguments: {' '.join(bad)} (see --help)")
    return rest


def configured(define_config, overrides: list[str]):
    """The config that `define_config(flag_values, argv)` defines (an absl config flag named
    `config`: a file or a ready dict), with `overrides` applied."""
    from absl import flags

    argv, open_ended = _split_open_ended(["config"] + list(overrides))
    fv = flags.FlagValues()
    try:
        define_config(fv, argv)  # registers the --config.KEY overrides it finds in argv
        fv(argv)
        config = fv.config
        config.to_dict()  # a config file that failed to load raises only when read
    except (flags.Error, OSError, KeyError, AttributeError, TypeError) as e:
        # a mistyped key or value in an override, a config file that does not load
        unknown = _unknown_config_key(e, argv)
        if unknown:
            raise UsageError(unknown) from None
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        raise UsageError(lines[-1] if lines else repr(e)) from None
    with config.unlocked():
        for (section, name), values in open_ended.items():
            if name not in config[section]:
                config[section][name] = {}
            config[section][name].update(values)
    return config


def from_file(path: str, overrides: list[str]):
    """The config of an experiment file's get_config() (`path`, or `path:ARG`), overridden."""
    from ml_collections import config_flags

    if not os.path.isfile(path.split(":")[0]):
        raise UsageError(f"--config: no such file {path!r} (give the path of an experiment file, "
                         "e.g. experiments/digits_unet.py)")

    def define(fv, argv):
        config_flags.DEFINE_config_file("config", path, "experiment file with get_config()",
                                        flag_values=fv, lock_config=True, sys_argv=argv)

    return configured(define, overrides)


def from_dict(config, overrides: list[str]):
    """A ready config (a run's config.json, an experiment's get_config()), overridden."""
    from ml_collections import config_flags

    def define(fv, argv):
        config_flags.DEFINE_config_dict("config", config, "the run's config; override with --config.KEY=VALUE",
                                        flag_values=fv, lock_config=True, sys_argv=argv)

    return configured(define, overrides)
