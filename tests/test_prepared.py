"""Prepared data (ArrayRecord shards read through grain): the same batches as the in-memory
path, per-process halves, training and resuming from them, `prepare` killed and resumed, and the
errors a user meets."""
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("grain")
pytest.importorskip("array_record")

from diffusion_jax.data import Batches, load_split  # noqa: E402
from diffusion_jax.data.prepare import prepare  # noqa: E402
from diffusion_jax.config import base_config  # noqa: E402
from tests.train_helpers import state_arrays, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

SHARD = 200  # digits train: 1,497 images in 8 shards, the last one short


def _digits(image_size=8):
    c = base_config().data
    c.name, c.image_size, c.channels = "digits", image_size, 1
    return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    for split in ("train", "validation"):
        prepare(_digits(), split, root, shard_size=SHARD, progress=False)
    return root


def _streamed(root):
    c = _digits()
    c.name = f"array_record:{root}"
    return c


def test_prepared_batches_equal_the_in_memory_batches(prepared):
    memory, streamed = load_split(_digits(), "train"), load_split(_streamed(prepared), "train")
    assert len(streamed.images) == len(memory.images) == 1497
    np.testing.assert_array_equal(streamed.labels, memory.labels)
    assert streamed.captions == memory.captions and memory.captions[0].startswith("a handwritten")  # kept
    np.testing.assert_array_equal(streamed.images[np.array([0, 5, 1496])], memory.images[[0, 5, 1496]])
    for count in (1, 2):
        for p in range(count):
            a = Batches(memory, 32, seed=7, process_index=p, process_count=count, random_flip=True,
                        conditions=memory.labels)
            b = Batches(streamed, 32, seed=7, process_index=p, process_count=count, random_flip=True,
                        conditions=streamed.labels)
            for step in (0, 3, 46, 1000):  # the same order and flips, across epochs
                x, y = a(step), b(step)
                np.testing.assert_array_equal(x["image"], y["image"])
                np.testing.assert_array_equal(x["cond"], y["cond"])


READER = """
import sys
import numpy as np
from diffusion_jax.data import Batches, load_split
from diffusion_jax.config import base_config
c = base_config().data
c.name, c.image_size, c.channels = "array_record:" + sys.argv[1], 8, 1
p = int(sys.argv[2])
data = load_split(c, "train", p, 2)
batches = Batches(data, 64, seed=11, process_index=p, process_count=2, random_flip=True, conditions=data.labels)
np.savez(sys.argv[3], **{f"{k}{s}": v for s in (0, 9, 30) for k, v in batches(s).items()})
"""


def test_two_processes_each_read_their_half_of_every_global_batch(prepared, tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(prepared), str(p), str(tmp_path / f"{p}.npz")],
                              stderr=subprocess.PIPE, text=True) for p in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    halves = [np.load(tmp_path / f"{p}.npz") for p in range(2)]
    data = load_split(_streamed(prepared), "train")
    whole = Batches(data, 64, seed=11, random_flip=True, conditions=data.labels)
    for step in (0, 9, 30):
        expected = whole(step)
        for key in ("image", "cond"):
            parts = [h[f"{key}{step}"] for h in halves]
            assert len(parts[0]) == len(parts[1]) == 32
            np.testing.assert_array_equal(np.concatenate(parts), expected[key])


def test_a_run_trains_from_prepared_data_and_resumes_bitwise_as_the_in_memory_run(prepared, tmp_path):
    from diffusion_jax.training import train
    # test_training's resume test's run (its programs come from the compile cache), from prepared data
    straight = train(tiny_config(20), tmp_path / "memory")
    streamed = tiny_config(20, **{"data.name": f"array_record:{prepared}"})
    train(streamed, tmp_path / "streamed", stop_after=10)
    resumed = train(streamed, tmp_path / "streamed")
    a, b = state_arrays(straight), state_arrays(resumed)
    assert int(resumed.step) == 20 and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_readme_prepare_commands(tmp_path, capsys):
    """The README's `prepare` lines through the CLI (its `train` line is the run above, through the API:
    the same data.name; compiling another model here would cost CI time for nothing new)."""
    from diffusion_jax import cli
    out = tmp_path / "data" / "digits"
    for split in ("train", "validation"):
        cli.main(["prepare", "--dataset", "digits", "--split", split, "--image_size", "8", "--channels", "1",
                  "--out", str(out)])
    printed = capsys.readouterr().out
    assert "prepared 1497 images (8x8x1, 1 shards)" in printed and "prepared 300 images" in printed
    assert len(load_split(_streamed(out), "validation").images) == 300


def test_a_tfds_split_is_prepared_from_its_own_reader(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    c = base_config().data
    c.name, c.image_size, c.channels = "cifar10", 32, 3
    with tfds.testing.mock_data(num_examples=24):  # mock_data ignores slicing: one shard holds the split
        done = prepare(c, "train", tmp_path, shard_size=100, progress=False)
    assert done["count"] == 24 and done["shards"] == [[0, 23]]
    c.name = f"array_record:{tmp_path}"
    data = load_split(c, "train")
    assert data.images[np.arange(24)].shape == (24, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.shape == (24,)


KILLER = """
import os, signal, sys
from diffusion_jax import shards
from diffusion_jax.data.prepare import prepare
from diffusion_jax.config import base_config
calls, original = [0], shards.ShardDir.write_file
def write_file(self, first, last, fill, **extra):
    calls[0] += 1
    if calls[0] == 3:  # the third shard half written under its temporary name
        fill(self.path(first, last).with_name("." + self.path(first, last).name + ".1.tmp"))
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, first, last, fill, **extra)
shards.ShardDir.write_file = write_file
c = base_config().data
c.name, c.image_size, c.channels = "digits", 8, 1
prepare(c, "train", sys.argv[1], shard_size=200, progress=False)
"""


def test_prepare_killed_mid_shard_completes_on_rerun_and_refuses_other_settings(prepared, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "train" / "prepared.json").exists() and len(list((out / "train").glob("*.array_record"))) == 2
    with pytest.raises(ValueError, match="not completely prepared.*run the same prepare command again"):
        load_split(_streamed(out), "train")
    done = prepare(_digits(), "train", out, shard_size=SHARD, progress=False)
    assert len(done["shards"]) == 8
    for name in sorted(p.name for p in (prepared / "train").iterdir()):  # byte for byte the uninterrupted result
        assert (out / "train" / name).read_bytes() == (prepared / "train" / name).read_bytes(), name
    with pytest.raises(ValueError, match=r"holds a prepared split with other settings \(image_size was 8, now 16"):
        prepare(_digits(16), "train", out, shard_size=SHARD, progress=False)


def test_missing_or_truncated_shards_a_size_mismatch_and_an_empty_directory_are_named(prepared, tmp_path):
    import shutil
    with pytest.raises(FileNotFoundError, match="no prepared split in .*prepare it first"):
        load_split(_streamed(tmp_path / "empty"), "train")
    wrong = _streamed(prepared)
    wrong.image_size = 16
    with pytest.raises(ValueError, match="holds 8x8x1 images but the config asks for 16x16x1"):
        load_split(wrong, "train")
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / "train" / "images_00000200_00000399.array_record"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match="shard images_00000200_00000399.array_record .* is truncated"):
        load_split(_streamed(copy), "train")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard images_00000200_00000399.array_record .* is missing"):
        load_split(_streamed(copy), "train")
    assert json.loads((prepared / "train" / "prepared.json").read_text())["count"] == 1497



def test_a_damaged_shard_stops_training_with_its_name_and_prepare_remakes_it(prepared, tmp_path, capsys):
    # Was: training crashed mid-run with a Riegeli hash-mismatch traceback naming no shard.
    import shutil

    from diffusion_jax import cli
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / "train" / "images_00000200_00000399.array_record"
    data = bytearray(shard.read_bytes())
    for i in range(6000, 6064):  # in the records' chunks (the file is padded), same size: only checksums tell
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    images, _ = load_split(_streamed(copy), "train").images, None
    with pytest.raises(ValueError, match="prepared shard images_00000200_00000399.array_record in .* is damaged .* "
                                         "run the same prepare command again"):
        images[np.arange(195, 400)]
    config = tiny_config(3, **{"data.name": f"array_record:{copy}", "data.batch_size": 1496})
    path = tmp_path / "config.py"
    path.write_text(f"import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({config.to_dict()!r})\n")
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err[-3000:]
    assert "images_00000200_00000399.array_record" in err and "prepare command again" in err
    prepare(_digits(), "train", copy, shard_size=SHARD, progress=False)  # remakes the damaged shard only
    np.testing.assert_array_equal(load_split(_streamed(copy), "train").images[np.arange(195, 400)],
                                  load_split(_streamed(prepared), "train").images[np.arange(195, 400)])
