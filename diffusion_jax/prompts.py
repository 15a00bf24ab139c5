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

from diffusion_jax.builders import num_model_classes
from diffusion_jax.conditioning import text_encoder_source
from diffusion_jax.errors import UsageError


RANDOM = "random"  # model.text_encoder = "random": a small frozen random encoder (offline experiments)
RANDOM_WIDTH = 64


def byte_characters() -> list:
    """The 256 printable characters byte-level BPE writes bytes as (GPT-2's table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def random_text_encoder():
    """(TextEncoder, CLIPTokenizer): a character-level CLIP tokenizer (every byte a token, no
    merges) and a 2-layer, 64-wide CLIPTextEncoder initialised from seed 0, frozen. A text
    condition that needs no download: prompts that differ give different embeddings, and the
    denoiser learns what they mean."""
    import jax

    from diffusion_jax.interop.clip import TextEncoder
    from diffusion_jax.interop.tokenizer import BOS, EOS, CLIPTokenizer, clip_bpe
    from diffusion_jax.models.text_encoder import CLIPTextEncoder

    chars = byte_characters()
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + [BOS, EOS])}
    model = CLIPTextEncoder(vocab_size=len(vocab), hidden_size=RANDOM_WIDTH, intermediate_size=2 * RANDOM_WIDTH,
                            num_layers=2, num_heads=4, eos_token_id=vocab[EOS])
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 77), jnp.int32))["params"]
    return TextEncoder(model, params, {}), CLIPTokenizer(clip_bpe(vocab, [], EOS))


@functools.lru_cache(maxsize=4)
def text_encoder_parts(source: str):
    """(TextEncoder, CLIPTokenizer) of a text encoder source, loaded once per process."""
    if source == RANDOM:
        return random_text_encoder()
    from diffusion_jax.interop import files
    from diffusion_jax.interop.clip import load_text_encoder
    from diffusion_jax.interop.tokenizer import load_tokenizer

    directory = files.resolve(source)
    for part in ("text_encoder", "tokenizer"):
        if not (pathlib.Path(directory) / part).is_dir():
            raise FileNotFoundError(f"model.text_encoder = {source!r} has no {part}/ folder: give the directory of a "
                                    "Stable Diffusion pipeline (text_encoder/ and tokenizer/)")
    return load_text_encoder(directory / "text_encoder"), load_tokenizer(directory / "tokenizer")


def _tokenizer(source: str):
    return text_encoder_parts(source)[1]


def _ids_encoder(source: str, clip_skip: int) -> Callable:
    """ids int32 [B, L] -> embeddings [B, L, D] (jitted; the parameters an argument, not constants)."""
    from diffusion_jax.models.text_encoder import compiled_text_embeddings

    encoder = text_encoder_parts(source)[0]
    encode = compiled_text_embeddings(encoder.model, clip_skip)
    return lambda ids: encode(encoder.params, jnp.asarray(ids))


def _load(source: str, clip_skip: int) -> Callable:
    encode_ids = _ids_encoder(source, clip_skip)
    tokenizer = _tokenizer(source)
    return lambda prompts: encode_ids(tokenizer(prompts))


def prompt_encoder(config) -> Callable:
    """prompts (a list of strings) -> text embeddings [B, L, D] (float32, on device)."""
    source = text_encoder_source(config)
    if not source:
        raise UsageError("prompts given, but this run is not text-conditioned (model.text_encoder is unset): "
                         "use --labels for a class-conditional run, or nothing")
    return _load(source, int(config.model.get("clip_skip", 0) or 0))


def null_condition(config, negative_prompt: str = ""):
    """The condition guidance contrasts with and the train step drops to: the embeddings [1, L, D]
    of the negative (default empty) prompt for a text run, else the null label (the class count)."""
    if text_encoder_source(config):
        return prompt_encoder(config)([negative_prompt or ""])
    return np.int32(num_model_classes(config))


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


def caption_ids(config, data) -> np.ndarray:
    """int32 [N, L]: the tokenized captions of a split (`data.captions`), for a text-conditioned
    run's batches; a split without captions is an error naming what to give."""
    if data.captions is None:
        raise UsageError(f"this run is text-conditioned (model.text_encoder) but data {config.data.name!r} has no "
                         "captions: give a folder with NAME.txt beside each image (or captions.jsonl), or the digits")
    return np.asarray(_tokenizer(text_encoder_source(config))(list(data.captions)), np.int32)


EMBEDDINGS_IN_MEMORY = 256 * 2 ** 20  # bytes: a split's caption embeddings computed once below this


def caption_conditions(config, data) -> tuple[np.ndarray, bool]:
    """(per-example conditions of a split, whether they are embeddings already): the frozen text
    encoder's embeddings [N, L, D] of every caption, computed once, when they fit in
    EMBEDDINGS_IN_MEMORY; else the caption ids [N, L], encoded a batch at a time (`TextBatches`)."""
    ids = caption_ids(config, data)
    source, skip = text_encoder_source(config), int(config.model.get("clip_skip", 0) or 0)
    width = text_encoder_parts(source)[0].model.hidden_size
    if ids.size * width * 4 > EMBEDDINGS_IN_MEMORY:
        return ids, False
    encode = _ids_encoder(source, skip)
    return np.concatenate([np.asarray(encode(ids[i:i + 256])) for i in range(0, len(ids), 256)]), True


class TextBatches:
    """Batch i of a `data.pipeline.Batches` (or `latents.LatentBatches`) whose "cond" holds caption
    ids, with them turned into the frozen text encoder's embeddings [b, L, D]."""

    def __init__(self, batches, config):
        self.batches = batches
        self.encode_ids = _ids_encoder(text_encoder_source(config), int(config.model.get("clip_skip", 0) or 0))

    def __call__(self, step: int) -> dict:
        batch = dict(self.batches(step))
        batch["cond"] = np.asarray(self.encode_ids(batch["cond"]))
        return batch
