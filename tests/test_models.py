"""Backbones: published parameter counts, shapes, zero init, bf16, remat, attention, learning."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import draws
import diffusion_jax as dj
from diffusion_jax.models import (PRESETS, count_params, create_model, init_params, param_shapes,
                                  sincos_pos_embed_2d, timestep_embedding)
from diffusion_jax.models.layers import DenseGELU, GroupNorm32, dot_product_attention, resolve_attention_impl
from diffusion_jax.models.ops import adaptive_layer_norm, gelu_tanh, group_norm
from diffusion_jax.models.unet import _resample

# Published figures: DDPM (Ho et al. 2020, 35.7M / 114M), DiT (Peebles & Xie 2022, Table 4).
pytestmark = pytest.mark.slow  # the full tier: `make test` (runs, commands, whole models)

PUBLISHED = {"ddpm_cifar10": (35.7e6, 0.005), "ddpm_celebahq256": (114e6, 0.01),
             "ddpm_lsun256": (114e6, 0.01), "dit_s2": (33e6, 0.01), "dit_b2": (130e6, 0.01),
             "dit_l2": (458e6, 0.01), "dit_xl2": (675e6, 0.01)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_papers(name):
    expected, tolerance = PUBLISHED[name]
    n = count_params(param_shapes(create_model(name), PRESETS[name].input_shape))
    assert abs(n - expected) / expected <= tolerance, (name, n)


def test_a_model_of_a_runs_config_json_is_hashable_and_its_shapes_traced_once():
    """A run's config.json gives sequences as lists; the module gets them as tuples, so it is the
    preset's module and `param_shapes` traces it once; so is a diffusers VAE's, loaded again."""
    from diffusion_jax.interop import expected_params, vae
    from diffusion_jax.models import _abstract_init

    listed = create_model("unet_tiny", ch_mult=[1, 2], attn_resolutions=[4])
    assert listed == create_model("unet_tiny") and hash(listed) == hash(create_model("unet_tiny"))
    param_shapes(listed, (8, 8, 1))
    misses = _abstract_init.cache_info().misses
    param_shapes(create_model("unet_tiny", ch_mult=[1, 2]), (8, 8, 1))
    assert _abstract_init.cache_info().misses == misses
    config = {"block_out_channels": [8, 16], "latent_channels": 2, "norm_num_groups": 4, "sample_size": 8,
              "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    shapes = expected_params(*vae.module_from_config(config))
    shapes["encoder"] = None  # each call's tree is its own
    again = expected_params(*vae.module_from_config(config))
    assert _abstract_init.cache_info().misses == misses + 1 and again["encoder"] is not None


def test_patch_variants_and_exact_ddpm_count():
    # The DDPM CIFAR-10 U-Net of the original TF code has exactly 35,746,307 parameters.
    assert count_params(param_shapes(create_model("ddpm_cifar10"), (32, 32, 3))) == 35_746_307
    # Patch size changes only the patch embedding and the final linear.
    n2, n4, n8 = (count_params(param_shapes(create_model(f"dit_xl{p}"), (32, 32, 4))) for p in (2, 4, 8))
    assert n2 < n4 < n8 and abs(n8 - 675e6) / 675e6 < 0.01


@functools.lru_cache(maxsize=None)
def _tiny(name, overrides):
    model = create_model(name, **dict(overrides))
    shape = PRESETS[name].input_shape
    if not overrides:  # the preset's own initialisation (zero heads and all), compiled once
        params = jax.device_get(init_params(model, jax.random.key(0), shape, batch=2))
    else:  # a variant: random parameters from NumPy, no initialiser to compile (14 s for a U-Net)
        params = random_params(param_shapes(model, shape))
    return model, params, shape


def tiny(name, **kw):
    """A small preset and its parameters (host arrays), made once per configuration: the
    preset's initialisation for the preset itself, random normal ones for a variant."""
    return _tiny(name, tuple(sorted(kw.items())))


def random_params(shapes, seed: int = 0, scale: float = 0.05):
    """NumPy normal parameters of the given shapes (ShapeDtypeStructs)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def shifted(params, value):
    """params + value on the host (eager device ops would compile once per shape)."""
    return jax.tree_util.tree_map(lambda p: np.asarray(p) + value, params)


@pytest.mark.parametrize("name", ["unet_tiny", "dit_tiny"])
def test_shapes_zero_init_jit_grad_bf16(name):
    model, params, shape = tiny(name)
    x = draws.normal(jax.random.key(1), (3, *shape))
    t = jnp.array([0.0, 10.0, 999.0])  # float timesteps: the fractional ones below reuse the program
    apply = jax.jit(model.apply)  # one function: the calls below of the same shapes reuse its program
    out = apply({"params": params}, x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)  # zero-initialised head / adaLN-Zero
    # Learned sigma doubles the channels; class labels are accepted.
    model2 = create_model(name, learn_sigma=True, num_classes=10)
    out2 = jax.eval_shape(model2.apply, {"params": param_shapes(model2, shape)}, x, t, jnp.array([1, 2, 3]))
    assert out2.shape == (*x.shape[:-1], 2 * shape[-1])
    # Gradients flow (after a perturbation of the zero-initialised heads) and bf16 is finite.
    grads = jax.device_get(perturbed_gradients(name, remat=False))
    params = shifted(params, 0.01)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert sum(np.abs(g).sum() > 0 for g in jax.tree_util.tree_leaves(grads)) > 0.8 * len(
        jax.tree_util.tree_leaves(grads))
    bf16 = create_model(name, dtype=jnp.bfloat16)
    out_bf16 = jax.jit(bf16.apply)({"params": params}, x, t)
    assert out_bf16.dtype == jnp.float32 and np.isfinite(np.asarray(out_bf16)).all()
    np.testing.assert_allclose(out_bf16, apply({"params": params}, x, t), atol=0.1, rtol=0.1)
    bf16_params = jax.eval_shape(bf16.init, jax.random.key(0), x, t)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(bf16_params))
    # Fractional timesteps (the sigma-space samplers' interpolated ones) are embedded as they
    # are, not rounded or truncated: t = 10.5 gives an output of its own.
    same_x = jnp.broadcast_to(x[:1], x.shape)
    f10, f105, f11 = np.asarray(apply({"params": params}, same_x, jnp.array([10.0, 10.5, 11.0])))
    gap = np.abs(f11 - f10).max()
    assert gap > 0 and np.abs(f105 - f10).max() > 0.2 * gap and np.abs(f105 - f11).max() > 0.2 * gap


def perturbed_gradients(name, remat: bool):
    """Gradients of sum(out^2) at the initial parameters + 0.01 (the zero-initialised heads
    perturbed), one program shared by the tests that need them."""
    _, params, shape = tiny(name)
    model = create_model(name, remat=remat)
    params = shifted(params, 0.01)
    x = draws.normal(jax.random.key(1), (2, *shape))
    t = jnp.array([3, 500])
    return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t) ** 2)))(params)


@pytest.mark.parametrize("name", ["unet_tiny", "dit_tiny"])
def test_remat_gives_the_same_gradients(name):
    g1, g2 = perturbed_gradients(name, remat=False), perturbed_gradients(name, remat=True)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dropout_needs_and_uses_rng():
    _, params, shape = tiny("unet_tiny")
    model = create_model("unet_tiny", dropout=0.5)
    params = shifted(params, 0.01)
    x = draws.normal(jax.random.key(1), (2, *shape))
    t = jnp.array([3, 4])
    apply = jax.jit(model.apply, static_argnames="train")
    a = apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(0)})
    b = apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(1)})
    c = apply({"params": params}, x, t)
    assert not np.allclose(a, b) and np.allclose(c, apply({"params": params}, x, t))


def test_attention_matches_plain_softmax_reference():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q, k, v = (draws.normal(kk, (2, 10, 3, 8)) for kk in (k1, k2, k3))
    logits = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(8)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhlm,bmhd->blhd", weights, v)
    np.testing.assert_allclose(dot_product_attention(q, k, v), expected, atol=1e-5)


def _numerical_grad(f, x, h=1e-6):
    """Central differences of a scalar float64 function f at x (any shape)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = h
        grad[i] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def _residual_bytes(f, x, *args):
    """Bytes of the x-shaped tensors that reverse-mode differentiation of f(x, *args) keeps
    from the forward pass."""
    _, f_vjp = jax.vjp(f, x, *args)
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(f_vjp) if leaf.shape == x.shape)


def test_group_norm_silu_matches_float64_formula_and_its_gradient():
    rng = np.random.default_rng(0)
    x, w = rng.normal(0.5, 2.0, (2, 3, 2, 12)), rng.normal(size=(2, 3, 2, 12))
    scale, bias = rng.normal(size=12), rng.normal(size=12)

    def loss64(x, scale, bias, silu):   # G = 4 groups of 3 channels, over space and channels
        groups = x.reshape(2, 3, 2, 4, 3)
        mean = groups.mean(axis=(1, 2, 4), keepdims=True)
        var = groups.var(axis=(1, 2, 4), keepdims=True)
        z = ((groups - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
        return np.sum(w * (z / (1 + np.exp(-z)) if silu else z))

    f32 = lambda a: jnp.asarray(a, jnp.float32)
    for silu in (False, True):
        ours = lambda x, s, b: jnp.sum(f32(w) * group_norm(x, 4, s, b, silu=silu))
        np.testing.assert_allclose(ours(f32(x), f32(scale), f32(bias)), loss64(x, scale, bias, silu), rtol=1e-5)
        grads = jax.grad(ours, argnums=(0, 1, 2))(f32(x), f32(scale), f32(bias))
        expected = (_numerical_grad(lambda v: loss64(v, scale, bias, silu), x),
                    _numerical_grad(lambda v: loss64(x, v, bias, silu), scale),
                    _numerical_grad(lambda v: loss64(x, scale, v, silu), bias))
        for got, want in zip(grads, expected):
            np.testing.assert_allclose(got, want, atol=2e-4)
    # Per-example affine [B, C] (ADM's scale-shift norm folded in): each example's own scale.
    per_example = rng.normal(size=(2, 12))
    got = group_norm(f32(x), 4, f32(per_example), None)
    for b in range(2):
        np.testing.assert_allclose(got[b], group_norm(f32(x[b:b + 1]), 4, f32(per_example[b]))[0], atol=1e-6)
    # ADM's scale-shift norm, folded into the affine by GroupNorm32: SiLU(GN(x) (1 + s) + b).
    s, b = f32(rng.normal(size=(2, 12))), f32(rng.normal(size=(2, 12)))
    norm = GroupNorm32(4, silu=True)
    affine = {"params": {"scale": f32(scale), "bias": f32(bias)}}
    folded = lambda s: jnp.sum(f32(w) * norm.apply(affine, f32(x), scale_shift=(s, b)))
    plain = lambda s: jnp.sum(f32(w) * jax.nn.silu(group_norm(f32(x), 4, f32(scale), f32(bias))
                                                     * (1 + s[:, None, None]) + b[:, None, None]))
    np.testing.assert_allclose(folded(s), plain(s), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(folded)(s), jax.grad(plain)(s), atol=1e-4)
    # bfloat16 in and out; of the [B, H, W, C] tensors the backward pass keeps x alone, where
    # autodiff of the float32 composite keeps about 14 bytes an element.
    xb = jnp.asarray(x, jnp.bfloat16)
    assert group_norm(xb, 4, silu=True).dtype == jnp.bfloat16
    assert _residual_bytes(lambda v: group_norm(v, 4, f32(scale), f32(bias), silu=True), xb) == xb.nbytes
    import flax.linen as nn
    ref = nn.GroupNorm(num_groups=4, epsilon=1e-6, dtype=jnp.float32)
    ref_params = {"params": {"scale": f32(scale), "bias": f32(bias)}}
    autodiff = lambda v: nn.silu(ref.apply(ref_params, v.astype(jnp.float32)).astype(v.dtype))
    assert _residual_bytes(autodiff, xb) >= 5 * xb.nbytes
    with pytest.raises(ValueError, match="not divisible by the GroupNorm groups 5"):
        group_norm(jnp.zeros((1, 2, 2, 12)), 5)


def test_adaptive_layer_norm_matches_float64_formula_and_its_gradient():
    rng = np.random.default_rng(0)
    x, w = rng.normal(0.3, 1.5, (2, 3, 8)), rng.normal(size=(2, 3, 8))
    shift, scale = rng.normal(size=(2, 8)), rng.normal(size=(2, 8))

    def loss64(x, shift, scale):   # the plain float64 formula: LN(x) (1 + scale) + shift
        xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
        return np.sum(w * (xhat * (1 + scale[:, None]) + shift[:, None]))

    args32 = [jnp.asarray(a, jnp.float32) for a in (x, shift, scale)]
    ours = lambda *a: jnp.sum(jnp.asarray(w, jnp.float32) * adaptive_layer_norm(*a))
    np.testing.assert_allclose(ours(*args32), loss64(x, shift, scale), rtol=1e-5)
    grads = jax.grad(ours, argnums=(0, 1, 2))(*args32)
    expected = (_numerical_grad(lambda v: loss64(v, shift, scale), x),
                _numerical_grad(lambda v: loss64(x, v, scale), shift),
                _numerical_grad(lambda v: loss64(x, shift, v), scale))
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=2e-4)
    # bfloat16 in, bfloat16 out; of the [B, T, C] tensors the backward pass keeps x alone, where
    # autodiff of float32 LayerNorm + modulation keeps 10 bytes an element.
    xb, sb, cb = (jnp.asarray(a, jnp.bfloat16) for a in (x, shift, scale))
    assert adaptive_layer_norm(xb, sb, cb).dtype == jnp.bfloat16
    kept = _residual_bytes(adaptive_layer_norm, xb, sb, cb)
    assert kept == xb.nbytes
    import flax.linen as nn
    autodiff = lambda x, s, c: (nn.LayerNorm(1e-6, use_scale=False, use_bias=False).apply(
        {}, x.astype(jnp.float32)).astype(x.dtype) * (1 + c[:, None]) + s[:, None])
    assert _residual_bytes(autodiff, xb, sb, cb) >= 5 * kept


def test_gelu_tanh_matches_float64_formula_and_its_gradient():
    x = np.linspace(-6.0, 6.0, 97)
    gelu64 = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
    w = np.cos(np.arange(97.0))
    np.testing.assert_allclose(gelu_tanh(jnp.asarray(x, jnp.float32)), gelu64(x), atol=1e-6)
    np.testing.assert_allclose(gelu_tanh(jnp.asarray(x, jnp.float32)),
                               jax.nn.gelu(jnp.asarray(x, jnp.float32), approximate=True), atol=1e-6)
    grad = jax.grad(lambda v: jnp.sum(jnp.asarray(w, jnp.float32) * gelu_tanh(v)))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(grad, _numerical_grad(lambda v: np.sum(w * gelu64(v)), x), atol=1e-5)
    xb = jnp.asarray(x, jnp.bfloat16)
    assert gelu_tanh(xb).dtype == jnp.bfloat16
    assert _residual_bytes(gelu_tanh, xb) == xb.nbytes          # x only
    assert _residual_bytes(lambda v: jax.nn.gelu(v, approximate=True), xb) > 4 * xb.nbytes


def test_dense_gelu_is_a_dense_layer_and_its_gelu():
    """DenseGELU: nn.Dense's parameters (the same initial values), the same output, bitwise,
    and the same gradients as gelu_tanh after nn.Dense, in float32 and bfloat16; its bias
    gradient is the GELU gradient's sum (checked against the float64 formula)."""
    x = draws.normal(jax.random.key(0), (2, 3, 8))
    for dtype in (jnp.float32, jnp.bfloat16):
        ours, dense = DenseGELU(16, dtype=dtype), nn.Dense(16, dtype=dtype)
        params, dense_params = ours.init(jax.random.key(1), x), dense.init(jax.random.key(1), x)
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(dense_params)
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(dense_params)):
            np.testing.assert_array_equal(a, b)
        params = jax.tree_util.tree_map(lambda a: a + 0.1 * np.cos(np.arange(a.size).reshape(a.shape)), params)
        reference = lambda p, x: gelu_tanh(dense.apply(p, x))
        np.testing.assert_array_equal(ours.apply(params, x), reference(params, x))
        loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x).astype(jnp.float32)))
        got, want = (jax.grad(loss(f), argnums=(0, 1))(params, x) for f in (ours.apply, reference))
        tolerance = 1e-6 if dtype == jnp.float32 else 2e-2
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * float(jnp.max(jnp.abs(b))))
    p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
    g = np.cos(np.arange(48.0)).reshape(2, 3, 8) @ np.ones((8, 16)) / 8
    u = np.asarray(x, np.float64) @ p64["kernel"] + p64["bias"]
    slope = _numerical_grad(lambda v: np.sum(0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))), u)
    d_bias = jax.grad(lambda p: jnp.sum(jnp.asarray(g, jnp.float32) * DenseGELU(16).apply({"params": p}, x)))(
        params["params"])["bias"]
    np.testing.assert_allclose(d_bias, np.sum(g * slope, axis=(0, 1)), rtol=1e-4, atol=1e-5)


def test_resample_and_attention_kernel_choice():
    x = draws.normal(jax.random.key(0), (2, 3, 4, 5))
    np.testing.assert_array_equal(_resample(x, up=True),
                                  jax.image.resize(x, (2, 6, 8, 5), method="nearest"))
    np.testing.assert_array_equal(_resample(x, up=True)[:, ::2, ::2], x)
    # The fused kernel only where it exists: a GPU, half precision, head size <= 128, multiple of 8.
    assert resolve_attention_impl(None, jnp.bfloat16, 64, backend="gpu") == "cudnn"
    assert resolve_attention_impl("auto", jnp.float32, 64, backend="gpu") == "xla"
    assert resolve_attention_impl(None, jnp.bfloat16, 256, backend="gpu") == "xla"
    assert resolve_attention_impl(None, jnp.bfloat16, 64, backend="cpu") == "xla"
    assert resolve_attention_impl("cudnn", jnp.float32, 64, backend="cpu") == "cudnn"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        resolve_attention_impl("flash", jnp.bfloat16, 64)


def assert_same_loss_and_gradients(model, reference, params, shape, rtol=1e-6):
    """sum(sin(model(x, t))) and its gradient for every parameter agree with `reference`'s, at
    the parameters perturbed by a cosine (zero-initialised heads would hide differences)."""
    params = jax.tree_util.tree_map(lambda a: a + 0.05 * np.cos(np.arange(a.size).reshape(a.shape)), params)
    x = draws.normal(jax.random.key(1), (2, *shape))
    t = jnp.array([3, 700])

    def loss(model, p):
        return jnp.sum(jnp.sin(model.apply({"params": p}, x, t)))

    value, ours = jax.jit(jax.value_and_grad(functools.partial(loss, model)))(params)
    ref_value, theirs = jax.jit(jax.value_and_grad(functools.partial(loss, reference)))(params)
    np.testing.assert_allclose(value, ref_value, rtol=rtol)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(b))),
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", ["unet_tiny", "dit_tiny"])
def test_hand_written_gradients_equal_autodiff_in_the_whole_model(name):
    """`autodiff_ops=True` differentiates the same forward with JAX: outputs and every
    parameter's gradient agree (ADM's scale-shift norm included for the U-Net)."""
    extra = {"scale_shift_norm": True} if name == "unet_tiny" else {}
    model, params, shape = tiny(name, **extra)
    assert_same_loss_and_gradients(model, model.clone(autodiff_ops=True), params, shape)


def test_separate_qkv_projections_compute_the_fused_function():
    fused, params, shape = _tiny("dit_tiny", ())
    separate = create_model("dit_tiny", fused_qkv=False)
    assert count_params(params) == count_params(param_shapes(separate, shape))
    # The fused [C, 3C] product's columns are q | k | v.
    split = dict(params)
    for block in [k for k in params if k.startswith("block")]:
        attn = dict(params[block]["attn"])
        qkv = attn.pop("qkv")
        C = qkv["kernel"].shape[0]
        for i, name in enumerate("qkv"):
            attn[name] = {"kernel": qkv["kernel"][:, i * C:(i + 1) * C], "bias": qkv["bias"][i * C:(i + 1) * C]}
        split[block] = {**params[block], "attn": attn}
    perturbed = shifted(split, 0.05)  # zero-initialised heads would hide errors
    fused_params = shifted(params, 0.05)
    x = draws.normal(jax.random.key(1), (2, *shape))
    t, y = jnp.array([3, 70]), jnp.array([1, 4])
    np.testing.assert_allclose(jax.jit(separate.apply)({"params": perturbed}, x, t, y),
                               jax.jit(fused.apply)({"params": fused_params}, x, t, y), rtol=1e-5, atol=1e-5)


def test_embeddings():
    emb = timestep_embedding(jnp.array([0, 7]), 6)
    half = np.exp(-np.log(10000) * np.arange(3) / 3)
    np.testing.assert_allclose(emb[1], np.concatenate([np.cos(7 * half), np.sin(7 * half)]), rtol=1e-5)
    assert emb.dtype == jnp.float32
    pos = sincos_pos_embed_2d(8, 2, 3)
    assert pos.shape == (6, 8)
    np.testing.assert_allclose(pos[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)  # position (0, 0)
    # Token (row 1, col 2): first half encodes the column, second half the row.
    np.testing.assert_allclose(pos[5, [0, 4]], [np.sin(2.0), np.sin(1.0)], rtol=1e-6)


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown model preset 'ddpm_cifar100'.*ddpm_cifar10"):
        create_model("ddpm_cifar100")
    with pytest.raises(ValueError, match="unknown option"):
        create_model("unet_tiny", channels=3)
    x = jnp.zeros((1, 9, 9, 1))
    t = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        create_model("dit_tiny").init(jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="not divisible by 2\\^\\(levels-1\\)"):
        create_model("unet_tiny").init(jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="GroupNorm groups 32"):
        create_model("unet_tiny", num_groups=32).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), t)
    with pytest.raises(ValueError, match=r"attention resolution\(s\) \[16\] never occur"):
        create_model("unet_tiny", attn_resolutions=(16,)).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), t)


def test_overfits_a_fixed_batch():
    """A few hundred Adam steps of training_loss on one fixed batch drive the DiT's loss down (the
    U-Net's learning: test_evaluation's digits run, whose held-out noise MSE must fall)."""
    model, params, shape = tiny("dit_tiny")
    s = dj.make_schedule("linear", 100)
    x0 = jnp.tile(jnp.linspace(-1, 1, shape[0] * shape[1]).reshape(1, *shape[:2], 1), (16, 1, 1, shape[2]))
    x0 = x0 * jnp.where(jnp.arange(16) % 2 == 0, 1.0, -1.0).reshape(-1, 1, 1, 1)
    opt = optax.adam(2e-3)

    @jax.jit
    def step(params, opt_state, key):
        def loss_fn(p):
            return dj.training_loss(lambda x, t: model.apply({"params": p}, x, t), s, x0, key)[0]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = opt.init(params)
    eval_keys = jax.random.split(jax.random.key(99), 8)
    evaluate = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: dj.training_loss(
        lambda x, t: model.apply({"params": p}, x, t), s, x0, k)[0])(eval_keys)))
    initial = float(evaluate(params))
    for i in range(300):
        params, opt_state, _ = step(params, opt_state, jax.random.key(i))
    final = float(evaluate(params))
    assert final < 0.35 * initial, (initial, final)


def test_adm_options_scale_shift_and_resblock_updown():
    """ADM's scale-shift norm and resblock resampling: same interface, more parameters, and a
    time embedding that changes the output once the zero-initialised head is perturbed."""
    base = count_params(param_shapes(create_model("unet_tiny"), (8, 8, 1)))
    model = create_model("unet_tiny", scale_shift_norm=True, resblock_updown=True, num_heads=2)
    assert count_params(param_shapes(model, (8, 8, 1))) > base
    params = random_params(param_shapes(model, (8, 8, 1)), seed=2)
    x = draws.normal(jax.random.key(1), (2, 8, 8, 1))
    apply = jax.jit(model.apply)
    out_a = apply({"params": params}, x, jnp.array([1, 1]))
    out_b = apply({"params": params}, x, jnp.array([900, 900]))
    assert out_a.shape == x.shape and not np.allclose(out_a, out_b)


def test_flop_count_of_the_ddpm_unet():
    """The jaxpr FLOP counter on one conv against 2 x H x W x k x k x Cin x Cout, on a scan, and on the DDPM
    CIFAR-10 U-Net against the paper-convention figure (12.4 GFLOPs a forward at 32x32)."""
    import flax.linen as nn
    from benchmarks.common import analytic_forward_flops
    conv = nn.Conv(5, (3, 3))
    x = jnp.zeros((1, 8, 8, 4))
    p = jax.eval_shape(conv.init, jax.random.key(0), x)
    assert analytic_forward_flops(conv.apply, p, x) == 2 * 8 * 8 * 9 * 4 * 5
    # A scan's body counts once per iteration: 7 products of [3, 4] x [4, 4].
    w = jnp.zeros((4, 4))
    scanned = lambda h: jax.lax.scan(lambda c, _: (c @ w, None), h, None, length=7)[0]
    assert analytic_forward_flops(scanned, jnp.zeros((3, 4))) == 7 * 2 * 3 * 4 * 4
    model = create_model("ddpm_cifar10")
    params = param_shapes(model, (32, 32, 3))
    flops = analytic_forward_flops(lambda p, x, t: model.apply({"params": p}, x, t), params,
                                   jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
                                   jax.ShapeDtypeStruct((1,), jnp.int32))
    assert abs(flops / 12.4e9 - 1) < 0.01, flops


def test_flop_count_of_dit_b2_matches_the_transformer_formula():
    """DiT-B/2 on 32x32x4 latents: T = 256 tokens of width C = 768, 12 blocks. Per block the
    adaLN projection 2 C 6C, q/k/v 2 T C 3C, scores and values 2 x 2 T^2 C, output 2 T C^2 and
    the MLP 2 x 2 T C 4C; plus patch embedding, time embedding MLP, final adaLN and linear.
    The total is twice the paper's 23.01 G multiply-adds."""
    from benchmarks.common import analytic_forward_flops
    model = create_model("dit_b2").clone(attention_impl="xla")
    params = param_shapes(model, (32, 32, 4))
    flops = analytic_forward_flops(lambda p, x, t: model.apply({"params": p}, x, t), params,
                                   jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
                                   jax.ShapeDtypeStruct((1,), jnp.int32))
    T, C, p, depth = 256, 768, 2, 12
    block = 2 * C * 6 * C + 2 * T * C * 3 * C + 2 * 2 * T * T * C + 2 * T * C * C + 2 * 2 * T * C * 4 * C
    rest = (2 * T * (p * p * 4) * C + 2 * (256 * C + C * C)      # patch embedding, time MLP
            + 2 * C * 2 * C + 2 * T * C * (p * p * 8))          # final adaLN, linear to 2 x 4 channels
    assert flops == depth * block + rest
    assert abs(flops / 2 / 23.01e9 - 1) < 0.001
