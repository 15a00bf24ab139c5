"""Where the time of a profiled step goes: a jax.profiler Perfetto trace summarised by kernel.

    python -m benchmarks.train --model ddpm_cifar10 --batch 128 --profile /tmp/prof
    python -m benchmarks.trace_summary /tmp/prof --steps 3

Prints one JSON line: for the busiest device track group (the GPU on a GPU machine), the
total kernel time per step, the number of kernels per step, the time per kernel category
(convolution, matrix product, attention, fusion, reduction, copy, other) and the top kernels.
With `--hlo` (the step's optimised HLO, `benchmarks.train --hlo`) each top kernel that is an
XLA fusion also gets its output shape and the JAX operation it came from (the HLO metadata's
op_name, e.g. `.../block0/mlp_fc1/dot_general`), which says what a fusion computes.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re

from benchmarks.common import open_text

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


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) (\w[\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")


def _op_name(rest: str) -> str:
    """An instruction's metadata op_name without the leading jit(...)/ ('' without one)."""
    op = re.search(r'op_name="([^"]*)"', rest)
    return re.sub(r"^jit\([^)]*\)/", "", op.group(1)) if op else ""


def hlo_origins(text: str) -> dict:
    """{instruction name: [output shape, op_name, the op_names it calls]} for the text of an
    optimised HLO module (every computation).

    The output shape is the text between `=` and the opcode (a tuple for multi-output fusions,
    cut at 160 characters); op_name is the metadata's; a fusion (or any instruction with
    `calls=`) also lists the distinct op_names of the computation it calls, which say what the
    fused kernel computes.
    """
    origins, called, inside, current = {}, {}, collections.defaultdict(list), None
    for line in text.splitlines():
        computation = _COMPUTATION.match(line)
        if computation:
            current = computation.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, _, rest = match.groups()
        op = _op_name(rest)
        origins[name] = [re.sub(r"\{[\d,]*\}", "", shape)[:160], op]
        if op and current and op not in inside[current]:
            inside[current].append(op)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        if calls:
            called[name] = calls.group(1)
    for name, computation in called.items():
        origins[name].append(inside.get(computation, [])[:12])
    return origins


# HLO operations that are no kernel of their own: a compiled program's plumbing
PLUMBING = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def kernel_count(text: str) -> int:
    """The operations of an optimised HLO module's unfused computations (its entry, a conditional's
    branches, a loop's body and condition; not the bodies of fusions or of reductions) that are not
    plumbing: the kernels XLA:CPU compiles apart, a count the host's speed does not move."""
    unfused = re.findall(r"(?:branch_computations=\{|true_computation=|false_computation=|body=|condition=)"
                         r"([^,}\s]+(?:, %[^,}\s]+)*)", text)
    unfused = {name.strip().lstrip("%") for names in unfused for name in names.split(",")}
    count, counting = 0, False
    for line in text.splitlines():
        computation = _COMPUTATION.match(line)
        if computation:
            counting = line.startswith("ENTRY") or computation.group(1) in unfused
            continue
        match = _INSTRUCTION.match(line)
        if counting and match and match.group(3) not in PLUMBING:
            count += 1
    return count


def operation(op_name: str) -> str:
    """An op_name as a per-layer operation: the differentiated module's path made
    forward/ or backward/, the transformer's block indices dropped (identical layers add up:
    "transpose(jvp(DiT))/block3/mlp_fc1/dot_general" -> "backward/block*/mlp_fc1/dot_general");
    the U-Net's levels keep their names (their shapes differ)."""
    op = re.sub(r"^transpose\(jvp\([^)]*\)\)", "backward", op_name)
    op = re.sub(r"^jvp\([^)]*\)", "forward", op)
    return re.sub(r"(?<=/)block\d+(?=/)", "block*", op)


def summarise(path: str, steps: int = 1, top: int = 20, hlo: str | None = None) -> dict:
    """Kernel time by category and name for the process group with the most busy time."""
    with open_text(path) as f:
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
    # A GPU kernel is named after its HLO instruction with '.' and '-' made '_'.
    if hlo:
        with open_text(hlo) as f:
            origins = {re.sub(r"[.\-]", "_", k): v for k, v in hlo_origins(f.read()).items()}
    else:
        origins = {}
    origin = lambda n: origins.get(re.sub(r"[.\-]", "_", n), [])
    top_kernels = [[n[:90], ms(v), counts[n] // steps] + origin(n) for n, v in by_name.most_common(top)]
    summary = {"trace": path, "track": names.get(pid, str(pid)), "steps": steps,
               "wall_ms_per_step": ms(end - start), "kernel_ms_per_step": ms(sum(by_cat.values())),
               "kernels_per_step": round(len(kernels) / steps, 1),
               "by_category_ms": {k: ms(v) for k, v in by_cat.most_common()},
               "top_kernels_ms": top_kernels}
    if origins:  # kernel time by the operation of its HLO instruction (library calls by category)
        by_op = collections.Counter()
        for name, us in by_name.items():
            found = origin(name)
            by_op[operation(found[1]) if found and found[1] else f"[{category(name)}]"] += us
        summary["by_operation_ms"] = [[op, ms(us)] for op, us in by_op.most_common(top)]
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory")
    p.add_argument("--steps", type=int, default=3, help="steps the trace holds")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--hlo", default=None, help="the step's optimised HLO (benchmarks.train --hlo)")
    args = p.parse_args(argv)
    print(json.dumps(summarise(latest_trace(args.directory), args.steps, args.top, args.hlo)), flush=True)


if __name__ == "__main__":
    main()
