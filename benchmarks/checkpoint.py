"""Seconds to save (and wait for) and to restore a run's train state with the library's
Checkpointer, the median of a few rounds, one JSON line: the state of an experiment's config
(default the digits quickstart), built as training builds it.

    python -m benchmarks.checkpoint [--experiment experiments.digits_unet] [--rounds 5]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time

import jax

from benchmarks.common import emit
from diffusion_jax import parallel
from diffusion_jax.checkpoints import Checkpointer, abstract_like
from diffusion_jax.training.step import build_train_program


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="experiments.digits_unet", help="a module with get_config()")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    config = importlib.import_module(args.experiment).get_config()
    program = build_train_program(config, parallel.make_mesh())
    state = program.init(jax.random.PRNGKey(config.seed))
    abstract = abstract_like(program.state_shapes, program.shardings)
    saves, restores = [], []
    with tempfile.TemporaryDirectory() as workdir:
        ckpt = Checkpointer(workdir, keep=2)
        for step in range(1, args.rounds + 1):
            start = time.perf_counter()
            ckpt.save(step, state, config)
            ckpt.wait()
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            restored, _ = ckpt.restore_latest(abstract, config, step=step, read_only=True)
            jax.block_until_ready(restored)
            restores.append(time.perf_counter() - start)
        ckpt.close()
    leaves = jax.tree_util.tree_leaves(state)
    emit({"bench": "checkpoint", "experiment": args.experiment, "arrays": len(leaves),
          "bytes": sum(x.nbytes for x in leaves), "save_s": round(statistics.median(saves), 3),
          "restore_s": round(statistics.median(restores), 3)})


if __name__ == "__main__":
    main()
