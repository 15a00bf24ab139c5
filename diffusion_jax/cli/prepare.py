"""`prepare`: a data set split as uint8 ArrayRecord shards, a resumable batch job."""
from __future__ import annotations

from diffusion_jax.cli.arguments import at_least


def register(sub) -> None:
    r = sub.add_parser("prepare", help="a data set split as ArrayRecord shards (data.name=array_record:DIR)")
    r.add_argument("--dataset", required=True, help="digits, folder:PATH or a tfds name")
    r.add_argument("--image_size", type=at_least(1), required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--split", default="train")
    r.add_argument("--channels", type=at_least(1), default=3)
    r.add_argument("--shard_size", type=at_least(1), default=10_000)
    r.add_argument("--data_dir", default="")
    r.add_argument("--caption_feature", default="", help="a tfds data set's caption feature ('captions/text'): "
                                                         "the shards keep the captions")
    r.set_defaults(run=lambda args: prepare_command(args))


def prepare_command(args) -> None:
    import ml_collections

    from diffusion_jax.data.prepare import prepare
    from diffusion_jax.parallel import maybe_initialize_distributed

    maybe_initialize_distributed()
    import jax

    data = ml_collections.ConfigDict(dict(name=args.dataset, image_size=args.image_size, channels=args.channels,
                                          data_dir=args.data_dir, caption_feature=args.caption_feature))
    done = prepare(data, args.split, args.out, shard_size=args.shard_size, process_index=jax.process_index(),
                   process_count=jax.process_count(), progress=jax.process_index() == 0)
    if "shards" in done:
        print(f"prepared {done['count']} images ({args.image_size}x{args.image_size}x{args.channels}, "
              f"{len(done['shards'])} shards) in {args.out}/{args.split}: train with "
              f"--config.data.name=array_record:{args.out}")
    else:
        print(f"this process's shards of {args.out}/{args.split} are done; the others are still being written")
