"""One table per architecture maps Flax parameters to diffusers (PyTorch) tensors; these functions
read it both ways, so import and export cannot disagree.

An entry `Entry(path, kind, name)` ties the Flax module at `path` (a tuple of names in the
params tree) to the diffusers module `name` (a dotted state-dict prefix):
    "conv"   nn.Conv kernel [kh, kw, in, out] + bias  <->  name.weight [out, in, kh, kw] + name.bias
    "dense"  nn.Dense kernel [in, out] + bias         <->  name.weight [out, in] + name.bias
    "linear" nn.Dense kernel [in, out], no bias       <->  name.weight [out, in]
    "norm"   GroupNorm32 scale + bias                 <->  name.weight + name.bias
    "embed"  nn.Embed embedding [n, d]                <->  name.weight [n, d]
    "qkv"    fused q/k/v nn.Dense kernel [C, 3C]      <->  name.to_q / to_k / to_v (.weight, .bias)
`copies` lists diffusers tensors that duplicate another one (DiT stores its timestep and label
embedders once per block): on import each must equal its original, on export it is written.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from diffusion_jax.errors import UsageError


class Entry(NamedTuple):
    path: tuple
    kind: str
    name: str


def _to_torch_axes(kind: str, leaf: str):
    """The transpose taking a Flax parameter to diffusers' layout (None: the same layout)."""
    if leaf != "kernel":
        return None
    return (3, 2, 0, 1) if kind == "conv" else (1, 0)


def _torch_layout(kind: str, leaf: str, array: np.ndarray) -> np.ndarray:
    axes = _to_torch_axes(kind, leaf)
    return array if axes is None else array.transpose(axes)


def _flax_layout(kind: str, leaf: str, array: np.ndarray) -> np.ndarray:
    axes = _to_torch_axes(kind, leaf)
    return array if axes is None else array.transpose(np.argsort(axes))


_LEAVES = {"conv": (("kernel", "weight"), ("bias", "bias")),
           "dense": (("kernel", "weight"), ("bias", "bias")),
           "linear": (("kernel", "weight"),),
           "norm": (("scale", "weight"), ("bias", "bias")),
           "embed": (("embedding", "weight"),)}
_QKV = ("to_q", "to_k", "to_v")


def _pairs(entry: Entry):
    """(flax leaf, [diffusers tensor names]) of one entry."""
    if entry.kind == "qkv":
        return [("kernel", [f"{entry.name}.{p}.weight" for p in _QKV]),
                ("bias", [f"{entry.name}.{p}.bias" for p in _QKV])]
    return [(leaf, [f"{entry.name}.{suffix}"]) for leaf, suffix in _LEAVES[entry.kind]]


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _flat_paths(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat_paths(value, prefix + (key,))
    else:
        yield prefix


def params_from_tensors(entries, tensors: dict, expected, what: str, copies=()) -> dict:
    """The Flax params tree (numpy float32) of `tensors` {name: array} under `entries`.

    `expected` is the module's params tree of shapes (`param_shapes`). Every tensor must be
    consumed and every parameter filled, with the expected shape; `copies` (name, original)
    pairs must hold equal arrays. Errors name the tensors and shapes.
    """
    remaining = dict(tensors)
    params: dict = {}
    problems = []
    for entry in entries:
        for leaf, names in _pairs(entry):
            missing = [n for n in names if n not in remaining]
            if missing:
                problems.append(f"missing tensor {missing[0]}")
                continue
            arrays = [np.asarray(remaining.pop(n), np.float32) for n in names]
            want = tuple(_get(expected, entry.path + (leaf,)).shape)
            if entry.kind == "qkv":
                value = np.concatenate([_flax_layout("dense", leaf, a) for a in arrays], axis=-1)
            else:
                value = _flax_layout(entry.kind, leaf, arrays[0])
            if value.shape != want:
                torch_shape = tuple(_torch_layout(entry.kind, leaf, np.empty(want, np.int8)).shape)
                problems.append(f"tensor {names[0]} has shape {tuple(arrays[0].shape)}, the model needs "
                                f"{torch_shape if entry.kind != 'qkv' else 'parts of ' + str(torch_shape)}")
                continue
            _set(params, entry.path + (leaf,), value)
    for name, original in copies:
        if name not in remaining:
            problems.append(f"missing tensor {name}")
            continue
        copy = np.asarray(remaining.pop(name))
        if original in tensors and not np.array_equal(copy, np.asarray(tensors[original])):
            problems.append(f"tensor {name} differs from {original}: this model shares one copy, and the "
                            "checkpoint's copies must be identical")
    unfilled = [p for p in _flat_paths(expected) if not _has(params, p)]
    if remaining:
        problems.append(f"{len(remaining)} tensor(s) left over, not used by the model: "
                        + ", ".join(sorted(remaining)[:8]) + (" ..." if len(remaining) > 8 else ""))
    if unfilled and not problems:
        problems.append("parameters not filled: " + ", ".join("/".join(p) for p in unfilled[:8]))
    if problems:
        raise UsageError(f"the {what} checkpoint does not fit the model it describes:\n  "
                          + "\n  ".join(problems[:12]))
    return params


def _has(tree, path):
    try:
        _get(tree, path)
        return True
    except (KeyError, TypeError):
        return False


def tensors_from_params(entries, params, copies=()) -> dict:
    """The diffusers state dict {name: float32 contiguous array} of a Flax params tree."""
    tensors = {}
    for entry in entries:
        for leaf, names in _pairs(entry):
            value = np.asarray(_get(params, entry.path + (leaf,)), np.float32)
            parts = np.split(value, 3, axis=-1) if entry.kind == "qkv" else [value]
            for name, part in zip(names, parts):
                tensors[name] = np.ascontiguousarray(_torch_layout(entry.kind if entry.kind != "qkv" else "dense",
                                                                   leaf, part))
    for name, original in copies:
        tensors[name] = tensors[original]
    return tensors


# Blocks diffusers' U-Net and VAE share: ResnetBlock2D and the spatial Attention.

def resnet_entries(ours, theirs: str, shortcut: bool, temb: bool = True):
    """A `ResBlock` at path `ours` (a name or a tuple) <-> a diffusers ResnetBlock2D `theirs`."""
    base = ours if isinstance(ours, tuple) else (ours,)
    table = [Entry(base + ("norm1",), "norm", f"{theirs}.norm1"), Entry(base + ("conv1",), "conv", f"{theirs}.conv1"),
             Entry(base + ("norm2",), "norm", f"{theirs}.norm2"), Entry(base + ("conv2",), "conv", f"{theirs}.conv2")]
    if temb:
        table.append(Entry(base + ("temb_proj",), "dense", f"{theirs}.time_emb_proj"))
    if shortcut:
        table.append(Entry(base + ("nin_shortcut",), "conv", f"{theirs}.conv_shortcut"))
    return table


def attention_entries(ours, theirs: str, norm: bool = True):
    """An `AttnBlock` at path `ours` <-> a diffusers spatial Attention `theirs` (group_norm, to_q,
    to_k, to_v, to_out.0)."""
    base = ours if isinstance(ours, tuple) else (ours,)
    table = [Entry(base + ("attn", "qkv"), "qkv", theirs), Entry(base + ("attn", "proj"), "dense", f"{theirs}.to_out.0")]
    return table + ([Entry(base + ("norm",), "norm", f"{theirs}.group_norm")] if norm else [])


def transformer2d_entries(ours, theirs: str, depth: int, linear_projection: bool):
    """A `SpatialTransformer` at path `ours` <-> a diffusers Transformer2DModel `theirs` (norm,
    proj_in, transformer_blocks.j: norm1-3, attn1 / attn2 to_q, to_k, to_v (no bias), to_out.0,
    ff.net.0.proj (GEGLU), ff.net.2; proj_out)."""
    base = ours if isinstance(ours, tuple) else (ours,)
    projection = "dense" if linear_projection else "conv"
    table = [Entry(base + ("norm",), "norm", f"{theirs}.norm"),
             Entry(base + ("proj_in",), projection, f"{theirs}.proj_in"),
             Entry(base + ("proj_out",), projection, f"{theirs}.proj_out")]
    for j in range(depth):
        block, name = base + (f"block{j}",), f"{theirs}.transformer_blocks.{j}"
        table += [Entry(block + (f"norm{k}",), "norm", f"{name}.norm{k}") for k in (1, 2, 3)]
        for attn in ("attn1", "attn2"):
            table += [Entry(block + (attn, p), "linear", f"{name}.{attn}.{p}") for p in ("to_q", "to_k", "to_v")]
            table.append(Entry(block + (attn, "to_out"), "dense", f"{name}.{attn}.to_out.0"))
        table += [Entry(block + ("ff_proj",), "dense", f"{name}.ff.net.0.proj"),
                  Entry(block + ("ff_out",), "dense", f"{name}.ff.net.2")]
    return table
