"""What XLA flags do to compile and run time: for each setting of XLA_FLAGS, a fresh process
compiles the unet_tiny and dit_tiny train steps of the tests' tiny run (with their initialisers)
and five sampler chains, and runs five train steps. Prints a line of seconds per setting (the
numbers behind tests/conftest.py's FAST_COMPILE; BENCHMARKS.md).

    python -m benchmarks.compile_flags ["" "--xla_backend_optimization_level=1" ...]
"""
from __future__ import annotations

import os
import subprocess
import sys

DEFAULT_SETTINGS = ("", "--xla_backend_optimization_level=1", "--xla_cpu_use_fusion_emitters=false",
                    "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false")


def measure() -> str:
    """One setting, in this process: compile seconds (backend compilation, from JAX's events) and
    the run time of five steps."""
    import collections
    import time

    import jax
    import jax.numpy as jnp

    import diffusion_jax as dj
    from diffusion_jax.parallel import make_mesh
    from diffusion_jax.samplers import sample
    from diffusion_jax.training.step import build_train_program
    from tests.train_helpers import tiny_config

    compiled = collections.Counter()
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: compiled.update({"s": seconds}) if "backend_compile" in event else None)
    out = []
    for name in ("unet_tiny", "dit_tiny"):
        compiled.clear()
        program = build_train_program(tiny_config(**{"model.name": name}), make_mesh())
        state, batch = program.init(jax.random.PRNGKey(0)), {"image": jnp.zeros((16, 8, 8, 1))}
        state, metrics = program.step(state, batch)  # compiled here (the state is donated)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(5):
            state, metrics = program.step(state, batch)
        jax.block_until_ready(metrics)
        out.append(f"{name}: compile {compiled['s']:.2f} s, 5 steps {time.perf_counter() - start:.3f} s")
    compiled.clear()
    process, model = dj.make_process("edm"), lambda x, t, **_: 0.5 * x
    for method in ("euler", "heun", "dpm++_2m", "unipc", "ddim"):
        chain = jax.jit(lambda key: sample(model, process, (64, 8, 8, 1), key, method=method, num_steps=10))
        jax.block_until_ready(chain(jax.random.key(0)))
    out.append(f"five chains: compile {compiled['s']:.2f} s")
    return " | ".join(out)


def main(argv=None) -> None:
    settings = sys.argv[1:] if argv is None else argv
    if settings == ["--measure"]:
        print(measure())
        return
    for flags in settings or DEFAULT_SETTINGS:
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_COMPILATION_CACHE_DIR": "",
               "JAX_ENABLE_COMPILATION_CACHE": "false"}
        result = subprocess.run([sys.executable, "-m", "benchmarks.compile_flags", "--measure"], env=env,
                                capture_output=True, text=True)
        line = result.stdout.strip().splitlines()[-1] if result.returncode == 0 else result.stderr.strip()[-300:]
        print(f"XLA_FLAGS={flags!r}: {line}", flush=True)


if __name__ == "__main__":
    main()
