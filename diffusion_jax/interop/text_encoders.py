"""A text encoder source as its frozen CLIP text encoder and tokenizer: the directory (or Hub id)
of a Stable Diffusion pipeline, holding text_encoder/ and tokenizer/, or "random" (a small random
encoder that needs no download, for offline experiments and tests).

    encoder, tokenizer = text_encoder_parts("runwayml/stable-diffusion-v1-5")
"""
from __future__ import annotations

import functools
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.interop import files
from diffusion_jax.interop.clip import TextEncoder, load_text_encoder
from diffusion_jax.interop.tokenizer import BOS, EOS, CLIPTokenizer, byte_characters, clip_bpe, load_tokenizer
from diffusion_jax.models.text_encoder import CLIPTextEncoder

RANDOM = "random"  # model.text_encoder = "random": a small frozen random encoder (offline experiments)
RANDOM_WIDTH = 64


def character_vocabulary() -> dict:
    """{token: id} of a character-level CLIP vocabulary: every byte a token, alone or ending a word
    ("</w>"), then <|startoftext|> and <|endoftext|> (514 tokens, no merges)."""
    chars = byte_characters()
    return {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + [BOS, EOS])}


def character_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer of `character_vocabulary` (no download needed)."""
    return CLIPTokenizer(clip_bpe(character_vocabulary(), [], EOS))


def random_text_encoder() -> tuple[TextEncoder, CLIPTokenizer]:
    """The character-level CLIP tokenizer and a 2-layer, 64-wide CLIPTextEncoder initialised from
    seed 0. Prompts that differ give different embeddings; the denoiser learns what they mean."""
    vocab = character_vocabulary()
    model = CLIPTextEncoder(vocab_size=len(vocab), hidden_size=RANDOM_WIDTH, intermediate_size=2 * RANDOM_WIDTH,
                            num_layers=2, num_heads=4, eos_token_id=vocab[EOS])
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"]
    return TextEncoder(model, params, {}), character_tokenizer()


def load_text_encoder_parts(directory) -> tuple[TextEncoder, CLIPTokenizer]:
    """The text encoder and tokenizer of a pipeline directory (its text_encoder/ and tokenizer/)."""
    directory = pathlib.Path(directory)
    for part in ("text_encoder", "tokenizer"):
        if not (directory / part).is_dir():
            raise FileNotFoundError(f"{directory} has no {part}/ folder: give the directory of a Stable Diffusion "
                                    "pipeline (text_encoder/ and tokenizer/)")
    return load_text_encoder(directory / "text_encoder"), load_tokenizer(directory / "tokenizer")


@functools.lru_cache(maxsize=4)
def text_encoder_parts(source: str) -> tuple[TextEncoder, CLIPTokenizer]:
    """(TextEncoder, CLIPTokenizer) of a source ("random", a directory or a Hub id), loaded once
    per process."""
    return random_text_encoder() if source == RANDOM else load_text_encoder_parts(files.resolve(source))


class SecondTextEncoder(NamedTuple):
    """SDXL's second text encoder (CLIPTextModelWithProjection) and tokenizer, and whether the pipeline
    guides against zero embeddings when no negative prompt is given (`force_zeros_for_empty_prompt`)."""

    encoder: TextEncoder
    tokenizer: CLIPTokenizer
    force_zeros_for_empty_prompt: bool


def load_second_text_encoder(directory, index: dict) -> SecondTextEncoder:
    """The text_encoder_2/ and tokenizer_2/ of an SDXL pipeline's directory, with `index`'s (its
    model_index.json's) force_zeros_for_empty_prompt (True, SDXL's default, when absent)."""
    directory = pathlib.Path(directory)
    for part in ("text_encoder_2", "tokenizer_2"):
        if not (directory / part).is_dir():
            raise FileNotFoundError(f"{directory} has no {part}/ folder: give the directory of an SDXL pipeline")
    return SecondTextEncoder(load_text_encoder(directory / "text_encoder_2"), load_tokenizer(directory / "tokenizer_2"),
                             bool(index.get("force_zeros_for_empty_prompt", True)))


@functools.lru_cache(maxsize=4)
def second_text_encoder_parts(source: str) -> SecondTextEncoder:
    """`load_second_text_encoder` of a source (an SDXL pipeline's directory or Hub id), loaded once per
    process."""
    from diffusion_jax.files import read_json_object

    directory = files.resolve(source)
    index = directory / "model_index.json"
    return load_second_text_encoder(directory, read_json_object(index, "give the pipeline's model_index.json intact")
                                    if index.exists() else {})
