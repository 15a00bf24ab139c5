"""Training: exact resume, sharding equivalence, pre-emption, bad input, optimiser and EMA."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import parallel
from diffusion_jax.builders import build_model
from diffusion_jax.latents import model_input_shape as input_shape
from diffusion_jax.training import train
from diffusion_jax.optim import make_optimizer
from diffusion_jax.training.state import ema_decay
from diffusion_jax.training.step import build_train_program
from tests.conftest import xla_flags
from tests.train_helpers import state_arrays, tiny_config

pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_exact_resume_is_bitwise(tmp_path):
    straight = train(tiny_config(20), tmp_path / "a")
    train(tiny_config(20), tmp_path / "b", stop_after=10)
    resumed = train(tiny_config(20), tmp_path / "b")
    a, b = state_arrays(straight), state_arrays(resumed)
    assert a.keys() == b.keys() and int(resumed.step) == 20
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]  # the second call started at step 10
    # the TensorBoard event files hold the same scalars, read back by TensorFlow, which checks
    # every record's CRC-32C (a flipped byte is a DataLossError)
    import tensorflow as tf
    files = sorted((tmp_path / "b" / "tensorboard").iterdir())
    events = [e for f in files for e in tf.compat.v1.train.summary_iterator(str(f))]
    losses = {e.step: v.simple_value for e in events for v in e.summary.value if v.tag == "loss"}
    assert losses == {r["step"]: np.float32(r["loss"]) for r in rows}
    assert events[0].file_version == "brain.Event:2"
    data = bytearray(files[-1].read_bytes())
    data[-6] ^= 1
    files[-1].write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.compat.v1.train.summary_iterator(str(files[-1])))


_INITIAL = {}


def _one_step(mesh, k=1):
    config = tiny_config(4, **{"train.steps_per_dispatch": k})
    program = build_train_program(config, mesh)
    step, shape = program.step, input_shape(config)
    if not _INITIAL:  # one initial state (its initialiser compiled once), placed on each mesh
        _INITIAL["state"] = jax.device_get(program.init(jax.random.PRNGKey(0)))
    state = jax.device_put(_INITIAL["state"], program.shardings)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 16, *shape)).astype(np.float32)
    if k == 1:
        for i in range(2):
            state, metrics = step(state, parallel.global_batch({"image": images[i]}, mesh))
    else:
        state, metrics = step(state, parallel.global_batch({"image": images}, mesh, leading=1))
    return state, metrics


@pytest.mark.devices(8)
def test_sharded_step_equals_single_device(tmp_path):
    # the two steps on one device, against data parallel over 8 devices (both steps in one lax.scan
    # dispatch) and a 4 x 2 data x fsdp mesh
    one, m1 = _one_step(parallel.make_mesh(devices=jax.devices()[:1]))
    fsdp, m_fsdp = _one_step(parallel.make_mesh(fsdp=2))
    scanned, m_scan = _one_step(parallel.make_mesh(), k=2)
    assert len(scanned.params["x_embedder"]["kernel"].sharding.device_set) == 8
    with pytest.raises(ValueError, match="not divisible by the device count 8"):  # before anything is made
        train(tiny_config(2, **{"data.batch_size": 12}), tmp_path / "c")
    for other, m in ((fsdp, m_fsdp), (scanned, m_scan)):
        np.testing.assert_allclose(float(m["loss"]), float(m1["loss"]), rtol=1e-5)
        a, b = state_arrays(one), state_arrays(other)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_sigterm_saves_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from tests.train_helpers import tiny_config\n"
            "from diffusion_jax.training import train\n"
            "train(tiny_config(100000, **{'train.log_every': 1, 'train.ckpt_every': 1000000}), %r)\n"
            % (str(REPO), str(workdir)))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "XLA_FLAGS": xla_flags(1)})
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert "SIGTERM" in output and "resume" in output, output
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 5 <= saved[0] < 100000
    logged = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    state = train(tiny_config(saved[0] + 3, **{"train.log_every": 1, "train.ckpt_every": 1000000}), workdir)
    assert int(state.step) == saved[0] + 3
    logged_after = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert logged_after[len(logged):] == [saved[0] + 1, saved[0] + 2, saved[0] + 3]


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'not_a_dataset'"):
        train(tiny_config(2, **{"data.name": "not_a_dataset"}), tmp_path / "a")
    with pytest.raises(ValueError, match="has 1 channels but the config asks for 3"):
        train(tiny_config(2, **{"data.channels": 3}), tmp_path / "b")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="--workdir: cannot write to"):
        train(tiny_config(2), blocker / "run")
    train(tiny_config(2), tmp_path / "d")
    with pytest.raises(ValueError, match="different config"):
        train(tiny_config(4, **{"model.overrides": {"hidden": 32}}), tmp_path / "d")
    with pytest.raises(ValueError, match="unknown model preset"):
        train(tiny_config(2, **{"model.name": "unet_huge"}), tmp_path / "e")


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    train(tiny_config(20), tmp_path)
    latest = tmp_path / "checkpoints" / "20"
    for f in latest.rglob("*"):
        if f.is_file() and "record" not in str(f):
            f.write_bytes(b"garbage")
    state = train(tiny_config(25), tmp_path)
    assert int(state.step) == 25
    assert "checkpoint 20 is unreadable" in caplog.text
    assert any((tmp_path / "unreadable_checkpoints").iterdir())  # set aside, not deleted


def test_checkpoint_that_does_not_fit_the_model_is_an_error_not_a_restart(tmp_path, monkeypatch):
    # A checkpoint written before the model's code changed (parameters renamed or reshaped) is
    # not corrupt: resuming must stop with the names that differ, never set it aside and restart.
    from diffusion_jax import runs
    from diffusion_jax.checkpoints import CheckpointMismatch, Checkpointer, abstract_like

    state = train(tiny_config(10), tmp_path)
    shapes = abstract_like(state)
    renamed = dict(shapes.params)
    renamed["renamed_block"] = renamed.pop("x_embedder")
    ckpt = Checkpointer(tmp_path, async_save=False)
    try:
        with pytest.raises(CheckpointMismatch, match=r"2 of the model's are not in it \(renamed_block\.bias, renamed_block\.kernel\); "
                                                     r"2 in it are not in the model \(x_embedder\.bias, x_embedder\.kernel\)"
                                                     r".*new --workdir"):
            ckpt.restore_latest(shapes.replace(params=renamed), tiny_config(10))
    finally:
        ckpt.close()
    assert not (tmp_path / "unreadable_checkpoints").exists()
    # The evaluation's read-only loader says the same.
    real = runs.param_shapes
    monkeypatch.setattr(runs, "param_shapes", lambda *a: {**real(*a), "extra": jax.ShapeDtypeStruct((3,), jnp.float32)})
    with pytest.raises(CheckpointMismatch, match=r"step 10 .* 1 of the model's are not in it \(extra\)"):
        runs.load_run(tmp_path)
    assert int(train(tiny_config(10), tmp_path).step) == 10  # the run itself is untouched


def test_ema_warmup_and_optimizer_schedule():
    assert float(ema_decay(0, 0.9999, True)) == pytest.approx(0.1)
    assert float(ema_decay(10**7, 0.9999, True)) == pytest.approx(0.9999)
    assert float(ema_decay(0, 0.99, False)) == pytest.approx(0.99)
    config = tiny_config()
    config.optim.warmup_steps, config.optim.decay, config.optim.learning_rate = 10, "cosine", 1.0
    from diffusion_jax.optim import learning_rate_schedule
    lr = learning_rate_schedule(config.optim, 110)
    assert float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.5, abs=1e-3) and float(lr(110)) == pytest.approx(0.0, abs=1e-6)
    # Gradient accumulation: nothing moves until the k-th micro-step.
    config.optim.accumulate_steps, config.optim.warmup_steps, config.optim.decay = 2, 0, "constant"
    opt = make_optimizer(config.optim, 10)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    upd, state = opt.update({"w": jnp.ones(3)}, state, params)
    assert float(jnp.abs(upd["w"]).sum()) == 0.0
    upd, state = opt.update({"w": jnp.ones(3)}, state, params)
    assert float(jnp.abs(upd["w"]).sum()) > 0.0


def test_config_overrides_are_validated(capsys):
    from diffusion_jax.cli import run_experiment
    from experiments.digits_unet import get_config
    for override, words in (("--config.train.no_such_key=3", "no_such_key"), ("--config.train.steps=many", "steps"),
                            ("--config.train.steps=-2", "train.steps must be")):
        with pytest.raises(SystemExit) as exit_info:
            run_experiment(get_config, ["prog", "--workdir", "/tmp/x", override])
        assert exit_info.value.code == 2
        assert words in capsys.readouterr().err


@pytest.mark.parametrize("name,size,channels", [("mnist", 8, 1), ("cifar10", 8, 3)])  # resized to the tiny model's size
def test_tfds_path_trains_end_to_end(tmp_path, name, size, channels):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = tiny_config(2, **{"data.name": name, "data.image_size": size, "data.channels": channels,
                               "data.random_flip": True, "data.use_labels": True, "data.num_classes": 10,
                               "train.cond_dropout": 0.2})
    with tfds.testing.mock_data(num_examples=32):
        state = train(config, tmp_path)
    assert int(state.step) == 2
    assert "y_embedder" in state.params


EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.py") if p.stem != "__init__")


def test_the_experiments_are_found():
    assert {"digits_unet", "digits_flow", "digits_edm", "digits_text", "cifar10_ddpm", "cifar10_dit", "cifar10_sit",
            "cifar10_edm", "digits_meanflow", "digits_consistency", "cifar10_meanflow", "imagenet256_meanflow"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("module", EXPERIMENTS)
def test_every_experiment_builds_its_model(module):
    """Each experiment config passes validation and names a preset that accepts its data shape
    (shapes only; a latent run's under Stable Diffusion's VAE: factor 8, 4 channels)."""
    import importlib
    import types

    from diffusion_jax.builders import input_shape as shape_under
    from diffusion_jax.config import validate_config
    config = importlib.import_module(f"experiments.{module}").get_config()
    validate_config(config)
    model = build_model(config)
    shape = shape_under(config, types.SimpleNamespace(downsample_factor=8, in_channels=3, latent_channels=4))
    from diffusion_jax.models import example_condition
    out = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, example_condition(model, 2)),
                         jax.ShapeDtypeStruct((2, *shape), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32))
    assert out["params"]


def test_workdir_check_is_safe_when_processes_share_the_directory(tmp_path):
    # The processes of a multi-host run all check the shared workdir at start-up; a common
    # probe file made one process delete it under another (seen in tests/test_multihost.py).
    import threading

    from diffusion_jax.workdir import check_workdir

    barrier, errors = threading.Barrier(8), []

    def worker():
        barrier.wait()
        for _ in range(50):
            try:
                check_workdir(tmp_path / "shared")
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert list((tmp_path / "shared").iterdir()) == []
