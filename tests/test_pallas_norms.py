"""The Pallas adaLN LayerNorm kernels (models/pallas_norms.py): run by Pallas' interpreter on
the CPU against the float64 formula and its numerical derivative, lowered to Triton for a GPU
(the lowering is JAX's and runs without one), and chosen by `ops.resolve_norm_impl`."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import create_model, ops, pallas_norms
from diffusion_jax.models.ops import adaptive_layer_norm, resolve_norm_impl
from tests.test_models import _numerical_grad, tiny

pytestmark = pytest.mark.skipif(not pallas_norms.available(), reason="this jax has no Pallas Triton API")


def adaln64(x, shift, scale, epsilon=1e-6):
    """LN(x) (1 + scale) + shift in float64, x [B, ..., C], shift and scale [B, C]."""
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + epsilon)
    per_example = lambda v: v.reshape((v.shape[0],) + (1,) * (x.ndim - 2) + (v.shape[-1],))
    return xhat * (1 + per_example(scale)) + per_example(shift)


def test_the_kernels_match_the_float64_formula_and_its_gradient():
    """C = 12 (tiles padded to 16 columns, masked), two examples of three tokens."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(0.3, 1.5, (2, 3, 12)), rng.normal(size=(2, 3, 12))
    shift, scale = rng.normal(size=(2, 12)), rng.normal(size=(2, 12))
    loss64 = lambda x, shift, scale: np.sum(w * adaln64(x, shift, scale))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    ours = lambda *a: jnp.sum(f32(w) * pallas_norms.adaptive_layer_norm(*a, interpret=True))
    value, grads = jax.value_and_grad(ours, argnums=(0, 1, 2))(f32(x), f32(shift), f32(scale))
    np.testing.assert_allclose(value, loss64(x, shift, scale), rtol=1e-5)
    expected = (_numerical_grad(lambda v: loss64(v, shift, scale), x),
                _numerical_grad(lambda v: loss64(x, v, scale), shift),
                _numerical_grad(lambda v: loss64(x, shift, v), scale))
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=2e-4)


@pytest.mark.parametrize("shape, tile_elements, min_programs", [
    ((2, 9, 12), 32, 4),      # 2-row tiles, 2 programs an example each walking 3 tiles (the last ragged)
    ((3, 2, 2, 20), 64, 1),   # [B, H, W, C]; 2 tiles of 2 rows in one program per example
])
def test_the_kernels_tile_rows_and_split_examples_like_one_pass(monkeypatch, shape, tile_elements, min_programs):
    """With small tiles (several per program, rows past the end masked) the kernels compute
    the XLA version's value and gradients, in float32 and in bfloat16."""
    monkeypatch.setattr(pallas_norms, "_TILE_ELEMENTS", tile_elements)
    monkeypatch.setattr(pallas_norms, "_MIN_PROGRAMS", min_programs)
    B, C = shape[0], shape[-1]
    keys = jax.random.split(jax.random.key(3), 4)
    w = jax.random.normal(keys[3], shape)
    for dtype, tolerance in ((jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)):
        x = (jax.random.normal(keys[0], shape) * 2 + 0.5).astype(dtype)
        shift, scale = (jax.random.normal(k, (B, C)).astype(dtype) for k in keys[1:3])

        def loss(impl, *args):
            return jnp.sum(w * adaptive_layer_norm(*args, 1e-5, impl=impl).astype(jnp.float32))

        ours = jax.value_and_grad(functools.partial(loss, "pallas_interpret"), argnums=(0, 1, 2))(x, shift, scale)
        xla = jax.value_and_grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(x, shift, scale)
        for got, want in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(xla)):
            assert got.dtype == want.dtype
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                       rtol=tolerance, atol=tolerance * float(jnp.max(jnp.abs(want))))


def test_the_dit_with_the_kernels_computes_the_xla_dits_loss_and_gradients():
    model, params, shape = tiny("dit_tiny")
    # zero-initialised modulations would hide the norms' gradients
    params = jax.tree_util.tree_map(lambda a: a + 0.05 * np.cos(np.arange(a.size).reshape(a.shape)), params)
    x = jax.random.normal(jax.random.key(1), (2, *shape))
    t, y = jnp.array([3, 700]), jnp.array([1, 4])

    def loss(model, p):
        return jnp.sum(jnp.sin(model.apply({"params": p}, x, t, y)))

    kernels = create_model("dit_tiny", norm_impl="pallas_interpret")
    value, ours = jax.jit(jax.value_and_grad(functools.partial(loss, kernels)))(params)
    ref_value, theirs = jax.jit(jax.value_and_grad(functools.partial(loss, model)))(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(b))),
                                   err_msg=jax.tree_util.keystr(path))


def test_the_kernels_lower_to_triton_for_a_gpu_at_dit_b2_size():
    """JAX's Pallas-to-Triton lowering (power-of-two tiles, masked loads, the loop) runs on
    this CPU: the DiT-B/2 adaLN's forward and backward become two Triton kernels."""
    B, T, C = 256, 256, 768
    x, mod = jax.ShapeDtypeStruct((B, T, C), jnp.bfloat16), jax.ShapeDtypeStruct((B, C), jnp.bfloat16)
    loss = lambda *a: jnp.sum(pallas_norms.adaptive_layer_norm(*a).astype(jnp.float32))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, mod, mod).lower(lowering_platforms=("cuda",))
    kernels = re.findall(r'@__gpu\$xla\.gpu\.triton.*?grid_x = (\d+) : i32, grid_y = (\d+) : i32.*?name = "(\w+)"',
                         lowered.as_text())
    assert sorted(kernels) == [("256", "4", "adaptive_layer_norm_backward"),
                               ("256", "64", "adaptive_layer_norm_forward")], kernels


def test_the_implementation_choice(monkeypatch, caplog):
    assert resolve_norm_impl(None, backend="gpu") == "xla"        # until measured faster (ops.py)
    assert resolve_norm_impl("auto", backend="cpu") == "xla"
    assert resolve_norm_impl("pallas", backend="gpu") == "pallas"
    assert resolve_norm_impl("pallas_interpret", backend="cpu") == "pallas_interpret"
    with caplog.at_level("INFO", logger="diffusion_jax.models.ops"):
        assert resolve_norm_impl("pallas", backend="tpu") == "xla"  # falls back where Triton is not
    assert "need a GPU" in caplog.text
    monkeypatch.setattr(ops, "PALLAS_NORMS_BY_DEFAULT", True)
    assert resolve_norm_impl(None, backend="gpu") == "pallas"
    assert resolve_norm_impl("auto", backend="cpu") == "xla"
    with pytest.raises(ValueError, match="unknown norm implementation 'triton'; choose one of auto, xla"):
        resolve_norm_impl("triton")
    with pytest.raises(ValueError, match=r"must be \[B, C\] = \(2, 4\)"):
        pallas_norms.adaptive_layer_norm(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3)), jnp.zeros((2, 4)))
