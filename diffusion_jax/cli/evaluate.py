"""`evaluate`: the held-out metrics, bits/dim, samples, FID and report of a run."""
from __future__ import annotations

import pathlib

from diffusion_jax.cli.arguments import add_option_argument, at_least, finite_float, parse_options
from diffusion_jax.files import ensure_writable_dir
from diffusion_jax.samplers import sampler_names


def register(sub) -> None:
    e = sub.add_parser("evaluate", help="metrics, bits/dim, samples and report of a run")
    e.add_argument("--workdir", required=True, help="the run to evaluate")
    e.add_argument("--checkpoint", type=at_least(0))
    e.add_argument("--num_samples", type=at_least(1))
    e.add_argument("--sampler", choices=sampler_names())
    e.add_argument("--steps", type=at_least(1))
    add_option_argument(e)
    e.add_argument("--seed", type=int)
    e.add_argument("--guidance_scale", type=finite_float, help="classifier-free guidance of the samples (default: the "
                                                        "run's sample.guidance_scale)")
    e.add_argument("--fid_stats", help="reference statistics .npz (from fid-stats) to compute FID against")
    e.add_argument("--inception_weights", help="converted FID Inception .npz (see evaluation/inception.py)")
    e.add_argument("--out", help="where to write the report (default: the run's eval/ folder)")
    e.set_defaults(run=lambda args: evaluate_command(args))


def evaluate_command(args):
    import json

    from diffusion_jax.evaluation import evaluate_run

    from diffusion_jax.runs import load_config

    load_config(args.workdir)  # a run is there: before any folder is made for its report
    out_dir = pathlib.Path(args.out or pathlib.Path(args.workdir) / "eval")
    ensure_writable_dir(out_dir, "--out" if args.out else "the run's eval/ folder (or choose --out DIR)")
    m = evaluate_run(args.workdir, checkpoint=args.checkpoint, num_samples=args.num_samples,
                     sampler=args.sampler, steps=args.steps, seed=args.seed, fid_stats=args.fid_stats,
                     inception_weights=args.inception_weights, out_dir=out_dir,
                     sampler_options=parse_options(args.option), guidance_scale=args.guidance_scale)
    summary = {k: m[k] for k in ("noise_mse", "noise_rmse", "noise_mae", "noise_r2", "checkpoint_step")}
    if "bpd" in m:
        summary["bits_per_dim"] = m["bpd"]["total_bpd"]
    if "bpd_ode" in m:
        summary["ode_bits_per_dim"] = m["bpd_ode"]["total_bpd"]
    for key in ("fid", "digits_fd"):
        if key in m:
            summary[key] = m[key]
    print(json.dumps(summary, indent=2))
