"""`python -m diffusion_jax train|sample|evaluate|fid-stats`.

  train     --config experiments/digits_unet.py --workdir DIR [--config.train.steps=N ...]
  sample    --workdir DIR --num_samples N [--method ddpm|ddim|dpm_solver++ --steps K --seed S
            --guidance_scale G --labels 0,1,2 --eta E --checkpoint STEP] --out FILE.npz
  evaluate  --workdir DIR [--checkpoint STEP --num_samples N --sampler M --steps K --seed S
            --fid_stats REF.npz --inception_weights FILE]
  fid-stats --dataset NAME --split train --out FILE.npz [--features digits|inception
            --inception_weights FILE --image_size S --channels C --max_images N]
"""
from __future__ import annotations

import argparse
import sys


def _train(argv):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "run directory", flag_values=fv)
    flags.DEFINE_bool("evaluate", False, "evaluate the run when training ends", flag_values=fv)
    config_flags.DEFINE_config_file("config", None, "experiment file with get_config()",
                                    flag_values=fv, lock_config=True, sys_argv=["train"] + argv)
    try:
        fv(["train"] + argv)
    except flags.Error as e:
        sys.exit(f"error: {e}")
    if fv.config is None or not fv.workdir:
        sys.exit("error: train needs --config FILE and --workdir DIR")
    from experiments.launch import main

    main(fv.config, fv.workdir, fv.evaluate)


def _sample(args):
    import jax
    import numpy as np

    from diffusion_jax import viz
    from diffusion_jax.parallel import maybe_initialize_distributed
    from diffusion_jax.runs import load_run, make_generator

    maybe_initialize_distributed()
    run = load_run(args.workdir, args.checkpoint)
    generate = make_generator(run.model, run.schedule, run.config, batch_size=min(args.num_samples, args.batch_size),
                              method=args.method, steps=args.steps,
                              guided=args.guidance_scale is not None and args.guidance_scale != 1.0)
    labels = None
    if args.labels:
        if not run.config.data.use_labels:
            sys.exit("error: --labels given but this run is unconditional (data.use_labels is False)")
        labels = np.resize(np.array([int(v) for v in args.labels.split(",")], np.int32), args.num_samples)
    images = generate(run.ema_params, args.num_samples, jax.random.PRNGKey(args.seed), eta=args.eta,
                      guidance_scale=args.guidance_scale, labels=labels)
    if jax.process_index() == 0:
        np.savez_compressed(args.out, samples=images.astype(np.float32))
        png = viz.save_grid(images[:256], str(args.out).rsplit(".", 1)[0] + ".png")
        print(f"wrote {images.shape[0]} samples {images.shape[1:]} to {args.out} and {png} "
              f"(checkpoint step {run.step}, EMA parameters)")


def _evaluate(args):
    import json

    from diffusion_jax.evaluation import evaluate_run

    m = evaluate_run(args.workdir, checkpoint=args.checkpoint, num_samples=args.num_samples,
                     sampler=args.sampler, steps=args.steps, seed=args.seed, fid_stats=args.fid_stats,
                     inception_weights=args.inception_weights)
    summary = {k: m[k] for k in ("noise_mse", "noise_rmse", "noise_mae", "noise_r2", "checkpoint_step")}
    if "bpd" in m:
        summary["bits_per_dim"] = m["bpd"]["total_bpd"]
    for key in ("fid", "digits_fd"):
        if key in m:
            summary[key] = m[key]
    print(json.dumps(summary, indent=2))


def _fid_stats(args):
    import ml_collections

    from diffusion_jax.data import load_split
    from diffusion_jax.evaluation.frechet import feature_statistics, save_statistics

    data_config = ml_collections.ConfigDict(dict(name=args.dataset, image_size=args.image_size,
                                                 channels=args.channels, data_dir=args.data_dir))
    images = load_split(data_config, args.split).images[: args.max_images or None]
    if args.features == "digits":
        from diffusion_jax.evaluation.digits_features import digits_features

        features = digits_features(images)
    else:
        from diffusion_jax.evaluation.inception import inception_features, load_inception

        features = inception_features(load_inception(args.inception_weights), images)
    mu, sigma = feature_statistics(features)
    print(f"wrote statistics of {len(features)} images ({features.shape[1]} features) to "
          f"{save_statistics(args.out, mu, sigma)}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        return _train(argv[1:])
    p = argparse.ArgumentParser(prog="python -m diffusion_jax", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a run (see --config)")
    s = sub.add_parser("sample", help="samples from a run's EMA parameters")
    s.add_argument("--workdir", required=True)
    s.add_argument("--num_samples", type=int, default=64)
    s.add_argument("--method", choices=["ddpm", "ddim", "dpm_solver++"])
    s.add_argument("--steps", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eta", type=float)
    s.add_argument("--guidance_scale", type=float)
    s.add_argument("--labels", help="comma-separated class labels, cycled")
    s.add_argument("--checkpoint", type=int)
    s.add_argument("--batch_size", type=int, default=256)
    s.add_argument("--out", required=True)
    e = sub.add_parser("evaluate", help="metrics, bits/dim, samples and report of a run")
    e.add_argument("--workdir", required=True)
    e.add_argument("--checkpoint", type=int)
    e.add_argument("--num_samples", type=int)
    e.add_argument("--sampler", choices=["ddpm", "ddim", "dpm_solver++"])
    e.add_argument("--steps", type=int)
    e.add_argument("--seed", type=int)
    e.add_argument("--fid_stats", help="reference statistics .npz (from fid-stats) to compute FID against")
    e.add_argument("--inception_weights", help="converted FID Inception .npz (see evaluation/inception.py)")
    f = sub.add_parser("fid-stats", help="reference feature statistics of a dataset split")
    f.add_argument("--dataset", required=True)
    f.add_argument("--split", default="train")
    f.add_argument("--out", required=True)
    f.add_argument("--features", choices=["inception", "digits"], default="inception")
    f.add_argument("--inception_weights", default=None)
    f.add_argument("--image_size", type=int, default=299)
    f.add_argument("--channels", type=int, default=3)
    f.add_argument("--data_dir", default="")
    f.add_argument("--max_images", type=int, default=0)
    args = p.parse_args(argv)
    from diffusion_jax.training.checkpoint import CheckpointMismatch

    try:
        {"sample": _sample, "evaluate": _evaluate, "fid-stats": _fid_stats}[args.command](args)
    except (CheckpointMismatch, FileNotFoundError) as e:  # the message says what to do
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
