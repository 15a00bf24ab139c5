"""What a run's optimiser update costs to compile: the update of the default config's optimiser
(Adam, global-norm clipping, skipping non-finite updates) with the train step's grad_norm metric,
over a parameter tree, built as `make_optimizer` builds it and as optax's composition
`apply_if_finite(chain(clip_by_global_norm, adam))` (what earlier versions built). Prints the
compile seconds of each, for each tree, and the number of operations left outside fusions (each a
kernel of its own that XLA:CPU compiles apart: a count that does not drift with the host's speed;
BENCHMARKS.md, eleventh and fifteenth sessions).

    python -m benchmarks.optimizer_compile [--trees unet_tiny,dit_tiny,lora400]

A tree is a model's parameters at the tests' 8x8x1 input, or `loraN`: N adapter matrices of
[64, 4] and [4, 64] (a LoRA's, as an SDXL run trains them). Run it with the XLA_FLAGS to compare
(the tests' are `tests/conftest.py`'s FAST_COMPILE).
"""
from __future__ import annotations

import argparse
import time

from benchmarks.trace_summary import kernel_count


def parameter_tree(name: str):
    import jax
    import jax.numpy as jnp

    if name.startswith("lora"):
        pairs = int(name[4:]) // 2
        return {f"layer{i}": {"down": jnp.zeros((64, 4)), "up": jnp.zeros((4, 64))} for i in range(pairs)}
    from diffusion_jax.models import create_model, param_shapes

    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), param_shapes(create_model(name), (8, 8, 1)))


def compile_seconds(optimizer, params) -> tuple:
    """Seconds to compile one update of `optimizer` (with the updated parameters and the gradients'
    global norm, as the train step takes them), and its program's kernel count."""
    import jax
    import optax

    from diffusion_jax.optim import tree_norm

    def update(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, tree_norm(grads)

    lowered = jax.jit(update).lower(params, optimizer.init(params), params)
    start = time.perf_counter()
    compiled = lowered.compile()
    return time.perf_counter() - start, kernel_count(compiled.as_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", default="unet_tiny,dit_tiny,lora400")
    args = parser.parse_args(argv)
    import jax
    import optax

    from diffusion_jax.config import base_config
    from diffusion_jax.optim import OPTIMIZERS, learning_rate_schedule, make_optimizer

    jax.config.update("jax_enable_compilation_cache", False)
    config = base_config().optim
    inner = lambda: OPTIMIZERS[config.optimizer](config, learning_rate_schedule(config, 100))
    composed = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(config.grad_clip), inner()), 1_000_000)
    for name in args.trees.split(","):
        params = parameter_tree(name)
        leaves = len(jax.tree.leaves(params))
        (ours, our_kernels), (theirs, their_kernels) = (compile_seconds(make_optimizer(config, 100), params),
                                                        compile_seconds(composed, params))
        print(f"{name} ({leaves} leaves): make_optimizer {ours:.2f} s ({our_kernels} kernels), "
              f"optax's composition {theirs:.2f} s ({their_kernels} kernels)", flush=True)


if __name__ == "__main__":
    main()
