"""The CLIP tokenizer of a pipeline's tokenizer/ folder (vocab.json, merges.txt and, when present,
special_tokens_map.json / tokenizer_config.json), built with the `tokenizers` library as
transformers' CLIPTokenizer builds it: NFC, whitespace runs to one space, lower case; split into
words, numbers and punctuation; byte-level BPE with "</w>" ending each word; <|startoftext|> and
<|endoftext|> around the ids; padded (with the pad token: <|endoftext|> for SD 1.x, "!" for
SD 2.x) or truncated to `model_max_length` (77) ids, as Stable Diffusion pipelines call it.
"""
from __future__ import annotations

import json
import logging
import pathlib

import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.files import read_json_object

log = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token(value, default: str) -> str:
    """A special token as special_tokens_map.json writes it: a string or {"content": ...}."""
    if value is None:
        return default
    return value["content"] if isinstance(value, dict) else str(value)


class CLIPTokenizer:
    """prompts (a string or a list of them) -> int32 ids [B, max_length]; `untruncated(prompt)`
    the ids without padding or truncation."""

    def __init__(self, vocab: dict, merges: list, *, pad_token: str = EOS, max_length: int = 77):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        for token in (BOS, EOS, pad_token):
            if token not in vocab:
                raise UsageError(f"the tokenizer's vocab.json has no {token!r}: give a CLIP tokenizer's vocabulary")
        self.max_length, self.pad_token = int(max_length), pad_token
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]
        bpe = BPE(vocab=vocab, merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges],
                  continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS)
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(dict.fromkeys([BOS, EOS, pad_token])))  # matched whole, before BPE (transformers)
        tok.post_processor = processors.RobertaProcessing((EOS, self.eos_id), (BOS, self.bos_id), False, False)
        self._tokenizer = tok
        self._warned = False

    def untruncated(self, prompt: str) -> list:
        return self._tokenizer.encode(prompt).ids

    def __call__(self, prompts) -> np.ndarray:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = []
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise UsageError(f"a prompt must be a string, got {type(prompt).__name__} {prompt!r}")
            ids = self.untruncated(prompt)
            if len(ids) > self.max_length:
                if not self._warned:
                    cut = self._tokenizer.decode(ids[self.max_length - 1:-1]).replace("</w>", " ").strip()
                    log.warning("a prompt is longer than the text encoder's %d tokens; cut off: %r (said once)",
                                self.max_length, cut)
                    self._warned = True
                ids = ids[:self.max_length - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return np.asarray(rows, np.int32).reshape(len(prompts), self.max_length)


def load_tokenizer(directory) -> CLIPTokenizer:
    """The CLIP tokenizer of a tokenizer/ folder (vocab.json, merges.txt; pad token and maximum
    length from special_tokens_map.json and tokenizer_config.json when they are there)."""
    directory = pathlib.Path(directory)
    for name in ("vocab.json", "merges.txt"):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory} has no {name}: a CLIP tokenizer folder holds vocab.json and "
                                    "merges.txt")
    vocab = read_json_object(directory / "vocab.json", "give the tokenizer's vocab.json intact")
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    settings = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (directory / name).exists():
            settings.update(json.loads((directory / name).read_text(encoding="utf-8")))
    max_length = settings.get("model_max_length", 77)
    if not isinstance(max_length, int) or max_length > 10_000:  # transformers' "no limit" is a huge number
        max_length = 77
    return CLIPTokenizer(vocab, merges, pad_token=_token(settings.get("pad_token"), EOS), max_length=max_length)
