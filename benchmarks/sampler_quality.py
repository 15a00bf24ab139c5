"""Sample quality against cost: every registered sampler at a few budgets of model evaluations
on a trained digits run (`make demo`), scored by the digits-classifier Frechet distance (FD) to
the held-out split, as `evaluate` scores it. One JSON line per (sampler, budget), then a plot
(FD against model evaluations, one line per sampler) and the markdown table.

    python -m benchmarks.sampler_quality --workdir runs/digits --out benchmarks/results/sampler_quality

Runs of several processes or objectives side by side: `--workdir LABEL=DIR` once per run, one line
per (run, sampler) in the plot; a `--methods` entry `LABEL:METHOD` is for that run only (a few-step
run's own sampler), a plain `METHOD` for every run. The wall time of a cell is a second, compiled
call (`seconds`; the first, with its compilation, is `seconds_with_compile`):

    python -m benchmarks.sampler_quality --workdir ddpm=runs/digits --workdir flow=runs/digits_flow \
        --workdir meanflow=runs/digits_meanflow --methods ddpm:ddim,flow:dpm++_2m,meanflow:meanflow \
        --budgets 1,2,4,10,50 --out benchmarks/results/few_step

Each sampler gets the most steps its budget allows (Heun: 2K - 1 evaluations for K steps) and
its default options (Karras sigmas for the sigma-space samplers); clipping and guidance follow
the run's config. The same seed for every cell.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax

from benchmarks.common import device_facts, emit
from diffusion_jax.data import load_split
from diffusion_jax.evaluation.digits_features import digits_features
from diffusion_jax.evaluation.frechet import feature_statistics, frechet_distance
from diffusion_jax.generation import make_generator
from diffusion_jax.runs import load_run
from diffusion_jax.samplers import model_calls, sampler_names


def steps_for_budget(method: str, schedule, budget: int) -> int:
    """The most steps whose model evaluations fit in `budget`."""
    return max(k for k in range(1, budget + 1) if model_calls(method, k) <= budget)


def line_name(row) -> str:
    return f"{row['run']}: {row['method']}" if row.get("run") else row["method"]


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    runs = list(dict.fromkeys(r.get("run", "") for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    styles = ["-", "--", ":", "-."]
    for name in dict.fromkeys(map(line_name, rows)):
        mine = [r for r in rows if line_name(r) == name]
        style = {}
        if len(runs) > 1:  # a colour per run, a line style per sampler
            style = dict(color=f"C{runs.index(mine[0]['run']) % 10}",
                         linestyle=styles[methods.index(mine[0]["method"]) % len(styles)])
        ax.plot([r["model_calls"] for r in mine], [r["digits_fd"] for r in mine], marker="o", label=name, **style)
    ax.set(xscale="log", yscale="log", xlabel="model evaluations", ylabel="digits-classifier FD (lower is better)",
           title="Sample quality against cost (digits runs)")
    budgets = sorted({r["budget"] for r in rows})
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(budgets, labels=[str(b) for b in budgets])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows, budgets) -> str:
    lines = ["| sampler | " + " | ".join(f"{b} evals" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for name in dict.fromkeys(map(line_name, rows)):
        cells = {r["budget"]: r for r in rows if line_name(r) == name}
        lines.append(f"| {name} | " + " | ".join(
            f"{cells[b]['digits_fd']:.2f} ({cells[b]['steps']} steps)" if b in cells else "" for b in budgets) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", action="append", help="DIR or LABEL=DIR, repeatable (default runs/digits)")
    p.add_argument("--budgets", default="5,10,20,50")
    p.add_argument("--methods", default=",".join(sampler_names()))
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/sampler_quality")
    p.add_argument("--replot", action="store_true", help="only redraw the plot and table from OUT/results.jsonl")
    args = p.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        return write(out, [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()], budgets)
    rows = []
    for spec in args.workdir or ["runs/digits"]:
        label, _, workdir = spec.rpartition("=")
        methods = [m.rpartition(":")[2] for m in args.methods.split(",") if m.rpartition(":")[0] in ("", label)]
        rows += measure(load_run(workdir), label, methods, budgets, args.num_samples, args.seed)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write(out, rows, budgets)


def measure(run, label, methods, budgets, num_samples, seed):
    """One row per (method that runs this run's process, budget)."""
    real = feature_statistics(digits_features(load_split(run.config.data, run.config.data.eval_split).model_range()))
    rows = []
    for method in methods:
        try:
            steps_for_budget(method, run.schedule, 1)
        except ValueError:  # a method of another process
            continue
        for budget in budgets:
            steps = steps_for_budget(method, run.schedule, budget)
            generate = make_generator(run.model, run.schedule, run.config, batch_size=num_samples,
                                      method=method, steps=steps)
            started = time.perf_counter()
            images = generate(run.ema_params, num_samples, jax.random.PRNGKey(seed))
            seconds = time.perf_counter() - started
            started = time.perf_counter()
            jax.block_until_ready(generate(run.ema_params, num_samples, jax.random.PRNGKey(seed)))
            compiled_seconds = time.perf_counter() - started
            fd = frechet_distance(*feature_statistics(digits_features(images)), *real)
            row = {"bench": "sampler_quality", "run": label, "process": run.config.diffusion.process,
                   "prediction": run.config.diffusion.prediction, "method": method, "budget": budget,
                   "steps": steps, "model_calls": model_calls(method, steps), "digits_fd": float(fd),
                   "num_samples": num_samples, "seconds_with_compile": round(seconds, 1),
                   "seconds": round(compiled_seconds, 3),
                   "checkpoint_step": run.step, **device_facts()}
            emit(row)
            rows.append(row)
    return rows


def write(out, rows, budgets):
    plot(rows, out / "fd_vs_evaluations.png")
    (out / "table.md").write_text(table(rows, budgets) + "\n")
    print(table(rows, budgets))
    print(f"wrote {out}/results.jsonl, fd_vs_evaluations.png, table.md")


if __name__ == "__main__":
    main()
