"""Deterministic batches: batch i of a run is a pure function of (seed, i), so a resumed run
sees exactly the batches it would have seen (the input position is the train step).

Each process builds only its part of every global batch ([global_batch / process_count, ...])
and `diffusion_jax.parallel.global_batch` assembles the global array. Two modes:
  * every process holds the whole split (digits, folders): one global permutation per epoch;
    process p takes rows [p * b, (p + 1) * b) of each global batch;
  * each process holds its own shard (`data.process_shard`, tfds.even_splits): its own
    permutation of its shard.
Random horizontal flips are drawn per example and per step from the seed (really random, and
reproducible).
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import jax
import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.data.sources import ImageData
from diffusion_jax.viz import to_model_range


class Batches:
    """Batch i of a split, for one process."""

    def __init__(self, data: ImageData, global_batch: int, seed: int, *, process_index: int = 0,
                 process_count: int = 1, random_flip: bool = False, conditions=None):
        if global_batch % process_count:
            raise UsageError(f"global batch {global_batch} is not divisible by the process count "
                             f"{process_count}: choose a multiple of {process_count}")
        self.data = data
        self.local_batch_size = global_batch // process_count
        self.global_batch = global_batch
        self.seed, self.p, self.local_shard = seed, process_index, data.process_shard
        self.random_flip = random_flip
        self.conditions = conditions  # [N, ...] per example (a tree of them): its kind's (labels, caption embeddings)
        rows = len(data.images)
        per_step = self.local_batch_size if self.local_shard else global_batch
        if rows < per_step:
            raise UsageError(f"the split has {rows} images, fewer than one batch of {per_step}: "
                             "lower data.batch_size")
        self.batches_per_epoch = rows // per_step
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            stream = [self.seed, epoch] + ([self.p] if self.local_shard else [])
            self._perm = np.random.default_rng(stream).permutation(len(self.data.images))
            self._perm_epoch = epoch
        return self._perm

    def __call__(self, step: int) -> dict:
        """{"image": float32 [b, H, W, C] in [-1, 1], "cond": [b, ...]} for train step `step` (b
        local; the conditions when given)."""
        epoch, i = divmod(int(step), self.batches_per_epoch)
        perm = self._permutation(epoch)
        b = self.local_batch_size
        if self.local_shard:
            idx = perm[i * b:(i + 1) * b]
            flips = np.random.default_rng([self.seed, int(step), 1, self.p]).random(b) < 0.5
        else:
            rows = perm[i * self.global_batch:(i + 1) * self.global_batch]
            flips = np.random.default_rng([self.seed, int(step), 1]).random(self.global_batch) < 0.5
            idx, flips = rows[self.p * b:(self.p + 1) * b], flips[self.p * b:(self.p + 1) * b]
        images = self.data.images[idx]  # uint8: converted a batch at a time
        if self.random_flip:
            images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
        batch = {"image": np.ascontiguousarray(to_model_range(images))}
        if self.conditions is not None:
            batch["cond"] = jax.tree_util.tree_map(lambda c: c[idx], self.conditions)
        return batch

def stacked_batches(batches, step: int, k: int) -> dict:
    """batches(step) .. batches(step + k - 1) stacked on a leading axis [k, b, ...], for k train
    steps in one dispatch (`batches` is any step -> batch function: Batches, LatentBatches)."""
    parts = [batches(step + j) for j in range(k)]
    return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *parts)


def prefetch(make, steps: Iterator[int], size: int = 2) -> Iterator:
    """make(step) for each step, computed `size` ahead on a background thread."""
    q: queue.Queue = queue.Queue(maxsize=size)
    sentinel = object()
    stop = threading.Event()

    def worker():
        try:
            for step in steps:
                if stop.is_set():
                    return
                q.put(make(step))
        except BaseException as e:  # surface errors in the consumer
            q.put(e)
        q.put(sentinel)

    threading.Thread(target=worker, daemon=True).start()
    try:
        while True:
            item = q.get()
            if item is sentinel:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
