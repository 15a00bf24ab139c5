"""The same training command twice, each a fresh process: the first with an empty cache directory
(every program compiled, the digits classifier absent), the second with it filled by the first
(the train step and initialiser read from the executable cache without tracing them, the other
programs from JAX's persistent cache). Prints both wall times and their ratio. Both run with
Python's default bytecode cache, as make's commands do (PYTHONDONTWRITEBYTECODE, set on some
machines, would make every process compile every module it imports: `import jax` 3.2 s instead of
1.0 s on a 2-core machine).

    python -m benchmarks.warm_start [--steps 100] [--config experiments/digits_unet.py]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def timed_train(config: str, workdir: str, steps: int, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffusion_jax", "train", "--config", config, "--workdir", workdir,
                    f"--config.train.steps={steps}", "--config.train.progress=False"], env=env, check=True)
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="experiments/digits_unet.py")
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="warm_start_")
    env = {**os.environ, "XDG_CACHE_HOME": os.path.join(root, "cache")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    first = timed_train(args.config, os.path.join(root, "first"), args.steps, env)
    second = timed_train(args.config, os.path.join(root, "second"), args.steps, env)
    print(f"{args.config}, {args.steps} steps: first {first:.1f} s (empty cache), second {second:.1f} s "
          f"(cache warm): ratio {second / first:.2f}")


if __name__ == "__main__":
    main()
