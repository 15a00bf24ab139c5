"""Conditions as pytrees: captions of the data sources, the train step's dropout to the null
condition (labels and text embeddings alike), and guidance that concatenates them leaf by leaf."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.data.sources import digit_captions, load_digits, load_folder
from diffusion_jax.errors import UsageError
from diffusion_jax.samplers import guided_denoise_fn
from diffusion_jax.conditions import drop_condition


def test_the_digits_carry_captions_and_folders_read_name_txt_or_captions_jsonl(tmp_path):
    data = load_digits("validation")
    assert len(data.captions) == len(data.labels)
    assert data.captions[:4] == digit_captions(data.labels[:4])
    assert digit_captions([7, 7, 7, 7]) == ["a handwritten 7", "the digit seven", "a handwritten seven", "the number 7"]
    from PIL import Image
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"img{i}.png")
    assert load_folder(str(tmp_path), 8, 3).captions is None  # no captions: an uncaptioned data set
    for i in range(3):
        (tmp_path / f"img{i}.txt").write_text(f"  caption {i}\n")
    assert load_folder(str(tmp_path), 8, 3).captions == ["caption 0", "caption 1", "caption 2"]
    (tmp_path / "img2.txt").unlink()
    with pytest.raises(UsageError, match="1 image.* have no caption"):
        load_folder(str(tmp_path), 8, 3)
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps({"file": f"img{i}.png", "text": f"row {i}"})
                                                       for i in range(3)))
    assert load_folder(str(tmp_path), 8, 3).captions == ["row 0", "row 1", "row 2"]
    for rows, words in (("not json\n", "line 1"), ('{"file": "img0.png", "text": null}\n', "string caption"),
                        ('{"file": "img0.png", "text": "a"}\n{"file": "img0.png", "text": "b"}\n', "img0.png twice")):
        (tmp_path / "captions.jsonl").write_text(rows)
        with pytest.raises(UsageError, match=words):
            load_folder(str(tmp_path), 8, 3)
    # as Windows editors write them: a byte-order mark and CRLF read as the plain file; not UTF-8 is refused
    (tmp_path / "captions.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(
        json.dumps({"file": f"img{i}.png", "text": f"row {i}"}) for i in range(3)).encode())
    assert load_folder(str(tmp_path), 8, 3).captions == ["row 0", "row 1", "row 2"]
    (tmp_path / "captions.jsonl").write_bytes(b'{"file": "img0.png", "text": "\xff"}')
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        load_folder(str(tmp_path), 8, 3)


def test_a_prompts_file_reads_as_editors_write_it(tmp_path):
    from diffusion_jax.conditions import read_values
    read_prompts = lambda path: read_values(path, "prompts")

    (tmp_path / "plain.txt").write_text("a cat\na dog\n")
    (tmp_path / "windows.txt").write_bytes(b"\xef\xbb\xbfa cat\r\na dog\r\n")
    assert read_prompts(tmp_path / "windows.txt") == read_prompts(tmp_path / "plain.txt") == ["a cat", "a dog"]
    (tmp_path / "latin1.txt").write_bytes("un caf\xe9\n".encode("latin-1"))
    with pytest.raises(UsageError, match="latin1.txt is not UTF-8 text"):
        read_prompts(tmp_path / "latin1.txt")


def test_labels_on_a_text_run_and_prompts_on_a_label_run_are_refused():
    from diffusion_jax.conditions import given_values
    from diffusion_jax.config import base_config
    text, labelled = base_config(), base_config()
    text.model.text_encoder = "random"
    labelled.data.use_labels, labelled.data.num_classes = True, 10
    with pytest.raises(UsageError, match="this run is text-conditioned .* give prompts"):
        given_values(text, labels=[3])
    with pytest.raises(UsageError, match="not text-conditioned .*: use --labels"):
        given_values(labelled, prompts=["a cat"])
    assert given_values(labelled, labels=[3, 9]).tolist() == [3, 9]
    with pytest.raises(UsageError, match=r"labels must be classes in \[0, 10\)"):
        given_values(labelled, conditions=[10])


def test_conditions_are_dropped_to_the_null_condition_per_example():
    key = jax.random.key(0)
    labels = jnp.arange(4000) % 10
    dropped = drop_condition(key, labels, 0.25, 10)
    assert abs(float(jnp.mean(dropped == 10)) - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000)
    text = jnp.ones((4000, 5, 3))
    null = jnp.zeros((1, 5, 3))
    out = drop_condition(key, text, 0.25, null)
    rows = jnp.all(out == 0, axis=(1, 2))
    np.testing.assert_array_equal(rows, dropped == 10)  # the same key drops the same examples
    assert bool(jnp.all(jnp.where(rows[:, None, None], True, out == 1)))
    pair = drop_condition(key, {"embeddings": text, "mask": jnp.ones((4000, 5))}, 0.25,
                          {"embeddings": null, "mask": jnp.zeros((1, 5))})
    np.testing.assert_array_equal(jnp.all(pair["mask"] == 0, axis=1), rows)
    assert drop_condition(key, None, 0.5, 10) is None


def test_guidance_concatenates_pytree_conditions_leaf_by_leaf():
    def model(x, t, cond):  # linear in the condition: guidance is then exact arithmetic
        return x * 0 + jnp.sum(cond["embeddings"] * cond["mask"][..., None], axis=(1, 2))[:, None]

    x, t = jnp.ones((3, 2)), jnp.zeros(3)
    cond = {"embeddings": jnp.arange(3 * 4 * 2, dtype=jnp.float32).reshape(3, 4, 2), "mask": jnp.ones((3, 4))}
    null = {"embeddings": jnp.ones((1, 4, 2)), "mask": jnp.ones((1, 4))}
    guided = guided_denoise_fn(model, cond, null, guidance_scale=3.0)(x, t)
    c, u = model(x, t, cond), model(x, t, {k: jnp.broadcast_to(v, cond[k].shape) for k, v in null.items()})
    np.testing.assert_allclose(guided, u + 3.0 * (c - u), rtol=1e-6)


def test_a_run_written_with_label_dropout_reads_as_cond_dropout(tmp_path):
    """train.label_dropout was renamed train.cond_dropout (labels or text alike): an older run's
    config.json reads under the new name."""
    from diffusion_jax.config import base_config
    from diffusion_jax.runs import load_config

    old = base_config().to_dict()
    old["train"]["label_dropout"] = old["train"].pop("cond_dropout") + 0.2
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = load_config(tmp_path)
    assert config.train.cond_dropout == 0.2 and "label_dropout" not in config.train
