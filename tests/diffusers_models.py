"""Small random diffusers models and pipelines shared by the test modules: `perturbed` (random
weights everywhere), a CLIP tokenizer folder (`write_tokenizer`), the SD scheduler config and
prompts, the `small_pipeline` and `small_sdxl` fixtures (module-scoped: each module gets its own,
since tests change their schedulers; conftest makes them every module's), and PEFT LoRAs with
diffusers' images of them. torch, diffusers, transformers and peft are imported when used, so
that the modules that need none of them do not pay for their import."""
import copy
import json

import pytest


def _torch():
    return pytest.importorskip("torch")


def _diffusers():
    return pytest.importorskip("diffusers")


def _transformers():
    return pytest.importorskip("transformers")


def perturbed(model):
    """Random weights everywhere (diffusers zero-initialises some layers), copies kept equal."""
    torch = _torch()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
        if hasattr(model, "transformer_blocks"):  # DiT: every block's embedder equals block 0's
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model.eval()


WORDS = ["a", "the", "photo", "of", "cat", "dog", "handwritten", "digit", "seven", "painting", "astronaut",
         "riding", "horse", "on", "mars", "high", "quality", "in", "style", "van", "gogh", "'s", "and", "with"]


def write_tokenizer(directory, pad_token="<|endoftext|>"):
    """A CLIP-format tokenizer folder: every byte with and without </w>, merges building WORDS."""
    from diffusion_jax.interop.tokenizer import byte_characters  # GPT-2's byte <-> printable character table

    directory.mkdir(parents=True, exist_ok=True)
    chars = byte_characters()
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
                vocab.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, **special}))
    return len(vocab)


SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")
PROMPTS = ["a photo of a cat", "a painting of a horse in the style of van gogh"]
NEGATIVE = ["high quality", ""]


@pytest.fixture(scope="module")
def small_pipeline(tmp_path_factory):
    """A small random StableDiffusionPipeline (DDIM, SD's scheduler config) and the directory it is saved in."""
    torch, diffusers, transformers = _torch(), _diffusers(), _transformers()
    directory = tmp_path_factory.mktemp("sd")
    write_tokenizer(directory / "tokenizer_files")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(directory / "tokenizer_files"))
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, eos_token_id=595)).eval()
    unet = perturbed(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8))
    vae = perturbed(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=16))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(directory / "pipeline")
    return pipe, directory / "pipeline"


@pytest.fixture(scope="module")
def small_sdxl(tmp_path_factory):
    """A small random StableDiffusionXLPipeline: two text encoders (the second with a projection; a
    tokenizer that pads with "!"), a U-Net with no attention at its first level, transformer depths
    (1, 2) and the text_time embedding, SDXL's Euler scheduler config."""
    torch, diffusers, transformers = _torch(), _diffusers(), _transformers()
    directory = tmp_path_factory.mktemp("sdxl")
    write_tokenizer(directory / "tokenizer_files")
    write_tokenizer(directory / "tokenizer_2_files", pad_token="!")
    torch.manual_seed(0)
    clip = dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, eos_token_id=595)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip)).eval()
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        **clip, projection_dim=16, hidden_act="gelu")).eval()
    unet = perturbed(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=[2, 4], use_linear_projection=True,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8))
    vae = perturbed(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.13025))
    scheduler = diffusers.EulerDiscreteScheduler.from_config({**SD_SCHEDULER, "interpolation_type": "linear"})
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, unet=unet, scheduler=scheduler,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(directory / "tokenizer_files")),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(directory / "tokenizer_2_files")),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(directory / "pipeline")
    return pipe, directory / "pipeline"


def peft_state(module, **lora_config):
    """(state dict, metadata) of a LoRA that PEFT injects into a copy of `module` (random, non-zero
    up weights, halved)."""
    peft = pytest.importorskip("peft")
    model, config = copy.deepcopy(module), peft.LoraConfig(init_lora_weights=False, **lora_config)
    peft.inject_adapter_in_model(config, model)
    return {k: 0.5 * v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}, config.to_dict()


def peft_lora(pipe, seed: int, rank: int, alpha: float, patterns: bool):
    """A LoRA made by PEFT on copies of the pipeline's U-Net and text encoder (with `patterns`, a rank
    and an alpha pattern), as (U-Net state dict, text encoder state dict, their metadata)."""
    _torch().manual_seed(seed)
    unet_state, unet_meta = peft_state(
        pipe.unet, r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                             "conv1", "ff.net.2", "time_emb_proj"],
        rank_pattern={"conv1": 2} if patterns else {}, alpha_pattern={"to_k": 2 * alpha} if patterns else {})
    text_state, text_meta = peft_state(pipe.text_encoder, r=rank, lora_alpha=alpha,
                                        target_modules=["q_proj", "v_proj", "out_proj", "fc1"])
    return unet_state, text_state, unet_meta, text_meta


def diffusers_lora_images(pipe, files, weights, latents, steps: int, guidance_scale: float, negative=NEGATIVE,
                          prompts=PROMPTS):
    """diffusers' images with the LoRA files `files` loaded (`load_lora_weights`) at `weights`
    (`set_adapters`), from the latents [B, C, h, w]; the pipeline is left without them."""
    torch = _torch()
    names = [f"lora{i}" for i in range(len(files))]
    for name, path in zip(names, files):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    try:
        pipe.set_adapters(names, adapter_weights=list(weights))
        with torch.no_grad():
            return pipe(prompts, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance_scale,
                        latents=torch.from_numpy(latents), output_type="np").images
    finally:
        pipe.unload_lora_weights()
