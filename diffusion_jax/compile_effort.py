"""How hard XLA works on a program: decided here for the programs that run once.

An initialiser (a run's fresh train state, a model's parameters) runs once, so its compilation
is all it costs. On a CPU it is compiled at XLA's backend optimisation level 0 (LLVM without its
optimisation passes): the digits U-Net's train-state initialiser compiles in 1.6 s instead of
4.5 s (BENCHMARKS.md), and its values equal level 2's within float rounding (1.2e-7: the
multiply-adds are not fused). Other backends compile it as any program.
"""
from __future__ import annotations

from typing import Callable

import jax

ONE_TIME_CPU_OPTIONS = {"xla_backend_optimization_level": 0}


def jit_once(fn: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` for a program run once (an initialiser), compiled with
    ONE_TIME_CPU_OPTIONS on a CPU."""
    options = ONE_TIME_CPU_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(fn, compiler_options=options, **jit_kwargs)
