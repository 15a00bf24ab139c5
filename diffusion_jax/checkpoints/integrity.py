"""What makes a saved train state trustworthy: a digest of every array's bits, finiteness, and
the layout (name and shape of every array), computed on the host from what each process holds
(nothing to compile); `verify` says why a restored state cannot be used."""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def _bits(x: np.ndarray) -> np.ndarray:
    """The bits of every element of a host array as uint32 (floats bitcast, narrower types widened)."""
    if x.dtype == np.bool_:
        return x.astype(np.uint32)
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
    return x.view(unsigned).astype(np.uint32)


def _global_flat_index(index: tuple, shape: tuple) -> np.ndarray:
    """uint32 [shard shape]: the row-major flat index in the whole array (of `shape`) of every element
    of the shard at `index` (a tuple of slices), modulo 2^32."""
    flat = np.zeros((), np.uint64)
    stride = 1
    for axis in reversed(range(len(shape))):
        start, stop, _ = index[axis].indices(shape[axis])
        coordinates = np.arange(start, stop, dtype=np.uint64) * np.uint64(stride)
        flat = flat + coordinates.reshape((-1,) + (1,) * (len(shape) - 1 - axis))
        stride *= shape[axis]
    return flat.astype(np.uint32)


def _local_pieces(x):
    """(global index, host data) of the parts of array x this process holds and counts: each shard
    once over its replicas; a host (NumPy) value only on process 0, which every process holds."""
    if isinstance(x, jax.Array):
        return [(shard.index, np.asarray(shard.data)) for shard in x.addressable_shards if shard.replica_id == 0]
    x = np.asarray(x)
    return [(tuple(slice(None) for _ in x.shape), x)] if jax.process_index() == 0 else []


def _leaf_sums(x) -> tuple[int, float, bool]:
    """(digest, sum of squares, all finite) of this process's part of array x: the digest is
    sum_i bits_i * (2654435761 i + 1) mod 2^32 over the global flat index i. Every factor is odd, so
    a change to any one element changes it; integer sums are exact, so the processes' parts add up
    to the same value for any sharding and any order."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    digest, squares, finite = 0, 0.0, True
    for index, data in _local_pieces(x):
        weights = _global_flat_index(index, x.shape) * np.uint32(2654435761) + np.uint32(1)
        digest = (digest + int(np.sum(_bits(data) * weights, dtype=np.uint32))) % 2**32
        if jnp.issubdtype(data.dtype, jnp.floating):
            with np.errstate(invalid="ignore", over="ignore"):  # damaged bits: NaN or inf, reported below
                values = data.astype(np.float64)
            squares += float(np.sum(values * values))
            finite = finite and bool(np.all(np.isfinite(values)))
    return digest, squares, finite


def _digests_and_squares(groups: dict):
    """({name: uint32 digest of each array} and {name: sum of squares of its float arrays, inf when
    one is not finite}) of every group, computed on the host from the parts this process holds and
    added up over the processes (no program to compile: the arrays are read once, as saving does)."""
    names = list(groups)
    leaves = {name: jax.tree_util.tree_leaves(groups[name]) for name in names}
    sums = {name: [_leaf_sums(x) for x in leaves[name]] for name in names}
    digests = np.asarray([d for name in names for d, _, _ in sums[name]], np.uint32)
    squares = np.asarray([sum(s for _, s, _ in sums[name]) if all(f for _, _, f in sums[name]) else np.inf
                          for name in names], np.float64)
    if jax.process_count() > 1:
        digests = np.sum(multihost_utils.process_allgather(digests), axis=0, dtype=np.uint32)
        squares = np.sum(multihost_utils.process_allgather(squares), axis=0)
    split = np.cumsum([len(leaves[name]) for name in names])[:-1]
    return dict(zip(names, np.split(digests, split))), dict(zip(names, squares))


def _combine(digests) -> int:
    """The leaf digests of a tree as one uint32, in order (FNV-1a)."""
    combined = 2166136261
    for value in np.asarray(digests):
        combined = ((combined ^ int(value)) * 16777619) % 2**32
    return combined


class StateSummary(NamedTuple):
    """What is checked of a train state before it is kept and after it is restored."""

    digest: dict  # {field of the TrainState: uint32 digest of its arrays}
    finite: bool  # every parameter and EMA parameter finite
    param_norm: float  # global L2 norm of the parameters


def summarize(state) -> StateSummary:
    """Digests, finiteness and parameter norm of a TrainState."""
    digests, squares = _digests_and_squares(state_groups(state))
    return StateSummary({name: _combine(d) for name, d in digests.items()},
                        bool(np.isfinite(squares["params"]) and np.isfinite(squares["ema_params"])),
                        float(np.sqrt(squares["params"])))


def state_groups(state) -> dict:
    """The top-level fields of a TrainState (step, params, ema_params, opt_state, rng)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def verify(groups: dict, record: dict) -> str | None:
    """Why restored arrays cannot be used, or None: `groups` ({field of the TrainState: tree},
    all of them or some) must have the digests saved in `record`, and the parameters among them
    must be finite."""
    checked = tuple(name for name in ("params", "ema_params") if name in groups)
    digests, squares = _digests_and_squares(dict(groups))
    saved = record.get("digest") or {}
    bad = sorted(name for name in groups if name in saved and saved[name] != _combine(digests[name]))
    if bad:
        return f"the digest of its {', '.join(bad)} differs from the one saved with them"
    if not all(np.isfinite(squares[name]) for name in checked):
        return f"its {' and '.join(n.replace('_', ' ') for n in checked)} are not finite"
    return None


def named_shapes(tree) -> dict:
    """{"a.b.c": shape} for the leaves of a pytree."""
    name = lambda path: ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                                 for k in path)
    return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def saved_param_shapes(item_dir) -> dict:
    """named_shapes of the `params` saved in a train-state checkpoint item, from its metadata
    (nothing is read but the metadata)."""
    absl_log = logging.getLogger("absl")  # quiet its note that the item has no step metadata file
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        meta = ocp.StandardCheckpointer().metadata(pathlib.Path(item_dir).absolute())
    finally:
        absl_log.setLevel(level)
    meta = getattr(meta, "item_metadata", meta)
    return named_shapes(getattr(meta, "tree", meta)["params"])


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs of a pytree (with shardings) for a restore target."""
    if shardings is None:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  tree, shardings)
