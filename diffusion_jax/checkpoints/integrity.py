"""What makes a saved train state trustworthy: a digest of every array's bits, finiteness, and
the layout (name and shape of every array), computed in one compiled program per state layout
(the same for saving and for verifying, so a second process reads it from the compilation
cache); `verify` says why a restored state cannot be used."""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


def _bits(x) -> jnp.ndarray:
    """The bits of every element of x as uint32 (floats bitcast, narrower types widened)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _digests(tree) -> jnp.ndarray:
    """uint32 [n]: one digest per array of a pytree, sum_i bits_i * (2654435761 i + 1) mod 2^32.
    Every factor is odd, so a change to any one element changes it; integer sums are exact, so
    the value does not depend on the sharding or the order of the reduction."""
    digests = []
    for x in jax.tree_util.tree_leaves(tree):
        bits = _bits(x).reshape(-1)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        digests.append(jnp.sum(bits * weights, dtype=jnp.uint32))
    return jnp.stack(digests) if digests else jnp.zeros((0,), jnp.uint32)


def _sum_of_squares(tree) -> jnp.ndarray:
    """float32 sum of the squares of every float array: not finite iff an entry is not (or the
    weights are so large that it overflows, which is divergence too)."""
    floats = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in floats), jnp.float32(0))


@jax.jit
def _digests_and_squares(groups: dict):
    """({name: digests} and {name: sum of squares} of every group)."""
    return ({name: _digests(tree) for name, tree in groups.items()},
            {name: _sum_of_squares(tree) for name, tree in groups.items()})


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
    """Digests, finiteness and parameter norm of a TrainState, in one compiled program."""
    digests, squares = jax.device_get(_digests_and_squares(state_groups(state)))
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
    digests, squares = jax.device_get(_digests_and_squares(dict(groups)))
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
