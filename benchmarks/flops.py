"""Forward FLOPs per image of model presets, counted two ways (nothing is allocated:
parameters and inputs are ShapeDtypeStructs):
  * analytic: 2 x multiply-adds of every convolution and matrix product in the forward's jaxpr
    (the convention of the papers; the DDPM U-Net's 12.4 GFLOPs), used for MFU
    (MFU = 3 x forward FLOPs x images/s / peak);
  * XLA: the cost analysis of the CPU compilation (GPU cost analysis leaves out cuDNN
    convolutions), reported for comparison.

    python -m benchmarks.flops --model ddpm_cifar10 --model dit_b2
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import analytic_forward_flops, emit
from diffusion_jax.models import PRESETS, count_params, create_model, param_shapes


def forward_flops(name: str, batch: int = 1) -> dict:
    model = create_model(name)
    shape = PRESETS[name].input_shape
    params = param_shapes(model, shape)
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    apply = lambda p, x, t: model.apply({"params": p}, x, t)
    with jax.default_device(jax.devices("cpu")[0]):
        cost = jax.jit(apply).lower(params, x, t).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"bench": "flops", "model": name, "input": list(shape), "params": count_params(params),
            "forward_gflops_per_image": round(analytic_forward_flops(apply, params, x, t) / batch / 1e9, 3),
            "xla_cpu_gflops_per_image": round(float(cost["flops"]) / batch / 1e9, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append")
    args = p.parse_args(argv)
    for name in args.model or ["ddpm_cifar10", "dit_b2"]:
        emit(forward_flops(name))


if __name__ == "__main__":
    main()
