"""diffusers checkpoints in and out, checked against diffusers itself (torch, CPU, float32):
randomly initialised models saved with `save_pretrained` are real diffusers checkpoints."""
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusion_jax.interop import from_state_dict, load_diffusers, save_diffusers  # noqa: E402
from diffusion_jax.interop import files, scheduler  # noqa: E402
from diffusion_jax.interop.tensors import params_from_tensors  # noqa: E402
from diffusion_jax.models import count_params  # noqa: E402
from tests.diffusers_models import perturbed  # noqa: E402

TOLERANCE = 1e-4  # max abs error / RMS of the reference output


SMALL = {
    # DDPM-style: the google/ddpm-* options, with their pre-Attention tensor names (renamed below).
    "unet_ddpm": ("UNet2DModel", dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                      norm_num_groups=8, attention_head_dim=None, freq_shift=1,
                                      flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6)),
    # diffusers' defaults elsewhere: scale-shift norm, several heads, padding 1, learned-sigma width.
    "unet_scale_shift": ("UNet2DModel", dict(sample_size=16, in_channels=3, out_channels=6,
                                             block_out_channels=(16, 32),
                                             down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                             up_block_types=("UpBlock2D", "AttnUpBlock2D"), layers_per_block=2,
                                             norm_num_groups=8, attention_head_dim=8,
                                             resnet_time_scale_shift="scale_shift")),
    "dit": ("DiTTransformer2DModel", dict(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                          out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=10)),
    "vae": ("AutoencoderKL", dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)),
}

_OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _use_old_attention_names(directory):
    """Rewrite a UNet2DModel's weights with the attention names google/ddpm-* files have."""
    from safetensors.numpy import load_file, save_file
    path = directory / files.WEIGHTS
    tensors = load_file(str(path))
    renamed = {}
    for name, value in tensors.items():
        for new, old in _OLD_NAMES.items():
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = value
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(path))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (diffusers model, directory)} of the small models, saved once."""
    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for name, (cls, kwargs) in SMALL.items():
        model = perturbed(getattr(diffusers, cls)(**kwargs))
        model.save_pretrained(root / name)
        if name == "unet_ddpm":
            _use_old_attention_names(root / name)
        out[name] = (model, root / name)
    return out


def _nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def _assert_close(ours, reference):
    error = np.abs(ours - reference).max() / np.sqrt(np.mean(reference ** 2))
    assert error <= TOLERANCE, f"max abs error / RMS = {error:.2e}"
    return error


def _reference_and_ours(name, model, imported, reloaded=None):
    """(diffusers output, our output, the output of the exported-and-reloaded diffusers model)."""
    generator = torch.Generator().manual_seed(1)
    size = imported.input_shape[0]
    channels = imported.input_shape[2]
    x = torch.randn(3, channels, size, size, generator=generator)
    reload = lambda m: m if reloaded is None else reloaded
    with torch.no_grad():
        if name == "vae":
            z = torch.randn(3, 4, size // 2, size // 2, generator=generator)
            dist = model.encode(x).latent_dist
            mean, logvar = imported.encode(_nhwc(x))
            refs = [dist.mean.numpy(), dist.logvar.numpy(), model.decode(z).sample.numpy()]
            ours = [_nchw(mean), _nchw(logvar), _nchw(imported.decode(_nhwc(z)))]
            back = [reload(model).decode(z).sample.numpy()] if reloaded is not None else []
            return refs, ours, back
        t = torch.tensor([0, 417, 999])
        y = torch.tensor([3, 10, 7]) if name == "dit" else None  # 10: the null class
        kwargs = {"class_labels": y} if y is not None else {}
        ref = model(x, t, **kwargs).sample.numpy()
        out = _nchw(imported.apply(_nhwc(x), jnp.asarray(t.numpy()), None if y is None else jnp.asarray(y.numpy())))
        back = [reloaded(x, t, **kwargs).sample.numpy()] if reloaded is not None else []
        return [ref], [out], back


@pytest.mark.parametrize("name", list(SMALL))
def test_import_matches_diffusers_and_export_reloads_in_diffusers(name, saved, tmp_path):
    model, directory = saved[name]
    imported = load_diffusers(str(directory))
    refs, ours, _ = _reference_and_ours(name, model, imported)
    errors = [_assert_close(o, r) for o, r in zip(ours, refs)]
    print(name, "import max abs error / RMS:", ", ".join(f"{e:.1e}" for e in errors))

    save_diffusers(tmp_path / "out", imported.model, imported.params, input_shape=imported.input_shape)
    reloaded = getattr(diffusers, SMALL[name][0]).from_pretrained(str(tmp_path / "out")).eval()
    reference_again = _reference_and_ours(name, model, imported, reloaded)[2]
    # Export writes the imported float32 weights back unchanged: diffusers computes the same numbers.
    for again, ref in zip(reference_again, refs[-1:]):
        assert _assert_close(again, ref) == 0.0


def test_the_ddpm_import_samples_with_diffusers_scheduler_maths(saved, tmp_path):
    """A scheduler config next to the model becomes the schedule, and the settings of a run."""
    model, directory = saved["unet_ddpm"]
    (directory / "scheduler").mkdir(exist_ok=True)
    sched = diffusers.DDPMScheduler(beta_schedule="linear", num_train_timesteps=1000, clip_sample=True)
    sched.save_pretrained(directory / "scheduler")
    imported = load_diffusers(str(directory))
    np.testing.assert_allclose(np.asarray(imported.schedule.betas), sched.betas.numpy(), rtol=1e-6)
    settings = scheduler.settings_from_scheduler(imported.scheduler_config, learn_sigma=False)
    assert settings == {"diffusion": {"schedule": "linear", "num_timesteps": 1000,
                                      "schedule_options": {"beta_start": 0.0001, "beta_end": 0.02},
                                      "prediction": "eps", "variance": "fixed_small", "zero_terminal_snr": False},
                        "sample": {"clip_x0": True}}


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_scheduler_betas_and_run_settings_match_diffusers(beta_schedule):
    from diffusion_jax.schedules import make_schedule
    sched = diffusers.DDIMScheduler(beta_schedule=beta_schedule, num_train_timesteps=500, beta_start=0.00085,
                                    beta_end=0.012, prediction_type="v_prediction")
    config = dict(sched.config)
    np.testing.assert_allclose(scheduler.betas_from_scheduler(config), sched.betas.numpy(), rtol=2e-6, atol=1e-9)
    d = scheduler.settings_from_scheduler(config, learn_sigma=True)["diffusion"]
    assert (d["prediction"], d["variance"]) == ("v", "learned_range")
    ours = make_schedule(d["schedule"], d["num_timesteps"], **d["schedule_options"])
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), sched.alphas_cumprod.numpy(), rtol=2e-5)
    # and back: the exported scheduler config names the schedule
    exported = scheduler.scheduler_config(ours, "v", "learned_range", False)
    assert exported["beta_schedule"] == beta_schedule and "trained_betas" not in exported
    np.testing.assert_allclose(diffusers.DDPMScheduler.from_config(exported).betas.numpy(), sched.betas.numpy(),
                               rtol=2e-6, atol=1e-9)


PUBLISHED = {
    # google/ddpm-cifar10-32/config.json
    "ddpm-cifar10-32": {"_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
                        "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
                        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                        "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
                        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
                        "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
                        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]},
    # stabilityai/sd-vae-ft-ema/config.json
    "sd-vae-ft-ema": {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                      "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
                      "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
                      "up_block_types": ["UpDecoderBlock2D"] * 4},
    # facebook/DiT-XL-2-256/transformer/config.json (written before DiTTransformer2DModel existed)
    "DiT-XL-2-256": {"_class_name": "Transformer2DModel", "activation_fn": "gelu-approximate",
                     "attention_bias": True, "attention_head_dim": 72, "cross_attention_dim": None, "dropout": 0.0,
                     "in_channels": 4, "norm_elementwise_affine": False, "norm_num_groups": 32,
                     "norm_type": "ada_norm_zero", "num_attention_heads": 16, "num_embeds_ada_norm": 1000,
                     "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False, "out_channels": 8,
                     "patch_size": 2, "sample_size": 32, "upcast_attention": False, "use_linear_projection": False},
}


@pytest.mark.parametrize("name", ["ddpm-cifar10-32", "sd-vae-ft-ema"])
def test_published_configs_load_at_random_initialisation_with_diffusers_parameter_count(name):
    config = PUBLISHED[name]
    model = getattr(diffusers, config["_class_name"])(**{k: v for k, v in config.items() if k != "_class_name"})
    expected = sum(p.numel() for p in model.parameters())
    if name == "ddpm-cifar10-32":
        assert expected == 35_746_307
    imported = from_state_dict(config, {k: v.numpy() for k, v in model.state_dict().items()})
    assert count_params(imported.params) == expected


def test_dit_xl_2_256_maps_every_tensor_and_counts_diffusers_parameters_less_its_embedder_copies():
    """DiT-XL/2 (750M tensors in diffusers' layout) is built on torch's meta device, and its
    tensors stand in as zero-stride arrays, so nothing the size of the model is allocated."""
    from diffusion_jax.interop import dit, expected_params
    import inspect
    config = PUBLISHED["DiT-XL-2-256"]
    accepted = inspect.signature(diffusers.DiTTransformer2DModel.__init__).parameters
    with torch.device("meta"):  # the class diffusers loads this config as
        model = diffusers.DiTTransformer2DModel(**{k: v for k, v in config.items() if k in accepted})
    expected = sum(p.numel() for p in model.parameters())
    tensors = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}
    module, shape = dit.module_from_config(config)
    table, copies = dit.entries(module, shape)
    params = params_from_tensors(table, tensors, expected_params(module, shape), "DiT-XL/2", copies)
    copied = sum(int(np.prod(tensors[c].shape)) for c, _ in copies)
    assert count_params(params) == expected - copied == 674_834_720  # the DiT paper's 675M


def test_a_dit_saved_as_transformer2dmodel_loads_as_the_same_dit(tmp_path, saved):
    """The class name and fields of facebook/DiT-XL-2-*'s config.json."""
    directory = _copy(saved["dit"][1], tmp_path / "dit")
    config = json.loads((directory / "config.json").read_text())
    legacy = {k: v for k, v in PUBLISHED["DiT-XL-2-256"].items() if k not in config or k == "_class_name"}
    (directory / "config.json").write_text(json.dumps({**config, **legacy}))
    assert config["_class_name"] != legacy["_class_name"]
    a, b = load_diffusers(str(saved["dit"][1])), load_diffusers(str(directory))
    assert a.model == b.model
    config.update(_class_name="Transformer2DModel", cross_attention_dim=8)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="cross_attention_dim = 8 is not supported"):
        load_diffusers(str(directory))


# --- errors a user meets, each naming the problem and the fix -------------------------------------

def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_missing_config_and_missing_weights(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="has no config.json.*subfolder"):
        load_diffusers(str(tmp_path))
    directory = _copy(saved["dit"][1], tmp_path / "dit")
    (directory / files.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_diffusers(str(directory))


def test_a_bin_weights_file_without_torch_says_so(tmp_path, saved, monkeypatch):
    directory = _copy(saved["dit"][1], tmp_path / "dit")
    (directory / files.WEIGHTS).rename(directory / files.WEIGHTS_BIN)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ValueError, match="PyTorch pickle.*pip install torch"):
        load_diffusers(str(directory))


def test_an_unsupported_block_type_is_named(tmp_path, saved):
    directory = _copy(saved["unet_scale_shift"][1], tmp_path / "unet")
    config = json.loads((directory / "config.json").read_text())
    config["down_block_types"][0] = "CrossAttnDownBlock2D"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="down_block_types = 'CrossAttnDownBlock2D' is not supported"):
        load_diffusers(str(directory))


def test_a_tensor_of_the_wrong_shape_and_leftover_tensors_are_named(tmp_path, saved):
    from safetensors.numpy import load_file, save_file
    directory = _copy(saved["dit"][1], tmp_path / "dit")
    tensors = load_file(str(directory / files.WEIGHTS))
    tensors["proj_out_2.weight"] = np.zeros((5, 32), np.float32)
    tensors["extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(directory / files.WEIGHTS))
    with pytest.raises(ValueError) as error:
        load_diffusers(str(directory))
    message = str(error.value)
    assert "tensor proj_out_2.weight has shape (5, 32), the model needs (32, 32)" in message
    assert "1 tensor(s) left over, not used by the model: extra.weight" in message


def test_differing_embedder_copies_are_an_error(tmp_path, saved):
    from safetensors.numpy import load_file, save_file
    directory = _copy(saved["dit"][1], tmp_path / "dit")
    tensors = load_file(str(directory / files.WEIGHTS))
    tensors["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] += 1.0
    save_file(tensors, str(directory / files.WEIGHTS))
    with pytest.raises(ValueError, match="linear_1.bias differs from transformer_blocks.0"):
        load_diffusers(str(directory))


def test_a_repository_id_without_network_says_what_to_do(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)  # as with no network: nothing cached, nothing reachable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="could not download google/ddpm-cifar10-32.*network"):
        load_diffusers("google/ddpm-cifar10-32")
    # a module the Hub client needs is named, not the network
    def needs_a_module(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'hf_xet'", name="hf_xet")

    monkeypatch.setattr(hub, "snapshot_download", needs_a_module)
    with pytest.raises(ValueError, match="needs a module that is not installed.*pip install hf_xet"):
        load_diffusers("google/ddpm-cifar10-32")


def test_sgm_names_of_sd15_are_the_original_checkpoints():
    """`lora.sgm_names` on SD 1.5's U-Net (4 levels, the last without attention or downsampler)
    gives the names of the original LDM checkpoint, which kohya's LoRAs in sgm form use."""
    from diffusion_jax import interop
    from diffusion_jax.lora import layer_table, sgm_names
    from diffusion_jax.models import create_model

    names = sgm_names(layer_table(interop.entries_for(create_model("sd15_unet"), (64, 64, 4))))
    expected = {"input_blocks.0.0": "conv_in", "input_blocks.1.1.transformer_blocks.0.attn1.to_q":
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
                "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
                "input_blocks.11.0.out_layers.3": "down_blocks.3.resnets.1.conv2",
                "middle_block.1.proj_in": "mid_block.attentions.0.proj_in",
                "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
                "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
                "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
                "output_blocks.11.1.proj_out": "up_blocks.3.attentions.2.proj_out",
                "output_blocks.11.0.in_layers.2": "up_blocks.3.resnets.2.conv1",
                "time_embed.2": "time_embedding.linear_2", "out.2": "conv_out"}
    assert {k: names.get(k) for k in expected} == expected
    assert "output_blocks.11.2.conv" not in names and len(set(names.values())) == len(names)
