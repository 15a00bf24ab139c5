"""Bad input through the CLI, as a new user types it: each case exits non-zero with one line
`error: ...` that names the problem (the expected words) and no traceback."""
import pathlib

import numpy as np
import pytest

from diffusion_jax import cli
from diffusion_jax.evaluation.frechet import save_statistics
from tests.train_helpers import tiny_config, write_untrained_run

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("cli_errors")  # one worker: the runs below are made once
DIGITS = str(REPO / "experiments" / "digits_unet.py")


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Runs and files the cases point at: an unconditional and a 10-class run, image folders."""
    from PIL import Image
    root = tmp_path_factory.mktemp("cli")
    write_untrained_run(root / "run", tiny_config(2))
    write_untrained_run(root / "labelled", tiny_config(2, **{"data.use_labels": True, "data.num_classes": 10}))
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "broken" / "good.png")
    (root / "broken" / "bad.png").write_bytes(b"this is not a png")
    (root / "truncated").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "whole.png")
    data = (root / "whole.png").read_bytes()
    (root / "truncated" / "cut.png").write_bytes(data[: len(data) // 2])
    (root / "a_file").write_text("x")
    save_statistics(root / "stats.npz", np.zeros(3), np.eye(3))
    return root


def train_args(*overrides, workdir="{root}/new"):
    return ["train", "--config", DIGITS, "--workdir", workdir, *overrides]


CASES = {
    # train: settings
    "negative steps": (train_args("--config.train.steps=-5"), "train.steps must be"),
    "zero batch": (train_args("--config.data.batch_size=0"), "data.batch_size must be"),
    "zero ckpt_every": (train_args("--config.train.ckpt_every=0"), "train.ckpt_every must be"),
    "zero log_every": (train_args("--config.train.log_every=0"), "train.log_every must be"),
    "negative sample_every": (train_args("--config.train.sample_every=-1"), "train.sample_every must be"),
    "zero keep_ckpts": (train_args("--config.train.keep_ckpts=0"), "train.keep_ckpts must be"),
    "zero sample steps": (train_args("--config.sample.steps=0"), "sample.steps must be"),
    "sample steps above T": (train_args("--config.sample.steps=5000"), "cannot exceed diffusion.num_timesteps"),
    "batch not divisible": (train_args("--config.data.batch_size=12"), "not divisible by the device count 8"),
    "unknown preset": (train_args("--config.model.name=unet_huge"), "unknown model preset 'unet_huge'"),
    "unknown dataset": (train_args("--config.data.name=not_a_dataset"), "unknown dataset 'not_a_dataset'"),
    "missing folder": (train_args("--config.data.name=folder:{root}/nowhere"), "does not exist"),
    "empty folder": (train_args("--config.data.name=folder:{root}/empty"), "no PNG or JPEG images"),
    "corrupt image": (train_args("--config.data.name=folder:{root}/broken"), "bad.png"),
    "truncated image": (train_args("--config.data.name=folder:{root}/truncated"), "cut.png"),
    "channel mismatch": (train_args("--config.data.channels=3"), "has 1 channels but the config asks for 3"),
    "labels without classes": (train_args("--config.data.use_labels=True"), "data.num_classes is 0"),
    "label dropout without labels": (train_args("--config.train.label_dropout=0.1"), "label_dropout"),
    "label dropout of 1.5": (train_args("--config.train.label_dropout=1.5"), "label_dropout must be in [0, 1)"),
    "guidance on an unconditional run": (train_args("--config.sample.guidance_scale=5.0"), "unconditional"),
    "linear schedule, T = 20": (train_args("--config.diffusion.num_timesteps=20", "--config.sample.steps=10",
                                           "--config.diffusion.schedule=linear"), "beta = 1"),
    "T = 1": (train_args("--config.diffusion.num_timesteps=1", "--config.sample.steps=1",
                         "--config.diffusion.schedule=linear"), "of the signal"),
    "unknown schedule": (train_args("--config.diffusion.schedule=quadratic"), "diffusion.schedule 'quadratic'"),
    "unknown prediction": (train_args("--config.diffusion.prediction=score"), "diffusion.prediction 'score'"),
    "unknown variance": (train_args("--config.diffusion.variance=learned"), "diffusion.variance 'learned'"),
    "unknown sampler": (train_args("--config.sample.method=bogus"), "sample.method 'bogus'"),
    "unknown optimizer": (train_args("--config.optim.optimizer=sgd"), "optim.optimizer 'sgd'"),
    "negative learning rate": (train_args("--config.optim.learning_rate=-1.0"), "optim.learning_rate"),
    "ema decay of 1": (train_args("--config.train.ema_decay=1.0"), "train.ema_decay must be in [0, 1)"),
    "mistyped key": (train_args("--config.train.no_such_key=3"), "no setting 'no_such_key'"),
    "mistyped section": (train_args("--config.trian.steps=3"), 'Did you mean "train"'),
    "wrong type": (train_args("--config.train.steps=many"), "steps"),
    "unknown model field": (train_args("--config.model.overrides.no_such_field=3"), "no_such_field"),
    "patch size vs image size": (train_args("--config.model.name=dit_tiny", "--config.data.image_size=9"),
                                 "not divisible by the patch size"),
    "missing config file": (["train", "--config", "{root}/missing.py", "--workdir", "{root}/new"],
                            "no such file"),
    "no workdir": (["train", "--config", DIGITS], "--workdir"),
    "unwritable workdir": (train_args(workdir="{root}/a_file/run"), "not writable"),
    # sample
    "sample: no run": (["sample", "--workdir", "{root}/nowhere", "--out", "{root}/s.npz"], "no run in"),
    "sample: zero steps": (["sample", "--workdir", "{root}/run", "--steps", "0", "--out", "{root}/s.npz"],
                           "num_steps must be in [1, 100]"),
    "sample: ddpm, 5000 steps": (["sample", "--workdir", "{root}/run", "--method", "ddpm", "--steps", "5000",
                                  "--out", "{root}/s.npz"], "num_steps must be in [1, 100]"),
    "sample: zero samples": (["sample", "--workdir", "{root}/run", "--num_samples", "0", "--out", "{root}/s.npz"],
                             "--num_samples and --batch_size must be at least 1"),
    "sample: guidance, unconditional": (["sample", "--workdir", "{root}/run", "--guidance_scale", "5",
                                         "--out", "{root}/s.npz"], "this run is unconditional"),
    "sample: labels, unconditional": (["sample", "--workdir", "{root}/run", "--labels", "3", "--out", "{root}/s.npz"],
                                      "this run is unconditional"),
    "sample: label 12 of 10 classes": (["sample", "--workdir", "{root}/labelled", "--labels", "12",
                                        "--out", "{root}/s.npz"], "labels must be classes in [0, 10)"),
    "sample: label -1": (["sample", "--workdir", "{root}/labelled", "--labels", "-1", "--out", "{root}/s.npz"],
                         "labels must be classes in [0, 10)"),
    "sample: option of another sampler": (["sample", "--workdir", "{root}/run", "--method", "ddim", "--option",
                                           "sigmas=karras", "--out", "{root}/s.npz"], "has no option(s) ['sigmas']"),
    "sample: option without a value": (["sample", "--workdir", "{root}/run", "--option", "sigmas",
                                        "--out", "{root}/s.npz"], "write --option KEY=VALUE"),
    "sample: unknown sigma grid": (["sample", "--workdir", "{root}/run", "--method", "euler", "--option",
                                    "sigmas=cosine", "--out", "{root}/s.npz"], "unknown sigmas 'cosine'"),
    "evaluate: unknown option": (["evaluate", "--workdir", "{root}/run", "--option", "bogus=1", "--out", "{root}/e"],
                                 "has no option(s) ['bogus']"),
    "sampler option in the config": (train_args("--config.sample.options.sigmas=karras"),
                                     "sampler 'ddpm' has no option(s) ['sigmas']"),
    "zero SNR with eps": (train_args("--config.diffusion.zero_terminal_snr=True"), "zero terminal SNR"),
    "sample: labels not numbers": (["sample", "--workdir", "{root}/labelled", "--labels", "cat,dog",
                                    "--out", "{root}/s.npz"], "--labels 'cat,dog'"),
    "sample: missing checkpoint": (["sample", "--workdir", "{root}/run", "--checkpoint", "7", "--out", "{root}/s.npz"],
                                   "no checkpoint at step 7"),
    "sample: unwritable out": (["sample", "--workdir", "{root}/run", "--out", "{root}/a_file/s.npz"], "cannot write"),
    "sample: unknown method": (["sample", "--workdir", "{root}/run", "--method", "bogus", "--out", "{root}/s.npz"],
                               "invalid choice: 'bogus'"),
    "sample: no --out": (["sample", "--workdir", "{root}/run"], "--out"),
    # evaluate, fid-stats, the command itself
    "evaluate: zero samples": (["evaluate", "--workdir", "{root}/run", "--num_samples", "0", "--out", "{root}/e"],
                               "at least 1"),
    "evaluate: zero steps": (["evaluate", "--workdir", "{root}/run", "--steps", "0", "--out", "{root}/e"],
                             "num_steps must be in [1, 100]"),
    "evaluate: no run": (["evaluate", "--workdir", "{root}/nowhere"], "no run in"),
    "evaluate: read-only place": (["evaluate", "--workdir", "{root}/run", "--out", "{root}/a_file/eval"], "cannot write"),
    "evaluate: missing reference": (["evaluate", "--workdir", "{root}/run", "--fid_stats", "{root}/missing.npz",
                                     "--out", "{root}/e"], "fid-stats"),
    "evaluate: missing Inception": (["evaluate", "--workdir", "{root}/run", "--fid_stats", "{root}/stats.npz",
                                     "--inception_weights", "{root}/nothing.npz", "--out", "{root}/e"],
                                    "FID Inception weights not found"),
    "fid-stats: unknown dataset": (["fid-stats", "--dataset", "not_a_dataset", "--out", "{root}/r.npz"],
                                   "unknown dataset 'not_a_dataset'"),
    "unknown command": (["bogus"], "invalid choice: 'bogus'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_with_exit_code_2(case, places, capsys):
    argv, words = CASES[case]
    argv = [a.replace("{root}", str(places)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, (case, out.err[-2000:])
    assert len(errors) == 1 and errors[0].startswith("error: "), (case, out.err[-2000:])
    assert words in errors[0], (case, errors[0])
    assert "Traceback" not in out.err + out.out, case


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40


def test_a_failure_of_the_system_exits_1_and_a_bug_keeps_its_traceback(places, capsys, monkeypatch):
    from diffusion_jax.errors import NonFiniteLoss
    assert cli.exit_code(NonFiniteLoss("x")) == 1 and cli.exit_code(OSError(28, "No space left on device")) == 1
    assert cli.exit_code(ValueError("x")) == 2 and cli.exit_code(ZeroDivisionError()) is None
    with pytest.raises(FileNotFoundError, match="no run in"):  # --debug: the traceback of a user's mistake too
        cli.main(["--debug", "sample", "--workdir", str(places / "nowhere"), "--out", str(places / "s.npz")])
    monkeypatch.setattr(cli, "_sample", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug is not dressed up as the user's mistake
        cli.main(["sample", "--workdir", str(places / "run"), "--out", str(places / "s.npz")])


def test_sample_out_paths_stay_where_they_are_asked_for(places, capsys):
    out = places / "run.v2" / "samples"  # a dot in a folder name; no suffix on the file
    cli.main(["sample", "--workdir", str(places / "run"), "--num_samples", "4", "--steps", "2", "--out", str(out)])
    assert sorted(p.name for p in out.parent.iterdir()) == ["samples.npz", "samples.png"]
    assert not (places / "run.png").exists()


def test_model_fields_can_be_overridden_from_the_command_line():
    from diffusion_jax.builders import build_model
    from experiments.digits_unet import get_config

    def config_dict(fv, args):
        from ml_collections import config_flags
        config_flags.DEFINE_config_dict("config", get_config(), flag_values=fv, lock_config=True, sys_argv=args)

    config, workdir, _ = cli._parse_train_flags(
        ["prog", "--workdir", "w", "--config.model.overrides.ch=16", "--config.model.overrides.ch_mult=(1, 2, 2)",
         "--config.train.steps=7"], config_dict)
    assert config.model.overrides.ch == 16 and config.train.steps == 7 and workdir == "w"
    model = build_model(config)
    assert model.ch == 16 and tuple(model.ch_mult) == (1, 2, 2)
