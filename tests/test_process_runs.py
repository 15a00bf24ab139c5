"""Runs on continuous processes from the command line: a flow run and an EDM run (with EDM's
preconditioning) train, resume their config, sample with every process sampler, and a flow run
exports with its FlowMatchEulerDiscreteScheduler; evaluate says what it does not read yet."""
import json
import pathlib

import numpy as np
import pytest

from diffusion_jax import cli
from diffusion_jax.runs import load_run

REPO = pathlib.Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "experiments" / "digits_unet.py")
SMALL = ["--config.model.name=dit_tiny", "--config.data.batch_size=16", "--config.train.steps=6",
         "--config.train.log_every=3", "--config.train.ckpt_every=6", "--config.train.num_sample_images=0",
         "--config.train.progress=False", "--config.optim.warmup_steps=0", "--config.sample.steps=4"]
pytestmark = pytest.mark.xdist_group("process_runs")


@pytest.mark.parametrize("process,extra", [
    ("flow", ["--config.diffusion.prediction=velocity", "--config.train.time_sampling=logit_normal",
              "--config.diffusion.process_options.shift=3.0", "--config.sample.method=euler",
              # a class-conditional DiT with diffusers' timestep embedding: one export can write
              "--config.data.use_labels=True", "--config.data.num_classes=10", "--config.train.label_dropout=0.1",
              "--config.model.overrides.freq_dim=256", "--config.model.overrides.freq_shift=1.0"]),
    ("edm", ["--config.diffusion.prediction=x0", "--config.train.time_sampling=lognormal",
             "--config.diffusion.weighting=edm", "--config.model.precondition=edm", "--config.sample.method=heun",
             "--config.sample.clip_x0=False"])])
def test_a_continuous_process_run_trains_and_samples_from_the_cli(process, extra, tmp_path, capsys):
    run = tmp_path / "run"
    cli.main(["train", "--config", DIGITS, "--workdir", str(run), f"--config.diffusion.process={process}",
              *SMALL, *extra])
    loaded = load_run(run)
    assert loaded.step == 6 and loaded.schedule.name == process
    config = json.loads((run / "config.json").read_text())
    assert config["diffusion"]["process"] == process
    for method in ("euler", "heun", "ddim"):
        out = tmp_path / f"{method}.npz"
        cli.main(["sample", "--workdir", str(run), "--num_samples", "4", "--method", method, "--steps", "3",
                  "--out", str(out)])
        samples = np.load(out)["samples"]
        assert samples.shape == (4, 8, 8, 1) and np.isfinite(samples).all()
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", "--workdir", str(run)])
    assert stop.value.code == 2 and "evaluate reads DDPM runs so far" in capsys.readouterr().err
    if process == "flow":
        cli.main(["export", "--workdir", str(run), "--out", str(tmp_path / "exported")])
        scheduler = json.loads((tmp_path / "exported" / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0
        diffusers = pytest.importorskip("diffusers")
        theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "exported" / "scheduler")
        theirs.set_timesteps(4)
        np.testing.assert_allclose(theirs.sigmas.numpy(), loaded.schedule.default_grid(4), rtol=1e-6, atol=1e-7)
