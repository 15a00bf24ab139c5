"""Bad input through the CLI, as a new user types it: each case exits non-zero with one line
`error: ...` that names the problem (the expected words) and no traceback."""
import json
import pathlib
import re

import numpy as np
import pytest

from diffusion_jax import cli
from diffusion_jax.evaluation.frechet import save_statistics
from tests.train_helpers import tiny_config, write_untrained_run

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cli_errors")]  # one worker: the runs below are made once
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
    _bad_inputs_of_the_newer_commands(root)
    for name, index in (("refiner", {"_class_name": "StableDiffusionXLImg2ImgPipeline"}),
                        ("inpaint_pipeline", {"_class_name": "StableDiffusionInpaintPipeline"})):
        (root / name).mkdir()
        (root / name / "model_index.json").write_text(__import__("json").dumps(index))
    return root


def _fabricated_job(directory, size: int = 8, shards=((0, 1), (2, 3)), manifest=True):
    """A generate job's output written directly (no sampling): uint8 shards of `size` x `size`
    digits-like images, and the manifest listing `shards`."""
    from diffusion_jax.shards import ShardDir
    rng = np.random.default_rng(0)
    store = ShardDir(directory)
    for first, last in shards:
        store.write(first, last, images=rng.integers(0, 256, (last - first + 1, size, size, 1), dtype=np.uint8),
                    labels=np.full(last - first + 1, -1, np.int32))
    if manifest:
        records = [{"file": store.path(a, b).name, "first": a, "last": b} for a, b in shards]
        (directory / "manifest.json").write_text(json.dumps({"num_samples": 4, "shards": records}))
    return store


def _bad_inputs_of_the_newer_commands(root):
    """Damaged files and directories for generate, fid, fid-stats, prepare, import and export."""
    import shutil
    import zipfile

    from safetensors.numpy import load_file, save_file
    # reference statistics, damaged in every way the probe found
    q = np.zeros((4, 32), np.float32)  # LoRA files: one for a U-Net, one whose layer the DiT does not have
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": q,
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": q.T.copy()},
              str(root / "unet_lora.safetensors"))
    save_file({"transformer.nothing.lora_A.weight": q, "transformer.nothing.lora_B.weight": q.T.copy()},
              str(root / "odd_lora.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": q,  # rank 4, its metadata says 8
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": q.T.copy()},
              str(root / "rank_lora.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 8, "transformer.lora_alpha": 8})})
    np.save(root / "stats.npy", np.zeros(3))
    whole = (root / "stats.npz").read_bytes()
    (root / "stats_cut.npz").write_bytes(whole[: len(whole) // 2])
    (root / "stats_text.npz").write_text("mu sigma")
    with zipfile.ZipFile(root / "stats_crc.npz", "w", zipfile.ZIP_STORED) as z:  # a flipped byte: bad CRC-32
        z.writestr("mu.npy", _npy(np.zeros(3)))
        z.writestr("sigma.npy", _npy(np.eye(3)))
    data = bytearray((root / "stats_crc.npz").read_bytes())
    data[data.index(b"sigma.npy") + 90] ^= 0xFF
    (root / "stats_crc.npz").write_bytes(bytes(data))
    np.savez(root / "stats_nan.npz", mu=np.array([0.0, np.nan, 0.0]), sigma=np.eye(3))
    np.savez(root / "stats_neg.npz", mu=np.zeros(3), sigma=-np.eye(3))
    np.savez(root / "stats_asym.npz", mu=np.zeros(3), sigma=np.array([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]]))
    np.savez(root / "stats_64.npz", mu=np.zeros(64), sigma=np.eye(64))
    # generate's output directories
    _fabricated_job(root / "job")
    _fabricated_job(root / "job_missing", shards=((0, 1),), manifest=False)
    (root / "job_missing" / "manifest.json").write_text(json.dumps(
        {"num_samples": 4, "shards": [{"first": 0, "last": 1}, {"first": 2, "last": 3}]}))
    _fabricated_job(root / "job_extra", shards=((0, 1), (2, 3), (4, 5)), manifest=False)
    (root / "job_extra" / "manifest.json").write_text(json.dumps(
        {"num_samples": 4, "shards": [{"first": 0, "last": 1}, {"first": 2, "last": 3}]}))
    _fabricated_job(root / "job_unfinished", shards=((0, 1),), manifest=False)
    (root / "job_unfinished" / "job.json").write_text("{}")
    _fabricated_job(root / "job_16", size=16)
    (root / "empty_job").mkdir()
    (root / "empty_job" / "job.json").write_text("")
    _fabricated_job(root / "strangers", shards=((0, 1),), manifest=False)  # shards of no job, no job.json
    # prepare: a directory claimed with other settings, one with an empty claim
    (root / "prep" / "train").mkdir(parents=True)
    (root / "prep" / "train" / "settings.json").write_text(json.dumps({"source": "digits", "image_size": 16}))
    (root / "prep_empty" / "train").mkdir(parents=True)
    (root / "prep_empty" / "train" / "settings.json").write_text("")
    # import: a small UNet2DModel directory, then copies damaged one way each
    import jax

    import diffusion_jax as dj
    from diffusion_jax.interop import save_diffusers
    from diffusion_jax.models import UNet
    unet = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_groups=4, dropout=0.0,
                mid_attn=False)
    params = jax.jit(unet.init)(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32), np.zeros((1,), np.int32))["params"]
    save_diffusers(root / "exported", unet, params, dj.make_schedule("linear", 100), input_shape=(8, 8, 1))
    config = json.loads((root / "exported" / "config.json").read_text())
    for name, change in (("string_for_list", {"block_out_channels": "8,16"}), ("float_for_int", {"layers_per_block": 1.5}),
                         ("string_for_int", {"norm_num_groups": "four"})):
        shutil.copytree(root / "exported", root / name)
        (root / name / "config.json").write_text(json.dumps({**config, **change}))
    shutil.copytree(root / "exported", root / "gelu_unet")
    (root / "gelu_unet" / "config.json").write_text(json.dumps({**config, "act_fn": "gelu"}))
    shutil.copytree(root / "exported", root / "sigmoid_schedule")
    (root / "sigmoid_schedule" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}))
    shutil.copytree(root / "exported", root / "bad_scheduler")
    (root / "bad_scheduler" / "scheduler" / "scheduler_config.json").write_text("{not json")
    shutil.copytree(root / "exported", root / "wrong_scheduler")
    (root / "wrong_scheduler" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDPMScheduler", "num_train_timesteps": "1000"}))
    shutil.copytree(root / "exported", root / "empty_config")
    (root / "empty_config" / "config.json").write_text("")
    shutil.copytree(root / "exported", root / "nan_weights")
    weights = root / "nan_weights" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, str(weights))
    # export: a directory that holds another model
    (root / "other_model").mkdir()
    (root / "other_model" / "config.json").write_text("{}")


def _npy(array) -> bytes:
    import io
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


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
    "sample steps above T": (train_args("--config.sample.steps=5000"), "num_steps must be an integer in [1, 1000]"),
    "unknown preset": (train_args("--config.model.name=unet_huge"), "unknown model preset 'unet_huge'"),
    "unknown dataset": (train_args("--config.data.name=not_a_dataset"), "unknown dataset 'not_a_dataset'"),
    "missing folder": (train_args("--config.data.name=folder:{root}/nowhere"), "does not exist"),
    "empty folder": (train_args("--config.data.name=folder:{root}/empty"), "no PNG or JPEG images"),
    "corrupt image": (train_args("--config.data.name=folder:{root}/broken"), "bad.png"),
    "truncated image": (train_args("--config.data.name=folder:{root}/truncated"), "cut.png"),
    "channel mismatch": (train_args("--config.data.channels=3"), "has 1 channels but the config asks for 3"),
    "labels without classes": (train_args("--config.data.use_labels=True"), "data.num_classes is 0"),
    "condition dropout without a condition": (train_args("--config.train.cond_dropout=0.1"), "cond_dropout"),
    "condition dropout of 1.5": (train_args("--config.train.cond_dropout=1.5"), "cond_dropout must be in [0, 1)"),
    "label_dropout, renamed": (train_args("--config.train.label_dropout=0.1"), "renamed: use --config.train.cond_dropout"),
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
    "unknown process": (train_args("--config.diffusion.process=ve"), "unknown diffusion.process 've'"),
    "velocity on ddpm": (train_args("--config.diffusion.prediction=velocity"), "velocity target needs a continuous time"),
    "unknown time sampling": (train_args("--config.train.time_sampling=bogus"), "unknown time_sampling 'bogus'"),
    "meanflow on a one-time model": (train_args("--config.diffusion.process=flow", "--config.diffusion.prediction=velocity",
                                                "--config.diffusion.objective=meanflow", "--config.sample.method=euler"),
                                     "got model.second_time False"),
    "an unknown objective": (train_args("--config.diffusion.objective=consistent"), "unknown diffusion.objective"),
    "a meanflow option out of range": (train_args("--config.diffusion.process=flow", "--config.model.second_time=True",
                                                  "--config.diffusion.prediction=velocity", "--config.sample.method=euler",
                                                  "--config.diffusion.objective=meanflow",
                                                  "--config.diffusion.objective_options.ratio=2.0"),
                                       "option ratio = 2.0 must be a finite number in [0, 1]"),
    "meanflow's guidance on an unconditional run": (train_args("--config.diffusion.process=flow", "--config.model.second_time=True",
                                                              "--config.diffusion.prediction=velocity", "--config.sample.method=euler",
                                                              "--config.diffusion.objective=meanflow",
                                                              "--config.diffusion.objective_options.guidance=2.0"),
                                                   "train.cond_dropout > 0"),
    "preconditioning a flow run": (train_args("--config.diffusion.process=flow", "--config.diffusion.prediction=velocity",
                                              "--config.model.precondition=edm", "--config.sample.method=euler"),
                                   "needs diffusion.process='edm'"),
    "a bad process option": (train_args("--config.diffusion.process=flow", "--config.diffusion.prediction=velocity",
                                        "--config.diffusion.process_options.shift=-1.0", "--config.sample.method=euler"),
                             "shift = -1.0"),
    "eps prediction on flow": (train_args("--config.diffusion.process=flow", "--config.diffusion.prediction=eps",
                                          "--config.sample.method=euler"), "noisy end has alpha = 0"),
    "mistyped section": (train_args("--config.trian.steps=3"), 'Did you mean "train"'),
    "wrong type": (train_args("--config.train.steps=many"), "steps"),
    "unknown model field": (train_args("--config.model.overrides.no_such_field=3"), "no_such_field"),
    "patch size vs image size": (train_args("--config.model.name=dit_tiny", "--config.data.image_size=9"),
                                 "not divisible by the patch size"),
    "missing config file": (["train", "--config", "{root}/missing.py", "--workdir", "{root}/new"],
                            "no such file"),
    "no workdir": (["train", "--config", DIGITS], "--workdir"),
    "unwritable workdir": (train_args(workdir="{root}/a_file/run"), "--workdir: cannot write"),
    # sample
    "sample: no run": (["sample", "--workdir", "{root}/nowhere", "--out", "{root}/s.npz"], "no run in"),
    "sample: zero steps": (["sample", "--workdir", "{root}/run", "--steps", "0", "--out", "{root}/s.npz"],
                           "--steps: must be at least 1, got 0"),
    "sample: ddpm, 5000 steps": (["sample", "--workdir", "{root}/run", "--method", "ddpm", "--steps", "5000",
                                  "--out", "{root}/s.npz"], "num_steps must be an integer in [1, 100]"),
    "sample: zero samples": (["sample", "--workdir", "{root}/run", "--num_samples", "0", "--out", "{root}/s.npz"],
                             "--num_samples: must be at least 1, got 0"),
    "sample: guidance, unconditional": (["sample", "--workdir", "{root}/run", "--guidance_scale", "5",
                                         "--out", "{root}/s.npz"], "this run is unconditional"),
    "sample: labels, unconditional": (["sample", "--workdir", "{root}/run", "--labels", "3", "--out", "{root}/s.npz"],
                                      "this run is unconditional"),
    "sample: label 12 of 10 classes": (["sample", "--workdir", "{root}/labelled", "--labels", "12",
                                        "--out", "{root}/s.npz"], "labels must be classes in [0, 10)"),
    "sample: a negative prompt on a label run": (["sample", "--workdir", "{root}/labelled", "--negative_prompt",
                                                 "blurry", "--out", "{root}/s.npz"], "not text-conditioned"),
    "generate: a negative prompt on an unconditional run": (["generate", "--workdir", "{root}/run", "--num_samples",
                                                             "4", "--negative_prompt", "blurry", "--out", "{root}/g"],
                                                            "not text-conditioned"),
    "sample: a flag that is not a boolean": (["sample", "--workdir", "{root}/run", "--method", "dpm++_2m", "--option",
                                              "lower_order_final=maybe", "--out", "{root}/s.npz"], "must be true or false"),
    "sample: a fractional step offset": (["sample", "--workdir", "{root}/run", "--method", "ddim", "--option",
                                          "steps_offset=1.5", "--out", "{root}/s.npz"], "takes a whole number"),
    "a vp process that keeps the signal": (train_args("--config.diffusion.process=vp",
                                                      "--config.diffusion.process_options.beta_max=0.2"),
                                           "keeps alpha = 0.9"),
    "a degenerate time sampling": (train_args("--config.diffusion.process=flow", "--config.diffusion.prediction=velocity",
                                              "--config.sample.method=euler", "--config.train.time_sampling=mode",
                                              "--config.train.time_sampling_options.scale=50.0"), "scale = 50.0 must be"),
    "process options on a ddpm run": (train_args("--config.diffusion.process_options.shift=3.0"),
                                      "a ddpm run's schedule is"),
    "sample: an empty churn window": (["sample", "--workdir", "{root}/run", "--method", "heun", "--option", "s_tmin=5",
                                       "--option", "s_tmax=1", "--out", "{root}/s.npz"], "churn window"),
    "sample: label -1": (["sample", "--workdir", "{root}/labelled", "--labels", "-1", "--out", "{root}/s.npz"],
                         "labels must be classes in [0, 10)"),
    "sample: option of another sampler": (["sample", "--workdir", "{root}/run", "--method", "ddim", "--option",
                                           "s_churn=1", "--out", "{root}/s.npz"], "has no option(s) ['s_churn']"),
    "sample: option without a value": (["sample", "--workdir", "{root}/run", "--option", "sigmas",
                                        "--out", "{root}/s.npz"], "write --option KEY=VALUE"),
    "sample: unknown sigma grid": (["sample", "--workdir", "{root}/run", "--method", "euler", "--option",
                                    "sigmas=cosine", "--out", "{root}/s.npz"], "option sigmas = 'cosine' is not one it takes"),
    "evaluate: unknown option": (["evaluate", "--workdir", "{root}/run", "--option", "bogus=1", "--out", "{root}/e"],
                                 "has no option(s) ['bogus']"),
    "sampler option in the config": (train_args("--config.sample.options.s_churn=1.0"),
                                     "sampler 'ddpm' has no option(s) ['s_churn']"),
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
                             "--steps: must be at least 1, got 0"),
    "evaluate: no run": (["evaluate", "--workdir", "{root}/nowhere"], "no run in"),
    "evaluate: guidance, unconditional": (["evaluate", "--workdir", "{root}/run", "--guidance_scale", "5", "--out",
                                           "{root}/e"], "guidance scale 5.0 given, but this run is unconditional"),
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

S = ["sample", "--workdir", "{root}/run", "--out", "{root}/s.npz"]
G = ["generate", "--workdir", "{root}/run", "--num_samples", "4", "--shard_size", "2"]
FID = ["fid", "--samples", "{root}/job", "--features", "digits", "--ref"]
IMPORT = ["import", "--workdir", "{root}/imported", "--from"]
NEWER_COMMANDS = {
    # generate
    "generate: zero samples": (["generate", "--workdir", "{root}/run", "--num_samples", "0", "--out", "{root}/g"],
                               "--num_samples: must be at least 1, got 0"),
    "generate: zero shard size": (G[:-1] + ["0", "--out", "{root}/g"], "--shard_size: must be at least 1"),
    "generate: eta with heun": (G + ["--method", "heun", "--eta", "0.7", "--out", "{root}/g"],
                                "sampler 'heun' has no eta"),
    "generate: eta twice": (G + ["--method", "ddim", "--eta", "0.2", "--option", "eta=0.5", "--out", "{root}/g"],
                            "eta given twice"),
    "generate: out is a file": (G + ["--out", "{root}/a_file"], "it is a file, not a directory"),
    "generate: empty job.json": (G + ["--out", "{root}/empty_job"], "job.json is empty"),
    "generate: shards of another job": (G + ["--out", "{root}/strangers"], "holds shards of another job"),
    "generate: unknown method": (G + ["--method", "bogus", "--out", "{root}/g"], "invalid choice: 'bogus'"),
    "generate: labels, unconditional": (G + ["--labels", "1", "--out", "{root}/g"], "this run is unconditional"),
    "generate: negative checkpoint": (G + ["--checkpoint", "-1", "--out", "{root}/g"],
                                      "--checkpoint: must be at least 0"),
    # sampler options: typed and range-checked by each sampler's declaration
    "option: s_churn=-1": (S + ["--method", "heun", "--option", "s_churn=-1"], "option s_churn = -1 is out of range"),
    "option: s_churn=nan": (S + ["--method", "euler", "--option", "s_churn=nan"], "option s_churn = 'nan' is out of"),
    "option: rho=0": (S + ["--method", "heun", "--option", "rho=0"], "option rho = 0 is out of range"),
    "option: rho=-7": (S + ["--method", "heun", "--option", "rho=-7"], "option rho = -7 is out of range"),
    "option: rho=inf": (S + ["--method", "heun", "--option", "rho=inf"], "option rho = 'inf' is out of range"),
    "option: rho=abc": (S + ["--method", "heun", "--option", "rho=abc"], "option rho must be a number, got 'abc'"),
    "option: eta=2 on ddim": (S + ["--method", "ddim", "--option", "eta=2"], "option eta = 2 is out of range"),
    "option: s_noise=-0.5": (S + ["--method", "euler", "--option", "s_noise=-0.5"], "option s_noise = -0.5 is out"),
    "option: unknown spacing": (S + ["--method", "ddim", "--option", "spacing=bogus"],
                                "option spacing = 'bogus' is not one it takes"),
    "sample: eta with dpm++_2m": (S + ["--method", "dpm++_2m", "--eta", "0.7"], "sampler 'dpm++_2m' has no eta"),
    "sample: eta with ddpm": (S + ["--method", "ddpm", "--eta", "0.7"], "sampler 'ddpm' has no eta"),
    "sample: eta nan": (S + ["--eta", "nan"], "--eta: must be a finite number"),
    # fid: the reference is checked where it is read, the samples against their job
    "fid: missing samples": (["fid", "--samples", "{root}/nowhere", "--ref", "{root}/stats.npz"], "no directory"),
    "fid: reference as .npy": (FID + ["{root}/stats.npy"], "holds one array, not the 'mu' and 'sigma'"),
    "fid: truncated reference": (FID + ["{root}/stats_cut.npz"], "cannot be read as NumPy statistics"),
    "fid: text reference": (FID + ["{root}/stats_text.npz"], "cannot be read as NumPy statistics"),
    "fid: reference with a bad CRC": (FID + ["{root}/stats_crc.npz"], "stats_crc.npz is damaged"),
    "fid: NaN in the reference mean": (FID + ["{root}/stats_nan.npz"], "mu has 1 non-finite value"),
    "fid: reference covariance -I": (FID + ["{root}/stats_neg.npz"], "sigma is not positive semi-definite"),
    "fid: asymmetric reference covariance": (FID + ["{root}/stats_asym.npz"], "sigma is not symmetric"),
    "fid: reference of other features": (FID + ["{root}/stats.npz"], "has 3 features but the digits features"),
    "fid: unfinished job": (["fid", "--samples", "{root}/job_unfinished", "--features", "digits", "--ref",
                             "{root}/stats_64.npz"], "is not finished"),
    "fid: a shard missing": (["fid", "--samples", "{root}/job_missing", "--features", "digits", "--ref",
                              "{root}/stats_64.npz"], "1 missing (samples_00000002_00000003.npz)"),
    "fid: an extra shard": (["fid", "--samples", "{root}/job_extra", "--features", "digits", "--ref",
                             "{root}/stats_64.npz"], "1 not the job's (samples_00000004_00000005.npz)"),
    "fid: digits features of 16x16 images": (["fid", "--samples", "{root}/job_16", "--features", "digits", "--ref",
                                              "{root}/stats_64.npz"], "take 8x8x1 images"),
    # fid-stats
    "fid-stats: negative max_images": (["fid-stats", "--dataset", "digits", "--max_images", "-5", "--out",
                                        "{root}/r.npz"], "--max_images: must be at least 0, got -5"),
    "fid-stats: one image": (["fid-stats", "--dataset", "digits", "--features", "digits", "--image_size", "8",
                              "--channels", "1", "--max_images", "1", "--out", "{root}/r.npz"],
                             "statistics need at least 2 images"),
    "fid-stats: no dataset": (["fid-stats", "--out", "{root}/r.npz"], "needs --dataset"),
    "fid-stats: zero image size": (["fid-stats", "--dataset", "digits", "--image_size", "0", "--out",
                                    "{root}/r.npz"], "--image_size: must be at least 1"),
    # prepare
    "prepare: zero image size": (["prepare", "--dataset", "digits", "--image_size", "0", "--out", "{root}/p"],
                                 "--image_size: must be at least 1"),
    "prepare: unknown dataset": (["prepare", "--dataset", "not_a_dataset", "--image_size", "8", "--out",
                                  "{root}/p"], "unknown dataset 'not_a_dataset'"),
    "prepare: other settings": (["prepare", "--dataset", "digits", "--image_size", "8", "--channels", "1",
                                 "--out", "{root}/prep"], "holds a prepared split with other settings"),
    "prepare: empty settings.json": (["prepare", "--dataset", "digits", "--image_size", "8", "--channels", "1",
                                      "--out", "{root}/prep_empty"], "settings.json is empty"),
    # import
    "import: no directory": (IMPORT + ["{root}/nowhere"], "no directory"),
    "import: no --workdir": (["import", "--from", "{root}/exported"], "required: --workdir"),
    "import: a string for a list": (IMPORT + ["{root}/string_for_list"],
                                    "block_out_channels = '8,16' has the wrong type: it must be a list of integers"),
    "import: a float for an int": (IMPORT + ["{root}/float_for_int"], "layers_per_block = 1.5 has the wrong type"),
    "import: a string for an int": (IMPORT + ["{root}/string_for_int"], "must be an integer"),
    "import: scheduler config not JSON": (IMPORT + ["{root}/bad_scheduler"], "scheduler_config.json is not valid"),
    "import: scheduler field of the wrong type": (IMPORT + ["{root}/wrong_scheduler"],
                                                  "num_train_timesteps = '1000' has the wrong type"),
    "import: empty config.json": (IMPORT + ["{root}/empty_config"], "config.json is empty"),
    "import: an unsupported model field": (IMPORT + ["{root}/gelu_unet"], "act_fn = 'gelu' is not supported"),
    "import: an unsupported schedule": (IMPORT + ["{root}/sigmoid_schedule"], "beta_schedule = 'sigmoid' is not supported"),
    "import: NaN weights": (IMPORT + ["{root}/nan_weights"], "non-finite value(s)"),
    "import: unknown argument": (IMPORT + ["{root}/exported", "--bogus"], "unrecognized arguments: --bogus"),
    # export
    "export: out holds another model": (["export", "--workdir", "{root}/run", "--out", "{root}/other_model"],
                                        "already holds files (config.json)"),
    "export: out is a file": (["export", "--workdir", "{root}/run", "--out", "{root}/a_file"], "is a file"),
    "export: no run": (["export", "--workdir", "{root}/nowhere", "--out", "{root}/x"], "no run in"),
    # prompts and pipelines (text-to-image)
    "sample: a prompt for an unconditional run": (["sample", "--workdir", "{root}/run", "--prompt", "a cat", "--out",
                                                   "{root}/p.npz"], "not text-conditioned (model.text_encoder): drop them"),
    "generate: prompts for an unconditional run": (G + ["--prompts", "{root}/no_prompts.txt", "--out", "{root}/g"],
                                                     "not text-conditioned (model.text_encoder): drop them"),
    "sample: a LoRA for a U-Net on a DiT run": (["sample", "--workdir", "{root}/run", "--lora", "{root}/unet_lora.safetensors",
                                                 "--out", "{root}/l.npz"], "adapts the 'unet', which this model does not have"),
    "sample: a LoRA key that matches no layer": (["sample", "--workdir", "{root}/run", "--lora",
                                                  "{root}/odd_lora.safetensors", "--out", "{root}/l.npz"],
                                                 "'transformer.nothing.lora_A.weight' matches no layer of the transformer"),
    "sample: a LoRA weight that is not a number": (["sample", "--workdir", "{root}/run", "--lora",
                                                    "{root}/odd_lora.safetensors:nan", "--out", "{root}/l.npz"],
                                                   "the weight 'nan' must be a finite number"),
    "sample: a LoRA whose rank disagrees with its metadata": (["sample", "--workdir", "{root}/run", "--lora",
                                                               "{root}/rank_lora.safetensors", "--out", "{root}/l.npz"],
                                                              "has rank 4 but the file's metadata says 8"),
    "generate: a LoRA file that is not there": (G + ["--lora", "{root}/none.safetensors", "--out", "{root}/g_lora"],
                                                "no LoRA file"),
    "train: a LoRA on a base that is not a run": (["train", "--workdir", "{root}/lora_a", "--config.lora.base={root}/nowhere",
                                                   "--config.lora.rank=4"], "no run in"),
    "train: a negative LoRA rank": (["train", "--workdir", "{root}/lora_b", "--config.lora.base={root}/run",
                                     "--config.lora.rank=-1"], "lora.rank must be a whole number >= 0"),
    "train: LoRA targets that match no layer": (["train", "--workdir", "{root}/lora_c", "--config.lora.base={root}/run",
                                                 "--config.lora.rank=2", "--config.lora.targets=nothing"],
                                                "lora.targets ['nothing'] match no layer of this model"),
    "train: text encoder adapters on a run without one": (["train", "--workdir", "{root}/lora_d", "--config.lora.base={root}/run",
                                                           "--config.lora.rank=2", "--config.lora.text_encoder=True"],
                                                          "lora.text_encoder is True but this run has no text encoder"),
    "export: --lora of a run that is not a LoRA run": (["export", "--workdir", "{root}/run", "--lora",
                                                        "{root}/adapters.safetensors"], "is not a LoRA run"),
    "export: neither --out nor --lora": (["export", "--workdir", "{root}/run"], "give --out DIR"),
    "import: SDXL's refiner": (["import", "--from", "{root}/refiner", "--workdir", "{root}/imported_refiner"],
                               "SDXL's refiner, out of scope"),
    "import: a pipeline that is not a run": (["import", "--from", "{root}/inpaint_pipeline", "--workdir",
                                              "{root}/imported_inpaint"], "does not import as a run"),
}
assert not set(CASES) & set(NEWER_COMMANDS)
CASES.update(NEWER_COMMANDS)


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


def test_there_are_at_least_40_cases_and_30_of_the_newer_commands():
    assert len(CASES) >= 88 and len(NEWER_COMMANDS) >= 30


def test_a_failure_of_the_system_exits_1_and_a_bug_keeps_its_traceback(places, capsys, monkeypatch):
    from diffusion_jax.errors import NonFiniteLoss, UsageError
    assert cli.exit_code(NonFiniteLoss("x")) == 1 and cli.exit_code(OSError(28, "No space left on device")) == 1
    assert cli.exit_code(UsageError("x")) == 2 and cli.exit_code(ZeroDivisionError()) is None
    assert cli.exit_code(ValueError("x")) is None  # a ValueError of our own making is a UsageError
    with pytest.raises(FileNotFoundError, match="no run in"):  # --debug: the traceback of a user's mistake too
        cli.main(["--debug", "sample", "--workdir", str(places / "nowhere"), "--out", str(places / "s.npz")])
    monkeypatch.setattr(cli.sample, "sample_command", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug is not dressed up as the user's mistake
        cli.main(["sample", "--workdir", str(places / "run"), "--out", str(places / "s.npz")])
    monkeypatch.setattr(cli.sample, "sample_command", lambda args: np.zeros(-1))  # a ValueError raised inside NumPy by a bug
    with pytest.raises(ValueError, match="negative dimensions"):
        cli.main(["sample", "--workdir", str(places / "run"), "--out", str(places / "s.npz")])


def test_sample_out_paths_stay_where_they_are_asked_for(places, capsys):
    out = places / "run.v2" / "samples"  # a dot in a folder name; no suffix on the file
    cli.main(["sample", "--workdir", str(places / "run"), "--num_samples", "4", "--steps", "2", "--out", str(out)])
    assert sorted(p.name for p in out.parent.iterdir()) == ["samples.npz", "samples.png"]
    assert not (places / "run.png").exists()


def test_model_fields_can_be_overridden_from_the_command_line():
    from diffusion_jax.builders import build_model
    from diffusion_jax.cli import overrides
    from experiments.digits_unet import get_config

    config = overrides.from_dict(get_config(), ["--config.model.overrides.ch=16",
                                                "--config.model.overrides.ch_mult=(1, 2, 2)", "--config.train.steps=7"])
    assert config.model.overrides.ch == 16 and config.train.steps == 7
    model = build_model(config)
    assert model.ch == 16 and tuple(model.ch_mult) == (1, 2, 2)


# The flags each command cannot run without, written here (not read from the parser): its --help
# must list every one of them.
REQUIRED = {"train": ["--workdir"], "sample": ["--workdir", "--out"],
            "generate": ["--workdir", "--num_samples", "--out"], "evaluate": ["--workdir"],
            "fid": ["--samples", "--ref"], "fid-stats": ["--out"], "import": ["--from", "--workdir"],
            "export": ["--workdir"], "prepare": ["--dataset", "--image_size", "--out"]}


def test_every_commands_help_runs_and_lists_its_required_flags(capsys):
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == set(REQUIRED), "a command was added: list its required flags in REQUIRED"
    for command, flags in REQUIRED.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        out = capsys.readouterr()
        assert exit_info.value.code == 0 and "Traceback" not in out.err, (command, out.err[-2000:])
        usage = out.out.split("\n\n")[0]  # the usage line lists the required flags without brackets
        for flag in flags:
            assert f" {flag} " in usage.replace("\n", " ").replace("[", " [") + " ", (command, flag, usage)
            assert f"[{flag}" not in usage, (command, flag, usage)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(c in out for c in REQUIRED)


def test_eta_belongs_to_ddim_and_is_checked_before_a_job_claims_its_directory(places, tmp_path):
    from diffusion_jax.jobs.generate import generate_samples
    for method in ("heun", "ddpm", "dpm++_2m"):  # was: rc 0, eta ignored, and recorded in job.json
        with pytest.raises(ValueError, match=re.escape(f"sampler '{method}' has no eta")):
            generate_samples(places / "run", tmp_path / method, 2, method=method, steps=2, eta=0.7)
        assert not (tmp_path / method / "job.json").exists()
    # --option eta=0.5 on ddim was a "multiple values for keyword argument 'eta'" traceback
    manifest = generate_samples(places / "run", tmp_path / "ddim", 2, method="ddim", steps=2,
                                options={"eta": 0.5}, progress=False)
    assert manifest["eta"] == 0.5 and manifest["options"] == {}
    again = generate_samples(places / "run", tmp_path / "ddim2", 2, method="ddim", steps=2, eta=0.5, progress=False)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    heun = generate_samples(places / "run", tmp_path / "heun_plain", 2, method="heun", steps=2, progress=False)
    assert heun["eta"] is None  # a sampler without eta records none


def test_sample_out_as_an_existing_directory_writes_into_it(places, capsys):
    out = places / "sample_dir"
    out.mkdir()
    cli.main(["sample", "--workdir", str(places / "run"), "--num_samples", "2", "--steps", "2", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["samples.npz", "samples.png"]
    assert not (places / "sample_dir.npz").exists()
