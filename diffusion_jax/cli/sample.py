"""`sample` (a batch of samples of a run, .npz and a PNG grid) and `generate` (N samples as a
sharded, resumable batch job)."""
from __future__ import annotations

import pathlib

from diffusion_jax.cli.arguments import add_sampler_arguments, at_least, parse_labels, parse_options
from diffusion_jax.files import ensure_writable_dir


def register(sub) -> None:
    s = sub.add_parser("sample", help="samples from a run's EMA parameters")
    s.add_argument("--workdir", required=True, help="the run to sample")
    s.add_argument("--out", required=True, help="FILE.npz (and FILE.png beside it), or a directory")
    s.add_argument("--num_samples", type=at_least(1), default=64)
    s.add_argument("--batch_size", type=at_least(1), default=256)
    add_sampler_arguments(s, "comma-separated class labels, cycled")
    s.add_argument("--prompt", action="append", help="a text-conditioned run: the prompt (repeat it for several, "
                                                     "cycled over the samples)")
    add_lora_argument(s)
    s.set_defaults(run=lambda args: sample_command(args))
    g = sub.add_parser("generate", help="a batch job: N samples as verified, resumable shards (uint8)")
    g.add_argument("--workdir", required=True, help="the run to sample")
    g.add_argument("--num_samples", type=at_least(1), required=True)
    g.add_argument("--out", required=True, help="a directory every process can write")
    g.add_argument("--batch_size", type=at_least(1), default=256, help="per call; the images do not depend on it")
    g.add_argument("--shard_size", type=at_least(1), default=1000)
    add_sampler_arguments(g, "comma-separated class labels: sample i gets labels[i %% len(labels)]")
    g.add_argument("--prompts", help="a text-conditioned run: a file of prompts, one a line; sample i gets "
                                     "prompt i %% n")
    g.add_argument("--conditions", help="a run of another condition kind: a file of its values, one a line; "
                                        "sample i gets value i %% n")
    add_lora_argument(g)
    g.set_defaults(run=lambda args: generate_command(args))


def add_lora_argument(parser) -> None:
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                        help="a LoRA file (diffusers/PEFT or kohya .safetensors) on the run's backbone and text encoder, "
                             "at WEIGHT (default 1); repeat it for several")


def sample_command(args):
    import jax
    import numpy as np

    from diffusion_jax import viz
    from diffusion_jax.generation import make_generator
    from diffusion_jax.parallel import maybe_initialize_distributed
    from diffusion_jax.runs import load_run

    out = sample_path(args.out)
    ensure_writable_dir(out.parent, "--out")
    labels = parse_labels(args.labels)
    from diffusion_jax.interop.adapters import with_sample_loras
    from diffusion_jax.lora import parse_spec

    loras = [parse_spec(spec) for spec in args.lora]
    maybe_initialize_distributed()
    run = load_run(args.workdir, args.checkpoint)
    config = with_sample_loras(run.config, loras) if loras else run.config
    generate = make_generator(run.model, run.schedule, config,
                              batch_size=min(args.num_samples, args.batch_size),
                              method=args.method, steps=args.steps,
                              options=parse_options(args.option), eta=args.eta,
                              condition_adapters=run.condition_adapters)
    images = generate(run.ema_params, args.num_samples, jax.random.PRNGKey(args.seed),
                      guidance_scale=args.guidance_scale, labels=labels, prompts=args.prompt,
                      negative_prompt=args.negative_prompt, conditions=args.condition)
    if jax.process_index() == 0:
        np.savez_compressed(out, samples=images.astype(np.float32))
        png = viz.save_grid(images[:256], out.with_suffix(".png"))
        print(f"wrote {images.shape[0]} samples {images.shape[1:]} to {out} and {png} "
              f"(checkpoint step {run.step}, EMA parameters{', ' + str(len(loras)) + ' LoRA file(s)' if loras else ''})")


def sample_path(out) -> pathlib.Path:
    """Where `sample --out OUT` writes: OUT itself when it ends in .npz, OUT/samples.npz when OUT is
    an existing directory, else OUT.npz (and the grid beside it, as .png)."""
    out = pathlib.Path(out)
    if out.suffix == ".npz":
        return out
    return out / "samples.npz" if out.is_dir() else out.with_name(out.name + ".npz")


def generate_command(args):
    from diffusion_jax.jobs.generate import generate_samples
    from diffusion_jax.lora import parse_spec
    from diffusion_jax.parallel import maybe_initialize_distributed

    ensure_writable_dir(args.out, "--out")
    maybe_initialize_distributed()
    manifest = generate_samples(args.workdir, args.out, args.num_samples, seed=args.seed, method=args.method,
                                steps=args.steps, options=parse_options(args.option), eta=args.eta,
                                guidance_scale=args.guidance_scale, labels=parse_labels(args.labels),
                                checkpoint=args.checkpoint, batch_size=args.batch_size,
                                shard_size=args.shard_size, prompts_file=args.prompts,
                                negative_prompt=args.negative_prompt, conditions=args.condition,
                                conditions_file=args.conditions, loras=[parse_spec(spec) for spec in args.lora])
    import jax

    if jax.process_index() == 0:
        print(f"{args.num_samples} samples in {len(manifest['shards'])} verified shards in {args.out} "
              f"({manifest['method']}, {manifest['steps']} steps, checkpoint {manifest['checkpoint']}); "
              f"manifest: {pathlib.Path(args.out) / 'manifest.json'}")
