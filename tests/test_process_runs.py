"""Runs on continuous processes from the command line: a flow run and an EDM run (with EDM's
preconditioning) train, resume their config, sample with every process sampler, and a flow run
exports with its FlowMatchEulerDiscreteScheduler; evaluate reports the metrics of the implied eps
and of the model's own target and the probability-flow ODE's bits/dim."""
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
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("process_runs")]


@pytest.mark.parametrize("process,extra", [
    ("flow", ["--config.diffusion.prediction=velocity", "--config.train.time_sampling=logit_normal",
              "--config.diffusion.process_options.shift=3.0", "--config.sample.method=euler",
              # a class-conditional DiT with diffusers' timestep embedding: one export can write
              "--config.data.use_labels=True", "--config.data.num_classes=10", "--config.train.cond_dropout=0.1",
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
    # the process's own sampler from the CLI (every method on every process: test_samplers)
    method = {"flow": "euler", "edm": "heun"}[process]
    cli.main(["sample", "--workdir", str(run), "--num_samples", "4", "--method", method, "--steps", "3",
              "--out", str(tmp_path / "s.npz")])
    samples = np.load(tmp_path / "s.npz")["samples"]
    assert samples.shape == (4, 8, 8, 1) and np.isfinite(samples).all()
    cli.main(["evaluate", "--workdir", str(run), "--num_samples", "8", "--steps", "3"])
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["process"] == process and metrics["target"] == config["diffusion"]["prediction"]
    assert all(np.isfinite(metrics[k]) for k in ("noise_mse", "target_mse", "noise_r2"))
    assert "probability-flow ODE" in metrics["bpd"]["likelihood"] and np.isfinite(metrics["bpd"]["total_bpd"])
    report = (run / "eval" / "report.md").read_text()
    assert f"Process `{process}`" in report and "probability-flow ODE" in report
    assert (run / "eval" / "reverse_process.png").exists()
    if process == "flow":
        cli.main(["export", "--workdir", str(run), "--out", str(tmp_path / "exported")])
        scheduler = json.loads((tmp_path / "exported" / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0
        diffusers = pytest.importorskip("diffusers")
        theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "exported" / "scheduler")
        theirs.set_timesteps(4)
        np.testing.assert_allclose(theirs.sigmas.numpy(), np.append(loaded.schedule.own_grid(4), 0.0), rtol=1e-6, atol=1e-7)
        # a few-step run started from this one (train.init_from, pinned at its step): MeanFlow's two-time
        # model (the projection of r added at zero), with guidance folded into its target (test_few_step),
        # samples in 2 steps (consistency tuning is the same command with its objective:
        # experiments/digits_consistency.py, validated in test_training)
        tuned = tmp_path / "meanflow"
        cli.main(["train", "--workdir", str(tuned), "--config", DIGITS, f"--config.diffusion.process={process}",
                  *SMALL, *extra, "--config.train.steps=2", "--config.diffusion.objective=meanflow",
                  "--config.model.second_time=True", "--config.sample.method=meanflow", f"--config.train.init_from={run}",
                  "--config.diffusion.objective_options.guidance=1.5",
                  "--config.diffusion.objective_options.guidance_mix=0.25", "--config.eval.bpd_examples=0"])
        settings = json.loads((tuned / "config.json").read_text())["train"]
        assert (settings["init_from"], settings["init_from_step"]) == (str(run.resolve()), 6)
        cli.main(["sample", "--workdir", str(tuned), "--num_samples", "4", "--steps", "2", "--labels", "3",
                  "--out", str(tmp_path / "meanflow.npz")])
        assert np.isfinite(np.load(tmp_path / "meanflow.npz")["samples"]).all()
        cli.main(["evaluate", "--workdir", str(tuned), "--num_samples", "16", "--out", str(tmp_path / "meanflow_eval")])
        by_steps = json.loads((tmp_path / "meanflow_eval" / "metrics.json").read_text())["digits_fd_by_steps"]
        assert set(by_steps) == {"1", "2", "4"} and all(np.isfinite(v) for v in by_steps.values())
