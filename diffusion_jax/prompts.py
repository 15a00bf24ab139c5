"""A text-conditioned run's prompts as conditions: its text encoder and tokenizer (the
`model.text_encoder` directory: a Stable Diffusion pipeline's, holding text_encoder/ and
tokenizer/), loaded once per process and frozen.

    encode = prompt_encoder(config)
    cond = encode(["a photo of a cat"])         # text embeddings [B, 77, D]
    null = encode([""])                         # the null condition: the empty prompt
"""
from __future__ import annotations

import functools
import pathlib
from typing import Callable

import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError


def text_encoder_source(config) -> str:
    """The run's text encoder directory ("" for a run without text conditioning)."""
    return str(config.model.get("text_encoder", "") or "")


@functools.lru_cache(maxsize=4)
def _load(source: str, clip_skip: int) -> Callable:
    from diffusion_jax.interop import files
    from diffusion_jax.interop.clip import load_text_encoder
    from diffusion_jax.interop.pipeline import _encode
    from diffusion_jax.interop.tokenizer import load_tokenizer

    directory = files.resolve(source)
    for part in ("text_encoder", "tokenizer"):
        if not (pathlib.Path(directory) / part).is_dir():
            raise FileNotFoundError(f"model.text_encoder = {source!r} has no {part}/ folder: give the directory of a "
                                    "Stable Diffusion pipeline (text_encoder/ and tokenizer/)")
    encoder = load_text_encoder(directory / "text_encoder")
    tokenizer = load_tokenizer(directory / "tokenizer")
    encode = _encode(encoder.model, clip_skip)
    return lambda prompts: encode(encoder.params, jnp.asarray(tokenizer(prompts)))


def prompt_encoder(config) -> Callable:
    """prompts (a list of strings) -> text embeddings [B, L, D] (float32, on device)."""
    source = text_encoder_source(config)
    if not source:
        raise UsageError("prompts given, but this run is not text-conditioned (model.text_encoder is unset): "
                         "use --labels for a class-conditional run, or nothing")
    return _load(source, int(config.model.get("clip_skip", 0) or 0))


def read_prompts(path) -> list:
    """The prompts of a text file, one a line (blank lines skipped); an empty file is an error."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file {path}: give a text file with one prompt a line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"the prompts file {path} holds no prompt: write one prompt a line")
    return prompts


def prompts_by_index(prompts, index: np.ndarray) -> list:
    """Sample i's prompt: prompts[i % len(prompts)]."""
    return [prompts[int(i) % len(prompts)] for i in index]
