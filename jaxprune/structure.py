"""Prunable structure: channel groups that must be removed together, and tree-path helpers.

A *channel group* is a set of channels that has to be pruned as one: the output channels of
a conv (with its BatchNorm), or every tensor that writes into a ResNet stage's residual stream.
Groups are found from a model's program (`discover.Discovery.channel_groups()`); masks,
scores and costs read a `ChannelGroup`, or a discovered group on any axis, through its
`Member`s (`masks.group_members`), and `surgery.slice_variables` cuts them out of the
variables. It works on plain pytrees and never imports Flax.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import jax
import numpy as np

Path = Tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Tree paths: the one set of helpers of the package (masks re-exports them).


def _key_str(entry) -> str:
    """One jax key-path entry (DictKey, GetAttrKey, SequenceKey, ...) as a str."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def as_path(path) -> Path:
    """A path given as a tuple of keys or as 'a/b/c' -> tuple of str."""
    if isinstance(path, str):
        return tuple(path.split("/"))
    return tuple(str(p) for p in path)


def path_str(path: Path) -> str:
    """Human-readable form of a path, e.g. 'block1/conv1/kernel'."""
    return "/".join(str(p) for p in path)


def leaves_with_paths(tree: Any) -> tuple[list[tuple[Path, Any]], Any]:
    """[(path, leaf)] in tree-flatten order plus the treedef; paths are tuples of str."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(_key_str(k) for k in kp), leaf) for kp, leaf in flat], treedef


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that are kept or removed together.

    Attributes:
      name: unique group name, e.g. "stage1" or "block3.conv1".
      size: number of channels in the current (dense) model.
      producers: param paths whose LAST axis indexes these channels (kernel out axis, its
        bias, BatchNorm scale and bias).
      consumers: (kernel path, spatial) pairs whose INPUT axis (axis -2) is indexed by these
        channels. `spatial > 1` when an (H, W, C) feature map is flattened into a Dense layer:
        the Dense input index of channel c at position p is p * C + c.
      stats: batch-stat paths (BatchNorm mean / var) indexed on the last axis.
    """

    name: str
    size: int
    producers: Tuple[Path, ...]
    consumers: Tuple[Tuple[Path, int], ...] = ()
    stats: Tuple[Path, ...] = ()


@dataclasses.dataclass(frozen=True)
class Member:
    """One slice of one variable leaf indexed by a group's channels.

    Channel c of the group is index `(o * period + offset + c) * inner + i` of `axis`, for
    every o < outer and i < inner. A plain producer or per-channel leaf has offset 0,
    period = size, outer = inner = 1; a Dense reading a flattened (H, W, C) map has
    outer = H * W; a consumer of a concatenation has the operand's offset and the
    concatenation's width as period.

    Attributes:
      path: path of the leaf in `variables` (tuple of str).
      axis: the leaf axis (non-negative).
      role: 'producer' (a conv / dense kernel's output axis), 'consumer' (a kernel's input
        axis) or 'param' (a per-channel leaf: bias, norm scale / bias / statistics, a
        depthwise kernel's output axis).
      offset, period, outer, inner: the index layout above.
      ndim: the leaf's rank.
    """

    path: Path
    axis: int
    role: str
    offset: int = 0
    period: int = 0
    outer: int = 1
    inner: int = 1
    ndim: int = 0

    def indices(self, channels: np.ndarray) -> np.ndarray:
        """Leaf-axis indices of the given channel indices (every outer / inner copy)."""
        channels = np.asarray(channels, np.int64)
        o = np.arange(self.outer)[:, None, None]
        i = np.arange(self.inner)[None, None, :]
        c = channels[None, :, None]
        return ((o * self.period + self.offset + c) * self.inner + i).reshape(-1)


# --------------------------------------------------------------------------------------------
# Nested-dict helpers (params / batch_stats are plain nested dicts with str keys).


def _flatten(tree, prefix: Path = ()) -> dict:
    """{path: leaf} for a nested dict, in insertion order."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def _unflatten(flat: dict) -> dict:
    """Inverse of `_flatten`."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return tree


_fmt = path_str


# --------------------------------------------------------------------------------------------
# Validation.


def validate_groups(groups, params, batch_stats=None) -> None:
    """Checks that `groups` describe `params` / `batch_stats` exactly.

    Every producer / consumer / stat path must exist, and the indexed axis must have the
    group's size (producers and stats: last axis == size; consumers: axis -2 == size * spatial).
    Group names must be unique and no (leaf, axis) may be claimed by two groups. Works on
    arrays and on `jax.ShapeDtypeStruct` leaves (e.g. from `jax.eval_shape`).

    Raises:
      ValueError naming the group and the offending path.
    """
    flat_p = _flatten(params)
    flat_s = _flatten(batch_stats or {})
    seen_names = set()
    claimed: dict = {}

    def claim(key, name):
        if key in claimed:
            raise ValueError(
                f"group {name!r}: {key[0]} axis of {_fmt(key[1])!r} is already indexed by group "
                f"{claimed[key]!r}; each (leaf, axis) may belong to one group only")
        claimed[key] = name

    for g in groups:
        if g.name in seen_names:
            raise ValueError(f"duplicate channel group name {g.name!r}")
        seen_names.add(g.name)
        if not isinstance(g.size, int) or g.size < 1:
            raise ValueError(f"group {g.name!r}: size must be a positive int, got {g.size!r}")
        for path in g.producers:
            leaf = flat_p.get(tuple(path))
            if leaf is None:
                raise ValueError(f"group {g.name!r}: producer {_fmt(path)!r} not found in params")
            if len(leaf.shape) < 1 or leaf.shape[-1] != g.size:
                raise ValueError(
                    f"group {g.name!r}: producer {_fmt(path)!r} has shape {tuple(leaf.shape)}, "
                    f"expected last axis {g.size}")
            claim(("output", tuple(path)), g.name)
        for path, spatial in g.consumers:
            leaf = flat_p.get(tuple(path))
            if leaf is None:
                raise ValueError(f"group {g.name!r}: consumer {_fmt(path)!r} not found in params")
            if not isinstance(spatial, int) or spatial < 1:
                raise ValueError(
                    f"group {g.name!r}: consumer {_fmt(path)!r} has spatial={spatial!r}, "
                    "expected a positive int")
            if len(leaf.shape) < 2 or leaf.shape[-2] != g.size * spatial:
                raise ValueError(
                    f"group {g.name!r}: consumer {_fmt(path)!r} has shape {tuple(leaf.shape)}, "
                    f"expected input axis (-2) of {g.size} * {spatial} = {g.size * spatial}")
            claim(("input", tuple(path)), g.name)
        for path in g.stats:
            leaf = flat_s.get(tuple(path))
            if leaf is None:
                raise ValueError(f"group {g.name!r}: stat {_fmt(path)!r} not found in batch_stats")
            if len(leaf.shape) < 1 or leaf.shape[-1] != g.size:
                raise ValueError(
                    f"group {g.name!r}: stat {_fmt(path)!r} has shape {tuple(leaf.shape)}, "
                    f"expected last axis {g.size}")
            claim(("stat", tuple(path)), g.name)


def _keep_vector(name: str, size: int, value) -> np.ndarray:
    """Concrete bool[size] keep vector for one group (validated)."""
    try:
        arr = np.asarray(value)
    except Exception as e:  # e.g. a tracer: compaction changes shapes, so it cannot be jitted
        raise ValueError(
            f"keep[{name!r}] must be a concrete array (compaction cannot run under jit): {e}"
        ) from e
    if arr.shape != (size,):
        raise ValueError(f"keep[{name!r}] has shape {arr.shape}, expected ({size},)")
    if arr.dtype != np.bool_:
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"keep[{name!r}] must be boolean (or 0/1), got dtype {arr.dtype}")
        arr = arr.astype(bool)
    if not arr.any():
        raise ValueError(f"keep[{name!r}] keeps no channel; at least one must be kept per group")
    return arr
