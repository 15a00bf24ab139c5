"""What every command's arguments share: the parser class whose errors are one line, typed
values (integers with a lower bound, finite numbers, Python literals), and the sampler settings
that sample and generate both take, declared once."""
from __future__ import annotations

import argparse
import math

from diffusion_jax.errors import UsageError
from diffusion_jax.samplers import sampler_names


class Parser(argparse.ArgumentParser):
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
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def literal(text: str):
    """A command-line value as a Python literal (16, 0.1, (1, 2), True), else the string."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


OPTION_HELP = ("a sampler option, repeatable: the grid's sigmas=process|model|karras|exponential|logsnr, "
               "spacing=linspace|leading|trailing, steps_offset=1, points=steps+1, rho=7, last_step_to=t0; the "
               "sampler's own: eta (ddim), s_churn, s_tmin, s_tmax, s_noise (euler, heun), variance (ddpm), "
               "lower_order_final (dpm++)")


def add_option_argument(p) -> None:
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=OPTION_HELP)


def parse_options(items: list[str]) -> dict:
    """--option KEY=VALUE ... as a dict (the sampler checks the keys, types and ranges)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--option {item!r}: write --option KEY=VALUE, e.g. --option sigmas=karras")
        options[key] = literal(value)
    return options


def add_sampler_arguments(p, labels_help: str) -> None:
    """The sampler settings `sample` and `generate` share."""
    p.add_argument("--method", choices=sampler_names(), help="the sampler (default: the run's sample.method)")
    p.add_argument("--steps", type=at_least(1), help="sampling steps (default: the run's sample.steps)")
    add_option_argument(p)
    p.add_argument("--eta", type=finite_float, help="DDIM's eta in [0, 1] (ddim only; same as --option eta=E)")
    p.add_argument("--guidance_scale", type=finite_float,
                   help="classifier-free guidance: 1 = none (the default), > 1 guided, 0 = unconditional")
    p.add_argument("--labels", help=labels_help)
    p.add_argument("--condition", action="append", help="a run of another condition kind (data.condition): a value "
                                                        "of its kind (repeat it for several, cycled over the samples)")
    p.add_argument("--negative_prompt", help="a text-conditioned run: what guidance steers away from "
                                             "(default the empty prompt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=at_least(0), help="the checkpoint's step (default: the newest good one)")


def parse_labels(text: str | None) -> list[int] | None:
    """--labels "0,1,2" as a list of ints (the generator checks them against the run)."""
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--labels {text!r}: give comma-separated class numbers, e.g. --labels 0,1,2") from None
