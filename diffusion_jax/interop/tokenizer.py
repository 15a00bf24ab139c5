"""The CLIP tokenizer of a pipeline's tokenizer/ folder (vocab.json and merges.txt, or the
tokenizer.json transformers 5 writes; special_tokens_map.json / tokenizer_config.json when
present), built with the `tokenizers` library as
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
from diffusion_jax.files import read_json_object, read_text

log = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


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


def _token(value, default: str) -> str:
    """A special token as special_tokens_map.json writes it: a string or {"content": ...}."""
    if value is None:
        return default
    return value["content"] if isinstance(value, dict) else str(value)


class CLIPTokenizer:
    """prompts (a string or a list of them) -> int32 ids [B, max_length]; `untruncated(prompt)`
    the ids without padding or truncation."""

    def __init__(self, tokenizer, *, pad_token: str = EOS, max_length: int = 77):
        ids = {token: tokenizer.token_to_id(token) for token in (BOS, EOS, pad_token)}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise UsageError(f"the tokenizer has no {missing[0]!r}: give a CLIP tokenizer's vocabulary")
        self.max_length, self.pad_token = int(max_length), pad_token
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[pad_token]
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self._warned = False

    @property
    def vocab_size(self) -> int:
        """How many ids the tokenizer gives (its added tokens included)."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

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


def clip_bpe(vocab: dict, merges: list, pad_token: str = EOS):
    """A `tokenizers.Tokenizer` built as transformers' CLIPTokenizer builds it (module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    for token in (BOS, EOS, pad_token):
        if token not in vocab:
            raise UsageError(f"the tokenizer's vocab.json has no {token!r}: give a CLIP tokenizer's vocabulary")
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
    tok.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]), False, False)
    return tok


def save_tokenizer(directory, tokenizer: CLIPTokenizer) -> pathlib.Path:
    """A tokenizer/ folder transformers' CLIPTokenizer and `load_tokenizer` read: tokenizer.json
    and tokenizer_config.json (its special tokens and maximum length)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer._tokenizer.save(str(directory / "tokenizer.json"))
    settings = {"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.max_length, "bos_token": BOS,
                "eos_token": EOS, "unk_token": EOS, "pad_token": tokenizer.pad_token}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return directory


def load_tokenizer(directory) -> CLIPTokenizer:
    """The CLIP tokenizer of a tokenizer/ folder (vocab.json and merges.txt, else tokenizer.json;
    pad token and maximum length from special_tokens_map.json and tokenizer_config.json)."""
    directory = pathlib.Path(directory)
    settings = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (directory / name).exists():
            settings.update(read_json_object(directory / name, f"give the tokenizer's {name} intact"))
    max_length = settings.get("model_max_length", 77)
    if not isinstance(max_length, int) or max_length > 10_000:  # transformers' "no limit" is a huge number
        max_length = 77
    pad_token = _token(settings.get("pad_token"), EOS)
    if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        vocab = read_json_object(directory / "vocab.json", "give the tokenizer's vocab.json intact")
        lines = read_text(directory / "merges.txt", "the tokenizer's merges.txt").splitlines()
        tokenizer = clip_bpe(vocab, [line for line in lines if line and not line.startswith("#version")], pad_token)
    elif (directory / "tokenizer.json").exists():
        from tokenizers import Tokenizer
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as error:
            raise UsageError(f"{directory / 'tokenizer.json'} could not be read ({error}): give it intact") from None
    else:
        raise FileNotFoundError(f"{directory} has no vocab.json and merges.txt (nor a tokenizer.json): "
                                "a CLIP tokenizer folder holds them")
    return CLIPTokenizer(tokenizer, pad_token=pad_token, max_length=max_length)
