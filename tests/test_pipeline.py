"""A whole small StableDiffusionPipeline (random weights; a tokenizer from a vocabulary and merges
written here) run by diffusers (torch CPU float32) and by `load_pipeline(...)(...)` from the same
latents and prompts, guidance 7.5 and a negative prompt, with SD's DDIM, Euler and
DPMSolverMultistep configs (scaled-linear betas, leading spacing, steps_offset 1,
set_alpha_to_one False): the final images agree within 1e-3."""
import copy
import json

import jax
import numpy as np
import pytest

from diffusion_jax.errors import UsageError
from diffusion_jax.interop.pipeline import load_pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from tests.diffusers_models import NEGATIVE, PROMPTS, diffusers_lora_images, peft_lora, peft_state  # noqa: E402

pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                       "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_a_small_stable_diffusion_pipeline_gives_diffusers_images(small_pipeline, scheduler, monkeypatch):
    pipe, saved = small_pipeline
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.scheduler.save_config(saved / "scheduler")  # the directory load_pipeline reads names it
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    key_steps = jax.random.split(jax.random.key(0))[1]  # Euler ancestral's noise: ours, handed to diffusers
    noises = iter([np.asarray(jax.random.normal(jax.random.split(jax.random.fold_in(key_steps, i))[0], (2, 8, 8, 4)))
                   for i in range(6)])
    monkeypatch.setattr(diffusers.schedulers.scheduling_euler_ancestral_discrete, "randn_tensor",
                        lambda *a, **k: torch.from_numpy(next(noises).transpose(0, 3, 1, 2).copy()))
    with torch.no_grad():
        theirs = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5,
                      latents=torch.from_numpy(latents), output_type="np").images
    ours_pipe = load_pipeline(saved)
    ours = ours_pipe(PROMPTS, jax.random.key(0), num_steps=6, guidance_scale=7.5, negative_prompts=NEGATIVE,
                     x_T=latents.transpose(0, 2, 3, 1))
    assert ours.shape == theirs.shape == (2, 16, 16, 3)
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()
    assert theirs.std() > 0.01  # images, not a constant
    # The chain and decoder are one jitted program per sampler, shape and step bound: prompts, keys,
    # the guidance scale and the step count are its arguments, so later calls trace nothing (jax's
    # cache gains no entry); a deterministic chain given x_T does not read the key. The pipeline
    # loaded again runs the same program.
    (program,) = ours_pipe.programs.values()
    entries = program._cache_size()
    again = ours_pipe(PROMPTS[::-1], jax.random.key(1), num_steps=9, guidance_scale=3.0,
                      x_T=latents[::-1].transpose(0, 2, 3, 1))
    same = load_pipeline(saved)(PROMPTS, jax.random.key(1), num_steps=6, guidance_scale=7.5,
                                negative_prompts=NEGATIVE, x_T=latents.transpose(0, 2, 3, 1))
    assert program._cache_size() == entries and np.abs(again - ours).max() > 1e-3
    if scheduler != "EulerAncestralDiscreteScheduler":
        np.testing.assert_array_equal(same, ours)


def test_what_load_pipeline_refuses(small_pipeline, tmp_path):
    _, saved = small_pipeline
    index = json.loads((saved / "model_index.json").read_text())
    for changes, words in (({"_class_name": "StableDiffusionXLImg2ImgPipeline"}, "SDXL's refiner"),
                           ({"_class_name": "StableDiffusionXLPipeline"}, "without text_encoder_2, tokenizer_2"),
                           ({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
                            "holds a StableDiffusionPipeline"),
                           ({"_class_name": "DDPMPipeline"}, "reads a StableDiffusionPipeline"),
                           ({"vae": [None, None]}, "holds a StableDiffusionPipeline without vae"),
                           ({"tokenizer": None}, "without tokenizer")):
        broken = tmp_path / "broken"
        broken.mkdir(exist_ok=True)
        (broken / "model_index.json").write_text(json.dumps({**index, **changes}))
        with pytest.raises(UsageError, match=words):
            load_pipeline(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_pipeline(tmp_path / "empty")


def test_what_the_pipelines_python_call_refuses(small_pipeline):
    """The Python call's arguments, each a clear exception naming the argument (never NaN images,
    a reshaped x_T or JAX's own error)."""
    pipe = load_pipeline(small_pipeline[1])
    key, x_T = jax.random.key(0), np.zeros((1, 8, 8, 4), np.float32)
    for kwargs, words in (({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
                          ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number"),
                          ({"guidance_scale": np.ones(2)}, "guidance_scale must be a finite number"),
                          ({"num_steps": 0}, r"num_steps must be an integer in \[1, 1000\], got"),
                          ({"num_steps": -3}, r"num_steps must be an integer in \[1, 1000\], got"),
                          ({"num_steps": 2.5}, r"num_steps must be an integer in \[1, 1000\], got"),
                          ({"num_steps": 1001}, r"num_steps must be an integer in \[1, 1000\]"),
                          ({"x_T": x_T.transpose(0, 3, 1, 2)}, r"x_T has shape \(1, 4, 8, 8\)"),
                          ({"prompts": None}, "prompts must be a string or a non-empty list"),
                          ({"prompts": []}, "prompts must be a string or a non-empty list"),
                          ({"key": 0}, "key must be a JAX random key"),
                          ({"negative_prompts": ["a", "b"]}, "2 negative prompts for 1 prompts")):
        call = {"prompts": "a cat", "key": key, "num_steps": 2, **kwargs}
        with pytest.raises(UsageError, match=words):
            pipe(call.pop("prompts"), call.pop("key"), **call)



def test_a_damaged_pipeline_is_refused_at_import_and_load_naming_the_part(small_pipeline, tmp_path):
    """Each damage, refused by `load_pipeline` and by `import` (exit 2, one line) before anything
    is written: a missing component folder, a text encoder of another width, a U-Net of other
    channels than the VAE's latents, a vocabulary larger than the embedding table."""
    import shutil

    from diffusion_jax import cli

    _, saved = small_pipeline

    def damaged(name, edit):
        copy = tmp_path / name
        shutil.copytree(saved, copy)
        edit(copy)
        return copy

    def replaced(folder, model):  # the component saved anew: another model of the same class
        def edit(copy):
            shutil.rmtree(copy / folder)
            model.save_pretrained(copy / folder)
        return edit

    text_encoder = lambda **kw: transformers.CLIPTextModel(transformers.CLIPTextConfig(**{
        "vocab_size": 600, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "max_position_embeddings": 77, "eos_token_id": 2, **kw}))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                                  layers_per_block=1, latent_channels=8, norm_num_groups=8, sample_size=16)

    cases = {"no scheduler": (lambda c: shutil.rmtree(c / "scheduler"), "has no scheduler/scheduler_config.json"),
             "no tokenizer": (lambda c: shutil.rmtree(c / "tokenizer"), "has no tokenizer/"),
             "tokenizer not UTF-8": (lambda c: (c / "tokenizer" / "tokenizer_config.json").write_bytes(b'{"a": "\xff"}'),
                                     "tokenizer_config.json is not UTF-8 text"),
             "no text encoder weights": (lambda c: (c / "text_encoder" / "model.safetensors").unlink(), "text_encoder"),
             "width": (replaced("text_encoder", text_encoder(hidden_size=48)), "cross_attention_dim"),
             "vocabulary too small": (replaced("text_encoder", text_encoder(vocab_size=300)), "embedding table"),
             "channels": (replaced("vae", vae), "8-channel latents")}
    for name, (edit, words) in cases.items():
        copy = damaged(name.replace(" ", "_"), edit)
        with pytest.raises((UsageError, FileNotFoundError, ValueError), match=words):
            load_pipeline(copy)
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["import", "--from", str(copy), "--workdir", str(tmp_path / f"run_{name.replace(' ', '_')}")])
        assert exit_info.value.code == 2, name
        assert not (tmp_path / f"run_{name.replace(' ', '_')}" / "checkpoints").exists(), name


@pytest.mark.parametrize("form", ["fp16 variant", "sharded"])
def test_a_pipeline_saved_as_the_hub_has_them_loads_and_samples(small_pipeline, form, tmp_path):
    """diffusers' variant="fp16" (every component's weights in float16, upcast here) and
    max_shard_size (each model's weights in several files and an index) load whole: the images
    are those of the float32 single-file pipeline (fp16: to float16's rounding)."""
    pipe, saved = small_pipeline
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.save_config(saved / "scheduler")
    out = tmp_path / form.replace(" ", "_")
    if form == "fp16 variant":  # a copy: the module's pipeline keeps its float32 weights
        copy.deepcopy(pipe).to(torch.float16).save_pretrained(out, variant="fp16")
        assert (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    else:
        pipe.save_pretrained(out, max_shard_size="200KB")
        assert (out / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    x_T = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    call = dict(num_steps=4, guidance_scale=7.5, x_T=x_T)
    reference = load_pipeline(saved)(PROMPTS, jax.random.key(0), **call)
    ours = load_pipeline(out)(PROMPTS, jax.random.key(0), **call)
    from diffusion_jax import cli
    from diffusion_jax.runs import load_config

    cli.main(["import", "--from", str(out), "--workdir", str(tmp_path / "run")])  # and it imports as a run
    assert load_config(tmp_path / "run").model.text_encoder == str(out)
    assert np.abs(ours - reference).max() <= (2e-2 if form == "fp16 variant" else 1e-6), np.abs(ours - reference).max()


def test_a_pipeline_without_its_model_index_says_so_instead_of_a_subfolder_circle(small_pipeline, tmp_path):
    import shutil

    from diffusion_jax import cli

    copy = tmp_path / "no_index"
    shutil.copytree(small_pipeline[1], copy)
    (copy / "model_index.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["import", "--from", str(copy), "--workdir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    from diffusion_jax.interop import load_diffusers

    with pytest.raises(FileNotFoundError, match="no model_index.json, which says how they fit"):
        load_diffusers(str(copy))


def _as_kohya(unet_state, text_state, unet_meta, text_meta) -> dict:
    """The same LoRA in kohya's names: lora_unet_ / lora_te_ + the module's dots as underscores,
    lora_down / lora_up, and each module's alpha (its pattern's, else lora_alpha)."""
    from diffusion_jax.lora import _pattern_value

    out = {}
    for prefix, state, meta in (("lora_unet_", unet_state, unet_meta), ("lora_te_", text_state, text_meta)):
        for key, value in state.items():
            module, _, which = key.rpartition(".lora_")
            name = prefix + module.replace(".", "_")
            out[f"{name}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(float(_pattern_value(meta["alpha_pattern"], module, meta["lora_alpha"])))
    return out


def test_loras_from_diffusers_and_kohya_files_give_diffusers_images(small_pipeline, tmp_path):
    """A LoRA on the U-Net (attention, projections, 3x3 convolutions, the time embedding; a rank and
    an alpha pattern) and the text encoder, written by diffusers' save_lora_weights with its
    metadata, and one in kohya's names: our images are diffusers' load_lora_weights images within
    1e-3 at weight 1 and 0.7 (set_adapters), and with two LoRAs at once; the sampler is compiled
    once for all of them (the adapters are merged into its parameters by a small program). Kohya's per-module alphas are applied as its format says:
    the patterned LoRA in kohya's names gives our images of its PEFT file (diffusers drops the
    alphas of attention layers from kohya files, so it is compared with diffusers without them)."""
    import safetensors.torch

    pipe, saved = small_pipeline
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.save_config(saved / "scheduler")
    loras = {}
    for name, seed, rank, alpha, patterns in (("a", 1, 4, 8.0, True), ("b", 2, 3, 3.0, False)):
        unet_state, text_state, unet_meta, text_meta = peft_lora(pipe, seed, rank, alpha, patterns)
        diffusers.StableDiffusionPipeline.save_lora_weights(
            tmp_path / name, unet_lora_layers=unet_state, text_encoder_lora_layers=text_state,
            unet_lora_adapter_metadata=unet_meta, text_encoder_lora_adapter_metadata=text_meta)
        loras[name] = tmp_path / name / "pytorch_lora_weights.safetensors"
        safetensors.torch.save_file(_as_kohya(unet_state, text_state, unet_meta, text_meta),
                                    tmp_path / f"kohya_{name}.safetensors")
        loras[f"kohya_{name}"] = tmp_path / f"kohya_{name}.safetensors"
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)

    base = load_pipeline(saved)
    ours, entries = {}, []
    for adapters, weights in ((["a"], [1.0]), (["a"], [0.7]), (["kohya_a"], [0.7]), (["kohya_b"], [1.0]),
                              (["a", "b"], [1.0, 0.7])):
        ours_pipe = base.with_loras([(loras[n], w) for n, w in zip(adapters, weights)])
        ours[tuple(adapters), weights[0]] = ours_pipe(PROMPTS, jax.random.key(0), num_steps=6, negative_prompts=NEGATIVE,
                                                      x_T=latents.transpose(0, 2, 3, 1))
        entries.append(sum(program._cache_size() for program in base.programs.values()))
        if adapters != ["kohya_a"]:
            reference = diffusers_lora_images(pipe, [loras[n] for n in adapters], weights, latents, 6, 7.5)
            assert np.abs(ours[tuple(adapters), weights[0]] - reference).max() <= 1e-3, (adapters, weights)
    np.testing.assert_allclose(ours[("kohya_a",), 0.7], ours[("a",), 0.7], atol=1e-6)
    plain = base(PROMPTS, jax.random.key(0), num_steps=6, negative_prompts=NEGATIVE, x_T=latents.transpose(0, 2, 3, 1))
    assert min(np.abs(images - plain).max() for images in ours.values()) > 0.02  # each LoRA changes the images
    # one program for all, compiled once: the adapters are merged into its parameters
    assert len(base.programs) == 1 and len(set(entries)) == 1


def test_a_lora_we_write_loads_in_diffusers_merges_into_the_weights_and_bad_files_are_refused(small_pipeline,
                                                                                             tmp_path):
    """`write_lora` writes a PEFT file with its metadata that diffusers' load_lora_weights reads to
    our images (within 1e-3); `merge` folds the adapters into the weights (the same images) and
    `unmerge` takes them out again; a key that matches no layer, a LoRA for another model and a
    weight that is not a finite number are refused naming the problem."""
    import safetensors.torch
    from safetensors.numpy import load_file, save_file

    from diffusion_jax import lora

    pipe, saved = small_pipeline
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.save_config(saved / "scheduler")
    unet_state, text_state, unet_meta, text_meta = peft_lora(pipe, 3, 4, 4.0, True)
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path / "theirs", unet_lora_layers=unet_state,
                                                        text_encoder_lora_layers=text_state,
                                                        unet_lora_adapter_metadata=unet_meta,
                                                        text_encoder_lora_adapter_metadata=text_meta)
    base = load_pipeline(saved)
    adapted = base.with_loras([(tmp_path / "theirs" / "pytorch_lora_weights.safetensors", 1.0)])
    lora.write_lora(tmp_path / "ours" / "pytorch_lora_weights.safetensors", adapted.loras)
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    call = dict(num_steps=6, negative_prompts=NEGATIVE, x_T=latents.transpose(0, 2, 3, 1))
    ours = adapted(PROMPTS, jax.random.key(0), **call)
    theirs = diffusers_lora_images(pipe, [tmp_path / "ours" / "pytorch_lora_weights.safetensors"], [1.0], latents, 6, 7.5)
    assert np.abs(ours - theirs).max() <= 1e-3 and np.abs(ours - base(PROMPTS, jax.random.key(0), **call)).max() > 0.02

    import dataclasses
    unet_merged = lora.merge(base.unet.params, adapted.loras["unet"])
    text_merged = lora.merge(base.text_encoder.params, adapted.loras["text_encoder"])
    merged = dataclasses.replace(base, unet=dataclasses.replace(base.unet, params=unet_merged),
                                 text_encoder=base.text_encoder._replace(params=text_merged))
    np.testing.assert_allclose(merged(PROMPTS, jax.random.key(0), **call), ours, atol=1e-5)
    # only the adapted kernels are new arrays: the other leaves are the base's own (no copy of the model)
    shared = [a is b for a, b in zip(jax.tree_util.tree_leaves(unet_merged), jax.tree_util.tree_leaves(base.unet.params))]
    assert len(shared) - sum(shared) == len({layer.path for layer in adapted.loras["unet"]}) > 0
    for restored, original in zip(jax.tree_util.tree_leaves(lora.unmerge(unet_merged, adapted.loras["unet"])),
                                  jax.tree_util.tree_leaves(base.unet.params)):
        np.testing.assert_allclose(restored, original, atol=1e-6)

    ours_file = tmp_path / "ours" / "pytorch_lora_weights.safetensors"
    tensors = load_file(str(ours_file))
    key = next(k for k in tensors if k.startswith("unet.") and k.endswith("attn1.to_q.lora_A.weight"))
    cases = {"a key that matches nothing": ({**tensors, "unet.down_blocks.0.nothing.lora_A.weight": tensors[key],
                                             "unet.down_blocks.0.nothing.lora_B.weight": tensors[key.replace("_A", "_B")]},
                                            "down_blocks.0.nothing.lora_A.weight' matches no layer of the unet"),
             "another model's widths": ({**tensors, key: np.zeros((4, 48), np.float32)},
                                        "LoRA of .*attn1.to_q changes a kernel of shape \\(48, .*the LoRA is for another model"),
             "a second text encoder": ({**tensors, "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A."
                                        "weight": np.zeros((4, 32), np.float32)},
                                       "adapts the 'text_encoder_2', which this model does not have")}
    for name, (damaged, words) in cases.items():
        save_file(damaged, str(tmp_path / "bad.safetensors"))
        with pytest.raises(UsageError, match=words):
            base.with_loras([(tmp_path / "bad.safetensors", 1.0)])
    for weight in (float("nan"), float("inf"), "0.7", True):
        with pytest.raises(UsageError, match="must be a finite number"):
            base.with_loras([(ours_file, weight)])
    safetensors.torch.save_file({"unet.x.lora_A.weight": torch.zeros(1)}, tmp_path / "odd.safetensors")
    with pytest.raises(UsageError, match="matches no layer"):
        base.with_loras([(tmp_path / "odd.safetensors", 1.0)])


def test_a_pipeline_whose_scheduler_is_lcm_gives_diffusers_images_at_one_and_four_steps(small_pipeline, monkeypatch):
    """LCMScheduler (skipping timesteps of original_inference_steps, boundary scalings, fresh noise
    between steps) runs as the `lcm` sampler: diffusers' images within 1e-3 at one step (the
    one-step generator: no noise) and at four, diffusers given our noise through its randn_tensor."""
    pipe, saved = small_pipeline
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.save_config(saved / "scheduler")
    ddim_pipe = load_pipeline(saved)  # a pipeline of another scheduler, asked for method="lcm" (an LCM-LoRA's use)
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=40)
    pipe.scheduler.save_config(saved / "scheduler")
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    key_steps = jax.random.split(jax.random.key(0))[1]
    ours_pipe = load_pipeline(saved)
    for steps in (1, 4):
        noises = iter([np.asarray(jax.random.normal(jax.random.split(jax.random.fold_in(key_steps, i))[0], (2, 8, 8, 4)))
                       for i in range(steps)])
        monkeypatch.setattr(diffusers.schedulers.scheduling_lcm, "randn_tensor",
                            lambda *a, **k: torch.from_numpy(next(noises).transpose(0, 3, 1, 2).copy()))
        with torch.no_grad():
            theirs = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=1.5,
                          latents=torch.from_numpy(latents), output_type="np").images
        ours = ours_pipe(PROMPTS, jax.random.key(0), num_steps=steps, guidance_scale=1.5, negative_prompts=NEGATIVE,
                         x_T=latents.transpose(0, 2, 3, 1))
        assert np.abs(ours - theirs).max() <= 1e-3, (steps, np.abs(ours - theirs).max())
        assert theirs.std() > 0.01
    asked = ddim_pipe(PROMPTS, jax.random.key(0), num_steps=4, guidance_scale=1.5, negative_prompts=NEGATIVE,
                      x_T=latents.transpose(0, 2, 3, 1), method="lcm", original_steps=40)
    np.testing.assert_allclose(asked, ours, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_a_small_sdxl_pipeline_gives_diffusers_images(small_sdxl, scheduler):
    """SDXL's base pipeline: our images equal diffusers' within 1e-3 with guidance 5, negative
    prompts and, without them, the zero embeddings of force_zeros_for_empty_prompt."""
    pipe, saved = small_sdxl
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.scheduler.save_config(saved / "scheduler")
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    ours_pipe = load_pipeline(saved)
    for negative in (NEGATIVE, None):
        with torch.no_grad():
            theirs = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=5, guidance_scale=5.0,
                          latents=torch.from_numpy(latents), output_type="np").images
        ours = ours_pipe(PROMPTS, jax.random.key(0), num_steps=5, guidance_scale=5.0, negative_prompts=negative,
                         x_T=latents.transpose(0, 2, 3, 1))
        assert ours.shape == theirs.shape == (2, 16, 16, 3) and theirs.std() > 0.01
        assert np.abs(ours - theirs).max() <= 1e-3, (negative, np.abs(ours - theirs).max())
    # no negative prompt is zero embeddings, not the empty prompt's
    empty = ours_pipe(PROMPTS, jax.random.key(0), num_steps=5, guidance_scale=5.0, negative_prompts=["", ""],
                      x_T=latents.transpose(0, 2, 3, 1))
    assert np.abs(empty - ours).max() > 1e-3


def test_an_sdxl_lora_in_kohyas_sgm_names_gives_diffusers_images(small_sdxl, tmp_path):
    """kohya writes SDXL LoRAs in Stability's sgm names (lora_unet_input_blocks_..., output_blocks,
    middle_block, in_layers / emb_layers / op ...; lora_te1_ / lora_te2_ for the encoders): a LoRA on
    every kind of U-Net layer and on both text encoders, so named, gives our images of the same LoRA in
    PEFT's names, and (the U-Net's and the second encoder's) diffusers' load_lora_weights images
    within 1e-3."""
    import safetensors.torch

    from diffusion_jax.lora import sgm_names

    pipe, saved = small_sdxl
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.save_config(saved / "scheduler")
    torch.manual_seed(7)
    states = {}
    for part, targets in (("unet", ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv",
                                    "time_emb_proj", "conv_shortcut", "linear_1", "ff.net.2"]),
                          ("text_encoder", ["q_proj", "fc1"]), ("text_encoder_2", ["v_proj", "out_proj"])):
        states[part] = peft_state(getattr(pipe, part), r=2, lora_alpha=2, target_modules=targets)[0]
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "peft", unet_lora_layers=states["unet"], text_encoder_lora_layers=states["text_encoder"],
        text_encoder_2_lora_layers=states["text_encoder_2"])
    unet_modules = {k.rsplit(".lora_", 1)[0] for k in states["unet"]}
    to_sgm = {module: sgm for sgm, module in sgm_names(sorted(unet_modules | {
        f"down_blocks.0.resnets.{i}.conv1" for i in range(1)})).items()}
    kohya = {}
    for part, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        for key, value in states[part].items():
            module, _, which = key.rpartition(".lora_")
            # kohya names the encoders' layers text_model.encoder... (transformers 5's CLIPTextModel has no text_model.)
            module = to_sgm[module] if part == "unet" else "text_model." + module.removeprefix("text_model.")
            name = prefix + module.replace(".", "_")
            kohya[f"{name}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value
            kohya[f"{name}.alpha"] = torch.tensor(2.0)
    assert any("input_blocks" in k for k in kohya) and any("output_blocks" in k for k in kohya)
    safetensors.torch.save_file(kohya, tmp_path / "kohya_sdxl.safetensors")
    # diffusers maps lora_te1_text_model_... onto text_model.*, which transformers 5's CLIPTextModel does
    # not have (its first encoder would load nothing): diffusers is given the file without them
    safetensors.torch.save_file({k: v for k, v in kohya.items() if not k.startswith("lora_te1_")},
                                tmp_path / "kohya_sdxl_te2.safetensors")
    latents = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)
    theirs = diffusers_lora_images(pipe, [tmp_path / "kohya_sdxl_te2.safetensors"], [1.0], latents, 4, 5.0)
    base = load_pipeline(saved)
    call = dict(num_steps=4, guidance_scale=5.0, negative_prompts=NEGATIVE, x_T=latents.transpose(0, 2, 3, 1))
    ours_te2 = base.with_loras([(tmp_path / "kohya_sdxl_te2.safetensors", 1.0)])(PROMPTS, jax.random.key(0), **call)
    assert np.abs(ours_te2 - theirs).max() <= 1e-3, np.abs(ours_te2 - theirs).max()
    ours = base.with_loras([(tmp_path / "kohya_sdxl.safetensors", 1.0)])(PROMPTS, jax.random.key(0), **call)
    in_peft = base.with_loras([(tmp_path / "peft" / "pytorch_lora_weights.safetensors", 1.0)])
    np.testing.assert_allclose(in_peft(PROMPTS, jax.random.key(0), **call), ours, atol=1e-6)
    assert np.abs(ours - base(PROMPTS, jax.random.key(0), **call)).max() > 0.02
