"""`import` (a diffusers model directory as a run) and `export` (a run's EMA model as one)."""
from __future__ import annotations

from diffusion_jax.cli import overrides as config_overrides
from diffusion_jax.errors import UsageError
from diffusion_jax.cli.arguments import at_least


def register(sub) -> None:
    m = sub.add_parser("import", help="a diffusers model as a run", allow_abbrev=False,
                       epilog="Settings of the run made are overridden by --config.SECTION.KEY=VALUE.")
    m.add_argument("--from", dest="source", required=True, help="a diffusers model directory or Hub repository id")
    m.add_argument("--workdir", required=True, help="the new run's directory")
    m.add_argument("--subfolder", help="the model's subfolder in a pipeline: unet, transformer")
    m.add_argument("--vae", default="", help="latent diffusion: the AutoencoderKL (a directory, a repository id, "
                                             "or a pipeline with a vae/ folder)")
    m.add_argument("--copy_parts", action="store_true",
                   help="copy the frozen parts the run reads (a pipeline's vae/, text encoders, tokenizers, scheduler/) "
                        "into WORKDIR/parts, so the run does not depend on the source directory")
    m.set_defaults(run=lambda args, overrides: import_command(args, overrides), takes_overrides=True)
    x = sub.add_parser("export", help="a run's EMA model as a diffusers model directory")
    x.add_argument("--workdir", required=True, help="the run to export")
    x.add_argument("--out", help="a new or empty directory")
    x.add_argument("--lora", metavar="FILE", help="a LoRA run: write its EMA adapters as a PEFT LoRA file "
                                                  "(diffusers' load_lora_weights reads it)")
    x.add_argument("--checkpoint", type=at_least(0))
    x.set_defaults(run=lambda args: export_command(args))


def import_command(args, overrides) -> None:
    from diffusion_jax.interop import load_diffusers
    from diffusion_jax.diffusers_runs import run_config, write_imported_run
    from diffusion_jax.models import count_params
    from diffusion_jax.config import base_config

    from diffusion_jax.interop import files
    from diffusion_jax.interop.pipeline import load_pipeline, pipeline_parts

    vae, text_encoder, subfolder = args.vae, "", args.subfolder
    if not subfolder:  # a whole pipeline: its model_index.json says which parts make the run
        directory = files.resolve(args.source)
        parts = pipeline_parts(directory)
        if parts is not None:
            subfolder, uses_vae, uses_text = parts
            vae = vae or (str(directory) if uses_vae else "")
            text_encoder = str(directory) if uses_text else ""
    if text_encoder:  # every part the text run will use, loaded and checked to fit before anything is written
        imported = load_pipeline(text_encoder).unet
    else:
        imported = load_diffusers(args.source, subfolder)
    if args.copy_parts:
        vae, text_encoder = copy_parts(args.workdir, vae, text_encoder)
    config = config_overrides.from_dict(run_config(imported, base_config(), vae, text_encoder), overrides)
    workdir = args.workdir
    write_imported_run(imported, config, workdir)
    print(f"imported {imported.config['_class_name']} ({count_params(imported.params):,} parameters) into "
          f"{workdir}: sample, evaluate or train it (train --workdir {workdir} --config.train.steps=N)")


def copy_parts(workdir, vae: str, text_encoder: str) -> tuple[str, str]:
    """(vae, text_encoder) sources copied into WORKDIR/parts: the frozen parts of the run, so that
    moving or deleting the pipeline it came from leaves the run whole."""
    import pathlib
    import shutil

    from diffusion_jax.interop import files

    parts = pathlib.Path(workdir) / "parts"
    copied = {}
    text_folders = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    for source, folders in ((vae, ("vae",)), (text_encoder, text_folders)):
        if not source:
            continue
        directory = files.resolve(source)
        if (directory / files.CONFIG).exists():  # a model's own folder (--vae DIR): the VAE itself
            shutil.copytree(directory, parts / "vae", dirs_exist_ok=True)
        for folder in folders:
            if (directory / folder).is_dir():
                shutil.copytree(directory / folder, parts / folder, dirs_exist_ok=True)
        if source == text_encoder and (directory / "model_index.json").exists():  # SDXL's force_zeros_for_empty_prompt
            shutil.copy2(directory / "model_index.json", parts / "model_index.json")
        copied[source] = str(parts.resolve())
    return copied.get(vae, vae), copied.get(text_encoder, text_encoder)


def export_command(args) -> None:
    from diffusion_jax.diffusers_runs import export_lora, export_run

    import json
    import pathlib

    if (args.out is None) == (args.lora is None):
        raise UsageError("give --out DIR (the model or pipeline) or --lora FILE (a LoRA run's adapters), one of them")
    if args.lora:
        path = export_lora(args.workdir, args.lora, args.checkpoint)
        print(f"wrote {path} (a PEFT LoRA file with its metadata)")
        return
    out = pathlib.Path(export_run(args.workdir, args.out, args.checkpoint))
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    index = out / "model_index.json"
    kind = f"a {json.loads(index.read_text())['_class_name']}" if index.exists() else "a diffusers model"
    print(f"wrote {out} ({kind}, diffusers format: {', '.join(written)})")
