"""Helpers shared by the benchmarks: timing, FLOP counts, device facts, one JSON line each."""
from __future__ import annotations

import argparse
import ast
import datetime
import gzip
import json
import time

import jax
import numpy as np

# Dense bf16 peak FLOP/s of the accelerators MFU is reported against.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5e": 197e12}


def parse_override(text: str) -> tuple:
    """"field=value" -> (field, value), the value read as a Python literal or else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--override wants field=value, got {text!r}")
    field, value = text.split("=", 1)
    try:
        return field, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return field, value


def open_text(path: str, mode: str = "rt"):
    """open(path, mode) for a text file, gzip-compressed when the name ends in .gz."""
    return (gzip.open if path.endswith(".gz") else open)(path, mode)


def device_facts() -> dict:
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__, "date": datetime.date.today().isoformat()}


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def compiled_flops(compiled) -> float | None:
    """FLOPs XLA's cost analysis reports for a compiled executable (None if unavailable).

    On GPU, convolutions that run as cuDNN custom calls are left out: count those on the CPU
    lowering instead (see forward_flops_cpu)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:
        return None


def _matmul_flops(eqn) -> float:
    """2 x multiply-adds of one conv_general_dilated or dot_general equation."""
    out = eqn.outvars[0].aval
    if eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        dn = eqn.params["dimension_numbers"]
        kernel_out = rhs.shape[dn.rhs_spec[0]]
        per_output = np.prod(rhs.shape) / kernel_out  # kernel spatial x input channels per group
        return 2.0 * np.prod(out.shape) * per_output
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    return 2.0 * np.prod(out.shape) * np.prod([lhs.shape[d] for d in lhs_contract])


def jaxpr_flops(jaxpr) -> float:
    """Sum of conv / dot_general FLOPs in a (closed) jaxpr, nested jaxprs included; a scan's
    body counts once per iteration."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            total += _matmul_flops(eqn)
        repeats = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else [param]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    total += repeats * jaxpr_flops(inner if hasattr(inner, "eqns") else inner.jaxpr)
                elif hasattr(sub, "eqns"):
                    total += repeats * jaxpr_flops(sub)
    return total


def analytic_forward_flops(apply_fn, *args) -> float:
    return jaxpr_flops(jax.make_jaxpr(apply_fn)(*args).jaxpr)


def block(x):
    return jax.block_until_ready(x)


def timed(fn, *args, repeats: int = 1):
    """(result, seconds per call) after the calls finish on the device."""
    start = time.perf_counter()
    out = None
    for _ in range(repeats):
        out = fn(*args)
    block(out)
    return out, (time.perf_counter() - start) / repeats


def peak_memory_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")
    except Exception:
        return None


def compiled_temp_bytes(compiled) -> int | None:
    """Temporary memory of XLA's buffer assignment for a compiled function (mostly the
    activations kept for the backward pass), or None where the backend does not say."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes
    except Exception:
        return None


def emit(record: dict) -> None:
    print(json.dumps({**record, **device_facts()}), flush=True)
