"""The text-conditioned U-Net against diffusers' UNet2DConditionModel (torch CPU float32), small and
randomly initialised, in SD 1 form (1x1-convolution projections, one head count) and SD 2 form
(linear projections, a head count per block): the same latents, timesteps and text embeddings give
the same output within 1e-4 x RMS; export is read back by diffusers; SD 1.5's configuration has
diffusers' parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.errors import UsageError
from diffusion_jax.interop import load_diffusers, save_diffusers

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tests.diffusers_models import perturbed  # noqa: E402

pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

SD1_FORM = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
SD2_FORM = dict(SD1_FORM, block_out_channels=(32, 64, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=24, attention_head_dim=[2, 4, 8], use_linear_projection=True, upcast_attention=True)

# SDXL's: the first level without attention, a transformer depth per block, the "text_time" added embedding
SDXL_FORM = dict(SD1_FORM, block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                              "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 1, 2), attention_head_dim=[2, 4, 8], use_linear_projection=True,
                 cross_attention_dim=40, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8)


def run_both(unet, imported, apply, batch=2, tokens=7, mask=None):
    """diffusers' `unet` and our `imported` model (through `apply`, its jitted apply: one per model
    keeps its programs) on the same random inputs: (ours, theirs) in NCHW."""
    rng = np.random.default_rng(0)
    cfg = unet.config
    x = rng.standard_normal((batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)).astype(np.float32)
    t = np.array([3, 871][:batch] + [500] * (batch - 2), np.int64)
    context = rng.standard_normal((batch, tokens, cfg.cross_attention_dim)).astype(np.float32)
    kwargs = {} if mask is None else {"encoder_attention_mask": torch.from_numpy(mask)}
    y = jnp.asarray(context) if mask is None else {"embeddings": jnp.asarray(context), "mask": jnp.asarray(mask)}
    if cfg.addition_embed_type == "text_time":  # the pooled embedding and the time ids (sizes, crop)
        pooled = rng.standard_normal((batch, 16)).astype(np.float32)
        ids = np.array([[64, 48, 3, 5, 32, 32], [16, 16, 0, 0, 24, 40]][:batch], np.float32)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(ids)}
        y = {"embeddings": jnp.asarray(context), "pooled": jnp.asarray(pooled), "time_ids": jnp.asarray(ids),
             **({} if mask is None else {"mask": jnp.asarray(mask)})}
    with torch.no_grad():
        theirs = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context), **kwargs).sample.numpy()
    ours = apply({"params": imported.params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.float32), y)
    return np.asarray(ours).transpose(0, 3, 1, 2), theirs


def relative_error(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.sqrt(np.mean(theirs ** 2)))


@pytest.mark.parametrize("form", [SD1_FORM, SD2_FORM, SDXL_FORM], ids=["sd1", "sd2", "sdxl"])
def test_the_text_conditioned_unet_is_diffusers_unet2dconditionmodel(tmp_path, form):
    unet = perturbed(diffusers.UNet2DConditionModel(**form))
    unet.save_pretrained(tmp_path / "unet")
    imported = load_diffusers(str(tmp_path / "unet"))
    assert imported.model.context_dim == form["cross_attention_dim"]
    assert imported.model.linear_projection == form.get("use_linear_projection", False)
    apply = jax.jit(imported.model.apply)
    ours, theirs = run_both(unet, imported, apply)
    assert relative_error(ours, theirs) <= 1e-4
    # a padding mask on the text tokens is honoured as diffusers honours it (the same attention
    # layer in every form: checked in the smallest)
    if form is SD1_FORM:
        mask = np.ones((2, 7), np.float32)
        mask[0, 4:] = 0
        ours, theirs = run_both(unet, imported, apply, mask=mask)
        assert relative_error(ours, theirs) <= 1e-4
    n_ours = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(imported.params))
    assert n_ours == sum(p.numel() for p in unet.parameters())
    # export, read back by diffusers
    save_diffusers(tmp_path / "exported", imported.model, imported.params, input_shape=imported.input_shape)
    again = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "exported")).eval()
    ours, theirs = run_both(again, imported, apply)
    assert relative_error(ours, theirs) <= 1e-4


SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8)


SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, down_block_types=(
    "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=(
    "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
    cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)


@pytest.mark.parametrize("name,config,count", [("sd15_unet", SD15_UNET, 859_520_964),
                                               ("sdxl_unet", SDXL_UNET, 2_567_463_684)])  # sd21_unet: 865,910,724
def test_the_sd_unet_presets_have_diffusers_parameter_counts(name, config, count):
    """The presets' shapes (jax.eval_shape: nothing allocated) against diffusers' model built on the
    meta device from the same config (SD 1.5's: 859,520,964; SDXL's: 2,567,463,684)."""
    from diffusion_jax.models import create_model, param_shapes

    model = create_model(name)
    shapes = param_shapes(model, (config["sample_size"],) * 2 + (4,))
    n_ours = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(shapes))
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**config)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_theirs and (count is None or n_ours == count), (n_ours, n_theirs)


def test_what_the_text_conditioned_unet_refuses(tmp_path):
    config = {"_class_name": "UNet2DConditionModel", **SD1_FORM, "addition_embed_type": "text_time"}
    from diffusion_jax.interop import unet2d_condition
    with pytest.raises(UsageError, match="text_time embedding needs addition_time_embed_dim"):
        unet2d_condition.module_from_config(config)
    with pytest.raises(UsageError, match="addition_embed_type = 'image'"):
        unet2d_condition.module_from_config({**config, "addition_embed_type": "image"})
    with pytest.raises(UsageError, match="attention_head_dim"):
        unet2d_condition.module_from_config({**SD1_FORM, "attention_head_dim": 5})
    with pytest.raises(UsageError, match="dual_cross_attention"):
        unet2d_condition.module_from_config({**SD1_FORM, "dual_cross_attention": True})
    from diffusion_jax.models import create_model
    model = create_model("sd15_unet")
    with pytest.raises(UsageError, match="text-conditioned: give y"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, jnp.zeros(1)), jnp.zeros((1, 64, 64, 4)))


SD15_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512)


def test_sd15_text_encoder_and_vae_have_transformers_and_diffusers_parameter_counts():
    """SD 1.5's text encoder (123,060,480) and VAE (83,653,863) at their published configs, counted
    from shapes here and from the reference models built on the meta device."""
    transformers = pytest.importorskip("transformers")
    from diffusion_jax.interop import clip, expected_params, vae
    from diffusion_jax.models import count_params

    encoder = clip.module_from_config(SD15_TEXT_ENCODER)
    with torch.device("meta"):
        theirs = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT_ENCODER))
    assert count_params(clip.param_shapes(encoder)) == sum(p.numel() for p in theirs.parameters()) == 123_060_480
    model, shape = vae.module_from_config({"_class_name": "AutoencoderKL", **SD15_VAE})
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(**SD15_VAE)
    assert count_params(expected_params(model, shape)) == sum(p.numel() for p in theirs.parameters()) == 83_653_863
