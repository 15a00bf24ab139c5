"""Programs kept for the life of the process: a function of hashable settings (modules, shapes,
sampler options) that builds a jitted program, or traces one (a module's parameter shapes), is
memoised, so that making the same program again -- a pipeline loaded again, another generator with
the same settings, a sweep -- traces and compiles nothing. Arrays that decide a program (a
process's schedule) take part as `ByContent`."""
from __future__ import annotations

import functools
import hashlib
from typing import Callable

import jax
import numpy as np


class ByContent:
    """A pytree of arrays (a process, a schedule) as a memo key: hashed and compared by its
    structure and values; `tree` is the pytree itself."""

    def __init__(self, tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        digest = hashlib.sha256(str(treedef).encode())
        for leaf in leaves:
            value = np.asarray(leaf)
            digest.update(f"{value.dtype}{value.shape}".encode() + value.tobytes())
        self.tree, self.digest = tree, digest.hexdigest()

    def __hash__(self):
        return hash(self.digest)

    def __eq__(self, other):
        return isinstance(other, ByContent) and other.digest == self.digest


def kept(maxsize: int) -> Callable:
    """`functools.lru_cache(maxsize)` for a builder whose arguments may be unhashable (a module with
    a list field, an option given as a list): those calls build anew instead of failing."""
    def wrap(build: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(build)

        @functools.wraps(build)
        def call(*args):
            try:
                hash(args)
            except TypeError:
                return build(*args)
            return cached(*args)

        call.cache_info, call.cache_clear = cached.cache_info, cached.cache_clear
        return call
    return wrap
