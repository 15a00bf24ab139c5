"""A split prepared once as ArrayRecord shards of uint8 images, read back with random access.

    python -m diffusion_jax prepare --dataset cifar10 --split train --image_size 32 --out data/c10
    ... --config.data.name=array_record:data/c10      (a run then reads data/c10/<split>/)

Layout of `OUT/<split>/`:
  * `images_{first:08d}_{last:08d}.array_record`: one record per image, its uint8 [H, W, C]
    bytes, images first..last of the split in the source's order; written atomically by
    `shards.ShardDir` and recorded in `images_{first:08d}_{last:08d}.json` (size, sha256, labels);
  * `settings.json`: source, split, image size, channels, shard size and count, written first:
    a later `prepare` with other settings into the same directory is refused;
  * `prepared.json`: the settings again with the shards, written when every shard verifies.

Preparing is a batch job: process p of P writes the shards j with j % P == p, each read from
the source on its own (a tfds slice `split[first:last+1]`, a folder's files first..last), so no
process holds more than one shard; run the same command again after an interruption and only
the missing or damaged shards are made. Reading (`PreparedImages`) goes through grain's
`ArrayRecordDataSource`: images[idx] reads just those records, so host memory is one batch.
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import NamedTuple

import numpy as np

from diffusion_jax.shards import ShardDir, shard_ranges

log = logging.getLogger(__name__)

FORMAT = "diffusion_jax.prepared/1"
PREFIX, SUFFIX = "images", ".array_record"
SCHEME = "array_record:"


class Settings(NamedTuple):
    source: str
    split: str
    image_size: int
    channels: int
    shard_size: int
    count: int

    def as_dict(self) -> dict:
        return {"format": FORMAT, **self._asdict()}


def split_dir(root, split: str) -> pathlib.Path:
    return pathlib.Path(root) / split


# ---------------------------------------------------------------------------- writing
def source_rows(data_config, split: str):
    """(count, read(first, last) -> (uint8 images [n, H, W, C], int32 labels [n])) of a split of
    a digits / folder / tfds source, read a range at a time."""
    from diffusion_jax.data import sources

    name, size, channels = data_config.name, data_config.image_size, data_config.channels
    if name == "digits":
        data = sources.load_digits(split, size, channels)
        return len(data.images), lambda a, b: (data.images[a:b + 1], data.labels[a:b + 1])
    if name.startswith("folder:"):
        files = sources.folder_files(name[len("folder:"):])
        return len(files), lambda a, b: (sources.read_folder_images(files[a:b + 1], size, channels),
                                         np.zeros(b + 1 - a, np.int32))
    count = sources.tfds_split_size(name, split, data_config.data_dir)
    return count, lambda a, b: sources.load_tfds(name, f"{split}[{a}:{b + 1}]", size, channels,
                                                 data_config.data_dir)[:2]


def _write_shard(store: ShardDir, first: int, last: int, images: np.ndarray, labels: np.ndarray) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    def fill(path):
        writer = ArrayRecordWriter(str(path), "group_size:1")
        for image in images:
            writer.write(np.ascontiguousarray(image, np.uint8).tobytes())
        writer.close()

    return store.write_file(first, last, fill, labels=[int(v) for v in labels])


def prepare(data_config, split: str, out, *, shard_size: int = 10_000, process_index: int = 0,
            process_count: int = 1, progress: bool = True, rows=None) -> dict:
    """Writes (or completes) OUT/<split>/ for the data config's source; returns prepared.json's dict
    once every shard verifies, else the settings (other processes still writing). `rows` =
    (count, read(first, last)) replaces the source's (`source_rows`), e.g. for synthetic data."""
    if shard_size < 1:
        raise ValueError(f"--shard_size must be at least 1, got {shard_size}")
    count, read = rows or source_rows(data_config, split)
    if count == 0:
        raise ValueError(f"split {split!r} of {data_config.name!r} is empty: nothing to prepare")
    settings = Settings(data_config.name, split, int(data_config.image_size), int(data_config.channels),
                        int(shard_size), int(count)).as_dict()
    directory = split_dir(out, split)
    directory.mkdir(parents=True, exist_ok=True)
    _claim(directory, settings)
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
        images, labels = read(first, last)
        if len(images) != last + 1 - first or len(labels) != len(images):
            raise ValueError(f"the source {data_config.name!r} gave {len(images)} images for rows {first}..{last} of "
                             f"split {split!r}: its size changed while preparing, or it cannot be read by range")
        _write_shard(store, first, last, np.asarray(images, np.uint8), np.asarray(labels, np.int32))
        if bar is not None:
            bar.update(last + 1 - first)
    if bar is not None:
        bar.close()
    log.info("%d of %d shards made by process %d (%d were done)", len(todo), len(mine), process_index,
             len(mine) - len(todo))
    if all(store.verified(*r) is not None for r in ranges):
        done = {**settings, "shards": [list(r) for r in ranges]}
        _atomic_json(directory / "prepared.json", done)
        return done
    return settings


def _claim(directory: pathlib.Path, settings: dict) -> None:
    """settings.json, or a refusal if the directory was prepared with other settings."""
    path = directory / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        differ = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
        if differ:
            raise ValueError(f"{directory} was prepared with other settings ({'; '.join(differ)}): prepare into "
                             "another directory, or delete this one to start again")
        return
    _atomic_json(path, settings)


def _atomic_json(path: pathlib.Path, value: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1))
    temporary.replace(path)


# ---------------------------------------------------------------------------- reading
class PreparedImages:
    """The images of a prepared split as a read-only array-like of uint8 [N, H, W, C]:
    len(), .shape, .dtype, and [index] for an int, a slice or an integer array (reads only those
    records, through grain's ArrayRecordDataSource)."""

    def __init__(self, paths, shape):
        from grain.sources import ArrayRecordDataSource

        self._source = ArrayRecordDataSource([str(p) for p in paths])
        self.shape = (len(self._source), *shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self[np.asarray([index])][0]
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        if rows.size == 0:
            return np.zeros((0, *self.shape[1:]), np.uint8)
        records = self._source.__getitems__([int(i) for i in rows.reshape(-1)])
        flat = np.frombuffer(b"".join(records), np.uint8)
        return flat.reshape(*rows.shape, *self.shape[1:])


def load_prepared(root, split: str, image_size: int, channels: int):
    """(PreparedImages, labels int32 [N]) of ROOT/<split>, checked against the run's image size
    and channels, every shard present with the size its record gives."""
    directory = split_dir(root, split)
    meta_path = directory / "prepared.json"
    if not meta_path.exists():
        if directory.exists() and (directory / "settings.json").exists():
            raise ValueError(f"{directory} is not completely prepared (no prepared.json): run the same prepare "
                             "command again to finish it")
        raise FileNotFoundError(f"no prepared split in {directory}: prepare it first with python -m diffusion_jax "
                                f"prepare --split {split} --out {root} (and the dataset and size)")
    meta = json.loads(meta_path.read_text())
    if (meta["image_size"], meta["channels"]) != (image_size, channels):
        raise ValueError(f"{directory} holds {meta['image_size']}x{meta['image_size']}x{meta['channels']} images but "
                         f"the config asks for {image_size}x{image_size}x{channels}: set data.image_size="
                         f"{meta['image_size']} and data.channels={meta['channels']}, or prepare the split again "
                         "at that size into another directory")
    store = ShardDir(directory, PREFIX, SUFFIX)
    paths, labels = [], []
    for first, last in meta["shards"]:
        path, record_path = store.path(first, last), store.record_path(first, last)
        if not path.exists() or not record_path.exists():
            raise FileNotFoundError(f"shard {path.name} of {directory} is missing: run the prepare command again "
                                    "to make it")
        record = json.loads(record_path.read_text())
        if path.stat().st_size != record["bytes"]:
            raise ValueError(f"shard {path.name} of {directory} is truncated or changed ({path.stat().st_size} "
                             f"bytes, its record says {record['bytes']}): run the prepare command again to remake it")
        paths.append(path)
        labels.extend(record["labels"])
    return PreparedImages(paths, (image_size, image_size, channels)), np.asarray(labels, np.int32)
