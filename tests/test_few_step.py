"""The few-step objectives on Gaussian data, whose average velocity and consistency function on the
flow path are exact (`oracles`): MeanFlow's loss and the consistency loss are stationary there and
their gradients point back from a perturbed model (their samplers are in test_samplers' registry x
processes); a two-time backbone given a one-time model's parameters computes its function, and
jax.jvp (both objectives' tangent) through every backbone equals finite differences."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import draws
import diffusion_jax as dj
from diffusion_jax.errors import UsageError
from diffusion_jax.objectives import consistency_loss, meanflow_loss
from diffusion_jax.samplers import sample
from tests.oracles import gaussian_average_velocity, gaussian_average_velocity_model, gaussian_consistency_model

MU, S = 0.3, 0.5
FLOW = dj.make_process("flow")
EXACT = gaussian_average_velocity(MU, S)
EXACT_MODEL = gaussian_average_velocity_model(FLOW, MU, S)


def exact_model(theta=0.0):
    """The exact average velocity as a model of model times (1000 t; r= the second), plus theta times
    a direction (z t + 1) that the loss must push back to 0."""
    def model(z, model_t, r=None):
        t = model_t.reshape((-1,) + (1,) * (z.ndim - 1)) / 1000.0
        r = t if r is None else r.reshape(t.shape) / 1000.0
        return EXACT(z, r, t) + theta * (z * t + 1.0)
    return model


@pytest.mark.parametrize("model_tangent", [0.0, 1.0])
def test_the_meanflow_loss_is_stationary_at_the_exact_average_velocity(model_tangent):
    """The gradient in theta of the loss of u_exact + theta (z t + 1), over 32 keys of 4096 examples:
    at theta = 0 its mean is within 4 standard errors of 0 (the plain squared error, adaptive p = 0;
    the loss itself is not 0: the target carries the sample's own velocity), at theta = +-0.05 it
    points back to 0, well outside its noise; along the sample's velocity (MeanFlow's tangent) and
    along the model's own (iMF's)."""
    x0_of = lambda key: MU + S * draws.normal(key, (4096, 1))

    def gradient(theta, key):
        key_data, key_loss = jax.random.split(key)
        loss = lambda th: meanflow_loss(exact_model(theta=th), FLOW, x0_of(key_data), key_loss,
                                        adaptive_p=0.0, model_tangent=model_tangent)[0]
        return jax.value_and_grad(loss)(theta)

    assert stationary_and_restoring(gradient).mean() > 0.1  # at theta = -0.05; and at 0 (below): not zero
    assert float(gradient(jnp.float32(0.0), jax.random.key(5))[0]) > 0.1


def stationary_and_restoring(gradient):
    """gradient(theta, key) -> (loss, d loss / d theta): over 32 keys, at theta = 0 its mean is within 4
    standard errors of 0, at theta = +-0.05 it points back to 0, well outside its noise."""
    keys = jax.random.split(jax.random.key(0), 32)
    for theta in (0.0, 0.05, -0.05):
        losses, grads = np.asarray(jax.jit(jax.vmap(gradient, in_axes=(None, 0)))(jnp.float32(theta), keys))
        mean, error = grads.mean(), grads.std() / math.sqrt(len(grads))
        if theta == 0.0:
            assert abs(mean) < 4 * error, (mean, error)
        else:
            assert mean * theta > 0 and abs(mean) > 8 * error, (theta, mean, error)
    return losses


def test_guidance_folded_into_the_meanflow_target_is_stationary_at_the_guided_velocity():
    """Two classes N(+-0.5, 0.3^2), equal weights, 10% of the conditions dropped to the null (label 2):
    with guidance w = 1.5 and guidance_mix kappa = 0.25 folded into the target, the loss at r = t
    (ratio 0) is stationary at the guided velocity v_null + s (v_c - v_null) of scale s = w / (1 - kappa)
    = 2, v_c and v_null the classes' and the mixture's exact velocities: the model of scale 2 + theta is
    stationary at theta = 0 and restored from +-0.05 (ignoring kappa, s = w, is theta = -0.5)."""
    from diffusion_jax.objectives import Unconditional

    means, s = jnp.array([0.5, -0.5]), 0.3

    def velocities(z, t):
        """v_c [B, 2] of each class and v_null [B, 1] of the mixture at z [B, 1], t [B, 1] on the flow path."""
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        x0_mean = means + (1 - t) * s ** 2 / var * (z - (1 - t) * means)
        v = (z - x0_mean) / t
        weights = jax.nn.softmax(-(z - (1 - t) * means) ** 2 / (2 * var), axis=1)
        return v, jnp.sum(weights * v, axis=1, keepdims=True)

    def model(theta, labels):
        def u(z, model_t, r=None):
            v, v_null = velocities(z, model_t.reshape(-1, 1) / 1000.0)
            v_c = jnp.take_along_axis(v, jnp.minimum(labels, 1)[:, None], axis=1)
            return jnp.where(labels[:, None] == 2, v_null, v_null + (2.0 + theta) * (v_c - v_null))
        return u

    def gradient(theta, key):
        key_data, key_labels, key_drop, key_loss = jax.random.split(key, 4)
        labels = jax.random.bernoulli(key_labels, 0.5, (4096,)).astype(jnp.int32)
        x0 = means[labels][:, None] + s * draws.normal(key_data, (4096, 1))
        dropped = jax.random.bernoulli(key_drop, 0.1, (4096,))
        loss = lambda th: meanflow_loss(model(th, jnp.where(dropped, 2, labels)), FLOW, x0, key_loss, ratio=0.0,
                                        adaptive_p=0.0, guidance=1.5, guidance_mix=0.25,
                                        unconditional=Unconditional(model(th, jnp.full((4096,), 2)), dropped))[0]
        return jax.value_and_grad(loss)(theta)

    stationary_and_restoring(gradient)
    with pytest.raises(UsageError, match="cond_dropout"):
        meanflow_loss(exact_model(), FLOW, jnp.zeros((2, 1)), jax.random.key(0), guidance=2.0)


def test_the_consistency_loss_is_stationary_at_the_exact_consistency_function():
    """f = f* + theta t x (an x0 prediction: f(x, 0) = x kept), the consistency loss without tangent
    normalisation (tangent_c = 0): stationary at theta = 0, restoring at +-0.05 (along this direction the
    posterior mean E[x0 | x_t], which is not constant along the ODE, is 300 standard errors off)."""
    exact = gaussian_consistency_model(FLOW, MU, S)

    def gradient(theta, key):
        key_data, key_loss = jax.random.split(key)
        x0 = MU + S * draws.normal(key_data, (4096, 1))
        model = lambda th: (lambda x, model_t: exact(x, model_t) + th * (model_t / 1000.0)[:, None] * x)
        loss = lambda th: consistency_loss(model(th), FLOW, x0, key_loss, prediction="x0", tangent_c=0.0)[0]
        return jax.value_and_grad(loss)(theta)

    stationary_and_restoring(gradient)


@pytest.mark.parametrize("method", ["meanflow", "consistency"])
def test_one_step_from_the_exact_model_reproduces_the_data(method):
    """One jump of the exact average velocity, one denoising by the exact consistency function: 20,000
    samples of N(MU, S^2), mean and std within 0.01 (3 standard errors of the mean)."""
    model, prediction = (EXACT_MODEL, "velocity") if method == "meanflow" else \
        (gaussian_consistency_model(FLOW, MU, S), "x0")
    out = np.asarray(sample(model, FLOW, (20_000, 1), jax.random.key(3), method=method, num_steps=1,
                            prediction=prediction, clip_x0=False))
    assert abs(out.mean() - MU) < 0.01 and abs(out.std() - S) < 0.01, (out.mean(), out.std())


def test_meanflow_refuses_a_model_of_another_target_and_ddpms_integer_times():
    model = exact_model()
    with pytest.raises(UsageError, match="average velocity"):
        sample(model, FLOW, (2, 1), jax.random.key(0), method="meanflow", prediction="x0")
    with pytest.raises(UsageError, match="integer timesteps"):
        meanflow_loss(model, dj.make_schedule("linear", 1000), jnp.zeros((2, 1)), jax.random.key(0))


@pytest.mark.slow  # compiles whole backbones
@pytest.mark.parametrize("name", ["unet_tiny", "dit_tiny"])
def test_a_two_time_backbone_computes_the_one_time_models_function_from_its_parameters(name):
    """`with_second_time` adds the zero-initialised projection of r to a one-time model's (perturbed)
    parameters: the two-time model computes the same outputs for any r (max difference 0)."""
    from diffusion_jax.models import PRESETS, create_model, param_shapes, with_second_time

    one, two = create_model(name), create_model(name, second_time=True)
    shape, labels = PRESETS[name].input_shape, jnp.array([1, 2]) if name == "dit_tiny" else None
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype),
                                    param_shapes(one, shape))
    x, t = draws.normal(jax.random.key(0), (2, *shape)), jnp.array([10.0, 500.0])
    before = jax.jit(lambda p: one.apply({"params": p}, x, t, labels))(params)
    after = jax.jit(lambda p: two.apply({"params": p}, x, t, labels, r=jnp.array([3.0, 100.0])))(
        with_second_time(params, two, shape))
    assert float(jnp.abs(before).max()) > 0 and float(jnp.abs(after - before).max()) == 0.0
    with pytest.raises(UsageError, match="second_time=True"):
        one.apply({"params": params}, x, t, labels, r=t)


SMALL_SD = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), attn_levels=(1,), level_heads=(2, 2),
                context_dim=8, num_groups=8, transformer_depth=(1, 1), linear_projection=True)


@pytest.mark.slow  # compiles whole backbones
@pytest.mark.parametrize("name,ops_impl", [("unet_tiny", "pallas_interpret"), ("dit_tiny", "xla"), ("sd15_unet", "xla")])
def test_jvp_through_each_two_time_backbone_equals_finite_differences(name, ops_impl):
    """MeanFlow's target is one jax.jvp of the model; the ops' hand-written gradients have no forward
    mode, so a forward-mode objective's model takes JAX's autodiff (builders: autodiff_ops, on
    every GroupNorm, adaLN and GELU, whatever ops_impl). Tangent (dx, 0, 1) in (x, r, t) against the
    central difference at h = 1e-2 (float32): relative 1e-3 of the tangent's scale."""
    from diffusion_jax.models import PRESETS, create_model, param_shapes

    fields = dict(SMALL_SD if name == "sd15_unet" else {}, second_time=True, autodiff_ops=True, ops_impl=ops_impl)
    model = create_model(name, **fields)
    shape = (8, 8, 4) if name == "sd15_unet" else PRESETS[name].input_shape
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                                    param_shapes(model, shape))
    y = {"dit_tiny": jnp.array([1, 2]), "sd15_unet": jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)}.get(name)
    x, dx = (jnp.asarray(rng.standard_normal((2, *shape)), jnp.float32) for _ in range(2))
    r = jnp.array([100.0, 300.0])

    def u(x, t):
        return model.apply({"params": params}, x, t, y, r=r)

    t = jnp.array([400.0, 700.0])
    _, tangent = jax.jit(lambda x, t: jax.jvp(u, (x, t), (dx, jnp.ones_like(t))))(x, t)
    h = 1e-2
    step = jax.jit(lambda s: u(x + s * dx, t + s))
    difference = (step(h) - step(-h)) / (2 * h)
    scale = float(jnp.abs(tangent).max())
    assert scale > 1e-3 and float(jnp.abs(tangent - difference).max()) <= 1e-3 * scale, \
        (float(jnp.abs(tangent - difference).max()), scale)
