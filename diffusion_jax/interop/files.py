"""diffusers' on-disk format: a directory (or a subfolder of one) holding `config.json` and
`diffusion_pytorch_model.safetensors` (or the older `.bin`, a pickled PyTorch state dict), and a
pipeline's `scheduler/scheduler_config.json`. Read and written with `safetensors` and NumPy:
torch is needed only for a `.bin` file, huggingface_hub only for a repository id."""
from __future__ import annotations

import json
import logging
import math
import pathlib

import numpy as np

from diffusion_jax.errors import UsageError
from diffusion_jax.files import read_json_object

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
SCHEDULER = "scheduler/scheduler_config.json"


def looks_like_repo_id(source: str) -> bool:
    """'owner/name' that is not an existing path: a Hugging Face Hub repository id."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def resolve(source: str) -> pathlib.Path:
    """The local directory of `source`: a path, or a Hub repository id downloaded (and cached)
    through `huggingface_hub.snapshot_download`."""
    path = pathlib.Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{source} is a file: give the directory that holds {CONFIG}")
        return path
    if not looks_like_repo_id(source):
        raise FileNotFoundError(f"no directory {source}: give a diffusers model directory or a Hugging Face "
                                "repository id such as google/ddpm-cifar10-32 (a run imported from a pipeline reads "
                                "its VAE and text encoder there: put it back, or import again with --copy_parts)")
    try:
        import huggingface_hub
    except ImportError:
        raise UsageError(f"{source} is not a local directory, and downloading it as a Hugging Face repository "
                         "needs huggingface_hub: pip install huggingface_hub (or download it elsewhere and "
                         "give the directory)") from None
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(
            source, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except ImportError as error:  # a module the Hub client needs, not the network
        raise UsageError(f"downloading {source} needs a module that is not installed ({error}): pip install "
                         f"{error.name or 'it'}") from None
    except Exception as error:  # offline, unknown repository, no permission: all the user's to fix
        raise UsageError(f"could not download {source} from the Hugging Face Hub ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'no details'}): check the repository "
                         "id and the network, or download it elsewhere and give the directory") from None


def read_config(directory: pathlib.Path) -> dict:
    path = directory / CONFIG
    if not path.exists():
        parts = sorted(p.parent.name for p in directory.glob(f"*/{CONFIG}"))
        if parts and not (directory / "model_index.json").exists():
            raise FileNotFoundError(f"{directory} holds the parts of a pipeline ({', '.join(parts)}) but no "
                                    "model_index.json, which says how they fit: copy the pipeline's model_index.json "
                                    "back (or save the pipeline again with save_pretrained)")
        raise FileNotFoundError(f"{directory} has no {CONFIG}: is it a diffusers model directory? (a pipeline "
                                "keeps each model in a subfolder: pass subfolder='unet', 'transformer' or 'vae')")
    return read_json_object(path, "give a diffusers model directory whose config.json is intact (download it again)")


def _kind(default) -> str:
    if isinstance(default, bool):
        return "a boolean"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    plural = {"a boolean": "booleans", "an integer": "integers", "a number": "numbers", "a string": "strings"}
    return f"a list of {plural[_kind(default[0])]}" if default else "a list"


# Integer fields diffusers also writes as a list: [H, W], or one value per block.
ONE_OR_LIST = ("sample_size", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block")


def _fits(value, default, field: str) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        if field in ONE_OR_LIST and isinstance(value, list):
            return bool(value) and all(_fits(v, default, "") for v in value)
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, tuple):
        return isinstance(value, list) and all(_fits(v, default[0], "") for v in value) if default else True
    return True


def check_field_types(config: dict, defaults: dict, nullable=()) -> None:
    """Every field of a diffusers `config` that `defaults` (the class's defaults) gives a value has
    a value of that type (an integer for an int, a list of strings for a tuple of strings, ...);
    None only where the default is None or the field is `nullable`. A ValueError names the field,
    the value and the type expected."""
    for field, default in defaults.items():
        if field not in config or default is None:
            continue
        value = config[field]
        if value is None and field in nullable:
            continue
        if not _fits(value, default, field):
            raise UsageError(f"{config.get('_class_name', 'diffusers')} config field {field} = {value!r} has the wrong "
                             f"type: it must be {_kind(default)} (as diffusers writes it, e.g. "
                             f"{json.dumps(list(default) if isinstance(default, tuple) else default)})")


def _load_safetensors(path: pathlib.Path) -> dict:
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except Exception as error:
        raise UsageError(f"{path} could not be read as safetensors ({error}): the file is damaged or "
                         "incomplete; download it again") from None


def _sharded(directory: pathlib.Path, index_name: str) -> dict:
    """The tensors of a sharded checkpoint: NAME.safetensors.index.json's weight_map, shard by shard."""
    index = read_json_object(directory / index_name, "the sharded checkpoint's index must be intact")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UsageError(f"{directory / index_name} has no weight_map: the sharded checkpoint's index is damaged")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        if not (directory / shard).exists():
            raise FileNotFoundError(f"{directory / index_name} names the shard {shard}, which is missing: download it")
        tensors.update(_load_safetensors(directory / shard))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise UsageError(f"the shards of {directory} hold no {missing[0]} (and {len(missing) - 1} more), which the "
                         "index names: the checkpoint is incomplete")
    return tensors


def read_tensors(directory: pathlib.Path, weights: str = WEIGHTS, weights_bin: str = WEIGHTS_BIN) -> dict:
    """{name: float32 NumPy array} of the model's weights (diffusers' names by default; transformers'
    are model.safetensors and pytorch_model.bin), in the forms the Hub has them: one file, the fp16
    variant (NAME.fp16.safetensors, upcast to float32), or shards with NAME.safetensors.index.json."""
    stem = weights.removesuffix(".safetensors")
    for name in (weights, f"{stem}.fp16.safetensors"):
        if (directory / name).exists():
            if name != weights:
                log.info("%s: the fp16 variant, read as float32", directory / name)
            return {k: _float32(k, v) for k, v in _load_safetensors(directory / name).items()}
    for name in (f"{weights}.index.json", f"{stem}.safetensors.index.fp16.json", f"{stem}.fp16.safetensors.index.json"):
        if (directory / name).exists():
            return {k: _float32(k, v) for k, v in _sharded(directory, name).items()}
    bin_path = directory / weights_bin
    if bin_path.exists():
        try:
            import torch
        except ImportError:
            raise UsageError(f"{bin_path} is a PyTorch pickle, which only torch can read: pip install torch, or "
                             "convert it to safetensors once (diffusers' save_pretrained writes safetensors)") from None
        state = torch.load(str(bin_path), map_location="cpu", weights_only=True)
        return {name: _float32(name, value.float().numpy()) for name, value in state.items()}
    raise FileNotFoundError(f"{directory} has a {CONFIG} but no weights file ({weights}, its fp16 variant, its shards' "
                            f"index or {weights_bin})")


def _float32(name, value) -> np.ndarray:
    """The tensor as float32, checked to be floating point and finite."""
    if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
        raise UsageError(f"tensor {name} has dtype {value.dtype}, not floating point")
    value = np.asarray(value, np.float32)
    bad = value.size - int(np.isfinite(value).sum())
    if bad:
        raise UsageError(f"tensor {name} has {bad} non-finite value(s) (NaN or inf) of {value.size}: the weights "
                         "are damaged or come from a diverged run; give intact weights")
    return value


def write_model(directory: pathlib.Path, config: dict, tensors: dict, weights: str = WEIGHTS) -> None:
    """config.json and the weights file (diffusion_pytorch_model.safetensors) of one model."""
    from safetensors.numpy import save_file
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(directory / weights), metadata={"format": "pt"})


def read_scheduler(directory: pathlib.Path) -> dict | None:
    """The scheduler config next to a model (../scheduler or ./scheduler), or None."""
    for candidate in (directory / SCHEDULER, directory.parent / SCHEDULER, directory / "scheduler_config.json"):
        if candidate.exists():
            return read_json_object(candidate, "give an intact scheduler config (download it again), or remove it "
                                               "to use the default schedule")
    return None
