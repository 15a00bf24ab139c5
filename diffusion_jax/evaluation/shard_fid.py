"""FID of a directory of sample shards (`generate`'s output): the features of every shard, pooled
exactly as sums over shards and processes (`FeatureSums`), never as averages of per-part means
and covariances.

    python -m diffusion_jax fid --samples DIR --ref REF.npz [--features inception|digits]
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.evaluation.frechet import (FeatureSums, feature_sums, frechet_distance, load_statistics,
                                              statistics_from_sums)
from diffusion_jax.files import read_json_object, sha256_file
from diffusion_jax.shards import ShardDir
from diffusion_jax.viz import to_model_range


def feature_extractor(features: str, inception_weights=None):
    """(images [N, H, W, C] in [-1, 1] -> features [N, D], a description with the weights' sha256)."""
    if features == "digits":
        from diffusion_jax.evaluation.digits_features import digits_features

        return digits_features, "digits classifier (scikit-learn MLP on the digits train split, seed 0)"
    from diffusion_jax.evaluation.inception import DEFAULT_WEIGHTS, inception_features, load_inception

    variables = load_inception(inception_weights)
    path = pathlib.Path(inception_weights or DEFAULT_WEIGHTS).expanduser()
    return (lambda images: inception_features(variables, images)), f"inception {path.name} sha256 {sha256_file(path)}"


def job_shards(directory) -> list[tuple[int, int]]:
    """The shards of the finished job in `directory`, checked against what the job says it made:
    with a `manifest.json` (a finished `generate`), exactly the shards it lists, each present;
    with only a `job.json`, an error (the job is not finished); with neither, the shards found.
    A missing directory is an error (nothing is created)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--samples: no directory {str(directory)!r}: give the --out directory of "
                                "`python -m diffusion_jax generate`")
    store = ShardDir(directory, create=False)
    found = store.complete()
    manifest_path, job_path = directory / "manifest.json", directory / "job.json"
    if manifest_path.exists():
        manifest = read_json_object(manifest_path, "run the generate command again to write it")
        try:
            listed = sorted((int(r["first"]), int(r["last"])) for r in manifest["shards"])
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{manifest_path} does not list its shards: run the generate command again "
                             "to write it") from None
        missing, extra = sorted(set(listed) - set(found)), sorted(set(found) - set(listed))
        if missing or extra:
            names = lambda ranges: ", ".join(store.path(*r).name for r in ranges[:3]) + (" ..." if len(ranges) > 3 else "")
            raise UsageError(
                f"{directory} does not hold the job its manifest describes ({len(listed)} shards, "
                f"{manifest.get('num_samples')} samples): "
                + "; ".join(([f"{len(missing)} missing ({names(missing)})"] if missing else [])
                            + ([f"{len(extra)} not the job's ({names(extra)})"] if extra else []))
                + ": run the generate command again to remake missing shards, and move the others away")
        return listed
    if job_path.exists():
        raise UsageError(f"the generate job in {directory} is not finished (job.json but no manifest.json, "
                         f"{len(found)} shard(s) so far): run the same generate command again to finish it")
    if not found:
        raise UsageError(f"no shards (samples_*.npz) in {directory}: make them with `python -m diffusion_jax "
                         "generate ... --out DIR`")
    return found


def shard_feature_sums(directory, extract) -> FeatureSums:
    """Pooled feature sums of every shard of the job in `directory` (`job_shards`; each process
    reads its share); a shard that does not verify is an error naming it."""
    shards = job_shards(directory)
    store = ShardDir(directory, create=False)
    sums = None
    for first, last in shards[jax.process_index()::jax.process_count()]:
        record, why = store.inspect(first, last)
        if record is None:
            raise UsageError(f"shard {store.path(first, last).name} does not verify ({why}): run the generate "
                             "command again to remake it")
        images = to_model_range(store.load(first, last)["images"])
        part = feature_sums(extract(images))
        sums = part if sums is None else sums + part
    return pool_across_processes(sums)


def pool_across_processes(sums: FeatureSums | None) -> FeatureSums:
    if jax.process_count() == 1:
        return sums
    from jax.experimental import multihost_utils

    dim = int(multihost_utils.process_allgather(np.asarray(0 if sums is None else len(sums.total))).max())
    sums = sums or FeatureSums(0, np.zeros(dim), np.zeros((dim, dim)))
    # float64 travels as its bytes (uint32 pairs): JAX without x64 would round it to float32.
    exact = lambda a: multihost_utils.process_allgather(np.ascontiguousarray(a, np.float64).view(np.uint32))
    totals, outers = (np.asarray(exact(a)).view(np.float64) for a in (sums.total, sums.outer))
    count = int(np.sum(multihost_utils.process_allgather(np.asarray(sums.count, np.int32))))
    return FeatureSums(count, totals.sum(0), outers.sum(0))


def fid_of_shards(directory, ref, features: str = "inception", inception_weights=None, out=None) -> dict:
    """FID of the shards against reference statistics `ref` (.npz with mu, sigma); written as JSON
    to `out` (default DIR/fid.json) with n and the sha256 of the reference and of the weights."""
    job_shards(directory)  # the samples are a finished job, before anything is loaded
    mu_ref, sigma_ref = load_statistics(ref)
    extract, extractor = feature_extractor(features, inception_weights)
    sums = shard_feature_sums(directory, extract)
    mu, sigma = statistics_from_sums(sums)
    if mu.shape != mu_ref.shape:
        raise UsageError(f"the reference {ref} has {len(mu_ref)} features but the {features} features of the "
                         f"samples have {len(mu)}: make the reference with fid-stats --features {features}")
    result = {"fid": frechet_distance(mu, sigma, mu_ref, sigma_ref), "n": sums.count,
              "samples": str(directory), "ref": str(ref), "ref_sha256": sha256_file(ref), "features": extractor}
    if jax.process_index() == 0:
        pathlib.Path(out or pathlib.Path(directory) / "fid.json").write_text(json.dumps(result, indent=1))
    return result
