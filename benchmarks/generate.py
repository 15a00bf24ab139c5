"""The `generate` batch job against plain sampling: samples/s at the same batch size and
sampler (compile excluded), and the job's peak host memory for two sample counts (each in a
fresh process, `ru_maxrss`), one JSON line each.

    python -m benchmarks.generate --workdir runs/digits --counts 2000,20000 --method ddim --steps 10
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks.common import emit


def job(workdir, count, method, steps, batch, out) -> dict:
    """Runs the job in this process; its rate between the first and the last shard written
    (compile and start-up excluded)."""
    import jax

    from diffusion_jax import shards
    from diffusion_jax.jobs.generate import generate_samples

    written, original = [], shards.ShardDir.write

    def timed_write(self, first, last, **arrays):
        record = original(self, first, last, **arrays)
        written.append((time.perf_counter(), last - first + 1))
        return record

    shards.ShardDir.write = timed_write
    generate_samples(workdir, out, count, method=method, steps=steps, batch_size=batch, shard_size=1000,
                     progress=False)
    seconds = written[-1][0] - written[0][0]
    return {"samples_per_s": sum(n for _, n in written[1:]) / seconds, "seconds": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "devices": jax.device_count()}


def plain(workdir, count, method, steps, batch) -> dict:
    """make_generator as `sample` uses it, one batch first to compile, then `count` samples
    (all held in memory, as `sample` holds them)."""
    import jax

    from diffusion_jax.generation import make_generator
    from diffusion_jax.runs import load_run

    run = load_run(workdir)
    generate = make_generator(run.model, run.schedule, run.config, batch_size=batch, method=method, steps=steps)
    generate(run.ema_params, batch, jax.random.PRNGKey(0))
    started = time.perf_counter()
    generate(run.ema_params, count, jax.random.PRNGKey(1))
    seconds = time.perf_counter() - started
    return {"samples_per_s": count / seconds, "seconds": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/digits")
    p.add_argument("--counts", default="2000,20000")
    p.add_argument("--method", default="ddim")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--child", choices=["job", "plain"])
    p.add_argument("--count", type=int)
    p.add_argument("--out")
    args = p.parse_args()
    if args.child == "job":
        print(json.dumps(job(args.workdir, args.count, args.method, args.steps, args.batch, args.out)))
        return
    if args.child == "plain":
        print(json.dumps(plain(args.workdir, args.count, args.method, args.steps, args.batch)))
        return
    for count in [int(c) for c in args.counts.split(",")]:
        for child in ("plain", "job"):
            with tempfile.TemporaryDirectory() as out:
                line = subprocess.run([sys.executable, "-m", "benchmarks.generate", "--child", child, "--count",
                                       str(count), "--workdir", args.workdir, "--method", args.method, "--steps",
                                       str(args.steps), "--batch", str(args.batch), "--out", out + "/job"],
                                      capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            emit({"bench": "generate", "mode": child, "count": count, "method": args.method,
                  "steps": args.steps, "batch": args.batch, **json.loads(line)})


if __name__ == "__main__":
    main()
