"""The CLIP text encoder and tokenizer against transformers (the reference implementation, torch
CPU float32): a small randomly initialised CLIPTextModel saved with save_pretrained, its last and
penultimate hidden states and pooled output; the tokenizer's ids on 60 prompts, with SD 1.x's and
SD 2.x's pad tokens; export read back by transformers."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.errors import UsageError
from diffusion_jax.interop.clip import load_text_encoder, save_text_encoder
from diffusion_jax.interop.tokenizer import load_tokenizer
from diffusion_jax.models.text_encoder import text_embeddings
from tests.diffusers_models import write_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a photo of a cat", "A Photo Of A CAT", "a  photo\tof\n a cat", "the cat's dog", "the cat's, dog!!",
    "a painting of a horse in the style of van gogh", "an astronaut riding a horse on mars, high quality",
    "a handwritten 7", "the digit seven", "digit 1234567890", "a café in Zürich", "naïve façade, crème brûlée",
    "emoji 🐱🐶🚀", "🐱", "", " ", "...", "a-b_c/d\\e", "(high quality:1.3), [cat]", "'s 't 're 've 'm 'll 'd",
    "they're we've i'm you'll he'd", "#hashtag @mention $100 50% 3.14", "ÀÉÎÕÜ àéîõü", "ß ø å æ œ",
    "東京 タワー", "Москва", "مرحبا", "ελληνικά", "a\u0301 combining accent", "tab\tand\r\nnewlines",
    "UPPER lower MiXeD", "a photo of a cat" * 3, "cat " * 40, "digit " * 80, "a, " * 60,
    "seven.seven.seven", "dog-dog-dog", "<|endoftext|>", "a <|startoftext|> b", "the the the the",
    "horse\u00a0nbsp", "ﬁ ligature", "Ｆｕｌｌｗｉｄｔｈ", "1st 2nd 3rd", "x" * 100, "quality!!!???",
    "a photo of 1 cat and 2 dogs", "style: van gogh; painting", "mars\u200bzero width", "A", "z",
    "THE CAT'S DOG", "it's", "no ' apostrophe", "\"quoted\" text", "😀😃😄😁", "~!@#$%^&*()_+", "end.",
    "painting " * 25 + "of a cat",
]


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_the_tokenizer_gives_transformers_clip_tokenizers_ids(tmp_path, pad_token, caplog):
    write_tokenizer(tmp_path, pad_token)
    theirs = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    ours = load_tokenizer(tmp_path)
    assert len(PROMPTS) >= 50
    expected = theirs(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    with caplog.at_level(logging.WARNING):
        got = ours(PROMPTS)
    assert got.shape == (len(PROMPTS), 77) and got.dtype == np.int32
    for prompt, a, b in zip(PROMPTS, got, expected):
        assert a.tolist() == list(b), prompt
    assert sum("cut off" in r.message for r in caplog.records) == 1  # the long prompts: said once
    assert ours.pad_id == theirs.pad_token_id


def small_clip(**changes):
    changes = {"eos_token_id": 595, **changes}  # write_tokenizer's <|endoftext|>
    config = transformers.CLIPTextConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, max_position_embeddings=77, **changes)
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # layer norms away from their (1, 0) initialisation
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("changes", [{}, {"hidden_act": "gelu", "eos_token_id": 2}])
def test_the_text_encoder_is_transformers_clip_text_model(tmp_path, changes):
    vocab_size = write_tokenizer(tmp_path / "tokenizer")
    model = small_clip(**changes)
    model.save_pretrained(tmp_path / "text_encoder")
    encoder = load_text_encoder(tmp_path / "text_encoder")
    ids = load_tokenizer(tmp_path / "tokenizer")(PROMPTS[:8])
    assert ids.max() == vocab_size - 1 == 595 and vocab_size <= 600
    with torch.no_grad():
        out = model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        penultimate = model.final_layer_norm(out.hidden_states[-2]).numpy()
    last, pooled = out.last_hidden_state.numpy(), out.pooler_output.numpy()

    def close(ours, theirs):
        error = np.abs(np.asarray(ours) - theirs).max() / np.sqrt(np.mean(theirs ** 2))
        assert error <= 1e-4, error

    embed = jax.jit(text_embeddings, static_argnums=0, static_argnames="clip_skip")
    close(embed(encoder.model, encoder.params, jnp.asarray(ids)), last)
    close(embed(encoder.model, encoder.params, jnp.asarray(ids), clip_skip=1), penultimate)
    apply = jax.jit(encoder.model.apply)
    close(apply({"params": encoder.params}, jnp.asarray(ids))["pooled"], pooled)
    # padding masked as transformers masks it
    mask = (np.arange(77)[None] < 6).astype(np.int32).repeat(8, 0)
    with torch.no_grad():
        masked = model(torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask)).last_hidden_state
    close(apply({"params": encoder.params}, jnp.asarray(ids), jnp.asarray(mask))["last_hidden_state"][:, :6],
          masked.numpy()[:, :6])

    # Stable Diffusion's checkpoints name the tensors text_model.*; export writes them so, and
    # transformers reads the export back to the same outputs
    save_text_encoder(tmp_path / "exported", encoder.model, encoder.params)
    reread = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "exported")).eval()
    with torch.no_grad():
        again = reread(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    close(again, last)
    close(embed(*load_text_encoder(tmp_path / "exported")[:2], jnp.asarray(ids)), last)


def test_a_text_encoder_with_projection_is_transformers_and_gives_sdxls_embeddings(tmp_path):
    """transformers' CLIPTextModelWithProjection (SDXL's second encoder): the projected pooled
    output ("text_embeds") and the penultimate hidden state SDXL conditions on within 1e-4 x RMS;
    its export read back by transformers."""
    config = transformers.CLIPTextConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=595,
                                         projection_dim=24, hidden_act="gelu")
    torch.manual_seed(1)
    model = transformers.CLIPTextModelWithProjection(config).eval()
    model.save_pretrained(tmp_path / "text_encoder_2")
    encoder = load_text_encoder(tmp_path / "text_encoder_2")
    assert encoder.model.projection_dim == 24
    write_tokenizer(tmp_path / "tokenizer")
    ids = load_tokenizer(tmp_path / "tokenizer")(PROMPTS[:4])
    with torch.no_grad():
        out = model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    ours = jax.jit(encoder.model.apply)({"params": encoder.params}, jnp.asarray(ids))
    for mine, theirs in ((ours["text_embeds"], out.text_embeds.numpy()),
                         (ours["hidden_states"][-2], out.hidden_states[-2].numpy())):
        assert np.abs(np.asarray(mine) - theirs).max() / np.sqrt(np.mean(theirs ** 2)) <= 1e-4
    save_text_encoder(tmp_path / "exported", encoder.model, encoder.params)
    reread = transformers.CLIPTextModelWithProjection.from_pretrained(str(tmp_path / "exported")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(reread(torch.from_numpy(ids.astype(np.int64))).text_embeds.numpy(),
                                   out.text_embeds.numpy(), atol=1e-6)


def test_what_the_text_encoder_and_tokenizer_refuse(tmp_path):
    small_clip().save_pretrained(tmp_path / "te")
    config = json.loads((tmp_path / "te" / "config.json").read_text())
    (tmp_path / "te" / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(UsageError, match="hidden_act = 'relu' is not supported"):
        load_text_encoder(tmp_path / "te")
    (tmp_path / "te" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    with pytest.raises(UsageError, match="missing tensor encoder.layers.3"):
        load_text_encoder(tmp_path / "te")
    with pytest.raises(FileNotFoundError, match="no vocab.json and merges.txt"):
        load_tokenizer(tmp_path / "te")
    write_tokenizer(tmp_path / "tok")
    with pytest.raises(UsageError, match="a prompt must be a string"):
        load_tokenizer(tmp_path / "tok")(["a cat", 7])
