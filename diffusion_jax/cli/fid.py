"""`fid` (the FID of a finished generate job against reference statistics) and `fid-stats` (the
reference statistics of a data set split, or of a job's shards)."""
from __future__ import annotations

import pathlib

from diffusion_jax.cli.arguments import at_least
from diffusion_jax.errors import UsageError


def register(sub) -> None:
    q = sub.add_parser("fid", help="FID of a directory of generated shards against reference statistics")
    q.add_argument("--samples", required=True, help="the --out directory of a finished generate job")
    q.add_argument("--ref", required=True, help="reference statistics .npz (from fid-stats)")
    q.add_argument("--features", choices=["inception", "digits"], default="inception")
    q.add_argument("--inception_weights", default=None)
    q.add_argument("--out", help="where to write the JSON result (default SAMPLES/fid.json)")
    q.set_defaults(run=lambda args: fid_command(args))
    f = sub.add_parser("fid-stats", help="reference feature statistics of a dataset split or of shards")
    f.add_argument("--out", required=True, help="the statistics file to write (.npz)")
    f.add_argument("--dataset", help="a dataset (digits, folder:PATH, a tfds name); or --samples")
    f.add_argument("--samples", help="a directory of shards (generate's --out) instead of a dataset")
    f.add_argument("--split", default="train")
    f.add_argument("--features", choices=["inception", "digits"], default="inception")
    f.add_argument("--inception_weights", default=None)
    f.add_argument("--image_size", type=at_least(1), default=299)
    f.add_argument("--channels", type=at_least(1), default=3)
    f.add_argument("--data_dir", default="")
    f.add_argument("--max_images", type=at_least(0), default=0, help="use the first N images (0: all)")
    f.set_defaults(run=lambda args: fid_stats_command(args))


def fid_command(args):
    import jax

    from diffusion_jax.evaluation.shard_fid import fid_of_shards
    from diffusion_jax.parallel import maybe_initialize_distributed

    maybe_initialize_distributed()
    result = fid_of_shards(args.samples, args.ref, args.features, args.inception_weights, args.out)
    if jax.process_index() == 0:
        print(f"FID {result['fid']:.4f} of {result['n']} samples in {args.samples} against {args.ref} "
              f"({result['features']}); written to {args.out or pathlib.Path(args.samples) / 'fid.json'}")


def fid_stats_command(args):
    import ml_collections

    from diffusion_jax.data import load_split
    from diffusion_jax.evaluation.frechet import feature_statistics, save_statistics
    from diffusion_jax.evaluation.shard_fid import feature_extractor

    if args.samples:  # statistics of a directory of shards, pooled exactly over the processes
        import jax

        from diffusion_jax.evaluation.frechet import statistics_from_sums
        from diffusion_jax.evaluation.shard_fid import shard_feature_sums
        from diffusion_jax.parallel import maybe_initialize_distributed

        maybe_initialize_distributed()
        sums = shard_feature_sums(args.samples, feature_extractor(args.features, args.inception_weights)[0])
        mu, sigma = statistics_from_sums(sums)
        if jax.process_index() == 0:
            print(f"wrote statistics of {sums.count} images ({len(mu)} features, {jax.process_count()} "
                  f"process(es)) to {save_statistics(args.out, mu, sigma)}")
        return
    if not args.dataset:
        raise UsageError("fid-stats needs --dataset NAME (or --samples DIR)")
    data_config = ml_collections.ConfigDict(dict(name=args.dataset, image_size=args.image_size,
                                                 channels=args.channels, data_dir=args.data_dir))
    images = load_split(data_config, args.split).model_range(slice(0, args.max_images or None))
    if len(images) < 2:
        raise UsageError(f"statistics need at least 2 images, the split {args.split!r} of {args.dataset!r} gives "
                         f"{len(images)}{' with --max_images ' + str(args.max_images) if args.max_images else ''}")
    features = feature_extractor(args.features, args.inception_weights)[0](images)
    mu, sigma = feature_statistics(features)
    print(f"wrote statistics of {len(features)} images ({features.shape[1]} features) to "
          f"{save_statistics(args.out, mu, sigma)}")
