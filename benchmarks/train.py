"""Training throughput: images/s, step time, MFU, peak memory and compile time of the library's
own train step (the one `diffusion_jax.training` runs), one JSON line per configuration.
`compiled_temp_gb` is the temporary memory of XLA's buffer assignment for the step (mostly the
activations kept for the backward pass), known on every backend without running it.

    python -m benchmarks.train --model ddpm_cifar10 --batch 128 --dtype bfloat16
    python -m benchmarks.train --model dit_b2 --batch 256 --dtype bfloat16

Data are synthetic (random images, marked "data": "synthetic"), already on the device, so the
number is the step itself. `--override attention_impl=xla` changes a model field (repeatable);
`--profile DIR` records a few steps with `jax.profiler` (a Perfetto trace; summarise it with
`python -m benchmarks.trace_summary DIR`).
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks.common import (analytic_forward_flops, block, compiled_temp_bytes, emit, open_text, parse_override,
                               peak_flops, peak_memory_bytes)
from diffusion_jax import parallel
from diffusion_jax.models import PRESETS
from diffusion_jax.latents import model_input_shape as input_shape
from diffusion_jax.config import base_config
from diffusion_jax.training.step import build_train_program
from diffusion_jax.host_memory import keep_freed_memory


def bench_config(model: str, batch: int, dtype: str, steps_per_dispatch: int, num_classes: int,
                 overrides: dict | None = None):
    c = base_config()
    h, w, ch = PRESETS[model].input_shape
    c.data.image_size, c.data.channels, c.data.batch_size = h, ch, batch
    c.data.use_labels, c.data.num_classes = num_classes > 0, num_classes
    c.model.name, c.model.dtype = model, dtype
    c.model.overrides.update(overrides or {})
    c.optim.warmup_steps = 10
    c.train.steps_per_dispatch = steps_per_dispatch
    if PRESETS[model].kwargs.get("learn_sigma", PRESETS[model].cls.learn_sigma):
        c.diffusion.variance = "learned_range"
    return c


def measure(model_name: str, batch: int, dtype: str, steps: int, k: int, num_classes: int,
            overrides: dict | None = None, hlo_path: str | None = None):
    """(record, run_more): the measurement, and run_more(n) to run n more steps (for a profile).
    `hlo_path` (.gz: compressed) gets the compiled step's optimised HLO, whose fusion names are
    the kernel names of a GPU profile."""
    config = bench_config(model_name, batch, dtype, k, num_classes, overrides)
    mesh = parallel.make_mesh()
    program = build_train_program(config, mesh)
    step_fn, shape = program.step, input_shape(config)
    state = program.init(jax.random.PRNGKey(0))
    lead = (k,) if k > 1 else ()
    rng = np.random.default_rng(0)
    local = {"image": rng.uniform(-1, 1, (*lead, batch, *shape)).astype(np.float32)}
    if num_classes:
        local["label"] = rng.integers(0, num_classes, (*lead, batch)).astype(np.int32)
    batch_arrays = parallel.global_batch(local, mesh, leading=len(lead))

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - t0
    if hlo_path:
        with open_text(hlo_path, "wt") as f:
            f.write(compiled.as_text())
    temp = compiled_temp_bytes(compiled)
    state, metrics = compiled(state, batch_arrays)  # warm-up
    block(metrics)
    calls = max(steps // k, 1)
    t0 = time.perf_counter()
    for _ in range(calls):
        state, metrics = compiled(state, batch_arrays)
    block((state.step, metrics))
    seconds = time.perf_counter() - t0
    step_s = seconds / (calls * k)
    images_s = batch / step_s

    # Counted on the XLA attention path: a fused attention kernel is one opaque call in the jaxpr.
    counted = program.model.clone(attention_impl="xla")
    fwd_flops = analytic_forward_flops(lambda p, x, t: counted.apply({"params": p}, x, t),
                                       state.params, np.zeros((1, *shape), np.float32), np.zeros((1,), np.int32))
    peak = peak_flops()
    record = {"bench": "train", "model": model_name, "batch": batch, "dtype": dtype,
              "steps_per_dispatch": k, "overrides": overrides or {}, "data": "synthetic", "images_per_sec": round(images_s, 1),
              "step_ms": round(1e3 * step_s, 3), "compile_s": round(compile_s, 2),
              "forward_gflops_per_image": None if fwd_flops is None else round(fwd_flops / 1e9, 4),
              "peak_memory_gb": None if peak_memory_bytes() is None else round(peak_memory_bytes() / 2**30, 2),
              "compiled_temp_gb": None if temp is None else round(temp / 2**30, 3),
              "loss": float(metrics["loss"])}
    if fwd_flops and peak:
        record["mfu"] = round(3 * fwd_flops * images_s / peak, 4)

    def run_more(n: int):
        nonlocal state
        for _ in range(n):
            state, out = compiled(state, batch_arrays)
        block((state.step, out))

    return record, run_more


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="preset name (repeatable)")
    p.add_argument("--batch", type=int, action="append", help="global batch (repeatable)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--steps_per_dispatch", type=int, default=1)
    p.add_argument("--num_classes", type=int, default=0)
    p.add_argument("--override", type=parse_override, action="append", default=[],
                   help="model field=value (repeatable), e.g. attention_impl=xla")
    p.add_argument("--profile", default=None, help="write a jax.profiler trace of 3 steps here")
    p.add_argument("--hlo", default=None, help="write the compiled step's optimised HLO here (.gz: compressed)")
    args = p.parse_args(argv)
    keep_freed_memory()  # the host allocator the commands run with (diffusion_jax.host_memory)
    for model in args.model or ["ddpm_cifar10"]:
        for batch in args.batch or [128]:
            record, run_more = measure(model, batch, args.dtype, args.steps, args.steps_per_dispatch,
                                       args.num_classes, dict(args.override), args.hlo)
            emit(record)
            if args.profile:
                with jax.profiler.trace(args.profile, create_perfetto_trace=True):
                    run_more(3)


if __name__ == "__main__":
    main()
