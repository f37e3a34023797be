"""Masks as pytrees: building them from importance scores, applying them, keeping them.

A *mask* pytree has the same tree structure and leaf shapes as `params`, dtype bool: True
keeps a weight, False prunes it. Leaves that are not prunable are all-True. Masks live next
to the params (in the train state), never hidden inside optimizer state, so they can be
stacked, sharded, checkpointed and inspected.

`from_scores` is the one place masks are made from scores. It is rank based: each unit's
(leaf's, group's, or -- for `scope='global'` -- everything's) scores are sorted ONCE, every
element gets its rank (0 = most important, ties broken towards the lower flat index by a
stable sort) and `mask = rank < k` with `k = round(keep * count)` (at least 1). Because the
sort does not depend on the keep ratio, `jax.vmap(from_scores, in_axes=(None, 0))` over K
keep-ratio vectors sorts once and does K cheap comparisons; a per-candidate `top_k` would
redo the selection K times (see DESIGN.md "what is fast" and benchmarks/mask_thresholds.py).

This module works on any pytree of arrays and never imports Flax.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.structure import (ChannelGroup, Member, Path, as_path,  # noqa: F401
                                leaves_with_paths, path_str)

PyTree = Any
PrunableFn = Callable[[Path, Any], bool]

SCOPES = ("layerwise", "global")
GRANULARITIES = ("unstructured", "channel", "nm")


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------
# The tree-path helpers live in structure.py (which masks imports); re-exported here.


# --------------------------------------------------------------------------------------------
# basics
# --------------------------------------------------------------------------------------------
def ones_like(params: PyTree) -> PyTree:
    """All-True masks shaped like `params` (nothing pruned)."""
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), dtype=bool), params)


def apply(params: PyTree, masks: PyTree) -> PyTree:
    """`params` with pruned entries set to exactly zero (`jnp.where`, so no NaN leaks)."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def check_compatible(params: PyTree, masks: PyTree) -> None:
    """Raises ValueError naming the first leaf where `masks` does not fit `params`.

    Checked in tree-flatten order: tree structure (missing / extra leaves), leaf shape, and
    dtype (masks must be bool).
    """
    p_leaves, p_def = leaves_with_paths(params)
    m_leaves, m_def = leaves_with_paths(masks)
    if p_def != m_def:
        p_paths = [p for p, _ in p_leaves]
        m_paths = [p for p, _ in m_leaves]
        for i in range(max(len(p_paths), len(m_paths))):
            pp = p_paths[i] if i < len(p_paths) else None
            mp = m_paths[i] if i < len(m_paths) else None
            if pp != mp:
                if pp is None or (mp is not None and mp not in p_paths):
                    what = f"masks have leaf '{path_str(mp)}' that params do not have"
                else:
                    what = f"masks are missing leaf '{path_str(pp)}' of params"
                raise ValueError(
                    f"masks do not match params: {what}. Build masks from the same params "
                    f"tree, e.g. masks.ones_like(params) or masks.from_scores(scores, ...) "
                    f"with scores shaped like params.")
        raise ValueError(
            f"masks do not match params: tree structures differ ({m_def} vs {p_def}). "
            f"Build masks with masks.ones_like(params).")
    for (path, p), (_, m) in zip(p_leaves, m_leaves):
        if jnp.shape(p) != jnp.shape(m):
            raise ValueError(
                f"mask leaf '{path_str(path)}' has shape {jnp.shape(m)} but the param has shape "
                f"{jnp.shape(p)}; a mask must be shaped like its parameter (unprunable leaves "
                f"all-True: jnp.ones(param.shape, bool)).")
        if jnp.result_type(m) != jnp.bool_:
            raise ValueError(
                f"mask leaf '{path_str(path)}' has dtype {jnp.result_type(m)}; masks must be "
                f"bool: convert with jax.tree.map(lambda m: m.astype(bool), masks).")


def default_prunable(path: Path, leaf) -> bool:
    """Kernels (ndim >= 2) are prunable; biases and normalisation params are not."""
    del path
    return jnp.ndim(leaf) >= 2


def make_prunable_fn(exclude: Sequence[Path] = (),
                     base_fn: PrunableFn = default_prunable) -> PrunableFn:
    """`base_fn` minus the leaves at `exclude` (tuple paths or 'a/b/c' strings)."""
    excluded = frozenset(as_path(p) for p in exclude)

    def prunable_fn(path: Path, leaf) -> bool:
        return as_path(path) not in excluded and bool(base_fn(path, leaf))

    return prunable_fn


def prunable_paths(params: PyTree, prunable_fn: PrunableFn = default_prunable) -> list[Path]:
    """Paths of the prunable leaves in tree-flatten order (the order of layer-wise keep vectors)."""
    leaves, _ = leaves_with_paths(params)
    return [path for path, leaf in leaves if prunable_fn(path, leaf)]


class MaskCount(NamedTuple):
    """Plain-python counts for reports. `per_leaf[path] = (kept, total)`."""
    per_leaf: dict[Path, tuple[int, int]]
    kept: int
    total: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0


def count(masks: PyTree, prunable_fn: PrunableFn | None = None) -> MaskCount:
    """Kept / total entries per leaf and summed, over the leaves `prunable_fn` selects (all
    leaves when None). Returns python ints (one device->host transfer)."""
    leaves, _ = leaves_with_paths(masks)
    chosen = [(p, m) for p, m in leaves if prunable_fn is None or prunable_fn(p, m)]
    kept = jax.device_get([jnp.sum(m, dtype=jnp.int32) for _, m in chosen])
    per_leaf = {p: (int(k), int(np.prod(jnp.shape(m), dtype=np.int64)))
                for (p, m), k in zip(chosen, kept)}
    return MaskCount(per_leaf=per_leaf,
                     kept=sum(k for k, _ in per_leaf.values()),
                     total=sum(t for _, t in per_leaf.values()))


def sparsity(masks: PyTree, prunable_fn: PrunableFn | None = default_prunable) -> float:
    """Fraction of pruned entries over the prunable leaves (all leaves if prunable_fn=None)."""
    return count(masks, prunable_fn).sparsity


# --------------------------------------------------------------------------------------------
# keep ratios
# --------------------------------------------------------------------------------------------
def _is_traced(x) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x))


def check_keep_ratios(value, where: str = "") -> None:
    """ValueError if a concrete keep ratio is outside (0, 1]. Traced values pass unchecked."""
    if _is_traced(value):
        return
    arr = np.asarray(value, dtype=np.float64)
    bad = ~((arr > 0.0) & (arr <= 1.0))
    if np.any(bad):
        idx = tuple(int(i) for i in np.argwhere(bad)[0]) if arr.ndim else ()
        shown = arr[idx] if idx else arr
        at = f" at index {idx[0] if len(idx) == 1 else idx}" if idx else ""
        raise ValueError(
            f"keep ratio {float(shown)!r}{at}{' ' + where if where else ''} is outside (0, 1]; "
            f"a keep ratio is the "
            f"fraction KEPT (sparsity = 1 - keep), e.g. 0.25 keeps a quarter.")


def _per_unit_keep(keep_ratios, names: Sequence[str], what: str, lookup=None) -> list:
    """Scalar / vector[U] / dict -> one keep value (scalar array) per unit, in `names` order.

    `lookup` maps a dict key to a unit name (e.g. a tuple path -> 'a/b/c'). Units missing
    from a dict keep everything (1.0); unknown keys are an error.
    """
    if isinstance(keep_ratios, Mapping):
        keyed = {}
        for key, value in keep_ratios.items():
            name = lookup(key) if lookup else key
            if name not in names:
                raise ValueError(
                    f"keep_ratios has key {key!r} which is not a {what}; allowed: "
                    f"{sorted(names)}")
            check_keep_ratios(value, f"for key {key!r}")
            keyed[name] = jnp.asarray(value, jnp.float32)
        return [keyed.get(name, jnp.float32(1.0)) for name in names]
    arr = jnp.asarray(keep_ratios, jnp.float32)
    if arr.ndim == 0:
        check_keep_ratios(keep_ratios, "")
        return [arr] * len(names)
    if arr.shape != (len(names),):
        raise ValueError(
            f"keep_ratios has shape {arr.shape}; expected a scalar, a dict, or a vector of "
            f"shape ({len(names)},) with one keep ratio per {what} in this order: {list(names)}")
    check_keep_ratios(keep_ratios, f"(keep_ratios vector over {what}s {list(names)})")
    return [arr[i] for i in range(len(names))]


def _scalar_keep(keep_ratios, scope_msg: str):
    if isinstance(keep_ratios, Mapping) or jnp.ndim(keep_ratios) != 0:
        raise ValueError(
            f"{scope_msg} takes ONE scalar keep ratio (one threshold over everything); got "
            f"{'a dict' if isinstance(keep_ratios, Mapping) else jnp.shape(keep_ratios)}. "
            f"Use scope='layerwise' for per-layer / per-group keep ratios.")
    check_keep_ratios(keep_ratios, "")
    return jnp.asarray(keep_ratios, jnp.float32)


def kept_count(keep, total: int):
    """round(keep * total), clipped to [1, total]; int32 (traceable)."""
    return jnp.clip(jnp.round(keep * total), 1, total).astype(jnp.int32)


def ranks(scores: jax.Array) -> jax.Array:
    """int32 rank of each entry of `scores` (flattened; result is 1-D): 0 = highest score.

    One stable sort of `-scores`, so equal scores rank by lower flat index first; NaN ranks
    last. Independent of any keep ratio: under vmap over keep ratios it runs once.
    """
    flat = jnp.ravel(scores).astype(jnp.float32)
    order = jnp.argsort(-flat, stable=True)
    return jnp.zeros(flat.shape, jnp.int32).at[order].set(
        jnp.arange(flat.size, dtype=jnp.int32), unique_indices=True)


def _keep_by_rank(scores: jax.Array, keep) -> jax.Array:
    """bool mask shaped like `scores` keeping the top round(keep * size) (>= 1) entries."""
    r = ranks(scores)
    return (r < kept_count(keep, r.size)).reshape(jnp.shape(scores))


def _force_best(flat: jax.Array) -> jax.Array:
    """`flat` with its (first) maximum set to +inf, so a global ranking keeps it."""
    return flat.at[jnp.argmax(flat)].set(jnp.inf)


def _global_keep(unit_scores: Sequence[jax.Array], keep) -> list[jax.Array]:
    """One ranking over the concatenation; each unit always keeps its best entry (if k >= #units).

    Returns bool masks shaped like each `unit_scores` entry; exactly round(keep*total) kept.
    """
    flats = [_force_best(jnp.ravel(s).astype(jnp.float32)) for s in unit_scores]
    sizes = [f.size for f in flats]
    keep_flat = ranks(jnp.concatenate(flats)) < kept_count(keep, sum(sizes))
    out, start = [], 0
    for s, size in zip(unit_scores, sizes):
        out.append(keep_flat[start:start + size].reshape(jnp.shape(s)))
        start += size
    return out


# --------------------------------------------------------------------------------------------
# channels
# --------------------------------------------------------------------------------------------
def _reduce_l1(x, axes):
    return jnp.sum(jnp.abs(x), axis=axes)


def _reduce_l2(x, axes):
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes))


def _reduce_sum(x, axes):
    return jnp.sum(x, axis=axes)


CHANNEL_REDUCTIONS: dict[str, Callable] = {
    "l1": _reduce_l1,
    "l2": _reduce_l2,
    "sum": _reduce_sum,
}


def reduce_channels(leaf: jax.Array, reduce: str = "l1") -> jax.Array:
    """Reduce a producer leaf over every axis but the last: float[..., C] -> float[C]."""
    if reduce not in CHANNEL_REDUCTIONS:
        raise ValueError(
            f"unknown channel reduction {reduce!r}; allowed: {sorted(CHANNEL_REDUCTIONS)}")
    leaf = jnp.asarray(leaf, jnp.float32)
    axes = tuple(range(leaf.ndim - 1))
    return CHANNEL_REDUCTIONS[reduce](leaf, axes)


def leaf_index(tree: PyTree) -> tuple[dict[Path, int], list, Any]:
    """({path: position}, leaves, treedef) of a pytree, in tree-flatten order."""
    leaves, treedef = leaves_with_paths(tree)
    return {p: i for i, (p, _) in enumerate(leaves)}, [leaf for _, leaf in leaves], treedef


def lookup_leaf(index: Mapping[Path, int], path, group: ChannelGroup, role: str) -> int:
    """Position of a channel group's `path` in `index`; ValueError naming group and path."""
    key = as_path(path)
    if key not in index:
        raise ValueError(
            f"channel group '{group.name}' names {role} '{path_str(key)}', which is not a leaf "
            f"of the tree; the group's paths must match the params (known leaves include "
            f"{[path_str(p) for p in list(index)[:8]]}...)")
    return index[key]


def _check_groups(groups) -> tuple[ChannelGroup, ...]:
    if groups is None:
        raise ValueError("granularity='channel' needs groups=(ChannelGroup, ...) (the model's "
                         "`groups`), which say which channels are removed together")
    groups = tuple(groups)
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"channel group names must be unique; got {names}")
    return groups


def group_members(g, index: Mapping[Path, int], shapes: Sequence[tuple],
                  roles: tuple = ("producer", "consumer")) -> list:
    """`[(leaf position, Member)]` of group `g`'s members with a role in `roles` ('param'
    members count as producers): how masks, scores and costs read any group.

    A `discover.Group` lists its members (on any axis); a `ChannelGroup`'s producers are
    members on their last axis and its consumers on their input axis (-2, `outer` = the
    consumer's `spatial`), checked against `shapes` (the leaf shapes, in `index` order)."""
    if hasattr(g, "members"):
        return [(lookup_leaf(index, m.path, g, m.role), m) for m in g.members
                if m.role in roles or (m.role == "param" and "producer" in roles)]
    out = []
    if "producer" in roles:
        for path in g.producers:
            i = lookup_leaf(index, path, g, "producer")
            shape = tuple(shapes[i])
            if not shape or shape[-1] != g.size:
                raise ValueError(
                    f"producer '{path_str(as_path(path))}' of channel group '{g.name}' has "
                    f"shape {shape}; its last dimension must equal the group size {g.size}")
            out.append((i, Member(as_path(path), len(shape) - 1, "producer", 0, g.size,
                                  ndim=len(shape))))
    if "consumer" in roles:
        for path, spatial in g.consumers:
            i = lookup_leaf(index, path, g, "consumer")
            shape = tuple(shapes[i])
            if len(shape) < 2 or shape[-2] != spatial * g.size:
                raise ValueError(
                    f"consumer '{path_str(as_path(path))}' of channel group '{g.name}' (size "
                    f"{g.size}, spatial {spatial}) has shape {shape}; its input axis (-2) must "
                    f"be spatial * size = {spatial} * {g.size} = {spatial * g.size}")
            out.append((i, Member(as_path(path), len(shape) - 2, "consumer", 0, g.size,
                                  outer=int(spatial), ndim=len(shape))))
    return out


def _covers(m: Member, size: int, length: int) -> bool:
    """Whether member `m`'s indices are its whole axis in order (no gather / scatter)."""
    return m.offset == 0 and m.period == size and m.outer * size * m.inner == length


def channel_scores(scores: PyTree, groups: Sequence[ChannelGroup],
                   reduce: str = "l1") -> dict[str, jax.Array]:
    """Per-channel importance of each group from a param-shaped score pytree.

    Each producer KERNEL (ndim >= 2) of the group is reduced over all axes but its channels
    (`reduce`: 'l1' sum|s|, 'l2' sqrt(sum s^2), 'sum' sum s) and the results are summed over
    the group's producers. 1-D producers (biases, BatchNorm scale/bias) are used only when the
    group has no kernel producer; use `criteria.bn_scale` for BatchNorm-based importance.
    `groups` are `ChannelGroup`s or `discover.Group`s (channels on any axis: attention heads,
    grouped convs), with paths relative to `scores`.

    Returns dict group name -> float32[group.size].
    """
    groups = _check_groups(groups)
    if reduce not in CHANNEL_REDUCTIONS:
        raise ValueError(
            f"unknown channel reduction {reduce!r}; allowed: {sorted(CHANNEL_REDUCTIONS)}")
    index, leaves, _ = leaf_index(scores)
    shapes = [jnp.shape(x) for x in leaves]
    out = {}
    for g in groups:
        prod = group_members(g, index, shapes, ("producer",))
        if not prod:
            raise ValueError(f"channel group '{g.name}' has no producers")
        kernels = [(i, m) for i, m in prod if jnp.ndim(leaves[i]) >= 2] or prod
        total = jnp.zeros((g.size,), jnp.float32)
        for i, m in kernels:
            x = jnp.asarray(leaves[i])
            if not _covers(m, g.size, x.shape[m.axis]):
                x = jnp.take(x, jnp.asarray(m.indices(np.arange(g.size))), axis=m.axis)
            # [..., outer, size, inner] -> [..., outer, inner, size]: reduce all but the last.
            x = jnp.moveaxis(x, m.axis, -1).reshape(x.shape[:m.axis] + x.shape[m.axis + 1:]
                                                    + (m.outer, g.size, m.inner))
            total = total + reduce_channels(jnp.moveaxis(x, -2, -1), reduce)
        out[g.name] = total
    return out


def channel_keep(channel_scores: Mapping[str, jax.Array], keep_ratios,
                 groups: Sequence[ChannelGroup]) -> dict[str, jax.Array]:
    """Layer-wise channel selection: each group keeps its top round(keep * size) (>= 1) channels.

    `keep_ratios`: scalar, float[G] in `groups` order, or dict group name -> keep (missing
    groups keep everything). Vmappable over `keep_ratios` (scores are sorted once).
    Returns dict group name -> bool[size].
    """
    groups = _check_groups(groups)
    names = [g.name for g in groups]
    keeps = _per_unit_keep(keep_ratios, names, "channel group")
    out = {}
    for g, keep in zip(groups, keeps):
        if g.name not in channel_scores:
            raise ValueError(f"channel_scores has no entry for group '{g.name}'; it has "
                             f"{sorted(channel_scores)}")
        s = jnp.asarray(channel_scores[g.name])
        if s.shape != (g.size,):
            raise ValueError(f"channel scores of group '{g.name}' have shape {s.shape}; expected "
                             f"({g.size},)")
        out[g.name] = _keep_by_rank(s, keep)
    return out


def channel_keep_global(channel_scores: Mapping[str, jax.Array], keep,
                        groups: Sequence[ChannelGroup]) -> dict[str, jax.Array]:
    """Global channel selection: one threshold over all groups' channels.

    Each group's scores are first divided by the group's mean |score| so that groups with
    different scales (a 3x3x512 kernel vs a 1x1x16 one) compete fairly; then one ranking over
    all channels keeps round(keep * total channels), and every group keeps at least its best
    channel. `keep` is a scalar. Vmappable over `keep`.
    """
    groups = _check_groups(groups)
    keep = _scalar_keep(keep, "scope='global'")
    normed = []
    for g in groups:
        if g.name not in channel_scores:
            raise ValueError(f"channel_scores has no entry for group '{g.name}'; it has "
                             f"{sorted(channel_scores)}")
        s = jnp.asarray(channel_scores[g.name], jnp.float32)
        normed.append(s / jnp.maximum(jnp.mean(jnp.abs(s)), jnp.finfo(jnp.float32).tiny))
    return dict(zip([g.name for g in groups], _global_keep(normed, keep)))


def _axis_mask(keep: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
    """Broadcast a 1-D keep vector along `axis` of `shape`."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return jnp.broadcast_to(jnp.reshape(keep, view), shape)


def channel_masks(keep: Mapping[str, jax.Array], groups: Sequence[ChannelGroup],
                  params: PyTree) -> PyTree:
    """Param masks for channel keeps: every member slice of a dropped channel is masked. For a
    `ChannelGroup`: every producer's last axis and every consumer's input axis (-2); a
    consumer with `spatial > 1` (an (H, W, C) map flattened into a Dense) has input index
    p * C + c masked by keep[c]. A `discover.Group` masks its members on their axes. Groups
    missing from `keep` are kept.

    The masked param count equals the param count of the compacted model.
    """
    groups = _check_groups(groups)
    known = {g.name for g in groups}
    unknown = [k for k in keep if k not in known]
    if unknown:
        raise ValueError(f"keep has groups {unknown} not in groups {sorted(known)}")
    index, leaves, treedef = leaf_index(params)
    shapes = [jnp.shape(x) for x in leaves]
    out = [jnp.ones(shape, dtype=bool) for shape in shapes]
    for g in groups:
        if g.name not in keep:
            continue
        k = jnp.asarray(keep[g.name]).astype(bool)
        if k.shape != (g.size,):
            raise ValueError(f"keep['{g.name}'] has shape {k.shape}; expected ({g.size},)")
        for i, m in group_members(g, index, shapes):
            shape = shapes[i]
            vec = jnp.tile(jnp.repeat(k, m.inner), m.outer)
            if not _covers(m, g.size, shape[m.axis]):
                vec = jnp.ones((shape[m.axis],), bool).at[m.indices(np.arange(g.size))].set(vec)
            out[i] = out[i] & _axis_mask(vec, shape, m.axis)
    return jax.tree_util.tree_unflatten(treedef, out)


def channel_keep_from_masks(masks: PyTree, groups: Sequence[ChannelGroup]) -> dict:
    """The inverse of `channel_masks`: {group name: bool[size]}, a channel kept where a
    producer kernel of its group (else its first producer) keeps any of its slice. Any group,
    read through its members (attention heads on a middle axis, concatenation offsets)."""
    index, leaves, _ = leaf_index(masks)
    shapes = [np.shape(x) for x in leaves]
    out = {}
    for g in _check_groups(groups):
        producers = group_members(g, index, shapes, ("producer",))
        i, m = ([p for p in producers if len(shapes[p[0]]) >= 2] or producers)[0]
        leaf = np.moveaxis(np.asarray(leaves[i]), m.axis, 0)
        along = leaf.reshape(leaf.shape[0], -1).any(axis=1)
        out[g.name] = along[m.indices(np.arange(g.size))].reshape(
            m.outer, g.size, m.inner).any(axis=(0, 2))
    return out


# --------------------------------------------------------------------------------------------
# N:M
# --------------------------------------------------------------------------------------------
def nm_mask(scores: jax.Array, n: int = 2, m: int = 4, *, path: Path = ()) -> jax.Array:
    """Keep the n highest of every m consecutive entries along the input axis (-2).

    1-D leaves have no input axis: returns all-True. Ties: lower index wins.
    """
    shape = jnp.shape(scores)
    if len(shape) < 2:
        return jnp.ones(shape, dtype=bool)
    if shape[-2] % m:
        raise ValueError(
            f"N:M pruning of leaf '{path_str(path)}': its input dimension (axis -2) is "
            f"{shape[-2]}, which is not divisible by m={m}; exclude the leaf with "
            f"make_prunable_fn(exclude=[...]) or pick an m that divides it")
    x = jnp.moveaxis(jnp.asarray(scores, jnp.float32), -2, -1)         # [..., out, in]
    blocks = x.reshape(x.shape[:-1] + (shape[-2] // m, m))            # [..., out, in/m, m]
    order = jnp.argsort(-blocks, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    keep = (rank < n).reshape(x.shape)
    return jnp.moveaxis(keep, -1, -2)


def check_nm(params: PyTree, n: int, m: int, prunable_fn: PrunableFn | None = None) -> None:
    """Raises ValueError, before any work, when an n:m pattern cannot apply to every prunable
    leaf: naming each leaf whose input dimension (axis -2) m does not divide, and the m that
    would fit them all."""
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m):
        raise ValueError(f"N:M pruning needs integers 1 <= n <= m; got n={n!r}, m={m!r}.")
    fn = default_prunable if prunable_fn is None else prunable_fn
    dims = {path_str(p): np.shape(x)[-2] for p, x in leaves_with_paths(params)[0]
            if fn(p, x) and np.ndim(x) >= 2}
    bad = {k: d for k, d in dims.items() if d % m}
    if bad:
        common = functools.reduce(math.gcd, dims.values())
        fits = [d for d in range(2, common + 1) if common % d == 0][:4]
        raise ValueError(
            f"N:M pruning with m={m}: the input dimension (axis -2) of "
            + ", ".join(f"'{k}' ({d})" for k, d in bad.items())
            + f" is not divisible by {m}. Pick an m that divides every prunable leaf "
            + (f"(e.g. {', '.join(map(str, fits))}), " if fits else "(none > 1 does), ")
            + "or exclude those leaves from pruning.")


# --------------------------------------------------------------------------------------------
# from_scores
# --------------------------------------------------------------------------------------------
def _check_choice(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {list(allowed)}")


def from_scores(scores: PyTree, keep_ratios, *, scope: str = "layerwise",
                granularity: str = "unstructured",
                groups: Sequence[ChannelGroup] | None = None,
                prunable_fn: PrunableFn = default_prunable, n: int = 2, m: int = 4,
                reduce: str = "l1") -> PyTree:
    """Bool masks (shaped like `scores`, i.e. like params) keeping the highest-scoring weights.

    Args:
      scores: pytree shaped like params (e.g. `criteria.magnitude(params)`); higher = keep.
      keep_ratios: fraction kept, in (0, 1].
        * scope='layerwise', unstructured: scalar (same for every prunable leaf), float[L] in
          `prunable_paths(scores, prunable_fn)` order, or dict path -> keep (tuple path or
          'a/b/c'; missing leaves keep everything).
        * scope='layerwise', channel: scalar, float[G] in `groups` order, or dict group name ->
          keep (missing groups keep everything).
        * scope='global': one scalar.
        * granularity='nm': None (the keep is n/m) or a scalar equal to n/m.
      scope: 'layerwise' (one threshold per leaf / group) or 'global' (one threshold over all
        prunable weights: a single ranking over their concatenation, exactly
        round(keep * total) kept; every leaf keeps at least its best weight). For channel
        granularity the global ranking runs over channels and each group's channel scores are
        first divided by the group's mean |score| (see `channel_keep_global`). Ignored for nm.
      granularity: 'unstructured' (single weights), 'channel' (whole channels of `groups`;
        the groups, not `prunable_fn`, define what is prunable; channel scores from
        `channel_scores(scores, groups, reduce)`), or 'nm' (n of every m consecutive weights
        along the input axis -2 of each prunable leaf; 1-D leaves all-True).
      groups: the model's ChannelGroups (channel granularity only).
      prunable_fn: (path, leaf) -> bool; unprunable leaves get all-True masks.
      n, m: the N:M pattern.
      reduce: channel reduction 'l1' | 'l2' | 'sum' (channel granularity only).

    Per unit, kept = round(keep * count) clipped to [1, count]; ties go to the lower index.
    Works under jit (keep_ratios may be traced; scope/granularity/groups/n/m are static) and
    under vmap over keep_ratios: the sorts do not depend on keep_ratios, so they run once.
    """
    _check_choice(scope, SCOPES, "scope")
    _check_choice(granularity, GRANULARITIES, "granularity")
    if keep_ratios is None and granularity != "nm":
        raise ValueError(f"keep_ratios=None is only allowed for granularity='nm'; "
                         f"granularity={granularity!r} needs keep ratios in (0, 1]")

    if granularity == "channel":
        groups = _check_groups(groups)
        cs = channel_scores(scores, groups, reduce)
        if scope == "global":
            keep = channel_keep_global(cs, keep_ratios, groups)
        else:
            keep = channel_keep(cs, keep_ratios, groups)
        return channel_masks(keep, groups, scores)

    leaves, treedef = leaves_with_paths(scores)
    chosen = [i for i, (p, x) in enumerate(leaves) if prunable_fn(p, x)]
    out = [jnp.ones(jnp.shape(x), dtype=bool) for _, x in leaves]

    if granularity == "nm":
        if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m):
            raise ValueError(f"N:M needs integers 1 <= n <= m; got n={n!r}, m={m!r}")
        if keep_ratios is not None:
            if isinstance(keep_ratios, Mapping) or jnp.ndim(keep_ratios) != 0:
                raise ValueError("granularity='nm' takes keep_ratios=None (the keep is n/m)")
            if not _is_traced(keep_ratios) and not np.isclose(float(keep_ratios), n / m):
                raise ValueError(
                    f"granularity='nm' with n={n}, m={m} keeps {n}/{m} = {n / m:g}, but "
                    f"keep_ratios={float(keep_ratios)!r}; pass keep_ratios=None or n/m")
        for i in chosen:
            out[i] = nm_mask(leaves[i][1], n, m, path=leaves[i][0])
        return jax.tree_util.tree_unflatten(treedef, out)

    if scope == "global":
        keep = _scalar_keep(keep_ratios, "scope='global'")
        if chosen:
            for i, mask in zip(chosen, _global_keep([leaves[i][1] for i in chosen], keep)):
                out[i] = mask
        return jax.tree_util.tree_unflatten(treedef, out)

    names = [path_str(leaves[i][0]) for i in chosen]
    keeps = _per_unit_keep(keep_ratios, names, "prunable leaf",
                           lookup=lambda k: path_str(as_path(k)))
    for i, keep in zip(chosen, keeps):
        out[i] = _keep_by_rank(leaves[i][1], keep)
    return jax.tree_util.tree_unflatten(treedef, out)


# --------------------------------------------------------------------------------------------
# optimizer
# --------------------------------------------------------------------------------------------
def masked_updates() -> optax.GradientTransformationExtraArgs:
    """Optax transform zeroing the updates of pruned weights; put it LAST in the chain.

        tx = optax.chain(optax.adamw(1e-3), masks.masked_updates())
        updates, opt_state = tx.update(grads, opt_state, params, masks=masks)

    With params already masked (`masks.apply`), pruned weights then stay exactly zero whatever
    the earlier transforms (momentum, Adam moments, weight decay) produce.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, masks=None, **extra_args):
        del params, extra_args
        if masks is None:
            raise ValueError("masked_updates() needs the masks: call "
                             "tx.update(grads, opt_state, params, masks=masks)")
        updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, masks)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
