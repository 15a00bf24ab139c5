"""Imported diffusers models as runs: `import`, then `sample`, `evaluate`, `train` (fine-tuning on
the digits) and `export` from the CLI; and a latent DiT on a VAE's latents, end to end."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusion_jax import cli, latents  # noqa: E402
from diffusion_jax.interop import load_diffusers  # noqa: E402
from diffusion_jax.runs import load_config, load_run  # noqa: E402
from tests.diffusers_models import perturbed  # noqa: E402

pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

SMALL_RUN = ["--config.data.batch_size=16", "--config.eval.bpd_examples=0", "--config.eval.num_examples=64",
             "--config.optim.warmup_steps=0", "--config.train.num_sample_images=0", "--config.train.log_every=10",
             "--config.train.progress=False"]


def _cli(*argv):
    cli.main([str(a) for a in argv])


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_an_imported_unet_samples_evaluates_fine_tunes_and_exports(tmp_path, capsys):
    source = tmp_path / "ddpm"
    # google/ddpm-*'s options, small (attention is checked in test_interop; compiling it here costs time)
    unet = perturbed(diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4, add_attention=False, freq_shift=1, flip_sin_to_cos=False,
        downsample_padding=0, norm_eps=1e-6))
    unet.save_pretrained(source)
    diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=True).save_pretrained(source / "scheduler")
    run = tmp_path / "run"

    _cli("import", "--from", source, "--workdir", run, *SMALL_RUN)
    assert "imported UNet2DModel (" in capsys.readouterr().out
    imported = load_diffusers(str(source))
    step0 = load_run(run)
    assert step0.step == 0 and _leaves_equal(step0.ema_params, imported.params)
    config = load_config(run)
    assert (config.data.image_size, config.data.channels, config.diffusion.schedule) == (8, 1, "linear")

    _cli("sample", "--workdir", run, "--num_samples", 4, "--method", "ddim", "--steps", 5, "--out", tmp_path / "s.npz")
    samples = np.load(tmp_path / "s.npz")
    assert samples[samples.files[0]].shape == (4, 8, 8, 1)
    _cli("evaluate", "--workdir", run, "--num_samples", 8, "--sampler", "ddim", "--steps", 5)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint_step"] == 0 and np.isfinite(metrics["noise_mse"])

    _cli("train", "--workdir", run, "--config.train.steps=20")  # fine-tuning: the run's own config, more steps
    tuned = load_run(run)
    assert tuned.step == 20 and not _leaves_equal(tuned.ema_params, imported.params)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert losses and np.all(np.isfinite(losses))

    _cli("export", "--workdir", run, "--out", tmp_path / "exported")
    exported = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "exported")).eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 900])
    with torch.no_grad():
        reference = exported(x, t).sample.numpy()
    ours = jax.jit(tuned.model.apply)({"params": tuned.ema_params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                             jnp.asarray(t.numpy()))
    error = np.abs(np.asarray(ours).transpose(0, 3, 1, 2) - reference).max() / np.sqrt(np.mean(reference ** 2))
    assert error <= 1e-4
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(tmp_path / "exported" / "scheduler"))
    np.testing.assert_allclose(scheduler.betas.numpy(), np.asarray(tuned.schedule.betas), rtol=1e-6)
    assert scheduler.config.clip_sample and scheduler.config.prediction_type == "epsilon"


def test_a_latent_dit_imported_with_its_vae_trains_samples_with_guidance_and_decodes(tmp_path):
    """DiT-XL/2-256's pipeline in miniature: a class-conditional, learned-sigma DiT on the 4x4x4
    latents of a VAE for the 8x8 digits."""
    vae = perturbed(diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=8))
    vae.save_pretrained(tmp_path / "pipeline" / "vae")
    dit = perturbed(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=4,
        patch_size=2, num_embeds_ada_norm=10))
    dit.save_pretrained(tmp_path / "pipeline" / "transformer")
    run = tmp_path / "run"

    _cli("import", "--from", tmp_path / "pipeline", "--subfolder", "transformer", "--vae", tmp_path / "pipeline",
         "--workdir", run, "--config.train.steps=10", "--config.sample.steps=5", *SMALL_RUN)
    config = load_config(run)
    assert config.model.vae == str(tmp_path / "pipeline")
    assert (config.data.image_size, config.data.channels, config.data.num_classes) == (8, 1, 10)
    assert config.data.use_labels and config.diffusion.variance == "learned_range"

    # The batches the backbone trains on: scale * (mean + std * noise) of the VAE's posterior,
    # checked against diffusers' encoder with the same noise.
    from diffusion_jax.training.loop import make_batches
    batches = make_batches(config)
    assert isinstance(batches, latents.LatentBatches)
    batch, images = batches(3), batches.batches(3)["image"]
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).latent_dist
    key = jax.random.fold_in(jax.random.fold_in(batches.root, 3), 0)
    noise = np.asarray(jax.random.normal(key, batch["image"].shape))
    expected = vae.config.scaling_factor * (dist.mean.numpy().transpose(0, 2, 3, 1)
                                            + dist.std.numpy().transpose(0, 2, 3, 1) * noise)
    np.testing.assert_allclose(batch["image"], expected, atol=1e-4 * np.abs(expected).max())

    _cli("train", "--workdir", run)
    assert load_run(run).step == 10
    _cli("sample", "--workdir", run, "--num_samples", 4, "--guidance_scale", 4.0, "--labels", "0,1,2,3",
         "--out", tmp_path / "s.npz")
    samples = np.load(tmp_path / "s.npz")
    images = samples[samples.files[0]]
    assert images.shape == (4, 8, 8, 1) and np.all(np.isfinite(images))  # decoded pixels, not latents
    _cli("evaluate", "--workdir", run, "--num_samples", 8, "--sampler", "ddim", "--steps", 5)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert np.isfinite(metrics["noise_mse"]) and "bpd" not in metrics and "digits_fd" in metrics
    assert (run / "eval" / "samples.png").exists()


def test_a_flow_matching_dit_with_its_scheduler_imports_as_a_flow_run_sampled_as_diffusers_does(tmp_path):
    """A DiT trained by flow matching (SiT; SD3's and Flux's scheduler): DiTTransformer2DModel beside a
    FlowMatchEulerDiscreteScheduler (shift 3) imports as a "flow" run that predicts the velocity; its
    Euler chain equals diffusers' loop with the torch model from the same x_T, and the CLI samples it."""
    source = tmp_path / "sit"
    dit = perturbed(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10)).eval()
    dit.save_pretrained(source / "transformer")
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(source / "scheduler")
    run = tmp_path / "run"
    _cli("import", "--from", source, "--subfolder", "transformer", "--workdir", run, *SMALL_RUN)
    config = load_config(run)
    assert (config.diffusion.process, config.diffusion.prediction, config.sample.method) == ("flow", "velocity", "euler")
    assert config.diffusion.process_options.shift == 3.0 and not config.sample.clip_x0

    imported = load_run(run)
    K, labels = 6, np.array([3, 7])
    x_T = np.random.default_rng(0).standard_normal((2, 8, 8, 1)).astype(np.float32)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(source / "scheduler"))
    scheduler.set_timesteps(K)
    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = dit(x, timestep=t.expand(2), class_labels=torch.from_numpy(labels)).sample
            x = scheduler.step(out, t, x).prev_sample
    theirs = x.numpy().transpose(0, 2, 3, 1)
    import diffusion_jax as dj
    denoise = lambda x, t, y: imported.model.apply({"params": imported.ema_params}, x, t, y)
    ours = dj.sample(dj.guided_denoise_fn(denoise, jnp.asarray(labels)), imported.schedule, x_T.shape, jax.random.key(0),
                     method="euler", num_steps=K, prediction="velocity", clip_x0=False, x_T=x_T)
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())

    _cli("sample", "--workdir", run, "--num_samples", 2, "--method", "dpm++_2m", "--steps", 4, "--labels", "3,7",
         "--out", tmp_path / "samples.npz")
    images = np.load(tmp_path / "samples.npz")["samples"]
    assert images.shape == (2, 8, 8, 1) and np.all(np.isfinite(images))
    _cli("export", "--workdir", run, "--out", tmp_path / "exported")
    back = json.loads((tmp_path / "exported" / "scheduler" / "scheduler_config.json").read_text())
    assert back["_class_name"] == "FlowMatchEulerDiscreteScheduler" and back["shift"] == 3.0


def test_a_dit_pipeline_imports_whole_with_its_vae(tmp_path):
    """A DiTPipeline directory (transformer/, vae/, scheduler/, model_index.json) imports without
    --subfolder or --vae: its model_index.json says which parts make the run."""
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8)
    dit = perturbed(diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                     out_channels=8, num_layers=2, sample_size=4, patch_size=2,
                                                     num_embeds_ada_norm=10))  # its embedder copies made equal
    diffusers.DiTPipeline(transformer=dit, vae=vae, scheduler=diffusers.DDIMScheduler()).save_pretrained(
        tmp_path / "dit_pipeline")
    _cli("import", "--from", tmp_path / "dit_pipeline", "--workdir", tmp_path / "run", *SMALL_RUN)
    config = load_config(tmp_path / "run")
    assert config.model.vae == str(tmp_path / "dit_pipeline") and config.model.text_encoder == ""
    assert (config.data.image_size, config.data.channels, config.data.num_classes) == (8, 1, 10)
    assert _leaves_equal(load_run(tmp_path / "run").ema_params,
                         load_diffusers(str(tmp_path / "dit_pipeline"), "transformer").params)
