"""The `generate` batch job: images independent of batch size and devices, verified shards, a
restart that keeps what is good and remakes what is not, and clear refusals."""
import json
import os

import jax
import numpy as np
import pytest

from diffusion_jax import cli, parallel
from diffusion_jax.jobs.generate import generate_samples
from diffusion_jax.shards import ShardDir
from tests.conftest import free_port, process_env
from tests.train_helpers import tiny_config

pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A labelled tiny DiT whose (EMA) parameters are random, so the model does real work."""
    from diffusion_jax.checkpoints import Checkpointer
    from diffusion_jax.training.step import build_train_program

    workdir = tmp_path_factory.mktemp("generate") / "run"
    workdir.mkdir()
    config = tiny_config(2, **{"data.use_labels": True, "data.num_classes": 10, "sample.method": "ddim",
                               "sample.steps": 4})
    program = build_train_program(config, parallel.make_mesh())
    state = program.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    noisy = jax.tree_util.tree_map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(p.dtype),
                                   jax.device_get(state.ema_params))
    state = state.replace(step=state.step + 1, ema_params=jax.device_put(noisy, program.shardings.ema_params))
    ckpt = Checkpointer(workdir)
    ckpt.save(1, state, config)
    ckpt.close()
    (workdir / "config.json").write_text(config.to_json(indent=2))
    return workdir


def images_of(directory):
    store = ShardDir(directory)
    shards = [store.load(a, b) for a, b in store.complete()]
    return np.concatenate([s["images"] for s in shards]), np.concatenate([s["labels"] for s in shards])


@pytest.mark.devices(8)
def test_images_do_not_depend_on_batch_size_or_devices(run, tmp_path):
    first = generate_samples(run, tmp_path / "b16", 50, seed=3, batch_size=16, shard_size=20, progress=False)
    generate_samples(run, tmp_path / "b40", 50, seed=3, batch_size=40, shard_size=20, progress=False)
    a, labels = images_of(tmp_path / "b16")
    b, _ = images_of(tmp_path / "b40")
    assert a.shape == (50, 8, 8, 1) and a.dtype == np.uint8 and a.std() > 10
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # within one quantisation level
    np.testing.assert_array_equal(labels, np.arange(50) % 10)
    assert [s["file"] for s in first["shards"]] == [
        "samples_00000000_00000019.npz", "samples_00000020_00000039.npz", "samples_00000040_00000049.npz"]
    # One device instead of 8, sample by sample.
    import diffusion_jax.jobs.generate as job
    from unittest import mock
    make = job.make_generator
    one = [jax.devices()[0]]
    with mock.patch.object(job, "make_mesh", lambda devices: parallel.make_mesh(devices=one)):
        generate_samples(run, tmp_path / "one_device", 50, seed=3, batch_size=16, shard_size=20, progress=False)
    c, _ = images_of(tmp_path / "one_device")
    assert np.abs(a.astype(int) - c.astype(int)).max() <= 1
    # Another seed gives other images.
    generate_samples(run, tmp_path / "seed4", 20, seed=4, batch_size=16, shard_size=20, progress=False)
    assert not np.array_equal(images_of(tmp_path / "seed4")[0], a[:20])
    # A job smaller than its batch size samples no more than it keeps: 3 images, calls of 3 (8 on 8 devices).
    sizes = []
    with mock.patch.object(job, "make_generator", lambda *a, **k: sizes.append(k["batch_size"]) or make(*a, **k)):
        generate_samples(run, tmp_path / "three", 3, seed=3, batch_size=256, shard_size=1000, progress=False)
    assert sizes == [3] and np.abs(images_of(tmp_path / "three")[0].astype(int) - a[:3]).max() <= 1


def test_a_restart_keeps_good_shards_and_remakes_damaged_ones(run, tmp_path, caplog):
    out = tmp_path / "job"
    manifest = generate_samples(run, out, 45, seed=1, batch_size=16, shard_size=15, progress=False)
    reference, _ = images_of(out)
    store = ShardDir(out)
    kept = store.path(0, 14).stat().st_mtime_ns
    # A shard truncated by hand, one deleted, one whose record is gone (as a kill between the two
    # renames leaves it), and a temporary file of a write that never finished.
    data = store.path(15, 29).read_bytes()
    store.path(15, 29).write_bytes(data[: len(data) // 2])
    store.path(30, 44).unlink()
    (out / ".samples_00000030_00000044.npz.123.tmp").write_bytes(b"partial")
    caplog.clear()
    again = generate_samples(run, out, 45, seed=1, batch_size=16, shard_size=15, progress=False)
    assert "samples_00000015_00000029.npz is incomplete or damaged" in caplog.text
    assert store.path(0, 14).stat().st_mtime_ns == kept  # the good shard was not made again
    np.testing.assert_array_equal(images_of(out)[0], reference)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["num_samples"] == 45 and saved["seed"] == 1 and len(saved["shards"]) == 3
    assert saved["method"] == "ddim" and saved["checkpoint"] == 1 and saved["device_count"] == jax.device_count()


def test_bad_requests_are_refused_with_the_reason(run, tmp_path, capsys):
    out = tmp_path / "job"
    generate_samples(run, out, 10, seed=1, batch_size=16, shard_size=10, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(seed was 1, now 2\)"):
        generate_samples(run, out, 10, seed=2, batch_size=16, shard_size=10, progress=False)
    with pytest.raises(ValueError, match="num_samples was 10, now 20"):
        generate_samples(run, out, 20, seed=1, batch_size=16, shard_size=10, progress=False)
    (tmp_path / "a_file").write_text("x")
    for argv, words in ((["--num_samples", "0", "--out", str(tmp_path / "x")], "--num_samples: must be at least 1"),
                        (["--num_samples", "4", "--out", str(tmp_path / "a_file" / "x")], "--out: cannot write"),
                        (["--num_samples", "4", "--out", str(out), "--seed", "5"], "seed was 1, now 5"),
                        (["--num_samples", "4", "--out", str(tmp_path / "y"), "--labels", "12"],
                         "labels must be classes in [0, 10)")):
        with pytest.raises(SystemExit) as stop:
            cli.main(["generate", "--workdir", str(run), *argv])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    # The CLI runs the job and says where it is.
    cli.main(["generate", "--workdir", str(run), "--num_samples", "10", "--out", str(out), "--seed", "1",
              "--batch_size", "8", "--shard_size", "10"])
    assert "10 samples in 1 verified shards" in capsys.readouterr().out


def test_a_directory_whose_job_json_was_deleted_is_not_taken_over_by_another_seed(run, tmp_path):
    # Was: rc 0, the old seed's shards kept as the new job's, job.json and manifest naming the new seed.
    out = tmp_path / "job"
    first = generate_samples(run, out, 6, seed=1, batch_size=8, shard_size=2, progress=False)
    (out / "job.json").unlink()
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match="holds shards of another job .* job.json is missing"):
        generate_samples(run, out, 6, seed=2, batch_size=8, shard_size=2, progress=False)
    assert not (out / "job.json").exists()
    # The same job again takes its own shards back: each record names the job's digest.
    again = generate_samples(run, out, 6, seed=1, batch_size=8, shard_size=2, progress=False)
    assert again["shards"] == first["shards"] and again["job"] == first["job"]
    assert all(json.loads(p.read_text())["job"] == first["job"] for p in out.glob("samples_*.json"))


def test_a_temporary_file_left_by_a_killed_process_is_removed_when_its_shard_is_made(run, tmp_path, caplog):
    out = tmp_path / "job"
    generate_samples(run, out, 4, seed=1, batch_size=8, shard_size=2, progress=False)
    store = ShardDir(out)
    (out / "samples_00000002_00000003.npz").unlink()  # the shard a kill -9 interrupted ...
    dead = out / ".samples_00000002_00000003.npz.999999999.0.tmp"  # ... and its temporary (no such pid)
    dead.write_bytes(b"partial")
    live = out / f".samples_00000002_00000003.npz.{os.getpid()}.1.tmp"  # a live writer's is left alone
    live.write_bytes(b"in use")
    with caplog.at_level("WARNING"):
        generate_samples(run, out, 4, seed=1, batch_size=8, shard_size=2, progress=False)
    assert not dead.exists() and live.exists() and store.verified(2, 3) is not None
    assert any(dead.name in r.getMessage() and "interrupted" in r.getMessage() for r in caplog.records)


def test_fid_pools_shards_exactly_and_real_digits_score_zero(tmp_path, capsys):
    from diffusion_jax.data.sources import load_digits
    from diffusion_jax.evaluation.digits_features import digits_features
    from diffusion_jax.evaluation.frechet import feature_statistics, load_statistics, statistics_from_sums
    from diffusion_jax.evaluation.shard_fid import shard_feature_sums

    real = load_digits("train").images
    store = ShardDir(tmp_path / "real")
    for first in range(0, len(real), 400):
        chunk = real[first:first + 400]
        store.write(first, first + len(chunk) - 1, images=chunk, labels=np.zeros(len(chunk), np.int32))
    as_float = real.astype(np.float32) / 127.5 - 1.0
    mu, sigma = feature_statistics(digits_features(as_float))
    sums = shard_feature_sums(tmp_path / "real", digits_features)
    pooled_mu, pooled_sigma = statistics_from_sums(sums)
    assert sums.count == len(real)
    np.testing.assert_allclose(pooled_mu, mu, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(pooled_sigma, sigma, rtol=1e-10, atol=1e-12)
    # Two halves (as two processes hold them) pool to the same.
    half = len(real) // 2
    from diffusion_jax.evaluation.frechet import feature_sums
    both = feature_sums(digits_features(as_float[:half])) + feature_sums(digits_features(as_float[half:]))
    np.testing.assert_allclose(statistics_from_sums(both)[1], sigma, rtol=1e-10, atol=1e-12)
    # The commands: statistics of the shards, then the FID of the shards against them, ~0; against
    # the dataset's own statistics (float images, not uint8) nearly 0.
    ref = tmp_path / "ref.npz"
    cli.main(["fid-stats", "--samples", str(tmp_path / "real"), "--features", "digits", "--out", str(ref)])
    np.testing.assert_allclose(load_statistics(ref)[1], sigma, rtol=1e-10, atol=1e-12)
    cli.main(["fid", "--samples", str(tmp_path / "real"), "--ref", str(ref), "--features", "digits"])
    result = json.loads((tmp_path / "real" / "fid.json").read_text())
    assert abs(result["fid"]) < 1e-6 and result["n"] == len(real) and len(result["ref_sha256"]) == 64
    dataset = tmp_path / "dataset.npz"
    cli.main(["fid-stats", "--dataset", "digits", "--split", "train", "--features", "digits", "--image_size", "8",
              "--channels", "1", "--out", str(dataset)])
    cli.main(["fid", "--samples", str(tmp_path / "real"), "--ref", str(dataset), "--features", "digits",
              "--out", str(tmp_path / "f.json")])
    assert json.loads((tmp_path / "f.json").read_text())["fid"] < 0.05
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        cli.main(["fid", "--samples", str(tmp_path / "empty"), "--ref", str(ref), "--features", "digits"])
    assert stop.value.code == 2 and "no shards" in capsys.readouterr().err


def test_two_processes_write_the_shards_one_process_writes(run, tmp_path):
    """Two processes on localhost (2 CPU devices each) split the shards between them; the
    directory equals one process's, shard for shard."""
    import subprocess
    import sys

    port = free_port()
    base = process_env(2)
    # Each process runs the job, then the statistics of its shards (pooled across the two).
    script = ("import sys; from diffusion_jax import cli; "
              "cli.main(sys.argv[1:sys.argv.index('--then')]); cli.main(sys.argv[sys.argv.index('--then') + 1:])")
    command = [sys.executable, "-c", script, "generate", "--workdir", str(run), "--num_samples", "50",
               "--out", str(tmp_path / "two"), "--seed", "3", "--batch_size", "8", "--shard_size", "10", "--then",
               "fid-stats", "--samples", str(tmp_path / "two"), "--features", "digits", "--out",
               str(tmp_path / "pooled.npz")]
    procs = [subprocess.Popen(command, env=dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    generate_samples(run, tmp_path / "one", 50, seed=3, batch_size=16, shard_size=10, progress=False)
    two, labels_two = images_of(tmp_path / "two")
    one, labels_one = images_of(tmp_path / "one")
    assert np.abs(two.astype(int) - one.astype(int)).max() <= 1
    np.testing.assert_array_equal(labels_two, labels_one)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["process_count"] == 2 and len(manifest["shards"]) == 5
    # The FID statistics, each process reading its share of the shards and the sums pooled across
    # the two, equal those of all the images at once.
    from diffusion_jax.evaluation.digits_features import digits_features
    from diffusion_jax.evaluation.frechet import feature_statistics, load_statistics

    assert "wrote statistics of 50 images (64 features, 2 process(es))" in outputs[0], outputs[0][-2000:]
    mu, sigma = load_statistics(tmp_path / "pooled.npz")
    expected = feature_statistics(digits_features(two.astype(np.float32) / 127.5 - 1.0))
    np.testing.assert_allclose(mu, expected[0], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(sigma, expected[1], rtol=1e-10, atol=1e-12)


KILLER = """
import os, signal, sys
from diffusion_jax import shards
from diffusion_jax.jobs import generate as generate_job
calls, original, when = [0], shards.ShardDir.write, sys.argv[3]
def write(self, first, last, **arrays):
    calls[0] += 1
    if calls[0] == 2 and when == "sampling":  # the second shard sampled, nothing of it written
        os.kill(os.getpid(), signal.SIGKILL)
    if calls[0] == 2 and when == "mid_write":  # a temporary file half written
        self.path(first, last).with_name("." + self.path(first, last).name + ".1.tmp").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    record = original(self, first, last, **arrays)
    if calls[0] == 2 and when == "before_record":  # the shard renamed into place, its record not yet
        self.record_path(first, last).unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return record
shards.ShardDir.write = write
generate_job.generate_samples(sys.argv[1], sys.argv[2], 30, seed=5, batch_size=16, shard_size=10, progress=False)
"""


@pytest.mark.parametrize("when", ["mid_write", "before_record"])
def test_a_job_killed_during_a_shard_write_completes_on_restart(run, tmp_path, when):
    import subprocess
    import sys

    out = tmp_path / "killed"
    env = process_env(8)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(run), str(out), when], env=env, timeout=600,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    store = ShardDir(out)
    assert store.verified(0, 9) is not None and not (out / "manifest.json").exists()
    generate_samples(run, out, 30, seed=5, batch_size=16, shard_size=10, progress=False)
    generate_samples(run, tmp_path / "whole", 30, seed=5, batch_size=16, shard_size=10, progress=False)
    np.testing.assert_array_equal(images_of(out)[0], images_of(tmp_path / "whole")[0])
    assert all(store.verified(a, b) for a, b in store.complete()) and len(store.complete()) == 3
