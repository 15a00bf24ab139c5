"""Where the time of a profiled step goes: a jax.profiler Perfetto trace summarised by kernel.

    python -m benchmarks.train --model ddpm_cifar10 --batch 128 --profile /tmp/prof
    python -m benchmarks.trace_summary /tmp/prof --steps 3

Prints one JSON line: for the busiest device track group (the GPU on a GPU machine), the
total kernel time per step, the number of kernels per step, the time per kernel category
(convolution, matrix product, attention, fusion, reduction, copy, other) and the top kernels.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

CATEGORIES = [  # first match wins
    ("attention", r"flash|fmha|sdpa|cudnn::fusion"),
    ("convolution", r"conv(?!ert)|fprop|dgrad|wgrad|implicit_gemm"),
    ("matmul", r"gemm|nvjet|cublas|cutlass|matmul|dot|wgmma|sm90_xmma"),
    ("reduction", r"reduce|reduction"),
    ("fusion", r"fusion|loop_|input_"),
    ("copy", r"copy|memcpy|memset|transpose"),
]


def category(name: str) -> str:
    lowered = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return label
    return "other"


def latest_trace(directory: str) -> str:
    found = sorted(glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}: record one with "
                                "jax.profiler.trace(dir, create_perfetto_trace=True)")
    return found[-1]


def summarise(path: str, steps: int = 1, top: int = 20) -> dict:
    """Kernel time by category and name for the process group with the most busy time."""
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    busy = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X":
            busy[e["pid"]] += float(e.get("dur", 0.0))
    gpu = [pid for pid, name in names.items() if "gpu" in name.lower()]
    pid = max(gpu or busy, key=lambda p: busy[p])
    kernels = [e for e in events if e.get("ph") == "X" and e["pid"] == pid]
    by_name, by_cat = collections.Counter(), collections.Counter()
    counts = collections.Counter()
    for e in kernels:
        by_name[e["name"]] += float(e["dur"])
        by_cat[category(e["name"])] += float(e["dur"])
        counts[e["name"]] += 1
    start = min(float(e["ts"]) for e in kernels)
    end = max(float(e["ts"]) + float(e["dur"]) for e in kernels)
    ms = lambda us: round(us / 1e3 / steps, 3)
    return {"trace": path, "track": names.get(pid, str(pid)), "steps": steps,
            "wall_ms_per_step": ms(end - start), "kernel_ms_per_step": ms(sum(by_cat.values())),
            "kernels_per_step": round(len(kernels) / steps, 1),
            "by_category_ms": {k: ms(v) for k, v in by_cat.most_common()},
            "top_kernels_ms": [[n[:90], ms(v), counts[n] // steps] for n, v in by_name.most_common(top)]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory")
    p.add_argument("--steps", type=int, default=3, help="steps the trace holds")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    print(json.dumps(summarise(latest_trace(args.directory), args.steps, args.top)), flush=True)


if __name__ == "__main__":
    main()
