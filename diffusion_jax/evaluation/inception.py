"""The Inception-v3 network of FID (the TF 2015-12-05 graph, as pytorch-fid ports it), in Flax.

Features are the 2048-d pool3 activations. Images are NHWC in [-1, 1]; `inception_features`
first rounds them to 8 bits (the FID protocol compares uint8 images), repeats grey channels,
resizes to 299x299 bilinearly (half-pixel centres, no antialiasing, as torch's
interpolate(align_corners=False)), and runs the network.

Weights are never downloaded. Convert pytorch-fid's public file once, where torch is installed:

    pip install torch pytorch-fid
    python -m diffusion_jax.evaluation.inception convert \
        --torch_weights ~/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth \
        --out ~/.cache/diffusion_jax/inception_fid.npz

The .npz holds one array per leaf, keyed "params/Mixed_5b/branch1x1/conv/kernel" (conv kernels
[kh, kw, in, out]) and "batch_stats/.../bn/mean"; `load_inception(path)` checks every key and
shape against the network and names what is missing or unexpected. The default path is
$DIFFUSION_JAX_INCEPTION or ~/.cache/diffusion_jax/inception_fid.npz.
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from diffusion_jax.errors import UsageError

DEFAULT_WEIGHTS = pathlib.Path(os.environ.get(
    "DIFFUSION_JAX_INCEPTION", pathlib.Path.home() / ".cache" / "diffusion_jax" / "inception_fid.npz"))


def _pad(p):
    p = (p, p) if isinstance(p, int) else p
    return ((p[0], p[0]), (p[1], p[1]))


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

    features: int
    kernel: Sequence[int] = (1, 1)
    strides: Sequence[int] = (1, 1)
    padding: int | Sequence[int] = 0

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, tuple(self.kernel), tuple(self.strides), padding=_pad(self.padding),
                    use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool(x):
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, padding="VALID"):
    return nn.max_pool(x, (3, 3), (stride, stride), padding=padding)


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(64, (5, 5), padding=2, name="branch5x5_2")(BasicConv(48, name="branch5x5_1")(x))
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = BasicConv(64, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], -1)


class InceptionC(nn.Module):
    c7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.c7
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c7, name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(320, (3, 3), (2, 2), name="branch3x3_2")(BasicConv(192, name="branch3x3_1")(x))
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], -1)


class InceptionE(nn.Module):
    """FID's Mixed_7b (average pool) and Mixed_7c (max pool) variants."""

    max_pool: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = BasicConv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = BasicConv(448, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        pooled = _max_pool(x, 1, ((1, 1), (1, 1))) if self.max_pool else _avg_pool(x)
        bp = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3FID(nn.Module):
    """x [B, 299, 299, 3] in [-1, 1] -> pool3 features [B, 2048]."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool(x)
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(False, name="Mixed_7b")(x)
        x = InceptionE(True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def preprocess(images) -> jnp.ndarray:
    """[-1, 1] NHWC -> 8-bit-rounded, 3-channel, 299x299 [-1, 1] float32."""
    x = jnp.round((jnp.clip(images, -1, 1) + 1) * 127.5) / 127.5 - 1
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return jax.image.resize(x, (x.shape[0], 299, 299, 3), "bilinear", antialias=False)


@functools.lru_cache(maxsize=1)
def variable_shapes():
    """The network's variables as ShapeDtypeStructs (no allocation; traced once a process, 1 s)."""
    return jax.eval_shape(InceptionV3FID().init, jax.random.key(0), jnp.zeros((1, 299, 299, 3)))


def save_weights(variables, path) -> str:
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(variables)).items()}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **flat)
    return str(path)


def load_inception(path=None):
    """The FID Inception variables from a converted .npz (see the module docstring)."""
    path = pathlib.Path(path or DEFAULT_WEIGHTS).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Convert pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth with `python -m diffusion_jax.evaluation.inception "
            f"convert --torch_weights FILE --out {path}` (or set DIFFUSION_JAX_INCEPTION); "
            "nothing is downloaded.")
    expected = {"/".join(k): v for k, v in flatten_dict(variable_shapes()).items()}
    with np.load(path) as f:
        found = {k: f[k] for k in f.files}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise UsageError(f"{path} does not match the FID Inception network: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
                         f"{unexpected[:5]} ({len(unexpected)})")
    for k, v in expected.items():
        if found[k].shape != v.shape:
            raise UsageError(f"{path}: {k} has shape {found[k].shape}, the network needs {v.shape}")
    return unflatten_dict({tuple(k.split("/")): jnp.asarray(v, jnp.float32) for k, v in found.items()})


_network = jax.jit(lambda variables, x: InceptionV3FID().apply(variables, x))
_preprocess = jax.jit(preprocess)
MIN_BATCH = 4  # a few images (a test, a preview) run as 4, not as a batch of 16 (5.7 GFLOPs an image)


def inception_features(variables, images, batch_size: int = 200) -> np.ndarray:
    """pool3 features [N, 2048] (float64) of images [N, H, W, C] in [-1, 1], batched.

    The network is compiled for 299x299 batches of a few sizes only (a power of two from MIN_BATCH
    up to `batch_size`; a short batch is padded), whatever the images' size and count.
    """
    out = []
    for start in range(0, len(images), batch_size):
        chunk = _preprocess(jnp.asarray(images[start:start + batch_size]))
        n = chunk.shape[0]
        padded = min(batch_size, max(MIN_BATCH, 1 << (n - 1).bit_length()))
        if padded > n:
            chunk = jnp.concatenate([chunk, jnp.zeros((padded - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(_network(variables, chunk), np.float64)[:n])
    return np.concatenate(out)


def convert_torch_weights(torch_path, out_path) -> str:
    """pytorch-fid's state dict -> the .npz this module loads (needs torch)."""
    import torch

    state = torch.load(torch_path, map_location="cpu")
    variables = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[0] == "fc" or parts[-1] == "num_batches_tracked":
            continue
        array = tensor.numpy()
        prefix = tuple(parts[:-1])
        if parts[-1] == "weight" and array.ndim == 4:
            variables[("params",) + prefix + ("kernel",)] = array.transpose(2, 3, 1, 0)
        elif parts[-1] == "weight":
            variables[("params",) + prefix + ("scale",)] = array
        elif parts[-1] == "bias":
            variables[("params",) + prefix + ("bias",)] = array
        elif parts[-1] == "running_mean":
            variables[("batch_stats",) + prefix + ("mean",)] = array
        elif parts[-1] == "running_var":
            variables[("batch_stats",) + prefix + ("var",)] = array
    return save_weights(unflatten_dict(variables), out_path)


def main(argv=None):
    p = argparse.ArgumentParser(description="FID Inception weights")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert pytorch-fid's .pth to this library's .npz")
    c.add_argument("--torch_weights", required=True)
    c.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    args = p.parse_args(argv)
    print("wrote", convert_torch_weights(args.torch_weights, args.out))
    load_inception(args.out)


if __name__ == "__main__":
    main()
