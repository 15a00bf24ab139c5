"""One code path from a laptop CPU to a pod: a Mesh over every device, the batch on its data
axes, parameters replicated or sharded on an fsdp axis, several hosts via jax.distributed.

    mesh = make_mesh(fsdp=1)                 # ("data", "fsdp") over all devices
    batch = global_batch(local_batch, mesh)  # this process's rows -> one global array
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.errors import UsageError

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when this process is one of several.

    Launch each process with JAX_COORDINATOR_ADDRESS (host:port of process 0),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID (or on a managed cluster -- TPU pods, SLURM -- where
    JAX finds them itself and DIFFUSION_JAX_DISTRIBUTED=1 asks for the call). On CPU the
    collectives go through gloo.
    """
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        if env.get("JAX_PLATFORMS", "") == "cpu" or env.get("DIFFUSION_JAX_CPU_COLLECTIVES"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]))
    elif env.get("DIFFUSION_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all, every process)."""
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) % fsdp:
        raise UsageError(f"{len(devices)} devices cannot be split into fsdp groups of {fsdp}")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Batch axis (after `leading` unsharded axes) split over every mesh device."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp: int) -> P:
    """Shard the largest axis divisible by `fsdp` on the fsdp axis; small arrays replicated."""
    if fsdp == 1 or int(np.prod(shape)) < 2**14:
        return P()
    for axis in np.argsort(shape)[::-1]:
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(state_shapes, mesh: Mesh):
    """A sharding for every leaf of a (train-state) pytree: fsdp-sharded or replicated."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(
        lambda leaf: NamedSharding(mesh, fsdp_spec(getattr(leaf, "shape", ()), fsdp)), state_shapes)


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    n = mesh.size
    if global_batch % n:
        raise UsageError(f"global batch {global_batch} is not divisible by the device count {n}: "
                         f"set data.batch_size to a multiple of {n}")


def global_batch(local: dict, mesh: Mesh, leading: int = 0) -> dict:
    """This process's rows of a batch (a tree of NumPy arrays) -> global jax.Arrays sharded on the batch axis."""
    sharding = batch_sharding(mesh, leading)
    return jax.tree_util.tree_map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)), local)


def agree_across_processes(value: int, name: str = "") -> int:
    """The largest of every process's `value`: how the processes of a multi-host job settle on
    one outcome (each calls it at the same point) before any of them acts on it."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def to_host(x) -> np.ndarray:
    """A (possibly multi-host) global array as one NumPy array on every process (an array on
    this process's devices alone is simply fetched: no collective)."""
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
