"""A batch job: N samples of a trained run as verified shards of uint8 images, resumable.

    python -m diffusion_jax generate --workdir RUN --num_samples 50000 --out DIR [--method ...]

Image i is a pure function of (run, checkpoint, sampler settings, seed, i): all its noise comes
from fold_in(key(seed), i) and its label is labels[i % len(labels)] (default i % classes), so
the output does not depend on the batch size, the devices or the processes. Each process makes
the shards j with j % process_count == process_index (`DIR/samples_{first:08d}_{last:08d}.npz`,
`images` uint8 [n, H, W, C] and `labels` int32 [n]) on its own devices; memory is bounded by
one shard. A restarted job keeps the shards that verify and makes the others; one started with
other settings into the same DIR refuses. At the end `DIR/manifest.json` lists everything.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import time

import jax
import numpy as np
from tqdm import tqdm

from diffusion_jax.errors import UsageError
from diffusion_jax import viz
from diffusion_jax.conditions import (by_index, condition_kind, given_values, guidance_enabled, read_values,
                                      taking_kind)
from diffusion_jax.config import sampler_settings
from diffusion_jax.generation import make_generator
from diffusion_jax.interop.adapters import lora_file_records, with_sample_loras
from diffusion_jax.parallel import make_mesh, replicated
from diffusion_jax.files import claim_directory, write_json_atomically
from diffusion_jax.runs import load_run
from diffusion_jax.shards import ShardDir, shard_ranges

log = logging.getLogger(__name__)


def job_digest(settings: dict) -> str:
    """The job's identity: the sha256 of its settings (canonical JSON); every shard record carries it."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def claim_job_directory(store: ShardDir, settings: dict) -> None:
    """Claims DIR for the job (`store`, made with job=job_digest(settings)): DIR/job.json holds its settings (written by process 0), or the one
    there must hold the same. Shards whose records name another job, or none (written before job
    digests, or by a job whose job.json is gone), are never taken as this job's: the directory is
    refused with the reason, before anything is written."""
    digest, path = store.job, store.directory / "job.json"
    if path.exists():  # other settings: name them
        claim_directory(path, settings, "a generate job", write=False)
    strangers = sorted({str(r.get("job") or "none") for r in store.records() if r.get("job") != digest})
    if strangers:
        raise UsageError(f"{store.directory} holds shards of another job (their records name job(s) "
                         f"{', '.join(strangers)}; this one is {digest}), and its job.json "
                         f"{'holds these settings' if path.exists() else 'is missing'}: "
                         "choose another --out, or delete those shards if they are yours to lose")
    claim_directory(path, settings, "a generate job", write=jax.process_index() == 0)


def generate_samples(workdir, out_dir, num_samples: int, *, seed: int = 0, method=None, steps=None,
                     options=None, eta=None, guidance_scale=None, labels=None, checkpoint=None,
                     batch_size: int = 256, shard_size: int = 1000, progress: bool = True,
                     prompts_file=None, negative_prompt=None, conditions=None, conditions_file=None,
                     loras=()) -> dict:
    """Makes (or completes) the job's shards in `out_dir`; returns the manifest (see module).

    Conditions are values of the run's condition kind (`conditions`): given as a list
    (`conditions`; `labels` for a class-conditional run) or a file, one value a line
    (`conditions_file`; `prompts_file` for a text run), sample i getting value i mod n. A file's
    path and sha256 are in the job's settings, so a changed file is another job; so are those of the
    LoRA files `loras` ([(path, weight), ...]) the run samples with."""
    if num_samples < 1 or shard_size < 1 or batch_size < 1:
        raise UsageError(f"--num_samples, --shard_size and --batch_size must be at least 1, got "
                         f"{num_samples}, {shard_size} and {batch_size}")
    lora_files = lora_file_records(loras) if loras else None  # a missing file is named before the run is read
    run = load_run(workdir, checkpoint)
    c = with_sample_loras(run.config, loras) if loras else run.config
    method, steps, options = sampler_settings(c, run.schedule, method, steps, options, eta=eta)
    guidance_scale = float(c.sample.guidance_scale if guidance_scale is None else guidance_scale)
    guidance_enabled(c, guidance_scale)  # checked now, not after the first shard
    kind = condition_kind(c)
    if negative_prompt:
        taking_kind(c, "negative_prompt")
    values = given_values(c, conditions=conditions, labels=labels)
    argument = "prompts" if prompts_file is not None else "conditions"
    conditions_file = prompts_file if prompts_file is not None else conditions_file
    if conditions_file is not None:  # the kind is checked before the file is read
        values = given_values(c, **{argument: read_values(conditions_file, taking_kind(c, argument).file_key)})
    settings = {"run": str(pathlib.Path(workdir).resolve()), "checkpoint": run.step, "method": method,
                "steps": steps, "options": {k: v for k, v in options.items() if k != "eta"},
                "eta": options.get("eta"), "guidance_scale": guidance_scale,
                "guidance_rescale": float(c.sample.get("guidance_rescale", 0.0)),
                "labels": None, "seed": seed, "num_samples": num_samples, "shard_size": shard_size}
    if conditions_file is not None:
        path = pathlib.Path(conditions_file)
        settings.update({f"{kind.file_key}_file": str(path.resolve()),
                         f"{kind.file_key}_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                         "negative_prompt": negative_prompt or ""})
    elif kind is not None:
        settings.update(kind.job_settings(values))
    if negative_prompt:  # the empty prompt's images against another negative: another job
        settings.update(negative_prompt=negative_prompt)
    if lora_files:
        settings.update(loras=lora_files)
    if kind is not None and values is None:
        values = kind.default_values(c)
    store = ShardDir(out_dir, job=job_digest(settings))
    claim_job_directory(store, settings)
    shards = shard_ranges(num_samples, shard_size)
    mine = shards[jax.process_index()::jax.process_count()]
    mesh = make_mesh(devices=jax.local_devices())  # each process samples on its own devices
    # This process's copy of the replicated parameters, onto its own devices.
    params = jax.tree_util.tree_map(lambda a: jax.device_put(a.addressable_data(0), replicated(mesh)),
                                    run.ema_params)
    # a call never makes more samples than a shard holds (per-sample keys: the images do not depend on it)
    largest_shard = max(last - first + 1 for first, last in shards)
    generate = make_generator(run.model, run.schedule, c, batch_size=min(batch_size, largest_shard),
                              method=method, steps=steps, options=options, mesh=mesh, per_sample_keys=True,
                              condition_adapters=run.condition_adapters)
    key = jax.random.key(seed)
    total = sum(last - first + 1 for first, last in mine)
    bar = _progress(total, progress and jax.process_index() == 0)
    made, started = 0, time.perf_counter()
    for first, last in mine:
        n = last - first + 1
        if store.verified(first, last) is None:
            images = generate(params, n, key, eta=options.get("eta"), guidance_scale=guidance_scale,
                              conditions=values, first_index=first, negative_prompt=negative_prompt)
            shard_labels = kind.shard_labels(by_index(values, np.arange(first, last + 1))) if kind else None
            store.write(first, last, images=viz.to_uint8(images),
                        labels=np.full(n, -1, np.int32) if shard_labels is None else shard_labels)
            made += n
        bar.update(n)
        bar.set_postfix(made=made, img_s=f"{made / max(time.perf_counter() - started, 1e-9):.1f}")
    bar.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("generate_samples: every shard written")
    return write_manifest(store, settings, shards)


def write_manifest(store: ShardDir, settings: dict, shards) -> dict:
    """DIR/manifest.json (process 0): the settings, every shard verified with its sha256, and
    where it ran; an unverifiable shard is an error (run the job again to make it)."""
    records = []
    for first, last in shards:
        record = store.verified(first, last)
        if record is None:
            raise RuntimeError(f"shard {store.path(first, last).name} is missing or damaged after the job: "
                               "run the same command again to make it")
        records.append({"file": store.path(first, last).name, **record})
    device = jax.devices()[0]
    manifest = {**settings, "job": store.job, "shards": records, "jax": jax.__version__, "device_kind": device.device_kind,
                "device_count": jax.device_count(), "process_count": jax.process_count()}
    if jax.process_index() == 0:
        write_json_atomically(store.directory / "manifest.json", manifest)
    return manifest


def _progress(total: int, enabled: bool):
    return tqdm(total=total, unit="img", disable=not enabled, desc="generate")
