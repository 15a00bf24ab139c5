"""Host memory and speed of training from prepared ArrayRecord data larger than the pipeline needs.

    python -m benchmarks.stream --out /tmp/stream --gigabytes 2 --image_size 32 --steps 30

1. prepares a synthetic split of `--gigabytes` of uint8 images (random pixels, written through
   `prepare` with a synthetic reader: the format and the writer are the real ones);
2. in a fresh process, reads `--read_steps` global batches through the input pipeline alone
   (images/s of `Batches` over `array_record:DIR`) and reports that process's peak RSS;
3. in a fresh process, trains `--steps` steps of a small DiT on it (images/s of the train step,
   peak RSS of the whole training process).
One JSON line per measurement (benchmarks/common.emit).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

# The process's own peak resident memory (VmHWM: reset by exec, unlike getrusage's ru_maxrss,
# which a child started by subprocess inherits from the parent it was forked from).
PEAK_RSS = """
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

READ = PEAK_RSS + """
import json, sys, time
from diffusion_jax.data import Batches, load_split
from diffusion_jax.config import base_config
c = base_config().data
c.name, c.image_size, c.channels = "array_record:" + sys.argv[1], int(sys.argv[2]), 3
batch, steps = int(sys.argv[3]), int(sys.argv[4])
batches = Batches(load_split(c, "train"), batch, seed=0, random_flip=True)
batches(0)
start = time.perf_counter()
for step in range(1, steps + 1):
    batches(step)["image"].sum()
seconds = time.perf_counter() - start
print(json.dumps({"images_per_sec": batch * steps / seconds,
                  "peak_rss_mb": peak_rss_mb()}))
"""

TRAIN = PEAK_RSS + """
import json, sys, time
from diffusion_jax.training import train
from tests.train_helpers import tiny_config
steps = int(sys.argv[4])
config = tiny_config(steps, **{"data.name": "array_record:" + sys.argv[1], "data.image_size": int(sys.argv[2]),
                               "data.channels": 3, "data.batch_size": int(sys.argv[3]),
                               "train.ckpt_every": steps, "train.log_every": 5,
                               "model.overrides.patch_size": 4})
start = time.perf_counter()
train(config, sys.argv[5])
rows = [json.loads(l) for l in open(sys.argv[5] + "/metrics.jsonl") if "images_per_sec" in l]
print(json.dumps({"train_images_per_sec": rows[-1]["images_per_sec"], "seconds": time.perf_counter() - start,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def _peak_rss_mb():
    namespace = {}
    exec(PEAK_RSS, namespace)
    return namespace["peak_rss_mb"]()


def synthetic_rows(count: int, size: int):
    """(count, read) of random uint8 images, each a pure function of its index."""
    def read(first, last):
        images = np.stack([np.random.default_rng(i).integers(0, 256, (size, size, 3), np.uint8)
                           for i in range(first, last + 1)])
        return images, np.zeros(len(images), np.int32)
    return count, read


def _run(code, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1])
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    import ml_collections

    from benchmarks.common import device_facts, emit
    from diffusion_jax.data.prepare import prepare

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--gigabytes", type=float, default=2.0)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--read_steps", type=int, default=200)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    size = args.image_size
    count = int(args.gigabytes * 1e9) // (size * size * 3)
    data = ml_collections.ConfigDict(dict(name="synthetic", image_size=size, channels=3, data_dir=""))
    start = time.perf_counter()
    prepare(data, "train", args.out, shard_size=20_000, rows=synthetic_rows(count, size), progress=False)
    on_disk = sum(f.stat().st_size for f in (pathlib.Path(args.out) / "train").glob("*.array_record"))
    facts = {**device_facts(), "images": count, "image_shape": [size, size, 3], "dataset_mb": on_disk / 2**20,
             "in_memory_uint8_mb": count * size * size * 3 / 2**20,
             "in_memory_float32_mb": 4 * count * size * size * 3 / 2**20,
             "prepare_seconds": time.perf_counter() - start,
             "prepare_peak_rss_mb": _peak_rss_mb()}
    emit({"benchmark": "stream_prepare", **facts})
    emit({"benchmark": "stream_read", "batch": args.batch, "steps": args.read_steps,
          **_run(READ, args.out, size, args.batch, args.read_steps), **facts})
    emit({"benchmark": "stream_train", "batch": args.batch, "steps": args.steps, "model": "dit_tiny patch 4",
          **_run(TRAIN, args.out, size, args.batch, args.steps, pathlib.Path(args.out) / "run"), **facts})


if __name__ == "__main__":
    main()
