"""`prepare`: a split written once as the prepared format (data/prepared.py), as a batch job.

    python -m diffusion_jax prepare --dataset cifar10 --split train --image_size 32 --out data/c10
    ... --config.data.name=array_record:data/c10      (a run then reads data/c10/<split>/)

Process p of P writes the shards j with j % P == p, each read from the source on its own (a tfds
slice `split[first:last+1]`, a folder's files first..last), so no process holds more than one
shard; run the same command again after an interruption and only the missing or damaged shards
are made. `settings.json` is written first: a later prepare with other settings into the same
directory is refused.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.data import sources
from diffusion_jax.data.prepared import FORMAT, PREFIX, SUFFIX, split_dir
from diffusion_jax.files import claim_directory, write_json_atomically
from diffusion_jax.shards import ShardDir, shard_ranges

log = logging.getLogger(__name__)


class Settings(NamedTuple):
    source: str
    split: str
    image_size: int
    channels: int
    shard_size: int
    count: int
    caption_feature: str = ""  # a tfds source's captions (recorded only when named)

    def as_dict(self) -> dict:
        return {"format": FORMAT, **{k: v for k, v in self._asdict().items() if k != "caption_feature" or v}}


def _write_shard(store: ShardDir, first: int, last: int, images: np.ndarray, labels: np.ndarray,
                 captions=None) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    def fill(path):
        writer = ArrayRecordWriter(str(path), "group_size:1")
        for image in images:
            writer.write(np.ascontiguousarray(image, np.uint8).tobytes())
        writer.close()

    extra = {} if captions is None else {"captions": [str(c) for c in captions]}
    return store.write_file(first, last, fill, labels=[int(v) for v in labels], **extra)


def prepare(data_config, split: str, out, *, shard_size: int = 10_000, process_index: int = 0,
            process_count: int = 1, progress: bool = True, rows=None) -> dict:
    """Writes (or completes) OUT/<split>/ for the data config's source; returns prepared.json's dict
    once every shard verifies, else the settings (other processes still writing). `rows` =
    (count, read(first, last)) replaces the source's (`sources.split_rows`), e.g. for synthetic data."""
    if shard_size < 1:
        raise UsageError(f"--shard_size must be at least 1, got {shard_size}")
    count, read = rows or sources.split_rows(data_config, split)
    if count == 0:
        raise UsageError(f"split {split!r} of {data_config.name!r} is empty: nothing to prepare")
    settings = Settings(data_config.name, split, int(data_config.image_size), int(data_config.channels),
                        int(shard_size), int(count), str(data_config.get("caption_feature", ""))).as_dict()
    directory = split_dir(out, split)
    directory.mkdir(parents=True, exist_ok=True)
    claim_directory(directory / "settings.json", settings, "a prepared split")
    store = ShardDir(directory, PREFIX, SUFFIX)
    ranges = shard_ranges(count, shard_size)
    mine = [r for j, r in enumerate(ranges) if j % process_count == process_index]
    todo = [r for r in mine if store.verified(*r) is None]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(b + 1 - a for a, b in mine), initial=sum(b + 1 - a for a, b in mine if (a, b) not in todo),
                   unit="img", desc=f"prepare {split}")
    for first, last in todo:
        images, labels, *rest = read(first, last)
        captions = rest[0] if rest else None
        if len(images) != last + 1 - first or len(labels) != len(images) or (captions is not None
                                                                              and len(captions) != len(images)):
            raise UsageError(f"the source {data_config.name!r} gave {len(images)} images for rows {first}..{last} of "
                             f"split {split!r}: its size changed while preparing, or it cannot be read by range")
        _write_shard(store, first, last, np.asarray(images, np.uint8), np.asarray(labels, np.int32), captions)
        if bar is not None:
            bar.update(last + 1 - first)
    if bar is not None:
        bar.close()
    log.info("%d of %d shards made by process %d (%d were done)", len(todo), len(mine), process_index,
             len(mine) - len(todo))
    if all(store.verified(*r) is not None for r in ranges):
        done = {**settings, "shards": [list(r) for r in ranges]}
        write_json_atomically(directory / "prepared.json", done)
        return done
    return settings
