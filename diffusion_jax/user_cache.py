"""The user's cache directory for what diffusion_jax computes once and keeps (compiled programs,
the digits classifier): $XDG_CACHE_HOME/diffusion_jax, else ~/.cache/diffusion_jax. Anything in
it may be deleted at any time; it is made again when needed."""
from __future__ import annotations

import os
import pathlib


def user_cache_dir() -> pathlib.Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "diffusion_jax"
