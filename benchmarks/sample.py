"""Sampling throughput: samples/s and compile time of DDPM-1000 and DDIM-50 (the whole chain one
lax.scan), and the sampler's overhead over bare network forwards, one JSON line each.

    python -m benchmarks.sample --model ddpm_cifar10 --batch 256 --dtype bfloat16
    python -m benchmarks.sample --model unet_digits --batch 256 --dtype float32   # CPU-sized

overhead = time per step / time of one bare forward (same batch, same jit) - 1.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks.common import block, emit, parse_override, peak_memory_bytes
from diffusion_jax import parallel
from diffusion_jax.models import PRESETS, create_model, init_params
from diffusion_jax.builders import DTYPES
from diffusion_jax.samplers import sample
from diffusion_jax.schedules import make_schedule
from diffusion_jax.host_memory import keep_freed_memory


def measure(model_name, batch, dtype, method, steps, repeats=2, overrides=None):
    model = create_model(model_name, dtype=DTYPES[dtype], **(overrides or {}))
    shape = PRESETS[model_name].input_shape
    params = init_params(model, jax.random.PRNGKey(0), shape)
    # A zero-initialised head outputs zeros; perturb it so the chain does real arithmetic.
    params = jax.tree_util.tree_map(lambda p: p + 1e-3, params)
    schedule = make_schedule("linear", 1000)
    mesh = parallel.make_mesh()
    sharding = parallel.batch_sharding(mesh)
    params = jax.device_put(params, parallel.replicated(mesh))
    denoise = lambda p: (lambda x, t: model.apply({"params": p}, x, t))

    run = jax.jit(lambda p, key: sample(denoise(p), schedule, (batch, *shape), key, method=method,
                                        num_steps=steps, sharding=sharding))
    t0 = time.perf_counter()
    compiled = run.lower(params, jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - t0
    block(compiled(params, jax.random.PRNGKey(1)))
    t0 = time.perf_counter()
    for i in range(repeats):
        out = compiled(params, jax.random.PRNGKey(2 + i))
    block(out)
    chain_s = (time.perf_counter() - t0) / repeats

    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t),
                      in_shardings=(parallel.replicated(mesh), sharding, sharding))
    x = jax.device_put(np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32), sharding)
    t = jax.device_put(np.full((batch,), 500, np.int32), sharding)
    block(forward(params, x, t))
    n = max(steps // 4, 5)
    t0 = time.perf_counter()
    for _ in range(n):
        y = forward(params, x, t)
    block(y)
    forward_s = (time.perf_counter() - t0) / n
    per_step = chain_s / steps
    return {"bench": "sample", "model": model_name, "batch": batch, "dtype": dtype, "method": method,
            "overrides": overrides or {}, "steps": steps, "seconds": round(chain_s, 3), "samples_per_sec": round(batch / chain_s, 2),
            "compile_s": round(compile_s, 2), "step_ms": round(1e3 * per_step, 3),
            "forward_ms": round(1e3 * forward_s, 3), "overhead": round(per_step / forward_s - 1, 4),
            "peak_memory_gb": None if peak_memory_bytes() is None else round(peak_memory_bytes() / 2**30, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ddpm_cifar10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--methods", default="ddpm:1000,ddim:50", help="method:steps, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="timed chains per method (after one warm-up)")
    p.add_argument("--override", type=parse_override, action="append", default=[],
                   help="model field=value (repeatable), e.g. ops_impl=pallas")
    args = p.parse_args(argv)
    keep_freed_memory()  # the host allocator the commands run with (diffusion_jax.host_memory)
    for item in args.methods.split(","):
        method, steps = item.split(":")
        emit(measure(args.model, args.batch, args.dtype, method, int(steps), args.repeats, dict(args.override)))


if __name__ == "__main__":
    main()
