"""Helpers shared by the benchmarks: timing, FLOP counts, device facts, one JSON line each."""
from __future__ import annotations

import datetime
import json
import time

import jax

# Dense bf16 peak FLOP/s of the accelerators MFU is reported against.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5e": 197e12}


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


def forward_flops_cpu(apply_fn, *args) -> float | None:
    """FLOPs of apply_fn(*args) from XLA's cost analysis of its CPU compilation."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        return None
    with jax.default_device(cpu):
        args = jax.device_put(args, cpu)
        return compiled_flops(jax.jit(apply_fn).lower(*args).compile())


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


def emit(record: dict) -> None:
    print(json.dumps({**record, **device_facts()}), flush=True)
