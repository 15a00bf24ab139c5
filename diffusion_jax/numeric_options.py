"""Numeric options declared as {name: (default, low, high)} (a time sampling's, an objective's),
checked in one place: no unknown name, the defaults filled in, each value a finite number in range."""
from __future__ import annotations

import math

import jax

from diffusion_jax.errors import UsageError


def checked_options(what: str, declared: dict, given, zero_excluded: bool = False) -> dict:
    """`given` ({name: value}) of `what` (e.g. "objective 'meanflow'") against `declared`, defaults
    filled in; each a finite number in [low, high], or with `zero_excluded` in (0, high] where low is 0
    (a standard deviation above 0). Traced values pass unchecked."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise UsageError(f"{what} takes {sorted(declared) or 'no options'}, not {unknown}")
    merged = {k: given.get(k, default) for k, (default, _, _) in declared.items()}
    for k, value in merged.items():
        low, high = declared[k][1:]
        open_low = zero_excluded and low == 0.0
        if isinstance(value, jax.core.Tracer):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high or (open_low and value == low):
            raise UsageError(f"{what} option {k} = {value!r} must be a finite number in "
                             f"{'(' if open_low else '['}{low:g}, {high:g}]")
    return merged
