"""The benchmark tools' own logic (the measurements themselves run on a device)."""
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks.trace_summary import hlo_origins, operation
from diffusion_jax.models import pallas_ops


pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

def test_hlo_origins_names_each_fusion_s_shape_and_jax_operation():
    """A GPU profile names kernels after the optimised HLO's fusions: `hlo_origins` maps each
    instruction of that HLO to its output shape and the JAX operation it came from."""
    def step(x, w):
        with jax.named_scope("mlp_fc1"):
            h = jnp.tanh(x @ w) * 2.0 + 1.0
        return jnp.sum(h * h, axis=-1)

    text = jax.jit(step).lower(jnp.ones((8, 16)), jnp.ones((16, 32))).compile().as_text()
    origins = hlo_origins(text)
    fusions = {name: v for name, v in origins.items() if name.endswith("fusion") or "fusion." in name}
    # The elementwise work and the sum fuse into one kernel: [8] out, named after its root (the
    # sum), holding the scope's tanh, multiply and add.
    (shape, op, fused), = [v for v in fusions.values() if v[0] == "f32[8]"]
    assert op == "reduce_sum" and {"mlp_fc1/tanh", "mlp_fc1/add", "reduce_sum"} <= set(fused), fused


def test_operations_name_the_layer_s_op_forward_or_backward_without_block_indices():
    assert operation("transpose(jvp(DiT))/block11/mlp_fc1/dot_general") == "backward/block*/mlp_fc1/dot_general"
    assert operation("jvp(UNet)/down2_res0/norm1/reduce_sum") == "forward/down2_res0/norm1/reduce_sum"
    assert operation("reduce_sum") == "reduce_sum"


@pytest.mark.skipif(not pallas_ops.available(), reason="this jax has no Pallas Triton API")
def test_the_kernel_benchmark_times_xla_and_the_kernels_at_each_tiling(capsys, monkeypatch):
    """`benchmarks.kernels --smoke` (the Pallas kernels interpreted): a line for XLA and one per
    tiling for each op, with both timings."""
    from benchmarks import kernels
    monkeypatch.setattr(pallas_ops, "_TILE_ELEMENTS", pallas_ops._TILE_ELEMENTS)
    monkeypatch.setattr(pallas_ops, "_GROUP_BLOCK_CHANNELS", pallas_ops._GROUP_BLOCK_CHANNELS)
    kernels.main(["--smoke", "--tile_elements", "512,4096"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    seen = sorted((r["op"], r["impl"], r.get("tile_elements", 0)) for r in records)
    assert seen == [(op, impl, tile) for op in ("adaptive_layer_norm", "bias_gelu_tanh", "group_norm_silu")
                    for impl, tile in (("pallas_interpret", 512), ("pallas_interpret", 4096), ("xla", 0))], seen
    assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > 0 for r in records)


def test_the_pipeline_benchmark_writes_a_pipeline_that_it_and_the_pytorch_peer_both_run(tmp_path, capsys):
    """`benchmarks.pipeline --write DIR --size sdxl_tiny --lora 4:0.8`: a random-weight SDXL pipeline
    through the library's writers, timed by `load_pipeline` without and with a random LoRA, and read
    by diffusers for the peer's loop; the sd15 and sdxl sizes are the published configs (the U-Nets'
    parameter counts tests/test_sd_unet.py checks; bigG's 694,659,840 that of SDXL's text_encoder_2)."""
    from benchmarks import pipeline
    from diffusion_jax.interop import clip
    from diffusion_jax.models import count_params

    pipeline.main(["--write", str(tmp_path / "tiny"), "--size", "sdxl_tiny", "--batch", "2", "--steps", "3",
                   "--repeats", "1", "--guidance_scale", "5", "--lora", "4:0.8"])
    plain, ours = [json.loads(line) for line in capsys.readouterr().out.splitlines()[-2:]]
    assert (ours["bench"], ours["batch"], ours["steps"], ours["image_size"]) == ("pipeline", 2, 3, [16, 16, 3])
    assert ours["images_per_sec"] > 0 and ours["first_call_s"] >= ours["seconds"] and ours["programs"] == 1
    assert plain["lora"] is None and ours["lora"]["layers"] > 0 and ours["method"] == "euler"
    pytest.importorskip("diffusers")
    from benchmarks import peer_diffusers
    peer_diffusers.main(["--what", "sd_pipeline", "--pipeline", str(tmp_path / "tiny"), "--sd_batch", "2",
                         "--sd_steps", "3", "--sd_repeats", "1", "--sd_guidance_scale", "5"])
    theirs = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (theirs["peer"], theirs["batch"], theirs["image_size"]) == ("diffusers", 2, [16, 16, 3])
    from tests.test_sd_unet import SD15_TEXT_ENCODER, SD15_VAE  # counted there against transformers and diffusers
    assert pipeline.SIZES["sd15"][:3] == ("sd15_unet", {}, SD15_TEXT_ENCODER) and pipeline.SIZES["sdxl"][:2] == ("sdxl_unet", {})
    assert pipeline.SIZES["sdxl"][2] == SD15_TEXT_ENCODER  # SDXL's first encoder is SD 1.5's CLIP ViT-L
    assert count_params(clip.param_shapes(clip.module_from_config(pipeline.SECOND_ENCODERS["sdxl"]))) == 694_659_840
    assert {**pipeline.vae_config("sd15"), "_class_name": None} == {**SD15_VAE, "_class_name": None}
