"""A run is never lost: changed settings on resume, corrupted checkpoints, two trainers on one
workdir, kill -9 during saves, divergence. Each case here did the wrong thing silently before."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax import cli
from diffusion_jax.errors import CheckpointMismatch, NoUsableCheckpoint, NonFiniteLoss, WorkdirLocked
from diffusion_jax.runs import load_run
from diffusion_jax.training import train
from tests.conftest import xla_flags
from tests.train_helpers import corrupt_checkpoint_data, state_arrays, tiny_config

pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

REPO = pathlib.Path(__file__).resolve().parents[1]


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def run_of_20_steps(tmp_path_factory):
    """A tiny run trained to step 20 (checkpoints 10 and 20), copied by the tests that damage it."""
    workdir = tmp_path_factory.mktemp("faults") / "run"
    train(tiny_config(20), workdir)
    return workdir


def copy_of(run, tmp_path) -> pathlib.Path:
    import shutil
    return pathlib.Path(shutil.copytree(run, tmp_path / "run"))


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the CLI run in this process."""
    code = 0
    try:
        cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.xdist_group("faults")
def test_resume_with_another_optimizer_or_model_refuses_and_the_run_stays_intact(run_of_20_steps, tmp_path, caplog):
    tmp_path = copy_of(run_of_20_steps, tmp_path)
    config_json = (tmp_path / "config.json").read_text()
    for change, words in (({"optim.grad_clip": 0.0}, "optim.grad_clip was 1.0, now 0.0"),
                          ({"optim.accumulate_steps": 2}, "optim.accumulate_steps was 1, now 2"),
                          ({"optim.skip_nonfinite": False}, "optim.skip_nonfinite was True, now False"),
                          ({"optim.optimizer": "adamw"}, "optim.optimizer was 'adam', now 'adamw'"),
                          ({"model.overrides": {"hidden": 32}}, "model.overrides.hidden")):
        with pytest.raises(CheckpointMismatch, match=words):
            train(tiny_config(30, **change), tmp_path)
        assert checkpoint_steps(tmp_path) == [10, 20], change
        assert not (tmp_path / "unreadable_checkpoints").exists(), change
        assert (tmp_path / "config.json").read_text() == config_json, change  # written only after the checks
    assert load_run(tmp_path).step == 20  # still samples
    # A setting that may change (the learning rate): the run resumes, the old config is kept.
    caplog.set_level("INFO", logger="diffusion_jax")
    state = train(tiny_config(25, **{"optim.learning_rate": 5e-4}), tmp_path)
    assert int(state.step) == 25
    assert "optim.learning_rate was 0.001, now 0.0005" in caplog.text and "config.20.json" in caplog.text
    assert json.loads((tmp_path / "config.20.json").read_text())["optim"]["learning_rate"] == 1e-3
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["learning_rate"] == 5e-4


def replace_with_garbage_that_restores(workdir, step: int) -> None:
    """Rewrites the checkpoint at `step` with every array slightly changed but its old record
    (digest) kept: arrays that restore without any error and are not what was saved."""
    import orbax.checkpoint as ocp

    from diffusion_jax.checkpoints import Checkpointer
    ckpt = Checkpointer(workdir, async_save=False)
    record = ckpt.restore_record(step)
    state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    ckpt.manager.delete(step)
    garbage = jax.tree_util.tree_map(lambda a: a * 1.001 if np.issubdtype(np.asarray(a).dtype, np.floating) else a, state)
    ckpt.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(garbage),
                                                     record=ocp.args.JsonSave(record)), force=True)
    ckpt.close()


@pytest.mark.devices(8)
def test_a_states_digest_is_its_formula_for_any_sharding_and_sees_any_changed_bit():
    """The digest of each array is sum_i bits_i (2654435761 i + 1) mod 2^32 over its flat index i
    (Python integers here), the same whether the array is on one device, split over 8 or split on
    two axes and replicated on the others; one flipped bit changes it, a NaN makes the group not finite."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from diffusion_jax.checkpoints.integrity import _digests_and_squares
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(8, 4)).astype(np.float32), "b": rng.normal(size=(16,)).astype(jax.numpy.bfloat16),
            "n": np.arange(5, dtype=np.int32) - 2, "key": jax.random.key(3)}

    def formula(x):
        x = np.asarray(jax.random.key_data(x) if isinstance(x, jax.Array) else x).reshape(-1)
        bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.int64)
        return sum(int(b) * (2654435761 * i + 1) for i, b in enumerate(bits)) % 2**32

    expected = [formula(x) for x in jax.tree_util.tree_leaves(tree)]
    squares = sum(float(np.sum(np.asarray(tree[k], np.float64) ** 2)) for k in ("w", "b"))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    for spec in (None, P("fsdp"), P("data", "fsdp"), P(None, "data")):
        placed = dict(tree) if spec is None else {
            **tree, "w": jax.device_put(tree["w"], NamedSharding(mesh, spec)),
            "b": jax.device_put(tree["b"], NamedSharding(mesh, P(spec[0] if len(spec) else None)))}
        digests, sums = _digests_and_squares({"params": placed})
        assert digests["params"].tolist() == expected, spec
        np.testing.assert_allclose(sums["params"], squares, rtol=1e-12)
    flipped = dict(tree, w=tree["w"].copy())
    flipped["w"].view(np.uint32)[3, 2] ^= 1 << 7
    changed = _digests_and_squares({"params": flipped})[0]["params"].tolist()
    assert [a != b for a, b in zip(changed, expected)] == [False, False, False, True]  # leaves b, key, n, w
    flipped["w"][0, 0] = np.nan
    assert not np.isfinite(_digests_and_squares({"params": flipped})[1]["params"])


@pytest.mark.devices(8)
def test_a_checkpoint_restores_onto_any_sharding_and_reads_the_unpacked_format(tmp_path):
    """Small replicated arrays are saved packed, one buffer per field and dtype, large or sharded
    ones whole; either restores bit for bit onto another mesh, whole or a field alone, and so
    does a checkpoint of the previous format (one Orbax array per leaf, no plan in its record)."""
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from diffusion_jax.checkpoints import Checkpointer, abstract_like
    from diffusion_jax.training.state import TrainState
    rng = np.random.default_rng(0)
    params = {"big": rng.normal(size=(8, 40_000)).astype(np.float32),  # 1.3 MB: kept whole
              "small": rng.normal(size=(3, 5)).astype(np.float32), "half": rng.normal(size=(7,)).astype(jax.numpy.bfloat16),
              "sharded": rng.normal(size=(8, 4)).astype(np.float32)}
    host = TrainState(step=np.int32(7), params=params, ema_params={k: v * 2 for k, v in params.items()},
                      opt_state=(), rng=np.asarray(jax.random.key_data(jax.random.key(1))))
    wide, narrow = (jax.sharding.Mesh(np.asarray(jax.devices()).reshape(shape), ("data", "fsdp"))
                    for shape in ((2, 4), (8, 1)))
    spec = lambda path, _: P("fsdp") if jax.tree_util.keystr(path).endswith("['sharded']") else P()
    shardings = lambda mesh: jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, spec(p, x)), host)
    state = jax.device_put(host, shardings(wide))
    config = tiny_config(10)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, state, config)
    record = ckpt.restore_record(1)
    assert record["packed"]["params"] == {"bfloat16": [1], "float32": [3]}  # leaves big, half, sharded, small
    assert record["packed"]["opt_state"] == {} and record["packed"]["step"] == {"int32": [0]}
    old = {k: v for k, v in record.items() if k != "packed"}  # what the previous version wrote
    ckpt.manager.save(2, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), record=ocp.args.JsonSave(old)))
    abstract = abstract_like(host, shardings(narrow))
    for step in (1, 2):
        restored, _ = ckpt.restore_latest(abstract, config, step=step, read_only=True)
        fields, _ = ckpt.restore_latest({"ema_params": abstract.ema_params}, config, fields=("ema_params",), step=step)
        for got, want, target in ((restored, host, abstract), (fields["ema_params"], host.ema_params, abstract.ema_params)):
            for g, w, t in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                               jax.tree_util.tree_leaves(target)):
                assert g.sharding == t.sharding and g.dtype == w.dtype, step
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=str(step))
    ckpt.close()


@pytest.mark.xdist_group("faults")
@pytest.mark.parametrize("damage", ["restorable_garbage", "flipped_bytes"])
def test_a_corrupted_checkpoint_is_skipped_by_train_sample_and_evaluate(run_of_20_steps, tmp_path, capsys, caplog,
                                                                        damage):
    tmp_path = copy_of(run_of_20_steps, tmp_path)
    if damage == "restorable_garbage":  # what Orbax restores without complaint: the digest sees it
        replace_with_garbage_that_restores(tmp_path, 20)
    else:  # 64 random bytes in each array file: garbage that decodes, or data that does not
        corrupt_checkpoint_data(tmp_path, 20)
    code, out, err = run_cli(["sample", "--workdir", str(tmp_path), "--num_samples", "8", "--steps", "3",
                              "--out", str(tmp_path / "s.npz")], capsys)
    assert code == 0, err
    assert "checkpoint 20 cannot be used" in out and "checkpoint step 10" in out
    assert np.isfinite(np.load(tmp_path / "s.npz")["samples"]).all()
    code, out, err = run_cli(["sample", "--workdir", str(tmp_path), "--checkpoint", "20", "--out",
                              str(tmp_path / "t.npz")], capsys)
    assert code == 2 and "the checkpoint at step 20" in err and "Traceback" not in err
    code, out, err = run_cli(["evaluate", "--workdir", str(tmp_path), "--num_samples", "8", "--steps", "3"], capsys)
    assert code == 0, err
    assert json.loads(out[out.index("{"):])["checkpoint_step"] == 10
    assert checkpoint_steps(tmp_path) == [10, 20]  # sample and evaluate only read
    state = train(tiny_config(25), tmp_path)
    assert int(state.step) == 25
    assert "checkpoint 20 is unreadable" in caplog.text
    if damage == "restorable_garbage":
        assert "the digest of its ema_params, opt_state, params differs" in caplog.text
    assert checkpoint_steps(tmp_path) == [10, 20, 25]  # 20 saved again by the resumed run
    assert len(list((tmp_path / "unreadable_checkpoints").iterdir())) == 1


@pytest.mark.xdist_group("faults")
def test_a_workdir_whose_checkpoints_all_fail_is_never_silently_restarted(run_of_20_steps, tmp_path):
    tmp_path = copy_of(run_of_20_steps, tmp_path)
    for step in (10, 20):
        corrupt_checkpoint_data(tmp_path, step)
    with pytest.raises(NoUsableCheckpoint, match="restart=True"):
        train(tiny_config(30), tmp_path)
    assert not (tmp_path / "checkpoints" / "10").exists()  # set aside, not deleted
    assert len(list((tmp_path / "unreadable_checkpoints").iterdir())) == 2
    state = train(tiny_config(5, **{"train.restart": True}), tmp_path)  # asked for: starts again
    assert int(state.step) == 5


@pytest.mark.xdist_group("faults")
def test_divergence_is_never_kept_as_a_good_checkpoint(run_of_20_steps, tmp_path):
    # The filer's case: a good run resumed at a learning rate that makes it diverge, logging
    # every 50 steps and saving every 10; the weights stayed finite (2.5e4) and were saved.
    copy_of(run_of_20_steps, tmp_path / "a")
    good = tmp_path / "a" / "run"
    with pytest.raises(NonFiniteLoss, match=r"at step 30 .*last good checkpoint \(step 20\) is kept"):
        train(tiny_config(70, **{"optim.learning_rate": 1e6, "train.log_every": 50}), good)
    assert checkpoint_steps(good) == [10, 20]
    run = load_run(good)
    assert run.step == 20 and all(np.abs(np.asarray(p)).max() < 10 for p in jax.tree_util.tree_leaves(run.ema_params))
    # A loss that becomes NaN at once: nothing is saved, and the message says so.
    config = tiny_config(40, **{"optim.learning_rate": 1e30, "optim.skip_nonfinite": False,
                                "optim.grad_clip": 0.0, "optim.warmup_steps": 0,
                                "train.ckpt_every": 1, "train.log_every": 1})
    with pytest.raises(NonFiniteLoss, match="no checkpoint was saved"):
        train(config, tmp_path / "b")
    assert checkpoint_steps(tmp_path / "b") == []


TRAINER = """
import sys; sys.path.insert(0, {repo!r})
from tests.train_helpers import tiny_config
from diffusion_jax.training import train
train(tiny_config(100000, **{{"train.log_every": 1, "train.ckpt_every": 1}}), {workdir!r})
"""


def test_two_trainers_on_one_workdir_and_kill_9_during_saves(tmp_path, capsys, caplog):
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", TRAINER.format(repo=str(REPO), workdir=str(workdir))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 6):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    try:
        # A second trainer refuses, naming the first, and touches nothing.
        with pytest.raises(WorkdirLocked, match=f"pid {proc.pid} on"):
            train(tiny_config(5), workdir)
        code, out, err = run_cli(["train", "--config", str(REPO / "experiments" / "digits_unet.py"),
                                  "--workdir", str(workdir)], capsys)
        assert code == 1 and f"in use by another trainer (pid {proc.pid}" in err and "Traceback" not in err
    finally:
        time.sleep(np.random.default_rng().uniform(0.0, 1.0))  # saves every step: kill -9 lands in or near one
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = checkpoint_steps(workdir)
    assert saved, "no checkpoint survived"
    # The dead trainer's lock is taken over; the run resumes from its last complete save and is
    # then bitwise the run that was never interrupted.
    target = saved[-1] + 3
    config = tiny_config(target, **{"train.log_every": 1, "train.ckpt_every": 1})
    resumed = train(config, workdir)
    assert "took over the lock of a trainer that is gone" in caplog.text
    straight = train(config, tmp_path / "straight")
    a, b = state_arrays(straight), state_arrays(resumed)
    assert int(resumed.step) == target and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not (workdir / "train.lock").exists()  # released at the end


def test_sigint_saves_like_sigterm(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", TRAINER.format(repo=str(REPO), workdir=str(workdir))
                             .replace('"train.ckpt_every": 1', '"train.ckpt_every": 1000000')],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "XLA_FLAGS": xla_flags(1)})
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert "SIGINT at step" in output and "run the same command to resume" in output, output[-2000:]
    assert len(checkpoint_steps(workdir)) == 1 and not (workdir / "train.lock").exists()
