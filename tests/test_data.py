"""Data: digits split, deterministic per-process batches, really random flips, tfds under
mock_data, image folders."""
import numpy as np
import pytest

from diffusion_jax.data import Batches, load_digits, load_split
from diffusion_jax.config import base_config


def test_digits_split_is_fixed_and_disjoint():
    train, val = load_digits("train"), load_digits("validation")
    assert train.images.shape == (1497, 8, 8, 1) and val.images.shape == (300, 8, 8, 1)
    assert train.images.dtype == np.uint8  # held as uint8, converted a batch at a time (4x less memory)
    floats = train.model_range()
    assert floats.dtype == np.float32 and floats.min() == -1.0 and floats.max() == 1.0
    rows = lambda d: {r.tobytes() for r in d.images}
    assert len(rows(train) & rows(val)) < 10  # a few digits are pixel-identical duplicates
    np.testing.assert_array_equal(load_digits("validation").labels, val.labels)
    assert set(val.labels.tolist()) == set(range(10))
    # read from the file scikit-learn ships, without importing it: its loader's numbers
    from sklearn.datasets import load_digits as sk_digits
    from diffusion_jax.data.sources import digits_table
    pixels, digits = digits_table()
    np.testing.assert_array_equal(pixels, sk_digits().images)
    np.testing.assert_array_equal(digits, sk_digits().target)


def test_batches_are_a_function_of_the_step_and_processes_split_them():
    data = load_digits("train")
    whole = Batches(data, 32, seed=3, random_flip=True, conditions=data.labels)
    halves = [Batches(data, 32, seed=3, process_index=p, process_count=2, random_flip=True,
                      conditions=data.labels) for p in range(2)]
    for step in (0, 5, 46, 47, 1000):  # 46 batches an epoch: 46 and 47 are in the next epoch
        b = whole(step)
        np.testing.assert_array_equal(np.concatenate([h(step)["image"] for h in halves]), b["image"])
        np.testing.assert_array_equal(whole(step)["image"], b["image"])  # recomputable
    assert not np.array_equal(whole(0)["image"], whole(1)["image"])
    # Every image appears once per epoch.
    seen = np.concatenate([whole(s)["cond"] for s in range(whole.batches_per_epoch)])
    assert len(seen) == 46 * 32


def test_random_flips_are_random_per_example():
    data = load_digits("train")
    plain = Batches(data, 64, seed=0)
    flipped = Batches(data, 64, seed=0, random_flip=True)
    a, b = plain(7)["image"], flipped(7)["image"]
    is_flipped = [np.array_equal(b[i], a[i, :, ::-1]) and not np.array_equal(a[i], a[i, :, ::-1])
                  for i in range(64)]
    unchanged = [np.array_equal(b[i], a[i]) for i in range(64)]
    assert 10 < sum(is_flipped) < 54 and all(f or u for f, u in zip(is_flipped, unchanged))


def test_bad_batch_settings():
    data = load_digits("validation")
    with pytest.raises(ValueError, match="not divisible by the process count"):
        Batches(data, 30, seed=0, process_count=4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        Batches(data, 512, seed=0)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_digits("dev")


@pytest.mark.parametrize("name,shape,size", [("mnist", (28, 28, 1), 28), ("cifar10", (32, 32, 3), 32),
                                             ("mnist:3.*.*", (28, 28, 1), 8)])  # a version, as tfds names it
def test_tfds_under_mock_data(name, shape, size):
    tfds = pytest.importorskip("tensorflow_datasets")
    c = base_config().data
    c.name, c.image_size, c.channels = name, size, shape[-1]
    with tfds.testing.mock_data(num_examples=24):
        data = load_split(c, "train")
        half = load_split(c, "train", process_index=1, process_count=2)
    assert data.images.shape == (24, size, size, shape[-1]) and data.labels.shape == (24,)
    assert data.images.dtype == np.uint8 and data.model_range().dtype == np.float32
    # mock_data serves num_examples for any split, so only the shard's shape can be checked.
    assert half.images.shape[1:] == (size, size, shape[-1])


def test_folder_source(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    c = base_config().data
    c.name, c.image_size, c.channels = f"folder:{tmp_path}", 16, 3
    data = load_split(c, "train")
    assert data.images.shape == (3, 16, 16, 3)
    with pytest.raises(ValueError, match="does not exist"):
        c.name = f"folder:{tmp_path}/missing"
        load_split(c, "train")


def test_folder_images_of_16_bits_are_scaled_not_clipped(tmp_path):
    from PIL import Image
    gray16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # up to 63,000 of 65,535
    Image.fromarray(gray16).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    c = base_config().data
    c.name, c.image_size, c.channels = f"folder:{tmp_path}", 8, 1
    data = load_split(c, "train")
    expected = np.round(gray16 / 65535 * 255) / 127.5 - 1  # the same brightness in 8 bits
    np.testing.assert_allclose(data.model_range()[0, ..., 0], expected, atol=1e-6)
    assert data.model_range().max() < 1.0  # not all white, as an 8-bit clip made it


def test_tfds_captions_under_mock_data(tmp_path):
    """data.caption_feature: a nested text feature (coco_captions' first caption), a ClassLabel's
    class names, kept by `prepare`; a feature the data set lacks, or captions asked of a
    non-tfds source, are errors naming the fix."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from diffusion_jax import cli
    from diffusion_jax.errors import UsageError
    c = base_config().data
    c.name, c.image_size, c.channels, c.caption_feature = "coco_captions", 16, 3, "captions/text"
    with tfds.testing.mock_data(num_examples=6):
        data = load_split(c, "train")
        texts = [ex["captions"]["text"] for ex in tfds.as_numpy(tfds.load("coco_captions", split="train"))]
        cli.main(["prepare", "--dataset", "coco_captions", "--caption_feature", "captions/text", "--image_size", "16",
                  "--out", str(tmp_path / "coco")])
        c10 = base_config().data
        c10.name, c10.image_size, c10.channels, c10.caption_feature = "cifar10", 32, 3, "label"
        labelled = load_split(c10, "train")
        names = tfds.builder("cifar10").info.features["label"].names
        c.caption_feature = "caption"
        with pytest.raises(UsageError, match="'caption' is not a feature of 'coco_captions'.*captions/text"):
            load_split(c, "train")
    assert data.images.shape == (6, 16, 16, 3)
    assert data.captions == [t[0].decode("utf-8") if len(t) else "" for t in texts] and any(data.captions)
    assert labelled.captions == [names[y] for y in labelled.labels]
    prepared = base_config().data
    prepared.name, prepared.image_size, prepared.channels = f"array_record:{tmp_path / 'coco'}", 16, 3
    assert load_split(prepared, "train").captions == data.captions
    digits = base_config().data
    digits.caption_feature = "label"
    with pytest.raises(UsageError, match="not a tfds data set: .* unset data.caption_feature"):
        load_split(digits, "train")


def test_a_tfds_failure_names_its_cause(monkeypatch):
    """Not "the network" for everything: tensorflow-datasets not installed, a module a builder
    needs, an unknown split and a missing prepared copy each say what they are."""
    import sys

    from diffusion_jax.data.sources import _load_failure, _tfds
    from diffusion_jax.errors import UsageError

    missing = ModuleNotFoundError("No module named 'pycocotools'", name="pycocotools")
    assert isinstance(_load_failure("coco", "train", missing), UsageError)
    assert "pip install pycocotools" in str(_load_failure("coco", "train", missing))
    unknown = ValueError('Unknown split "validation". Should be one of [\'test\', \'train\'].')
    assert "has no split 'validation'" in str(_load_failure("mnist", "validation", unknown))
    absent = _load_failure("mnist", "train", OSError("not found in /data"))
    assert isinstance(absent, FileNotFoundError) and "data.data_dir" in str(absent)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(UsageError, match=r"pip install 'diffusion_jax\[data\]'"):
        _tfds("mnist")


def test_a_renamed_setting_is_not_logged_as_a_change(tmp_path):
    import json

    from diffusion_jax.workdir import write_config

    old = base_config().to_dict()
    old["train"]["label_dropout"] = old["train"].pop("cond_dropout")
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert write_config(tmp_path, base_config(), 10) == []
