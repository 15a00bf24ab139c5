"""Normalisations and activations with hand-written gradients that keep only what the backward
pass needs: DiT's adaLN LayerNorm, tanh-GELU (alone, and with the bias add before it), and the
U-Net's GroupNorm (+ SiLU).

Reverse-mode autodiff of a composite op saves its intermediates for the backward pass, and for
memory-bound ops on large activations those bytes are the cost. In bfloat16, autodiff keeps
10 bytes an element for the float32 LayerNorm + adaLN modulation (two float32 intermediates
and a bfloat16 one), five bfloat16 tensors of the input's size for tanh-GELU, and about 14
bytes an element for GroupNorm + SiLU. The versions here keep the input (and per-row or
per-group statistics) and recompute the rest inside the backward pass, where it fuses with the
gradient arithmetic: the same function and gradient (tests compare both with a float64 formula
and its numerical derivative), fewer bytes written and read. Each takes `autodiff=True` for
the same forward differentiated by JAX (the models' `autodiff_ops` field), the comparison the
hand-written gradients are measured against. The norms and the bias + GELU also have Pallas
(Triton) kernels in `pallas_ops`, chosen by `impl=` (the models' `ops_impl` field,
`resolve_ops_impl`).

All compute in float32 and return the input's dtype.
"""
from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import UsageError

log = logging.getLogger(__name__)

OPS_IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
# Whether "auto" picks the Pallas kernels on a GPU: off until a device run of
# `benchmarks/gpu_session.sh` (kernels; dit_pallas_ops against dit_b256, unet_pallas_ops against
# unet_b128) measures them faster.
PALLAS_OPS_BY_DEFAULT = False


def _broadcast_over_tokens(v, x):
    """[B, C] -> [B, 1, ..., 1, C] in float32, to broadcast against x [B, ..., C]."""
    return v.astype(jnp.float32).reshape((v.shape[0],) + (1,) * (x.ndim - 2) + (v.shape[-1],))


def _normalize(x, epsilon):
    """(x - mean) / sqrt(var + eps) over the last axis in float32, with mean and rstd [..., 1]."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
    rstd = jax.lax.rsqrt(var + epsilon)
    return (xf - mean) * rstd, mean, rstd


def resolve_ops_impl(impl: str | None, backend: str | None = None) -> str:
    """The implementation of the ops with Pallas kernels (adaLN LayerNorm, GroupNorm, bias +
    GELU) to use: "xla", "pallas" or "pallas_interpret".

    "xla" (this module) and "pallas_interpret" (the Pallas kernels run by Pallas' interpreter:
    any backend, slow, for tests; an error on a jax without Pallas' Triton API) are used as given. "pallas" (`pallas_ops`, Triton kernels)
    runs where it can, on a GPU with a jax whose Pallas has the Triton API, and falls back to
    "xla" elsewhere (CPU, TPU, a jax without it) with a log line. None or "auto" is "pallas"
    where it can run if `PALLAS_OPS_BY_DEFAULT`, else "xla".
    """
    if impl not in (None,) + OPS_IMPLS:
        raise UsageError(f"unknown ops implementation {impl!r}; choose one of {', '.join(OPS_IMPLS)}")
    if impl == "xla" or (impl in (None, "auto") and not PALLAS_OPS_BY_DEFAULT):
        return "xla"
    from diffusion_jax.models import pallas_ops
    if impl == "pallas_interpret":
        if not pallas_ops.available():
            raise UsageError(f"ops implementation 'pallas_interpret' needs Pallas' Triton API (masked loads), "
                             f"which jax {jax.__version__} lacks: upgrade jax or use 'xla'")
        return impl
    if (backend or jax.default_backend()) == "gpu" and pallas_ops.available():
        return "pallas"
    if impl == "pallas":
        _log_pallas_fallback(backend or jax.default_backend())
    return "xla"


@functools.lru_cache(maxsize=None)
def _log_pallas_fallback(backend: str) -> None:
    log.info("the Pallas kernels need a GPU and a jax with Pallas' Triton API: using XLA's ops on %s", backend)


def adaptive_layer_norm(x, shift, scale, epsilon: float = 1e-6, autodiff: bool = False,
                        impl: str | None = None):
    """DiT's adaLN: LayerNorm(x) * (1 + scale) + shift, without a learned affine.

    x [B, ..., C]; shift, scale [B, C] (one per example, broadcast over the token axes).
    Normalises over C in float32 (variance as E[x^2] - E[x]^2, as flax's fast variance) and
    returns x.dtype. The backward pass saves x and the per-row mean and 1/std only;
    `autodiff=True` differentiates the same forward with JAX's autodiff instead (XLA only).
    `impl` chooses XLA or the Pallas kernels of `pallas_ops` (`resolve_ops_impl`); every
    choice computes the same function and gradient.
    """
    if autodiff:
        return _adaptive_layer_norm_fwd(x, shift, scale, epsilon)[0]
    chosen = resolve_ops_impl(impl)
    if chosen != "xla":
        from diffusion_jax.models import pallas_ops
        return pallas_ops.adaptive_layer_norm(x, shift, scale, epsilon, interpret=chosen == "pallas_interpret")
    return _adaptive_layer_norm(x, shift, scale, epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _adaptive_layer_norm(x, shift, scale, epsilon):
    return _adaptive_layer_norm_fwd(x, shift, scale, epsilon)[0]


def _adaptive_layer_norm_fwd(x, shift, scale, epsilon):
    xhat, mean, rstd = _normalize(x, epsilon)
    y = xhat * (1.0 + _broadcast_over_tokens(scale, x)) + _broadcast_over_tokens(shift, x)
    return y.astype(x.dtype), (x, shift, scale, mean, rstd)


def _adaptive_layer_norm_bwd(epsilon, residuals, g):
    x, shift, scale, mean, rstd = residuals
    xhat = (x.astype(jnp.float32) - mean) * rstd
    gf = g.astype(jnp.float32)
    tokens = tuple(range(1, x.ndim - 1))
    d_shift = jnp.sum(gf, axis=tokens)
    d_scale = jnp.sum(gf * xhat, axis=tokens)
    # Gradient of y = xhat * a through xhat = (x - mean) * rstd, a = 1 + scale:
    # dx = rstd * (g a - mean_C(g a) - xhat * mean_C(g a xhat)).
    ga = gf * (1.0 + _broadcast_over_tokens(scale, x))
    dx = rstd * (ga - jnp.mean(ga, axis=-1, keepdims=True)
                 - xhat * jnp.mean(ga * xhat, axis=-1, keepdims=True))
    return dx.astype(x.dtype), d_shift.astype(shift.dtype), d_scale.astype(scale.dtype)


_adaptive_layer_norm.defvjp(_adaptive_layer_norm_fwd, _adaptive_layer_norm_bwd)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh_parts(xf):
    """tanh(u) and du/dx for u = sqrt(2/pi) (x + 0.044715 x^3), float32."""
    tanh_u = jnp.tanh(_SQRT_2_OVER_PI * (xf + 0.044715 * xf * xf * xf))
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * xf * xf)
    return tanh_u, du_dx


def gelu_tanh(x, autodiff: bool = False):
    """GELU with the tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) —
    `jax.nn.gelu(x, approximate=True)` — computed in float32, returned in x.dtype. The
    backward pass saves x only; `autodiff=True` differentiates the same forward with JAX's
    autodiff instead."""
    return _gelu_tanh_value(x) if autodiff else _gelu_tanh(x)


def _gelu_tanh_value(x):
    xf = x.astype(jnp.float32)
    return (0.5 * xf * (1.0 + _gelu_tanh_parts(xf)[0])).astype(x.dtype)


_gelu_tanh = jax.custom_vjp(_gelu_tanh_value)


def _gelu_tanh_fwd(x):
    return _gelu_tanh_value(x), x


def _gelu_tanh_bwd(x, g):
    return ((g.astype(jnp.float32) * _gelu_tanh_slope(x.astype(jnp.float32))).astype(x.dtype),)


_gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def _gelu_tanh_slope(u):
    """d/du of the tanh-GELU at u (float32): 0.5 (1 + tanh) + 0.5 u (1 - tanh^2) du'/du."""
    tanh_u, du_dx = _gelu_tanh_parts(u)
    return 0.5 * (1.0 + tanh_u) + 0.5 * u * (1.0 - tanh_u * tanh_u) * du_dx


def bias_gelu_tanh(h, bias, autodiff: bool = False, impl: str | None = None):
    """gelu_tanh(h + bias) for h [..., N] (a matrix product's output) and bias [N]: a Dense
    layer's bias add and the GELU after it as one op; returns h.dtype.

    The sum is rounded to h.dtype as a Dense layer's add is, so the value is exactly
    `gelu_tanh(h + bias.astype(h.dtype))`. The backward pass keeps h and the bias (not h +
    bias, which a separate add and GELU would write for the GELU's backward), and computes
    the gradient of h and the bias's (its sum over the leading axes, in float32) in one pass;
    `autodiff=True` differentiates the same forward with JAX's autodiff instead (XLA only),
    `impl` chooses XLA or the Pallas backward kernel of `pallas_ops`.
    """
    if autodiff:
        return _gelu_tanh_value(h + bias.astype(h.dtype))
    chosen = resolve_ops_impl(impl)
    if chosen != "xla":
        from diffusion_jax.models import pallas_ops
        return pallas_ops.bias_activation(h, bias, _gelu_tanh_value, _gelu_tanh_slope,
                                          interpret=chosen == "pallas_interpret")
    return _bias_gelu_tanh(h, bias)


@jax.custom_vjp
def _bias_gelu_tanh(h, bias):
    return _gelu_tanh_value(h + bias.astype(h.dtype))


def _bias_gelu_tanh_fwd(h, bias):
    return _bias_gelu_tanh(h, bias), (h, bias)


def _bias_gelu_tanh_bwd(residuals, g):
    h, bias = residuals
    u = (h + bias.astype(h.dtype)).astype(jnp.float32)
    dh = (g.astype(jnp.float32) * _gelu_tanh_slope(u)).astype(h.dtype)
    d_bias = jnp.sum(dh.astype(jnp.float32), axis=tuple(range(h.ndim - 1)))
    return dh, d_bias.astype(bias.dtype)


_bias_gelu_tanh.defvjp(_bias_gelu_tanh_fwd, _bias_gelu_tanh_bwd)


def _per_example(v, x):
    """Affine parameter [C] or [B, C] -> float32 [B, 1, ..., 1, C] against x [B, ..., C]."""
    v = jnp.broadcast_to(v.astype(jnp.float32), (x.shape[0], x.shape[-1]))
    return _broadcast_over_tokens(v, x)


def _group_stats(x, num_groups, epsilon):
    """Per-example, per-group mean and 1/std of x [B, ..., C] in float32, each [B, C] (repeated
    over the group's channels).

    Moments are taken per channel over space first ([B, ..., C] -> [B, C], a reduction whose
    kept axis is the contiguous one) and then pooled within each group: the direct reduction
    over (space, C / G) without XLA's slow reduction with a kept axis between reduced ones.
    Variance is E[x^2] - E[x]^2, as flax's fast variance.
    """
    xf = x.astype(jnp.float32)
    space = tuple(range(1, x.ndim - 1))
    mean_c, sq_mean_c = jnp.mean(xf, axis=space), jnp.mean(jnp.square(xf), axis=space)
    mean, sq_mean = _group_mean(mean_c, num_groups), _group_mean(sq_mean_c, num_groups)
    return mean, jax.lax.rsqrt(jnp.maximum(sq_mean - jnp.square(mean), 0.0) + epsilon)


def _group_mean(v, num_groups):
    """[B, C] -> the mean over each group's channels, repeated back to [B, C]."""
    B, C = v.shape
    return jnp.repeat(v.reshape(B, num_groups, C // num_groups).mean(-1), C // num_groups, axis=-1)


def _group_standardize(x, mean, rstd):
    """(x - mean) / std in float32 for x [B, ..., C] and group statistics [B, C]."""
    return (x.astype(jnp.float32) - _broadcast_over_tokens(mean, x)) * _broadcast_over_tokens(rstd, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, num_groups, epsilon, silu):
    return _group_norm_fwd(x, scale, bias, num_groups, epsilon, silu)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, silu):
    mean, rstd = _group_stats(x, num_groups, epsilon)
    xhat = _group_standardize(x, mean, rstd)
    z = xhat * _per_example(scale, x) + _per_example(bias, x)
    y = z * jax.nn.sigmoid(z) if silu else z
    return y.astype(x.dtype), (x, scale, bias, mean, rstd)


def _group_norm_bwd(num_groups, epsilon, silu, residuals, g):
    x, scale, bias, mean, rstd = residuals
    xhat = _group_standardize(x, mean, rstd)
    a_bc = jnp.broadcast_to(scale.astype(jnp.float32), (x.shape[0], x.shape[-1]))   # [B, C]
    a = _broadcast_over_tokens(a_bc, x)
    dz = g.astype(jnp.float32)
    if silu:  # d/dz z sigmoid(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
        z = xhat * a + _per_example(bias, x)
        sig = jax.nn.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    space = tuple(range(1, x.ndim - 1))
    d_a, d_b = jnp.sum(dz * xhat, axis=space), jnp.sum(dz, axis=space)          # [B, C]
    # With dxhat = dz a: dx = rstd (dxhat - mean_g(dxhat) - xhat mean_g(dxhat xhat)), the means
    # over each group's channels and space, which are the per-channel sums a d_b and a d_a pooled.
    n = np.prod(x.shape[1:-1])
    mean_dxhat = _group_mean(a_bc * d_b, num_groups) / n
    mean_dxhat_xhat = _group_mean(a_bc * d_a, num_groups) / n
    dx = _broadcast_over_tokens(rstd, x) * (dz * a - _broadcast_over_tokens(mean_dxhat, x)
                                            - xhat * _broadcast_over_tokens(mean_dxhat_xhat, x))
    reduce = lambda d, p: (d if p.ndim == 2 else d.sum(0)).astype(p.dtype)
    return dx.astype(x.dtype), reduce(d_a, scale), reduce(d_b, bias)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(x, num_groups: int, scale=None, bias=None, epsilon: float = 1e-6, silu: bool = False,
               autodiff: bool = False, impl: str | None = None):
    """GroupNorm of x [B, ..., C] in float32, optionally followed by SiLU; returns x.dtype.

    Each example's C channels are split into `num_groups` groups and normalised over the
    group's channels and all spatial positions, then scaled and shifted per channel: scale,
    bias [C] (learned) or [B, C] (per example, as ADM's scale-shift norm folds in), None for
    1 and 0. The backward pass saves x and the per-group statistics only (autodiff of the
    composite keeps about 14 bytes an element in bfloat16; `autodiff=True` uses it, XLA only).
    `impl` chooses XLA or the Pallas kernels of `pallas_ops` (`resolve_ops_impl`).
    """
    B, C = x.shape[0], x.shape[-1]
    if C % num_groups:
        raise UsageError(f"channels {C} are not divisible by the GroupNorm groups {num_groups}: "
                         "change the channel width or num_groups")
    scale = jnp.ones((C,), jnp.float32) if scale is None else scale
    bias = jnp.zeros((C,), jnp.float32) if bias is None else bias
    if autodiff:
        return _group_norm_fwd(x, scale, bias, num_groups, epsilon, silu)[0]
    chosen = resolve_ops_impl(impl)
    if chosen != "xla":
        from diffusion_jax.models import pallas_ops
        per_example = lambda v: jnp.broadcast_to(v.astype(jnp.float32), (B, C))
        return pallas_ops.group_norm(x, num_groups, per_example(scale), per_example(bias), epsilon, silu,
                                       interpret=chosen == "pallas_interpret")
    return _group_norm(x, scale, bias, num_groups, epsilon, silu)
