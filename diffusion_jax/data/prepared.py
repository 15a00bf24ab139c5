"""The prepared format: a split as ArrayRecord shards of uint8 images, read with random access.

Layout of `OUT/<split>/` (written by `data/prepare.py`):
  * `images_{first:08d}_{last:08d}.array_record`: one record per image, its uint8 [H, W, C]
    bytes, images first..last of the split in the source's order; written atomically by
    `shards.ShardDir` and recorded in `images_{first:08d}_{last:08d}.json` (size, sha256, labels);
  * `settings.json`: source, split, image size, channels, shard size and count, written first;
  * `prepared.json`: the settings again with the shards, written when every shard verifies.

A run with `data.name = "array_record:OUT"` reads OUT/<split> through `PreparedImages`, grain's
`ArrayRecordDataSource` underneath: images[idx] reads just those records, so host memory is one
batch (and the labels, the permutation and the reader's index, ~20 bytes an image).
"""
from __future__ import annotations

import pathlib

import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.files import read_json_object
from diffusion_jax.shards import ShardDir

FORMAT = "diffusion_jax.prepared/1"
PREFIX, SUFFIX = "images", ".array_record"


def split_dir(root, split: str) -> pathlib.Path:
    return pathlib.Path(root) / split


class PreparedImages:
    """The images of a prepared split as a read-only array-like of uint8 [N, H, W, C]:
    len(), .shape, .dtype, and [index] for an int, a slice or an integer array (reads only those
    records, through grain's ArrayRecordDataSource)."""

    def __init__(self, paths, shape, counts=None):
        from grain.sources import ArrayRecordDataSource

        self._paths = [pathlib.Path(p) for p in paths]
        self._source = ArrayRecordDataSource([str(p) for p in paths])
        self.shape = (len(self._source), *shape)
        self._ends = np.cumsum(counts if counts is not None else [len(self._source)])
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
        try:
            records = self._source.__getitems__([int(i) for i in rows.reshape(-1)])
        except Exception as error:  # a damaged shard: Riegeli's hash or framing check fails on read
            raise UsageError(self._damaged(rows.reshape(-1), error)) from None
        flat = np.frombuffer(b"".join(records), np.uint8)
        if flat.size != rows.size * int(np.prod(self.shape[1:])):
            raise UsageError(self._damaged(rows.reshape(-1), "records of the wrong size"))
        return flat.reshape(*rows.shape, *self.shape[1:])

    def _damaged(self, rows: np.ndarray, error) -> str:
        """The message for a read of `rows` that failed: the shard(s) whose rows fail to read on
        their own, and what to do."""
        shard_of = np.minimum(np.searchsorted(self._ends, rows, side="right"), len(self._paths) - 1)
        failing = []
        for shard in sorted(set(shard_of.tolist())):
            try:
                self._source.__getitems__([int(r) for r in rows[shard_of == shard]])
            except Exception:
                failing.append(self._paths[shard].name)
        names = ", ".join(failing or sorted({self._paths[s].name for s in shard_of.tolist()}))
        detail = error if isinstance(error, str) else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return (f"prepared shard {names} in {self._paths[0].parent} is damaged ({detail}): run the same prepare "
                "command again, which remakes every shard that does not match its checksum")


def load_prepared(root, split: str, image_size: int, channels: int):
    """(PreparedImages, labels int32 [N], captions [N] or None) of ROOT/<split>, checked against
    the run's image size and channels, every shard present with the size its record gives; the
    captions when every shard's record holds them."""
    directory = split_dir(root, split)
    meta_path = directory / "prepared.json"
    if not meta_path.exists():
        if directory.exists() and (directory / "settings.json").exists():
            raise UsageError(f"{directory} is not completely prepared (no prepared.json): run the same prepare "
                             "command again to finish it")
        raise FileNotFoundError(f"no prepared split in {directory}: prepare it first with python -m diffusion_jax "
                                f"prepare --split {split} --out {root} (and the dataset and size)")
    meta = read_json_object(meta_path, "run the same prepare command again to write it")
    if (meta["image_size"], meta["channels"]) != (image_size, channels):
        raise UsageError(f"{directory} holds {meta['image_size']}x{meta['image_size']}x{meta['channels']} images but "
                         f"the config asks for {image_size}x{image_size}x{channels}: set data.image_size="
                         f"{meta['image_size']} and data.channels={meta['channels']}, or prepare the split again "
                         "at that size into another directory")
    store = ShardDir(directory, PREFIX, SUFFIX)
    paths, labels, captions = [], [], []
    for first, last in meta["shards"]:
        path, record_path = store.path(first, last), store.record_path(first, last)
        if not path.exists() or not record_path.exists():
            raise FileNotFoundError(f"shard {path.name} of {directory} is missing: run the prepare command again "
                                    "to make it")
        record = read_json_object(record_path, "run the prepare command again to remake the shard")
        if path.stat().st_size != record["bytes"]:
            raise UsageError(f"shard {path.name} of {directory} is truncated or changed ({path.stat().st_size} "
                             f"bytes, its record says {record['bytes']}): run the prepare command again to remake it")
        paths.append(path)
        labels.extend(record["labels"])
        captions = None if captions is None or "captions" not in record else captions + list(record["captions"])
    counts = [last + 1 - first for first, last in meta["shards"]]
    return (PreparedImages(paths, (image_size, image_size, channels), counts), np.asarray(labels, np.int32),
            captions)
