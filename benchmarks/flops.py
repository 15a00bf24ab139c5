"""Forward FLOPs per image of model presets, from XLA's cost analysis of the CPU lowering
(nothing is allocated: parameters and inputs are ShapeDtypeStructs). These are the FLOPs MFU is
computed from (MFU = 3 x forward FLOPs x images/s / peak); GPU cost analysis leaves out cuDNN
convolutions, so the CPU lowering is the one counted.

    python -m benchmarks.flops --model ddpm_cifar10 --model dit_b2
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import emit
from diffusion_jax.models import PRESETS, count_params, create_model, param_shapes


def forward_flops(name: str, batch: int = 1) -> dict:
    model = create_model(name)
    shape = PRESETS[name].input_shape
    params = param_shapes(model, shape)
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    with jax.default_device(jax.devices("cpu")[0]):
        lowered = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(params, x, t)
        cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"bench": "flops", "model": name, "input": list(shape), "params": count_params(params),
            "forward_gflops_per_image": round(float(cost["flops"]) / batch / 1e9, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append")
    args = p.parse_args(argv)
    for name in args.model or ["ddpm_cifar10", "dit_b2"]:
        emit(forward_flops(name))


if __name__ == "__main__":
    main()
