"""Text-to-image runs from the CLI: a small StableDiffusionPipeline (tests/test_pipeline.py's)
imported whole through its model_index.json, sampled with --prompt (and a negative prompt), as a
generate job over a prompts file (deterministic per sample, resumable, the file's sha256 in the
manifest), exported back, fine-tuned on a captioned folder and evaluated; a small SDXL pipeline the
same way, with its micro-conditioning and LoRA files; a DDPMPipeline imports without --subfolder;
the digits report's agreement of samples with their prompts."""
import json

import jax
import numpy as np
import pytest

from diffusion_jax import cli
from diffusion_jax.errors import UsageError
from diffusion_jax.runs import load_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tests.diffusers_models import NEGATIVE, PROMPTS, diffusers_lora_images, peft_lora, peft_state  # noqa: E402

pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

SMALL = ["--config.eval.bpd_examples=0", "--config.train.progress=False"]


def _cli(*argv):
    cli.main([str(a) for a in argv])


def test_a_stable_diffusion_pipeline_imports_whole_and_samples_from_prompts(small_pipeline, tmp_path, capsys):
    original, saved = small_pipeline
    run = tmp_path / "run"
    _cli("import", "--from", saved, "--workdir", run, *SMALL)
    config = load_config(run)
    assert config.model.text_encoder == str(saved) and config.model.vae == str(saved)
    assert (config.data.image_size, config.data.channels, config.sample.guidance_scale) == (16, 3, 7.5)

    def sample(name, *extra):
        _cli("sample", "--workdir", run, "--num_samples", 2, "--steps", 4, "--out", tmp_path / f"{name}.npz", *extra)
        return np.load(tmp_path / f"{name}.npz")["samples"]

    cat = sample("cat", "--prompt", "a photo of a cat")
    assert cat.shape == (2, 16, 16, 3) and np.isfinite(cat).all()
    np.testing.assert_array_equal(sample("cat_again", "--prompt", "a photo of a cat"), cat)  # seeded
    # a LoRA file (diffusers' save_lora_weights) on the run's U-Net and text encoder: at weight 0 the
    # run's own images, at 0.7 others (the LoRA's images are diffusers' by test_pipeline)
    unet_state, text_state, unet_meta, text_meta = peft_lora(original, 5, 4, 4.0, False)
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=unet_state,
                                                        text_encoder_lora_layers=text_state,
                                                        unet_lora_adapter_metadata=unet_meta,
                                                        text_encoder_lora_adapter_metadata=text_meta)
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    np.testing.assert_allclose(sample("lora0", "--prompt", "a photo of a cat", "--lora", f"{lora_file}:0"), cat,
                               atol=1e-5)
    assert np.abs(sample("lora", "--prompt", "a photo of a cat", "--lora", f"{lora_file}:0.7") - cat).max() > 0.02
    both = sample("both", "--prompt", "a photo of a cat", "--prompt", "a painting of a horse",
                  "--negative_prompt", "high quality")  # sample i gets prompt i mod 2
    negative = sample("negative", "--prompt", "a photo of a cat", "--negative_prompt", "high quality")
    np.testing.assert_allclose(both[0], negative[0], atol=1e-5)
    assert np.abs(both[1] - negative[1]).max() > 1e-3 and np.abs(negative - cat).max() > 1e-3

    # export writes the pipeline back: diffusers runs it to the images of the pipeline imported
    capsys.readouterr()
    _cli("export", "--workdir", run, "--out", tmp_path / "exported")
    said = capsys.readouterr().out  # every part written, not the U-Net's files alone
    assert "a StableDiffusionPipeline" in said and "text_encoder/model.safetensors" in said and "vae/config.json" in said
    back = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "exported"), safety_checker=None)
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    images = []
    for pipe in (back, original):
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            images.append(pipe(["a photo of a cat"], num_inference_steps=4, latents=torch.from_numpy(latents),
                               output_type="np").images)
    assert np.abs(images[0] - images[1]).max() <= 1e-5

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na painting of a horse\n")
    job = tmp_path / "job"
    _cli("generate", "--workdir", run, "--num_samples", 5, "--steps", 3, "--shard_size", 2, "--batch_size", 2,
         "--prompts", prompts, "--out", job)
    manifest = json.loads((job / "manifest.json").read_text())
    import hashlib
    assert manifest["prompts_sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    first = sorted(job.glob("*.npz"))
    images = {p.name: np.load(p)["images"] for p in first}
    _cli("generate", "--workdir", run, "--num_samples", 5, "--steps", 3, "--shard_size", 2, "--batch_size", 1,
         "--prompts", prompts, "--out", job)  # resumed: nothing remade, the same images whatever the batch size
    assert {p.name: np.load(p)["images"] for p in sorted(job.glob("*.npz"))}.keys() == images.keys()
    prompts.write_text("another prompt\n")  # a changed prompts file is another job: refused, exit 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--workdir", str(run), "--num_samples", "5", "--steps", "3", "--shard_size", "2",
                  "--prompts", str(prompts), "--out", str(job)])
    assert exit_info.value.code == 2 and "prompts_sha256 was" in capsys.readouterr().err
    # the LoRA files are part of the job: each one's sha256 recorded, resumed, a changed file refused
    lora_job = ["generate", "--workdir", str(run), "--num_samples", "2", "--steps", "3", "--out", str(tmp_path / "lora_job"),
                "--prompts", str(tmp_path / "lora_prompts.txt"), "--lora", f"{lora_file}:0.7"]
    (tmp_path / "lora_prompts.txt").write_text("a photo of a cat\na painting of a horse\n")
    _cli(*lora_job)
    manifest = json.loads((tmp_path / "lora_job" / "manifest.json").read_text())
    assert manifest["loras"] == [{"file": str(lora_file.resolve()), "weight": 0.7,
                                  "sha256": hashlib.sha256(lora_file.read_bytes()).hexdigest()}]
    images = {p.name: np.load(p)["images"] for p in sorted((tmp_path / "lora_job").glob("*.npz"))}
    _cli(*lora_job)  # resumed: the same shards, nothing remade
    again = {p.name: np.load(p)["images"] for p in sorted((tmp_path / "lora_job").glob("*.npz"))}
    assert again.keys() == images.keys() and all(np.array_equal(again[k], images[k]) for k in images)
    lora_file.write_bytes(lora_file.read_bytes().replace(b"lora_alpha", b"lora_alphb"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(lora_job)
    assert exit_info.value.code == 2 and "loras was" in capsys.readouterr().err
    # without a prompts file the negative prompt is part of the job too: another one is another job
    _cli("generate", "--workdir", run, "--num_samples", 2, "--steps", 3, "--negative_prompt", "blurry",
         "--out", tmp_path / "empty_prompt")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--workdir", str(run), "--num_samples", "2", "--steps", "3", "--negative_prompt",
                  "sharp", "--out", str(tmp_path / "empty_prompt")])
    assert exit_info.value.code == 2 and "negative_prompt" in capsys.readouterr().err


def test_a_ddpm_pipeline_imports_without_subfolder_and_prompts_need_a_text_run(tmp_path):
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    _cli("import", "--from", tmp_path / "ddpm", "--workdir", tmp_path / "run", *SMALL)
    config = load_config(tmp_path / "run")
    assert (config.data.image_size, config.data.channels, config.model.text_encoder) == (8, 1, "")
    with pytest.raises(UsageError, match="not text-conditioned"):
        from diffusion_jax.generation import make_generator
        from diffusion_jax.runs import load_run
        run = load_run(tmp_path / "run")
        make_generator(run.model, run.schedule, run.config, batch_size=1, steps=2)(
            run.ema_params, 1, __import__("jax").random.key(0), prompts=["a cat"])


def test_an_imported_pipeline_fine_tunes_on_a_captioned_folder(small_pipeline, tmp_path):
    """`train` 10 steps on images with NAME.txt captions beside them: the text encoder and the VAE
    stay frozen (they are not the run's parameters), every U-Net parameter moves; `evaluate` reports
    the text run. (A LoRA trained on an imported run: the SDXL test below.)"""
    _, saved = small_pipeline
    run = tmp_path / "run"
    _cli("import", "--from", saved, "--workdir", run, *SMALL, "--config.eval.num_examples=16")
    from PIL import Image
    from diffusion_jax.runs import load_run

    folder = tmp_path / "captioned"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(["a photo of a cat", "a painting of a horse"][i % 2])
    before = load_run(run)
    _cli("train", "--workdir", run, "--config.train.steps=10", f"--config.data.name=folder:{folder}",
         "--config.data.batch_size=8", "--config.train.cond_dropout=0.1", "--config.train.log_every=5",
         "--config.train.num_sample_images=0", "--config.optim.warmup_steps=0", "--config.train.progress=False")
    after = load_run(run)
    assert after.step == 10
    assert all(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree_util.tree_leaves(before.ema_params), jax.tree_util.tree_leaves(after.ema_params)))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert losses and np.all(np.isfinite(losses))
    # evaluate a text run: the metrics of the empty prompt's (unconditional) model, its samples
    _cli("evaluate", "--workdir", run, "--num_samples", 2, "--steps", 2, "--guidance_scale", 3)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert np.isfinite(metrics["noise_mse"]) and metrics["sampler"]["guidance_scale"] == 3.0
    assert metrics["sampler"]["guidance"] == "classifier-free guidance scale 3"


def test_the_digits_prompt_report_reads_the_digit_each_prompt_asks_for(tmp_path, monkeypatch):
    """evaluate's prompt adherence on the digits: with samples that are real digits of the class
    each prompt names it reads 100%, a grid row per prompt; with the classes shifted by one, 0%."""
    from diffusion_jax.data import load_digits
    from diffusion_jax.evaluation.report import DIGIT_PROMPTS, digit_prompt_adherence

    data = load_digits("validation")
    images = data.model_range()

    def generate(shift):
        def fake(params, n, key, prompts):  # sample i: prompts[i % len(prompts)], as make_generator's
            asked = [(DIGIT_PROMPTS.index(prompts[i % len(prompts)]) + shift) % 10 for i in range(n)]
            return np.stack([images[data.labels == d][i // 10] for i, d in enumerate(asked)]), None
        return fake

    right = digit_prompt_adherence(generate(0), None, jax.random.key(0), tmp_path / "right.png", per_prompt=8)
    assert right["accuracy"] > 0.95 and len(right["accuracy_per_prompt"]) == 10
    wrong = digit_prompt_adherence(generate(1), None, jax.random.key(0), tmp_path / "wrong.png", per_prompt=8)
    assert wrong["accuracy"] < 0.1
    from diffusion_jax import viz
    from diffusion_jax.evaluation.digits_features import digits_predict
    grids = []
    monkeypatch.setattr(viz, "save_grid", lambda images, path, ncols=None: grids.append((images, ncols)))
    digit_prompt_adherence(generate(0), None, jax.random.key(0), tmp_path / "again.png", per_prompt=8)
    (grid, ncols), = grids
    assert ncols == 8 and (digits_predict(grid)[0] == np.repeat(np.arange(10), 8)).mean() > 0.95  # row d: digit d


def test_an_imported_run_keeps_its_frozen_parts_with_copy_parts(small_pipeline, tmp_path, capsys):
    """A run imported from a pipeline reads its VAE and text encoder there: with the pipeline moved
    away it is refused saying so; `--copy_parts` makes the run whole in itself."""
    import shutil

    source = tmp_path / "pipeline"
    shutil.copytree(small_pipeline[1], source)
    _cli("import", "--from", source, "--workdir", tmp_path / "kept", "--copy_parts", *SMALL)
    _cli("import", "--from", source, "--workdir", tmp_path / "linked", *SMALL)
    shutil.rmtree(source)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sample", "--workdir", str(tmp_path / "linked"), "--num_samples", "1", "--steps", "2",
                  "--prompt", "a cat", "--out", str(tmp_path / "linked.npz")])
    assert exit_info.value.code == 2 and "--copy_parts" in capsys.readouterr().err
    _cli("sample", "--workdir", tmp_path / "kept", "--num_samples", 1, "--steps", 2, "--prompt", "a cat",
         "--out", tmp_path / "kept.npz")
    assert np.isfinite(np.load(tmp_path / "kept.npz")["samples"]).all()
    assert (tmp_path / "kept" / "parts" / "text_encoder").is_dir() and (tmp_path / "kept" / "parts" / "vae").is_dir()


def _sizes_oracle(height: int, width: int, size: int) -> tuple:
    """diffusers' train_text_to_image_sdxl.py: resize the short side to `size` (torchvision's Resize:
    the long side int(size * long / short)), center-crop, crop_top_left = round((side - size) / 2)."""
    new_h, new_w = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
    return height, width, round((new_h - size) / 2), round((new_w - size) / 2), size, size


def test_an_sdxl_pipeline_imports_samples_trains_a_lora_and_exports(small_sdxl, tmp_path, capsys):
    """A small StableDiffusionXLPipeline as a run: its condition (both encoders, the pooled projection,
    the time ids; the zero null of force_zeros_for_empty_prompt, a negative prompt's) is the pipeline's
    (whose images are diffusers', test_pipeline), a captioned folder's micro-conditioning is diffusers'
    training script's; `sample --lora FILE:W` and `generate --prompts --lora` take an SDXL LoRA file
    (U-Net and both encoders); a rank-4 LoRA on the U-Net and both encoders trains on the folder and
    its exported PEFT file gives diffusers' load_lora_weights images within 1e-3; `export` writes a pipeline diffusers runs to the
    imported one's images."""
    import hashlib

    import diffusion_jax.data as data_module
    from diffusion_jax.conditions import condition_kind
    from diffusion_jax.interop.pipeline import load_pipeline
    from diffusion_jax.runs import load_run

    original, saved = small_sdxl
    run = tmp_path / "run"
    _cli("import", "--from", saved, "--workdir", run, "--copy_parts", *SMALL)
    config = load_config(run)
    assert (config.data.condition, config.sample.guidance_scale, config.sample.method) == ("sdxl", 5.0, "euler")
    kind, pipe = condition_kind(config), load_pipeline(saved)
    theirs = pipe.encode_prompt(PROMPTS)
    for ours, expected in ((kind.encoder(config)(PROMPTS), theirs),
                           (kind.null(config), pipe.null_condition(None, theirs)),
                           (kind.null(config, NEGATIVE[0]), pipe.null_condition([NEGATIVE[0]] * 2, theirs))):
        for name in ("embeddings", "pooled", "time_ids"):
            np.testing.assert_allclose(np.asarray(ours[name][:1]), np.asarray(expected[name][:1]), atol=1e-5)
    assert not np.asarray(kind.null(config)["pooled"]).any()
    from diffusion_jax.conditions import drop_condition  # cond_dropout: a dropped example gets the whole null tree
    dropped = drop_condition(jax.random.key(0), theirs, 1.0, kind.null(config))
    assert not np.asarray(dropped["embeddings"]).any() and np.array_equal(dropped["time_ids"], theirs["time_ids"])

    from PIL import Image
    folder = tmp_path / "captioned"
    folder.mkdir()
    rng, sizes = np.random.default_rng(0), [(16, 16), (24, 16), (16, 32), (40, 24)]
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (*sizes[i % 4], 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(PROMPTS[i % 2])
    with config.unlocked():
        config.data.name = f"folder:{folder}"
    inputs = kind.training_inputs(config, data_module.load_split(config.data, "train"))  # what the encoders take
    np.testing.assert_array_equal(inputs["time_ids"], [_sizes_oracle(*sizes[i % 4], 16) for i in range(8)])

    def sample(name, *extra):
        _cli("sample", "--workdir", run, "--num_samples", 2, "--steps", 4, "--prompt", PROMPTS[0],
             "--out", tmp_path / f"{name}.npz", *extra)
        return np.load(tmp_path / f"{name}.npz")["samples"]

    torch.manual_seed(3)
    states = {part: peft_state(getattr(original, part), r=4, lora_alpha=4, target_modules=targets)[0]
              for part, targets in (("unet", ["to_q", "to_v", "conv1"]), ("text_encoder", ["q_proj"]),
                                    ("text_encoder_2", ["v_proj"]))}
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=states["unet"], text_encoder_lora_layers=states["text_encoder"],
        text_encoder_2_lora_layers=states["text_encoder_2"])
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    plain = sample("lora0", "--lora", f"{lora_file}:0")  # weight 0 is the run's own model (test_a_stable_diffusion...)
    assert plain.shape == (2, 16, 16, 3) and np.isfinite(plain).all()
    assert np.abs(sample("lora", "--lora", f"{lora_file}:0.7") - plain).max() > 0.02

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    job = ["generate", "--workdir", run, "--num_samples", 3, "--steps", 3, "--shard_size", 2, "--prompts", prompts,
           "--lora", lora_file, "--out", tmp_path / "job"]
    _cli(*job)
    manifest = json.loads((tmp_path / "job" / "manifest.json").read_text())
    assert manifest["loras"][0]["sha256"] == hashlib.sha256(lora_file.read_bytes()).hexdigest()
    images = {p.name: np.load(p)["images"] for p in sorted((tmp_path / "job").glob("*.npz"))}
    _cli(*job)  # resumed: nothing remade, the same shards
    assert {p.name: np.load(p)["images"] for p in sorted((tmp_path / "job").glob("*.npz"))}.keys() == images.keys()

    lora_run, trained = tmp_path / "lora_run", tmp_path / "trained" / "pytorch_lora_weights.safetensors"
    _cli("train", "--workdir", lora_run, f"--config.lora.base={run}", "--config.lora.rank=4",
         "--config.lora.targets=to_q,to_k,to_v,to_out.0,proj_in,conv1", "--config.lora.text_encoder=True",
         "--config.train.steps=10",
         f"--config.data.name=folder:{folder}", "--config.data.batch_size=8",
         "--config.optim.learning_rate=3e-3", "--config.optim.warmup_steps=0", "--config.train.ema_decay=0.5",
         "--config.train.log_every=5", "--config.train.num_sample_images=0", "--config.train.progress=False")
    # both encoders' q/k/v/out projections in their 2 layers: all moved but the first encoder's last
    # layer's, which no gradient reaches (SDXL reads its penultimate hidden states; the second encoder's
    # last layer makes the pooled projection)
    tuned = load_run(lora_run)
    text_layers = tuned.condition_adapters
    moved = {part: [bool(np.abs(np.asarray(layer.up)).max() > 0) for layer in layers]
             for part, layers in text_layers.items()}
    assert moved == {"text_encoder": [True] * 4 + [False] * 4, "text_encoder_2": [True] * 8}, moved
    # only the adapters trained (on the base's step 0, pinned) and only they are saved: every U-Net
    # parameter but the adapted kernels (attention, projections, first convolutions) is the base's, bit for bit
    assert tuned.step == 10 and tuned.config.lora.base_step == 0
    adapted = {layer.path[:-1] for layer in tuned.adapters}
    assert len(adapted) == len(tuned.adapters) > 8
    for (path, base), (_, merged) in zip(jax.tree_util.tree_leaves_with_path(load_run(run).ema_params),
                                         jax.tree_util.tree_leaves_with_path(tuned.ema_params)):
        keys = tuple(k.key for k in path)
        if keys[:-1] in adapted and keys[-1] == "kernel":  # W + s down @ up differs from W
            assert not np.array_equal(np.asarray(base), np.asarray(merged)), keys
        else:
            np.testing.assert_array_equal(np.asarray(base), np.asarray(merged), err_msg=str(keys))
    from diffusion_jax.checkpoints import Checkpointer
    ckpt = Checkpointer(lora_run)
    saved_names = ckpt.restore_record(10)["layout"]["params"]  # the record's layout: what the checkpoint holds
    ckpt.close()
    assert {name.rsplit(".", 1)[-1] for name in saved_names} == {"down", "up"}  # the adapters only
    assert len(saved_names) == 2 * (len(tuned.adapters) + sum(len(layers) for layers in text_layers.values()))
    _cli("export", "--workdir", lora_run, "--lora", trained)
    latents = np.random.default_rng(4).standard_normal((2, 4, 8, 8)).astype(np.float32)
    call = dict(num_steps=4, guidance_scale=5.0, negative_prompts=NEGATIVE, x_T=latents.transpose(0, 2, 3, 1))
    ours = pipe.with_loras([(trained, 1.0)])(PROMPTS, jax.random.key(0), **call)
    assert np.abs(ours - diffusers_lora_images(original, [trained], [1.0], latents, 4, 5.0)).max() <= 1e-3
    with torch.no_grad():  # and the adapters changed the images
        plain = original(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0,
                         latents=torch.from_numpy(latents), output_type="np").images
    assert np.abs(ours - plain).max() > 1e-3

    capsys.readouterr()
    _cli("export", "--workdir", run, "--out", tmp_path / "exported")
    assert "a StableDiffusionXLPipeline" in capsys.readouterr().out
    back = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "exported"))
    images = []
    for each in (back, original):
        each.set_progress_bar_config(disable=True)
        with torch.no_grad():
            images.append(each(PROMPTS[:1], num_inference_steps=3, latents=torch.from_numpy(latents[:1]),
                               output_type="np").images)
    assert np.abs(images[0] - images[1]).max() <= 1e-5
