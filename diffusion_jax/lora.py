"""LoRA: low-rank adapters on a model's Dense layers and convolutions, as a transformation of its
parameters, and the files people share them in.

An adapted layer's kernel is W + s (down @ up): `down` [..., in, r] (a Dense layer's [in, r], a
convolution's [kh, kw, in, r]), `up` [r, out], s = (alpha / r) x the adapter's weight (alpha /
sqrt(r) with rsLoRA). `with_adapters(params, layers)` computes the adapted kernels inside the
program that calls it, so the base parameters are never copied, and a weight is a traced number
(changing it compiles nothing). Several adapters are the concatenation of their layers.

    layers = read_lora("pytorch_lora_weights.safetensors", {"unet": unet_entries}, weight=0.7)["unet"]
    out = model.apply({"params": with_adapters(params, layers)}, x, t, y)

Files: diffusers / PEFT (`unet.` / `text_encoder.` / `text_encoder_2.` prefixes, `lora_A` / `lora_B`,
the older `to_q_lora.down` and `lora.down` / `lora_linear_layer.down` names, the adapter metadata
in the safetensors header: r, lora_alpha, rank_pattern, alpha_pattern, use_rslora; alpha = r
without it) and kohya's (`lora_unet_`, `lora_te_` / `lora_te1_` / `lora_te2_` with the module's
dots as underscores: diffusers' names or, as kohya writes SDXL's, Stability's sgm ones (`sgm_names`);
`.lora_down` / `.lora_up` / `.alpha`). Names are matched against the
model's table of diffusers module names (`interop.tensors.Entry`): a key that matches no layer is
an error naming it. `write_lora` writes the PEFT format with its metadata.

Training: `adapter_spec(entries, targets)` chooses the layers, `init_adapters` makes the trainable
tree {module name: {"down", "up"}} as PEFT initialises it, `adapter_layers` turns it into LoraLayers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import draws
from diffusion_jax.errors import UsageError

METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
_ADAPTABLE = ("conv", "dense", "linear")
_QKV = ("to_q", "to_k", "to_v")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: `down` [..., in, r], `up` [r, out] and `scale` () (alpha / r x weight);
    `path` the kernel's place in the params tree, `part` which of q, k, v it adapts in a fused
    [C, 3C] kernel (None: all of it), `name` the diffusers module it is in files."""

    down: Any
    up: Any
    scale: Any
    path: tuple = dataclasses.field(metadata=dict(static=True))
    part: Optional[int] = dataclasses.field(default=None, metadata=dict(static=True))
    name: str = dataclasses.field(default="", metadata=dict(static=True))

    @property
    def rank(self) -> int:
        return int(self.up.shape[0])


def delta(layer: LoraLayer):
    """s (down @ up): the change to the kernel (or to its part), [..., in, out] float32."""
    return layer.scale * jnp.matmul(jnp.asarray(layer.down, jnp.float32), jnp.asarray(layer.up, jnp.float32))


def with_adapters(params, layers) -> Any:
    """`params` with every layer's delta added to its kernel (pure: jit it, or call it inside the
    program that applies the model). Only the dicts along the adapted paths are new."""
    if not layers:
        return params
    params = dict(params)
    for layer in layers:
        node, parents = params, []
        for key in layer.path:
            parents.append(node)
            node = node[key]
            if isinstance(node, dict):
                node = dict(node)
                parents[-1][key] = node
        kernel = node
        change = delta(layer).astype(kernel.dtype)
        if layer.part is not None:
            width = kernel.shape[-1] // 3
            change = jnp.zeros_like(kernel).at[..., layer.part * width:(layer.part + 1) * width].set(change)
        parents[-1][layer.path[-1]] = kernel + change
    return params


def merge(params, layers):
    """The base parameters with the adapters folded in (a new tree: serving without LoRA's cost).
    One small program computes the adapted kernels; every other leaf is `params`' own array, not a
    copy. A sampler given merged parameters is the same program whatever the LoRA files."""
    if not layers:
        return params
    adapted = {}  # the adapted kernels alone, at their paths
    for layer in layers:
        node, base = adapted, params
        for key in layer.path[:-1]:
            node, base = node.setdefault(key, {}), base[key]
        node[layer.path[-1]] = base[layer.path[-1]]
    return _graft(params, _with_adapters(adapted, tuple(layers)))


_with_adapters = jax.jit(with_adapters)


def _graft(tree, branches):
    """`tree` with the leaves of the nested dict `branches` put at their paths (new dicts along them)."""
    out = dict(tree)
    for key, branch in branches.items():
        out[key] = _graft(tree[key], branch) if isinstance(branch, dict) else branch
    return out


def unmerge(params, layers):
    """The inverse of `merge` (up to rounding)."""
    return merge(params, tuple(dataclasses.replace(layer, scale=-layer.scale) for layer in layers))


def layer_table(entries) -> dict:
    """{diffusers module name: (kernel path, kind, part)} of the layers a LoRA can adapt, from a
    model's `interop.tensors` table (a fused q/k/v entry gives its three modules)."""
    table = {}
    for entry in entries:
        if entry.kind == "qkv":
            for part, name in enumerate(_QKV):
                table[f"{entry.name}.{name}"] = (entry.path + ("kernel",), "dense", part)
        elif entry.kind in _ADAPTABLE:
            table[entry.name] = (entry.path + ("kernel",), entry.kind, None)
    return table


# ---------------------------------------------------------------------------------------- files
_PEFT = re.compile(r"^(?P<module>.+?)\.(?:lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|"
                   r"lora_linear_layer\.up)\.weight$")
_PROCESSOR = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<which>down|up)\.weight$")


def _is_down(key: str) -> bool:
    return any(part in key for part in (".lora_A.", ".lora.down.", ".lora_linear_layer.down.", "_lora.down.",
                                        ".lora_down."))


def _module_of(key: str) -> tuple[str, str]:
    """(component, module name) of a LoRA tensor's key in any of the formats read."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            return component, key[len(prefix):].split(".")[0]  # underscores: matched by `_kohya_name`
    component, _, rest = key.partition(".")
    if rest.endswith(".alpha"):  # diffusers' older files: the network alpha beside the pair
        return component, rest[:-len(".alpha")]
    match = _PROCESSOR.match(rest)
    if match:
        proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
        return component, f"{match['attn']}.{proj}"
    match = _PEFT.match(rest)
    if match:
        return component, match["module"]
    raise UsageError(f"LoRA tensor {key!r} is in no format this reads (PEFT's lora_A / lora_B, diffusers' older "
                     "to_q_lora.down, kohya's lora_unet_ / lora_te_ with lora_down / lora_up)")


def _kohya_name(module: str) -> str:
    return module.replace(".", "_")


_RESNET_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_OUTSIDE_SGM = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def sgm_names(modules) -> dict:
    """{name in Stability's sgm U-Net (kohya's SDXL LoRAs name layers so): diffusers module name} of a
    UNet2DConditionModel's modules: input_blocks.k (k = 1 + level (n + 1) + i for resnet / attention
    i of a level, the level's downsampler at k = (level + 1)(n + 1), `.op`), middle_block.0-2,
    output_blocks.k (k = block (n + 1) + i, the upsampler after the block's last), with sgm's names
    inside a resnet; n is the resnets of a down block."""
    modules = list(modules)
    down = [int(m.split(".")[3]) for m in modules if m.startswith("down_blocks.0.resnets.")]
    n = max(down) + 1 if down else 0
    attended = {int(m.split(".")[1]) for m in modules if m.startswith("up_blocks.") and ".attentions." in m}
    out = {}
    for module in modules:
        parts = module.split(".")
        if module in _OUTSIDE_SGM:
            out[_OUTSIDE_SGM[module]] = module
            continue
        where, rest = parts[0], parts[1:]
        if where in ("down_blocks", "up_blocks") and len(rest) >= 3:
            block, kind, i = int(rest[0]), rest[1], int(rest[2])
            inner = ".".join(rest[3:])
            if where == "down_blocks":
                index = (block + 1) * (n + 1) if kind == "downsamplers" else 1 + block * (n + 1) + i
            else:
                index = block * (n + 1) + (n if kind == "upsamplers" else i)
            sub = {"resnets": "0", "attentions": "1", "downsamplers": "0",
                   "upsamplers": "2" if block in attended else "1"}[kind]
            name = f"{'input' if where == 'down_blocks' else 'output'}_blocks.{index}.{sub}"
        elif where == "mid_block" and len(rest) >= 2:
            kind, i, inner = rest[0], int(rest[1]), ".".join(rest[2:])
            name = f"middle_block.{1 if kind == 'attentions' else 2 * i}"
        else:
            continue
        if kind in ("resnets",):
            inner = _RESNET_SGM.get(inner, inner)
        elif kind == "downsamplers":
            inner = "op"
        out[f"{name}.{inner}"] = module
    return out


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the module's name at its end."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def parse_spec(spec: str) -> tuple[str, float]:
    """(path, weight) of a command line's LoRA, "FILE" (weight 1) or "FILE:WEIGHT"."""
    path, colon, weight = str(spec).rpartition(":")
    if not colon or not path:
        return str(spec), 1.0
    try:
        number = float(weight)
    except ValueError:
        return str(spec), 1.0  # a colon in the file's name
    if not math.isfinite(number):
        raise UsageError(f"--lora {spec}: the weight {weight!r} must be a finite number (FILE:WEIGHT, e.g. FILE:0.7)")
    return path, number


def read_metadata(path) -> dict:
    """The adapter metadata diffusers writes into a LoRA file's safetensors header ({} without)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        header = f.metadata() or {}
    try:
        return json.loads(header.get(METADATA_KEY) or "{}")
    except json.JSONDecodeError:
        raise UsageError(f"{path}: its {METADATA_KEY} header entry is not JSON: the file is damaged") from None


def read_lora(path, models: dict, weight: float = 1.0, skip=()) -> dict:
    """{component: tuple of LoraLayer} of a LoRA file, for the models named in `models`
    ({component: its `interop.tensors` table}, e.g. {"unet": ..., "text_encoder": ...}); `weight`
    multiplies every layer's scale. Every tensor must adapt a layer of one of the models, or a
    UsageError names it; the tensors of the components in `skip` (read elsewhere) are left out."""
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file {path}: give a .safetensors file (diffusers' save_lora_weights, "
                                "PEFT or kohya)")
    if not isinstance(weight, (int, float, np.number)) or isinstance(weight, bool) or not math.isfinite(weight):
        raise UsageError(f"LoRA weight {weight!r} for {path.name} must be a finite number")
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise UsageError(f"{path} is not a readable safetensors file ({error})") from None
    metadata = read_metadata(path)
    pairs: dict = {}
    alphas: dict = {}
    for key, value in tensors.items():
        component, module = _module_of(key)
        if component in skip:
            continue
        if key.endswith(".alpha"):
            alphas[(component, module)] = float(np.asarray(value).reshape(-1)[0])
            continue
        pairs.setdefault((component, module), {})["down" if _is_down(key) else "up"] = (key, np.asarray(value))
    tables = {c: layer_table(entries) for c, entries in models.items()}
    kohya = {c: {**{_kohya_name(sgm): name for sgm, name in sgm_names(table).items()},
                 **{_kohya_name(name): name for name in table}} for c, table in tables.items()}
    layers: dict = {c: [] for c in models}
    for (component, module), pair in pairs.items():
        key = next(iter(pair.values()))[0]
        if component not in tables:
            raise UsageError(f"{path.name}: tensor {key!r} adapts the {component!r}, which this model does not have "
                             f"(it has {sorted(set(tables) | set(skip))}): the LoRA is for another model")
        if key.startswith(tuple(KOHYA_PREFIXES)):
            module_name = kohya[component].get(module) or kohya[component].get(module.removeprefix("text_model_"))
        else:
            module_name = module.removeprefix("text_model.") if component.startswith("text_encoder") else module
            module_name = module_name if module_name in tables[component] else None
        if module_name is None:
            raise UsageError(f"{path.name}: tensor {key!r} matches no layer of the {component} a LoRA can adapt "
                             "(its Dense layers and convolutions): the LoRA is for another model")
        if set(pair) != {"down", "up"}:
            raise UsageError(f"{path.name}: {module} has a LoRA {'up' if 'up' in pair else 'down'} tensor without its "
                             f"{'down' if 'up' in pair else 'up'} one: the file is incomplete")
        layer_path, kind, part = tables[component][module_name]
        down, up = _flax_factors(pair["down"][1], pair["up"][1], kind, path.name, module)
        rank = up.shape[0]
        meta = {k[len(component) + 1:]: v for k, v in metadata.items() if k.startswith(component + ".")}
        alpha = alphas.get((component, module))
        if meta:
            declared = int(_pattern_value(meta.get("rank_pattern"), module_name, meta.get("r", rank)))
            if declared != rank:
                raise UsageError(f"{path.name}: {module} has rank {rank} but the file's metadata says {declared}: the "
                                 "file is inconsistent")
            alpha = float(_pattern_value(meta.get("alpha_pattern"), module_name, meta.get("lora_alpha", rank)))
            if meta.get("use_dora"):
                raise UsageError(f"{path.name} is a DoRA adapter (use_dora): only LoRA is supported")
        alpha = rank if alpha is None else alpha
        scale = alpha / (math.sqrt(rank) if meta.get("use_rslora") else rank)
        layers[component].append(LoraLayer(jnp.asarray(down), jnp.asarray(up), jnp.float32(scale * weight),
                                           layer_path, part, module_name))
    order = {c: {name: i for i, name in enumerate(table)} for c, table in tables.items()}
    return {c: tuple(sorted(v, key=lambda layer: order[c][layer.name])) for c, v in layers.items()}


def _flax_factors(down: np.ndarray, up: np.ndarray, kind: str, file: str, module: str):
    """(down [..., in, r], up [r, out]) of PyTorch's lora_A [r, in(, kh, kw)] and lora_B [out, r(, 1, 1)]."""
    if down.ndim != up.ndim or down.ndim not in (2, 4) or up.shape[1] != down.shape[0] or \
            (up.ndim == 4 and up.shape[2:] != (1, 1)):
        raise UsageError(f"{file}: {module}'s LoRA tensors have shapes {down.shape} (down) and {up.shape} (up), which "
                         "are not a low-rank pair")
    if (down.ndim == 4) != (kind == "conv"):
        raise UsageError(f"{file}: {module} is a {'convolution' if kind == 'conv' else 'Dense layer'} here but its LoRA "
                         f"tensors have shape {down.shape}: the LoRA is for another model")
    up = up.reshape(up.shape[:2]).T
    down = down.transpose(2, 3, 1, 0) if down.ndim == 4 else down.T
    return down.astype(np.float32), up.astype(np.float32)


def check_fits(layers, params, what: str) -> None:
    """Each layer's kernel exists and has the shape down @ up gives, or a UsageError names it."""
    for layer in layers:
        want = _kernel_shape(params, layer.path, layer.part)
        got = tuple(layer.down.shape[:-1]) + (layer.up.shape[-1],)
        if got != want:
            raise UsageError(f"{what}: the LoRA of {layer.name} changes a kernel of shape {got}, the model's is {want}: "
                             "the LoRA is for another model")


def write_lora(path, layers: dict) -> pathlib.Path:
    """Write {component: LoraLayers} (one adapter, its weight 1) as a PEFT LoRA file with diffusers'
    metadata (r, lora_alpha, target_modules, rank_pattern, alpha_pattern), which diffusers'
    `load_lora_weights` reads."""
    from safetensors.numpy import save_file

    tensors, metadata = {}, {}
    for component, component_layers in layers.items():
        if not component_layers:
            continue
        prefix = f"{component}.text_model." if component.startswith("text_encoder") else f"{component}."
        ranks = {layer.name: layer.rank for layer in component_layers}
        alphas = {layer.name: float(layer.scale) * layer.rank for layer in component_layers}
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        for layer in component_layers:
            down, up = np.asarray(layer.down, np.float32), np.asarray(layer.up, np.float32)
            conv = down.ndim == 4
            tensors[f"{prefix}{layer.name}.lora_A.weight"] = np.ascontiguousarray(
                down.transpose(3, 2, 0, 1) if conv else down.T)
            tensors[f"{prefix}{layer.name}.lora_B.weight"] = np.ascontiguousarray(
                up.T[:, :, None, None] if conv else up.T)
        metadata.update({f"{component}.r": r, f"{component}.lora_alpha": alpha,
                         f"{component}.target_modules": sorted(ranks),
                         f"{component}.rank_pattern": {re.escape(k): v for k, v in ranks.items() if v != r},
                         f"{component}.alpha_pattern": {re.escape(k): v for k, v in alphas.items() if v != alpha}})
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True),
                                            "format": "pt"})
    return path


# ---------------------------------------------------------------------------------------- training
def adapter_spec(entries, targets) -> tuple:
    """((module name, kernel path, part), ...) of the layers whose diffusers module name is one of
    `targets` or ends with "." + one of them (PEFT's rule: "to_q" adapts every attention's query),
    in the table's order; a target that matches nothing is an error naming the modules there are."""
    table = layer_table(entries)
    chosen = tuple((name, path, part) for name, (path, _, part) in table.items()
                   if any(name == t or name.endswith("." + t) for t in targets))
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _, _ in chosen)]
    if unmatched or not chosen:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in table})
        raise UsageError(f"lora.targets {list(unmatched or targets)} match no layer of this model: its Dense layers and "
                         f"convolutions end in {suffixes[:24]}")
    return chosen


def _kernel_shape(param_shapes, path, part) -> tuple:
    """The shape [..., in, out] a layer's delta has: its kernel's, or a third of a fused q/k/v one's."""
    node = param_shapes
    for key in path:
        node = node[key]
    shape = tuple(node.shape)
    return shape[:-1] + (shape[-1] // 3 if part is not None else shape[-1],)


def init_adapters(key, spec, param_shapes, rank: int) -> dict:
    """{module name: {"down": [..., in, r], "up": [r, out]}} as PEFT initialises them: down uniform in
    +-1 / sqrt(fan_in) (kaiming-uniform with a = sqrt(5)), up zero, so the adapted model starts as
    the base model."""
    shapes = [_kernel_shape(param_shapes, path, part) for _, path, part in spec]
    by_shape = {}  # the adapters of one kernel shape are drawn in one vmapped draw (bitwise each one's own)
    for i, shape in enumerate(shapes):
        by_shape.setdefault(shape[:-1], []).append(i)
    downs = {}
    for down_shape, indices in by_shape.items():
        bound = 1.0 / math.sqrt(int(np.prod(down_shape)))
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))
        drawn = jax.vmap(lambda k: draws.uniform(k, down_shape + (rank,), jnp.float32, -bound, bound))(keys)
        downs.update({i: drawn[j] for j, i in enumerate(indices)})
    return {name: {"down": downs[i], "up": jnp.zeros((rank, shape[-1]), jnp.float32)}
            for i, ((name, _, _), shape) in enumerate(zip(spec, shapes))}


def adapter_layers(adapters: dict, spec, scale: float) -> tuple:
    """The LoraLayers of trainable `adapters` (their tree from `init_adapters`), each at `scale`
    (alpha / r)."""
    return tuple(LoraLayer(adapters[name]["down"], adapters[name]["up"], jnp.float32(scale), path, part, name)
                 for name, path, part in spec)
