"""The Pallas kernels (models/pallas_ops.py: adaLN LayerNorm, GroupNorm + SiLU, the bias + GELU
backward): run by Pallas' interpreter on the CPU against float64 formulas and their numerical
derivatives and against the XLA versions (whole models too), lowered to Triton for a GPU (the
lowering is JAX's and runs without one), and chosen by `ops.resolve_ops_impl`."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import ops, pallas_ops
from diffusion_jax.models.ops import adaptive_layer_norm, bias_gelu_tanh, group_norm, resolve_ops_impl
from tests.test_models import _numerical_grad, assert_same_loss_and_gradients, tiny

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not pallas_ops.available(), reason="this jax has no Pallas Triton API")]


def adaln64(x, shift, scale, epsilon=1e-6):
    """LN(x) (1 + scale) + shift in float64, x [B, ..., C], shift and scale [B, C]."""
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + epsilon)
    per_example = lambda v: v.reshape((v.shape[0],) + (1,) * (x.ndim - 2) + (v.shape[-1],))
    return xhat * (1 + per_example(scale)) + per_example(shift)


def group_norm64(x, num_groups, scale, bias, silu, epsilon=1e-6):
    """GroupNorm (+ SiLU) in float64, x [B, ..., C], scale and bias [B, C]."""
    B, C = x.shape[0], x.shape[-1]
    groups = x.reshape(B, -1, num_groups, C // num_groups)
    xhat = ((groups - groups.mean(axis=(1, 3), keepdims=True))
            / np.sqrt(groups.var(axis=(1, 3), keepdims=True) + epsilon)).reshape(B, -1, C)
    z = xhat * scale[:, None] + bias[:, None]
    return (z / (1 + np.exp(-z)) if silu else z).reshape(x.shape)


def assert_matches_float64(ours, loss64, args):
    """ours(*float32 args) and its gradient for every argument against loss64(*float64 args)
    and its central differences."""
    f32 = [jnp.asarray(a, jnp.float32) for a in args]
    value, grads = jax.value_and_grad(ours, argnums=tuple(range(len(args))))(*f32)
    np.testing.assert_allclose(value, loss64(*args), rtol=1e-5)
    for i, got in enumerate(grads):
        want = _numerical_grad(lambda v: loss64(*args[:i], v, *args[i + 1:]), args[i])
        np.testing.assert_allclose(got, want, atol=2e-4)


def gelu64(u):
    return 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))


def test_the_adaln_kernels_match_the_float64_formula_and_its_gradient():
    """C = 12 (tiles padded to 16 columns, masked), two examples of three tokens."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(0.3, 1.5, (2, 3, 12)), rng.normal(size=(2, 3, 12))
    shift, scale = rng.normal(size=(2, 12)), rng.normal(size=(2, 12))
    ours = lambda *a: jnp.sum(jnp.asarray(w, jnp.float32) * pallas_ops.adaptive_layer_norm(*a, interpret=True))
    assert_matches_float64(ours, lambda *a: np.sum(w * adaln64(*a)), (x, shift, scale))


@pytest.mark.parametrize("silu", [False, True])
def test_the_group_norm_kernels_match_the_float64_formula_and_its_gradient(silu):
    """C = 12 in 2 groups of 6 (one program's 12 channels padded to 16, masked), per-example affine."""
    rng = np.random.default_rng(1)
    x, w = rng.normal(0.3, 1.5, (2, 3, 2, 12)), rng.normal(size=(2, 3, 2, 12))
    scale, bias = rng.normal(size=(2, 12)), rng.normal(size=(2, 12))
    ours = lambda x, *affine: jnp.sum(jnp.asarray(w, jnp.float32)
                                      * pallas_ops.group_norm(x, 2, *affine, silu=silu, interpret=True))
    assert_matches_float64(ours, lambda x, *affine: np.sum(w * group_norm64(x, 2, *affine, silu)), (x, scale, bias))


def test_the_bias_gelu_kernel_matches_the_float64_formula_and_its_gradient():
    """N = 12 (one program's 16 columns, masked), rows in two leading axes."""
    rng = np.random.default_rng(2)
    h, w, bias = rng.normal(0.2, 1.5, (2, 3, 12)), rng.normal(size=(2, 3, 12)), rng.normal(size=12)
    ours = lambda h, b: jnp.sum(jnp.asarray(w, jnp.float32) * bias_gelu_tanh(h, b, impl="pallas_interpret"))
    assert_matches_float64(ours, lambda h, b: np.sum(w * gelu64(h + b)), (h, bias))


@pytest.mark.parametrize("shape, tile_elements, min_programs, dtype, tolerance", [
    ((5, 7, 40), 128, 8, jnp.float32, 2e-5),    # 32-column blocks (the last masked), 4-row tiles, 4 row groups
    ((4, 33, 300), 4096, 1024, jnp.bfloat16, 2e-2),  # 256-column blocks, 16-row tiles, the last rows masked
])
def test_the_bias_gelu_kernel_tiles_columns_and_splits_rows_like_one_pass(monkeypatch, shape, tile_elements,
                                                                          min_programs, dtype, tolerance):
    monkeypatch.setattr(pallas_ops, "_TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(pallas_ops, "_MIN_PROGRAMS", min_programs)
    monkeypatch.setattr(pallas_ops, "_BIAS_BLOCK_COLUMNS", 32 if shape[-1] == 40 else 256)
    keys = jax.random.split(jax.random.key(5), 3)
    h = (2 * jax.random.normal(keys[0], shape)).astype(dtype)
    bias, w = jax.random.normal(keys[1], shape[-1:]), jax.random.normal(keys[2], shape)

    def loss(impl, h, bias):
        return jnp.sum(w * bias_gelu_tanh(h, bias, impl=impl).astype(jnp.float32))

    assert_same_value_and_gradients(loss, (h, bias), tolerance)


@pytest.mark.parametrize("shape, tile_elements, min_programs, dtype, tolerance", [
    ((2, 9, 12), 32, 4, jnp.float32, 2e-5),     # 2-row tiles, 2 programs an example walking 3 (the last ragged)
    ((3, 2, 2, 20), 64, 1, jnp.bfloat16, 2e-2),  # [B, H, W, C]; 2 tiles of 2 rows in one program an example
])
def test_the_adaln_kernels_tile_rows_and_split_examples_like_one_pass(monkeypatch, shape, tile_elements, min_programs,
                                                                      dtype, tolerance):
    """With small tiles (several per program, rows past the end masked) the kernels compute
    the XLA version's value and gradients."""
    monkeypatch.setattr(pallas_ops, "_TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(pallas_ops, "_MIN_PROGRAMS", min_programs)
    B, C = shape[0], shape[-1]
    keys = jax.random.split(jax.random.key(3), 4)
    w = jax.random.normal(keys[3], shape)
    x = (jax.random.normal(keys[0], shape) * 2 + 0.5).astype(dtype)
    shift, scale = (jax.random.normal(k, (B, C)).astype(dtype) for k in keys[1:3])

    def loss(impl, *args):
        return jnp.sum(w * adaptive_layer_norm(*args, 1e-5, impl=impl).astype(jnp.float32))

    assert_same_value_and_gradients(loss, (x, shift, scale), tolerance)


def assert_same_value_and_gradients(loss, args, tolerance):
    """loss(impl, *args)'s value and gradients with the interpreted kernels and with XLA agree."""
    argnums = tuple(range(len(args)))
    ours = jax.value_and_grad(functools.partial(loss, "pallas_interpret"), argnums=argnums)(*args)
    xla = jax.value_and_grad(functools.partial(loss, "xla"), argnums=argnums)(*args)
    for got, want in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(xla)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=tolerance, atol=tolerance * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("shape, groups, tile_elements, dtype, tolerance, per_example", [
    # groups of 6: 4 in a program (24 of 32 channels), 15 positions in 8 tiles of 2; shared affine
    ((2, 5, 3, 24), 4, 64, jnp.float32, 2e-5, False),
    # groups of 8: 2 programs of 4 groups an example, 33 positions in 5 tiles of 8; per-example affine
    ((3, 33, 64), 8, 256, jnp.bfloat16, 2e-2, True),
])
def test_the_group_norm_kernels_tile_positions_and_split_channels_like_one_pass(monkeypatch, shape, groups,
                                                                               tile_elements, dtype, tolerance,
                                                                               per_example):
    """Several tiles a program (the last one ragged), several programs an example: the XLA
    version's value and gradients, with SiLU."""
    monkeypatch.setattr(pallas_ops, "_TILE_ELEMENTS", tile_elements)
    B, C = shape[0], shape[-1]
    keys = jax.random.split(jax.random.key(4), 4)
    w = jax.random.normal(keys[3], shape)
    x = (jax.random.normal(keys[0], shape) * 2 + 0.5).astype(dtype)
    scale, bias = (jax.random.normal(k, (B, C) if per_example else (C,)) for k in keys[1:3])

    def loss(impl, *args):
        return jnp.sum(w * group_norm(args[0], groups, *args[1:], silu=True, impl=impl).astype(jnp.float32))

    assert_same_value_and_gradients(loss, (x, scale, bias), tolerance)


def test_the_dit_with_the_kernels_computes_the_xla_dits_loss_and_gradients():
    """Every norm of the DiT through the kernels (interpreted): the same loss and the same
    gradient for every parameter."""
    model, params, shape = tiny("dit_tiny")
    assert_same_loss_and_gradients(model.clone(ops_impl="pallas_interpret"), model, params, shape, rtol=1e-5)


@pytest.mark.parametrize("name, kernels, extra", [("dit_tiny", 2 * 5 + 2, {}),
                                                  ("unet_tiny", None, {"scale_shift_norm": True})])
def test_ops_impl_sends_every_op_of_a_model_through_the_kernels(name, kernels, extra):
    """`ops_impl="pallas_interpret"` (the model field) reaches every adaLN LayerNorm (2 a DiT
    block and the final layer: a forward and a backward kernel each), every MLP's bias + GELU
    (a backward kernel each) and every GroupNorm of the U-Net (ADM's scale-shift ones too) in
    the training gradient's program."""
    model, params, shape = tiny(name, **extra)
    x, t = jnp.zeros((2, *shape)), jnp.array([3, 700])
    loss = lambda model: lambda p: jnp.sum(model.apply({"params": p}, x, t))
    if kernels is None:  # the U-Net's GroupNorms: every "scale" leaf is one
        kernels = 2 * sum(jax.tree_util.keystr(path).endswith("['scale']")
                          for path, _ in jax.tree_util.tree_leaves_with_path(params))
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(model.clone(ops_impl="pallas_interpret"))))(params))
    assert jaxpr.count("pallas_call[") == kernels > 0
    assert "pallas_call[" not in str(jax.make_jaxpr(jax.grad(loss(model)))(params))


def triton_kernels(loss, *shapes):
    """(grid x, grid y, name) of each Triton kernel in loss's gradient lowered for a GPU."""
    lowered = jax.jit(jax.grad(loss, argnums=tuple(range(len(shapes))))).trace(*shapes).lower(
        lowering_platforms=("cuda",))
    return sorted(re.findall(r'@__gpu\$xla\.gpu\.triton.*?grid_x = (\d+) : i32, grid_y = (\d+) : i32.*?name = "(\w+)"',
                             lowered.as_text()))


def test_the_kernels_lower_to_triton_for_a_gpu_at_dit_b2_and_ddpm_unet_sizes():
    """JAX's Pallas-to-Triton lowering (power-of-two tiles, masked loads, the loops) runs on
    this CPU: DiT-B/2's adaLN and the DDPM U-Net's GroupNorms (128 channels at 32x32, 192 in
    groups of 6) become one forward and one backward Triton kernel each, DiT-B/2's MLP bias +
    GELU one backward kernel."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    adaln = lambda *a: jnp.sum(pallas_ops.adaptive_layer_norm(*a).astype(f32))
    assert triton_kernels(adaln, jax.ShapeDtypeStruct((256, 256, 768), bf16),
                          *[jax.ShapeDtypeStruct((256, 768), bf16)] * 2) == [
        ("256", "4", "adaptive_layer_norm_backward"), ("256", "64", "adaptive_layer_norm_forward")]
    mlp = lambda h, b: jnp.sum(bias_gelu_tanh(h, b, impl="pallas").astype(f32))
    with pytest.MonkeyPatch.context() as patch:  # as on a GPU
        patch.setattr(jax, "default_backend", lambda: "gpu")
        kernels = triton_kernels(mlp, jax.ShapeDtypeStruct((256, 256, 3072), bf16), jax.ShapeDtypeStruct((3072,), bf16))
    assert kernels == [("86", "12", "bias_activation_backward")]
    for shape, programs in (((128, 32, 32, 128), "4"), ((4, 16, 16, 192), "7")):
        B, C = shape[0], shape[-1]
        norm = lambda x, a, b: jnp.sum(pallas_ops.group_norm(x, 32, a, b, silu=True).astype(f32))
        assert triton_kernels(norm, jax.ShapeDtypeStruct(shape, bf16), *[jax.ShapeDtypeStruct((B, C), f32)] * 2) == [
            (str(B), programs, "group_norm_backward"), (str(B), programs, "group_norm_forward")]


def test_the_implementation_choice(monkeypatch, caplog):
    assert resolve_ops_impl(None, backend="gpu") == "xla"        # until measured faster (ops.py)
    assert resolve_ops_impl("auto", backend="cpu") == "xla"
    assert resolve_ops_impl("pallas", backend="gpu") == "pallas"
    assert resolve_ops_impl("pallas_interpret", backend="cpu") == "pallas_interpret"
    with caplog.at_level("INFO", logger="diffusion_jax.models.ops"):
        assert resolve_ops_impl("pallas", backend="tpu") == "xla"  # falls back where Triton is not
    assert "need a GPU" in caplog.text
    monkeypatch.setattr(pallas_ops, "available", lambda: False)  # a jax without the Triton API
    assert resolve_ops_impl("pallas", backend="gpu") == "xla"
    with pytest.raises(ValueError, match="'pallas_interpret' needs Pallas' Triton API .*: upgrade jax or use 'xla'"):
        resolve_ops_impl("pallas_interpret")
    monkeypatch.undo()
    monkeypatch.setattr(ops, "PALLAS_OPS_BY_DEFAULT", True)
    assert resolve_ops_impl(None, backend="gpu") == "pallas"
    assert resolve_ops_impl("auto", backend="cpu") == "xla"
    with pytest.raises(ValueError, match="unknown ops implementation 'triton'; choose one of auto, xla"):
        resolve_ops_impl("triton")
    with pytest.raises(ValueError, match=r"must be \[B, C\] = \(2, 4\)"):
        pallas_ops.adaptive_layer_norm(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"must be \[B, C\] = \(2, 4\)"):
        pallas_ops.group_norm(jnp.zeros((2, 3, 4)), 2, jnp.zeros((4,)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"bias \(3,\) must be \[N\] = \(4,\)"):
        pallas_ops.bias_activation(jnp.zeros((2, 4)), jnp.zeros((3,)), jnp.tanh, jnp.tanh)
