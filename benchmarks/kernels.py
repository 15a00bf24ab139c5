"""The ops with Pallas kernels alone (adaLN LayerNorm, GroupNorm + SiLU, the MLP's bias + GELU):
XLA against the kernels (diffusion_jax/models/pallas_ops.py) at the shapes of DiT-B/2 and the
DDPM U-Net, forward and forward + backward, one JSON line each with the time and the memory
bandwidth it reaches.

    python -m benchmarks.kernels                                    # on a GPU
    python -m benchmarks.kernels --tile_elements 2048,4096,8192 --group_channels 16,32,64
    python -m benchmarks.kernels --smoke                            # tiny shapes, interpreted (CPU)

`--tile_elements` and `--group_channels` rerun the Pallas kernels with other tile sizes (the
module's `_TILE_ELEMENTS` and `_GROUP_BLOCK_CHANNELS`) to find the best. The bandwidth counts
the bytes a fused implementation must move: x read and y written forward; for forward +
backward (y and the gradients from one call) also x and g read and dx written again.
"""
from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp

from benchmarks.common import block, emit, timed
from diffusion_jax.models import ops, pallas_ops

# (op, x shape) at the published models' sizes: DiT-B/2 at batch 256 (256 tokens of 768), the
# DDPM CIFAR-10 U-Net's GroupNorms at batch 128 (training) and 256 (sampling) by resolution.
CASES = [("adaptive_layer_norm", (256, 256, 768)), ("bias_gelu_tanh", (256, 256, 3072)),
         ("group_norm_silu", (128, 32, 32, 128)), ("group_norm_silu", (128, 16, 16, 256)),
         ("group_norm_silu", (128, 8, 8, 256)), ("group_norm_silu", (256, 32, 32, 128))]
SMOKE_CASES = [("adaptive_layer_norm", (2, 16, 96)), ("bias_gelu_tanh", (2, 16, 96)), ("group_norm_silu", (2, 8, 8, 64))]


def make_op(op: str, impl: str):
    """(x, a, b) -> y for the op with `impl`; a, b: shift and scale [B, C], GroupNorm's scale
    and bias [C], or the bias [N] and an unused b for the bias + GELU."""
    if op == "adaptive_layer_norm":
        return lambda x, a, b: ops.adaptive_layer_norm(x, a, b, impl=impl)
    if op == "bias_gelu_tanh":
        return lambda x, a, b: ops.bias_gelu_tanh(x, a, impl=impl)
    return lambda x, a, b: ops.group_norm(x, 32, a, b, silu=True, impl=impl)


def inputs(op: str, shape, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    C = shape[-1]
    x, g = (jax.random.normal(k, shape, dtype) for k in keys[:2])
    param_shape, param_dtype = {"adaptive_layer_norm": ((shape[0], C), dtype), "bias_gelu_tanh": ((C,), dtype),
                                "group_norm_silu": ((C,), jnp.float32)}[op]
    a, b = (0.1 * jax.random.normal(k, param_shape, param_dtype) for k in keys[2:])
    return x, a, b, g


def measure(op: str, shape, impl: str, dtype=jnp.bfloat16, repeats: int = 20) -> dict:
    x, a, b, g = inputs(op, shape, dtype)
    f = make_op(op, impl)
    forward = jax.jit(f)

    @jax.jit
    def forward_backward(x, a, b, g):
        y, vjp = jax.vjp(f, x, a, b)
        return y, vjp(g)

    timings = {}
    for name, fn, args, tensors in (("forward", forward, (x, a, b), 2),
                                    ("forward_backward", forward_backward, (x, a, b, g), 5)):
        block(fn(*args))  # compile and warm up
        _, seconds = timed(fn, *args, repeats=repeats)
        timings[f"{name}_ms"] = round(1e3 * seconds, 4)
        timings[f"{name}_gb_s"] = round(tensors * x.nbytes / seconds / 1e9, 1)
    return {"bench": "kernels", "op": op, "shape": list(shape), "dtype": jnp.dtype(dtype).name, "impl": impl,
            **timings}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, the Pallas kernels interpreted (a CPU)")
    p.add_argument("--tile_elements", default=str(pallas_ops._TILE_ELEMENTS),
                   help="comma-separated tile sizes (elements) for the Pallas kernels")
    p.add_argument("--group_channels", default=str(pallas_ops._GROUP_BLOCK_CHANNELS),
                   help="comma-separated channels a GroupNorm program aims for")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    cases, kernels = (SMOKE_CASES, "pallas_interpret") if args.smoke else (CASES, "pallas")
    repeats = 2 if args.smoke else args.repeats
    for op, shape in cases:
        emit(measure(op, shape, "xla", repeats=repeats))
        tilings = itertools.product(map(int, args.tile_elements.split(",")), map(int, args.group_channels.split(",")))
        for tile_elements, group_channels in tilings:
            if op != "group_norm_silu" and group_channels != int(args.group_channels.split(",")[0]):
                continue  # only the GroupNorm kernels use this setting
            pallas_ops._TILE_ELEMENTS, pallas_ops._GROUP_BLOCK_CHANNELS = tile_elements, group_channels
            record = measure(op, shape, kernels, repeats=repeats)
            emit({**record, "tile_elements": tile_elements, "group_channels": group_channels})


if __name__ == "__main__":
    main()
