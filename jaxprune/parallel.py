"""Devices, meshes and multi-host glue: the only module that knows about devices.

Search evaluates K candidate subnetworks at once. The candidate axis is the one axis that is
split over devices; everything else (params, batch stats, images) is replicated. A 1-D mesh
with axis ``'candidates'`` spans every device of every process, so the same code runs on one
CPU, eight forced host devices, one GPU or many hosts:

    mesh = candidate_mesh()
    keep = shard_candidates(keep_ratios, mesh)       # [K, G] -> [K_padded, G], row-sharded
    ...jitted / shard_mapped work on `keep`...
    out = gather_candidates(out, k)                  # numpy [K, ...] on every process

K need not divide the device count: rows are padded with copies of the last row (so padded
candidates are valid, just repeated work) and dropped again by `gather_candidates`.

Multi-host: call `initialize_distributed` first in every process; `candidate_mesh()` then
spans the global devices, each process computes the rows that live on its own devices
(`process_slice`) and `gather_candidates` all-gathers the results to every process. Inputs
are given in full to every process (identical copies, e.g. from the same seed), which keeps
placement a pure function of (value, mesh).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

CANDIDATE_AXIS = "candidates"


def initialize_distributed(coordinator: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           **kwargs: Any) -> None:
    """Joins a multi-process JAX job (wraps `jax.distributed.initialize`).

    A no-op for a single process (``num_processes`` of None or 1 and no coordinator) and when
    the distributed runtime is already up, so callers may call it unconditionally. Must run
    before any other JAX call touches devices. On CPU, cross-process collectives use gloo
    (``jax_cpu_collectives_implementation``), which this function selects when it is unset.

    Args:
      coordinator: "host:port" of process 0's coordinator service.
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).
      **kwargs: passed on to `jax.distributed.initialize` (e.g. ``local_device_ids``,
        ``initialization_timeout``).
    """
    if jax.distributed.is_initialized():
        return
    if coordinator is None and (num_processes is None or num_processes <= 1):
        return
    if num_processes is not None and num_processes <= 1:
        return
    if process_id is not None and num_processes is not None and not (
            0 <= process_id < num_processes):
        raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes}).")
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, **kwargs)


def candidate_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh with axis 'candidates' over ``devices`` (default: all global devices)."""
    if devices is None:
        devices = jax.devices()
    devices = list(devices)
    if not devices:
        raise ValueError("candidate_mesh needs at least one device, got an empty list.")
    return Mesh(np.asarray(devices, dtype=object), (CANDIDATE_AXIS,))


def candidate_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (candidate) axis over the mesh."""
    return NamedSharding(mesh, P(CANDIDATE_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that puts a full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def padded_size(k: int, mesh: Mesh) -> int:
    """Smallest multiple of the mesh's device count that is >= k (and >= 1 device's worth)."""
    if k < 1:
        raise ValueError(f"Number of candidates must be >= 1, got k={k}.")
    n = mesh.devices.size
    return int(math.ceil(k / n) * n)


def _leading_size(tree: Any) -> int:
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(tree)}
    if None in sizes:
        raise ValueError("Every candidate leaf needs a leading candidate axis; got a scalar leaf.")
    if len(sizes) != 1:
        raise ValueError(f"Candidate leaves disagree on the candidate axis size: {sorted(sizes)}.")
    return sizes.pop()


def pad_candidates(tree: Any, size: int) -> Any:
    """Pads every leaf's leading axis to ``size`` with copies of its last row."""
    def pad(x):
        k = np.shape(x)[0]
        if size < k:
            raise ValueError(f"Cannot pad {k} candidates down to {size}.")
        if size == k:
            return x
        xp = jnp if isinstance(x, jax.Array) else np
        reps = xp.repeat(x[-1:], size - k, axis=0)
        return xp.concatenate([x, reps], axis=0)
    return jax.tree.map(pad, tree)


def drop_padding(tree: Any, k: int) -> Any:
    """Keeps the first ``k`` rows of every leaf (undoes `pad_candidates`)."""
    return jax.tree.map(lambda x: x[:k], tree)


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
    """Puts one array on ``sharding``; a no-op when it is already there."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    # Multi-process: every process holds the full value; each fills its own devices' shards.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a full copy of every leaf on every device of ``mesh`` (no-op if already so)."""
    sharding = replicated_sharding(mesh)
    return jax.tree.map(lambda x: _place(x, sharding), tree)


def shard_candidates(tree: Any, mesh: Mesh) -> Any:
    """Pads the leading (candidate) axis to a multiple of the device count and splits it.

    Every leaf must have the same leading size K. Returns the padded, row-sharded tree; the
    caller drops the padding with ``gather_candidates(result, k)`` or ``drop_padding``.
    """
    k = _leading_size(tree)
    tree = pad_candidates(tree, padded_size(k, mesh))
    sharding = candidate_sharding(mesh)
    return jax.tree.map(lambda x: _place(x, sharding), tree)


def process_slice(k: int, mesh: Optional[Mesh] = None) -> slice:
    """Which of the K candidate indices this process's devices hold under `shard_candidates`.

    Rows [start, stop) of the unpadded K; empty (start == stop) when this process holds only
    padding. Assumes each process's devices are contiguous along the mesh (the default order
    of `jax.devices()`), which this checks.
    """
    mesh = candidate_mesh() if mesh is None else mesh
    n = mesh.devices.size
    per_device = padded_size(k, mesh) // n
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if not mine:
        return slice(0, 0)
    if mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError(f"Process {jax.process_index()}'s devices are not contiguous on the "
                         f"mesh (positions {mine}); build the mesh from jax.devices() order.")
    start = min(mine[0] * per_device, k)
    stop = min((mine[-1] + 1) * per_device, k)
    return slice(start, stop)


def gather_candidates(tree: Any, k: Optional[int] = None) -> Any:
    """Per-candidate results → full numpy arrays on every process, padding dropped.

    Leaves may be global arrays sharded over the candidate mesh (each process only holds its
    rows: they are all-gathered across processes), fully addressable arrays or numpy arrays.
    """
    def gather(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        x = np.asarray(x)
        return x if k is None else x[:k]
    return jax.tree.map(gather, tree)
