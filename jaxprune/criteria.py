"""Importance scores: which weights or channels matter.

Every weight criterion returns a score pytree shaped like `params` (higher = more important),
ready for `masks.from_scores`. `bn_scale` scores channel groups directly (dict group ->
float[size], for `masks.channel_keep`). `layer_sensitivity` measures how much each layer /
channel group can be pruned alone, and `sensitivity_to_keep` turns those curves into per-unit
keep ratios that meet a cost budget.

Works on any pytree of arrays; never imports Flax.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import masks as masks_lib
from jaxprune.masks import CHANNEL_REDUCTIONS, channel_scores, reduce_channels  # noqa: F401
from jaxprune.structure import ChannelGroup

PyTree = Any


# --------------------------------------------------------------------------------------------
# weight criteria
# --------------------------------------------------------------------------------------------
def magnitude(params: PyTree, *, p: int = 1) -> PyTree:
    """|w| (p=1, L1) or w^2 (p=2, L2) per weight."""
    if p == 1:
        return jax.tree.map(lambda w: jnp.abs(w).astype(jnp.float32), params)
    if p == 2:
        return jax.tree.map(lambda w: jnp.square(w).astype(jnp.float32), params)
    raise ValueError(f"magnitude supports p=1 (|w|) or p=2 (w^2); got p={p!r}")


def _grads(loss_fn: Callable, params: PyTree, batches: Iterable) -> list[PyTree]:
    if isinstance(batches, Mapping):
        raise ValueError("batches must be an iterable of batches (e.g. a list), not a single "
                         "batch dict; wrap it: [batch]")
    grad_fn = jax.jit(jax.grad(loss_fn))
    grads = [grad_fn(params, batch) for batch in batches]
    if not grads:
        raise ValueError("batches is empty; gradient-based criteria need at least one batch")
    return grads


def taylor(loss_fn: Callable, params: PyTree, batches: Iterable) -> PyTree:
    """First-order Taylor importance |w * dL/dw|, averaged over `batches`.

    `loss_fn(params, batch) -> scalar`. The product is taken per batch and then averaged
    (Molchanov et al. 2019), so batches whose gradients cancel still add importance.
    """
    grads = _grads(loss_fn, params, batches)
    total = jax.tree.map(jnp.zeros_like, params)
    for g in grads:
        total = jax.tree.map(lambda t, w, gi: t + jnp.abs(w * gi), total, params, g)
    return jax.tree.map(lambda t: (t / len(grads)).astype(jnp.float32), total)


def snip(loss_fn: Callable, params: PyTree, batches: Iterable) -> PyTree:
    """SNIP connection sensitivity (Lee et al. 2019) at initialisation.

    |w * g| with g the gradient averaged over `batches`, normalised so the scores of all
    leaves sum to 1.
    """
    grads = _grads(loss_fn, params, batches)
    mean_g = jax.tree.map(lambda *gs: sum(gs) / len(gs), *grads)
    raw = jax.tree.map(lambda w, g: jnp.abs(w * g).astype(jnp.float32), params, mean_g)
    total = sum(jnp.sum(x) for x in jax.tree.leaves(raw))
    total = jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
    return jax.tree.map(lambda x: x / total, raw)


def random(key: jax.Array, params: PyTree) -> PyTree:
    """Uniform [0, 1) scores (the random-pruning control); one fresh key per leaf."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = [jax.random.uniform(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, out)


def bn_scale(params: PyTree, groups: Sequence[ChannelGroup]) -> dict[str, jax.Array]:
    """Network-slimming channel importance: |gamma| summed over the group's BatchNorm
    producers (producer leaves whose path ends in 'scale'). Returns dict group -> float[size].
    """
    index, leaves, _ = masks_lib.leaf_index(params)
    shapes = [jnp.shape(x) for x in leaves]
    out = {}
    for g in groups:  # ChannelGroups or discover.Groups, read through their members
        producers = masks_lib.group_members(g, index, shapes, ("producer",))
        bn = [(i, m.path) for i, m in producers if masks_lib.as_path(m.path)[-1] == "scale"]
        if not bn:
            raise ValueError(
                f"bn_scale: channel group '{g.name}' has no BatchNorm producer (a producer "
                f"path ending in 'scale'); its producers are "
                f"{[masks_lib.path_str(masks_lib.as_path(m.path)) for _, m in producers]}. "
                f"Use criterion 'l1' for models without BatchNorm.")
        total = jnp.zeros((g.size,), jnp.float32)
        for i, p in bn:
            gamma = jnp.asarray(leaves[i], jnp.float32)
            if gamma.shape != (g.size,):
                raise ValueError(f"BatchNorm scale '{masks_lib.path_str(masks_lib.as_path(p))}'"
                                 f" has shape {gamma.shape}; group '{g.name}' has {g.size}")
            total = total + jnp.abs(gamma)
        out[g.name] = total
    return out


def mask_gradient(mask_loss_fn: Callable, sizes: Mapping[str, int],
                  batches: Iterable) -> dict[str, jax.Array]:
    """Channel importance from the gradient of a channel mask: |dL/dξ_c| at ξ = 1, where the
    model's channel c (an attention head's output, an FFN neuron, a conv channel) is multiplied
    by ξ_c; the absolute value is taken per batch and averaged over `batches` (Michel et al.
    2019's head importance, for every kind of group).

    `mask_loss_fn(channel_masks {group: float32[size]}, batch) -> scalar`; `sizes`: {group:
    size}. Returns dict group -> float32[size].
    """
    ones = {name: jnp.ones((int(n),), jnp.float32) for name, n in sizes.items()}
    grads = _grads(mask_loss_fn, ones, batches)
    return {name: (sum(jnp.abs(g[name]) for g in grads) / len(grads)).astype(jnp.float32)
            for name in ones}


CRITERIA: dict[str, Callable] = {
    "l1": functools.partial(magnitude, p=1),
    "l2": functools.partial(magnitude, p=2),
    "magnitude": magnitude,
    "taylor": taylor,
    "snip": snip,
    "random": random,
    "bn_scale": bn_scale,
    "mask_gradient": mask_gradient,
}


def get_criterion(name: str) -> Callable:
    """CRITERIA[name], or ValueError listing the known names."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; known: {sorted(CRITERIA)}")
    return CRITERIA[name]


class Scores(NamedTuple):
    """What `score` returns: `weights` shaped like params (None for a channel-only criterion)
    and `channels` {group: float[size]} when the criterion scores channels directly (else None:
    `masks.channel_scores` reduces the weight scores over each group)."""
    weights: PyTree
    channels: dict | None = None


GRADIENT_CRITERIA = ("taylor", "snip", "mask_gradient")  # need a loss and training batches
CHANNEL_CRITERIA = ("bn_scale", "mask_gradient")  # score channel groups, not weights


def score(name: str, params: PyTree, *, groups: Sequence[ChannelGroup] = (),
          loss_fn: Callable | None = None, batches: Iterable | None = None,
          key: jax.Array | None = None, mask_loss_fn: Callable | None = None) -> Scores:
    """Every criterion of `CRITERIA` behind one signature.

    Args:
      name: 'l1', 'l2' (|w|, w^2), 'taylor', 'snip' (need `loss_fn(params, batch)` and
        `batches`), 'random' (needs `key`), 'bn_scale' (needs `groups`; channels only),
        'mask_gradient' (needs `groups`, `mask_loss_fn(channel_masks, batch)` and `batches`;
        channels only).
    """
    get_criterion(name)
    if name == "mask_gradient":
        if mask_loss_fn is None or batches is None or not groups:
            raise ValueError("criterion 'mask_gradient' scores channel groups by the gradient of "
                             "their masks: pass groups, mask_loss_fn(channel_masks, batch) and "
                             "batches (granularity 'channel').")
        return Scores(None, mask_gradient(mask_loss_fn, {g.name: g.size for g in groups}, batches))
    if name in GRADIENT_CRITERIA:
        if loss_fn is None or batches is None:
            raise ValueError(f"criterion {name!r} is gradient-based: pass loss_fn and batches "
                             "(a few training batches).")
        return Scores(CRITERIA[name](loss_fn, params, batches))
    if name == "random":
        if key is None:
            raise ValueError("criterion 'random' needs a PRNG key.")
        return Scores(random(key, params))
    if name == "bn_scale":
        return Scores(None, bn_scale(params, groups))
    return Scores(CRITERIA[name](params))


# --------------------------------------------------------------------------------------------
# sensitivity analysis
# --------------------------------------------------------------------------------------------
class SensitivityCurves(NamedTuple):
    """`values[u, j]` = eval_fn(params with only unit u pruned to keep_grid[j])."""
    units: tuple            # leaf paths (tuple of str) or channel group names, as analysed
    keep_grid: np.ndarray   # float32[K]
    values: np.ndarray      # float64[U, K]
    dense: float            # eval_fn(params), nothing pruned


def _resolve_unit(unit, groups_by_name, leaf_index):
    """-> ('group', ChannelGroup) or ('leaf', path)."""
    if isinstance(unit, ChannelGroup):
        return "group", unit
    if isinstance(unit, str) and unit in groups_by_name:
        return "group", groups_by_name[unit]
    path = masks_lib.as_path(unit)
    if path in leaf_index:
        return "leaf", path
    raise ValueError(
        f"sensitivity unit {unit!r} is neither a channel group "
        f"({sorted(groups_by_name) or 'no groups given'}) nor a param leaf path "
        f"(e.g. {[masks_lib.path_str(p) for p in list(leaf_index)[:4]]})")


def layer_sensitivity(eval_fn: Callable[[PyTree], Any], params: PyTree, scores: PyTree,
                      units: Sequence | None, keep_grid: Sequence[float], *,
                      groups: Sequence[ChannelGroup] | None = None,
                      reduce: str = "l1") -> SensitivityCurves:
    """Prune each unit ALONE (everything else dense) at each keep ratio and evaluate.

    Args:
      eval_fn: masked params -> scalar metric (accuracy or loss); a python callable that the
        caller may jit. Called 1 + len(units) * len(keep_grid) times.
      params: the dense params.
      scores: importance pytree shaped like params (e.g. `magnitude(params)`).
      units: param leaf paths (unstructured pruning of that leaf) and/or channel group names
        or ChannelGroups (channel pruning of that group, scores reduced with `reduce`).
        None: all groups if `groups` is given, else `masks.prunable_paths(params)`.
      keep_grid: keep ratios in (0, 1].
      groups: the model's channel groups (needed for group units).

    Returns SensitivityCurves; feed it to `sensitivity_to_keep`.
    """
    grid = np.asarray(keep_grid, np.float32)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(f"keep_grid must be a non-empty 1-D sequence; got {keep_grid!r}")
    masks_lib.check_keep_ratios(grid, "in keep_grid")
    groups = tuple(groups or ())
    groups_by_name = {g.name: g for g in groups}
    index, score_leaves, treedef = masks_lib.leaf_index(scores)
    if units is None:
        units = [g.name for g in groups] if groups else masks_lib.prunable_paths(params)
    resolved = [_resolve_unit(u, groups_by_name, index) for u in units]

    dense_masks = masks_lib.ones_like(params)
    dense_leaves = jax.tree.leaves(dense_masks)
    values = np.zeros((len(resolved), grid.size), np.float64)
    for ui, (kind, unit) in enumerate(resolved):
        if kind == "leaf":
            i = index[unit]
            rank = masks_lib.ranks(score_leaves[i]).reshape(jnp.shape(score_leaves[i]))
        else:
            cs = channel_scores(scores, (unit,), reduce)[unit.name]
            rank = masks_lib.ranks(cs)
        for j, keep in enumerate(grid):
            kept = rank < masks_lib.kept_count(jnp.float32(keep), rank.size)
            if kind == "leaf":
                leaves = list(dense_leaves)
                leaves[i] = kept
                unit_masks = jax.tree_util.tree_unflatten(treedef, leaves)
            else:
                unit_masks = masks_lib.channel_masks({unit.name: kept}, (unit,), params)
            values[ui, j] = float(eval_fn(masks_lib.apply(params, unit_masks)))
    names = tuple(u.name if k == "group" else u for k, u in resolved)
    return SensitivityCurves(units=names, keep_grid=grid, values=values,
                             dense=float(eval_fn(params)))


class SensitivityKeep(NamedTuple):
    keep_ratios: np.ndarray   # float32[U], in curves.units order
    tolerated_drop: float     # the delta that was chosen
    cost: float               # target_fn(keep_ratios)


def sensitivity_to_keep(curves: SensitivityCurves,
                        target_fn: Callable[[np.ndarray], float], budget: float, *,
                        higher_is_better: bool = True) -> SensitivityKeep:
    """Per-unit keep ratios from sensitivity curves that meet a cost budget.

    For a tolerated metric drop delta, each unit gets the smallest keep in the grid whose
    drop (dense - value if `higher_is_better`, else value - dense) is <= delta (keep 1.0 --
    the unit untouched -- always qualifies). Larger delta -> smaller keeps -> lower cost, so
    the smallest delta with `target_fn(keep_ratios) <= budget` is found by bisection over the
    measured drops (exact, no tolerance).

    Args:
      curves: from `layer_sensitivity`.
      target_fn: float32[U] keep ratios (curves.units order) -> cost, e.g. the MACs fraction
        `lambda k: cost_model.macs(k) / cost_model.dense_macs` (must not increase as keeps
        fall).
      budget: the largest allowed cost.

    Raises ValueError when even the smallest keeps in the grid exceed the budget.
    """
    grid = np.asarray(curves.keep_grid, np.float32)
    values = np.asarray(curves.values, np.float64)
    drops = curves.dense - values if higher_is_better else values - curves.dense
    order = np.argsort(grid, kind="stable")
    grid, drops = grid[order], drops[:, order]

    def keep_for(delta: float) -> np.ndarray:
        ok = drops <= delta
        first = np.where(ok.any(axis=1), ok.argmax(axis=1), -1)
        return np.where(first >= 0, grid[np.maximum(first, 0)], 1.0).astype(np.float32)

    def cost(keep):
        return float(target_fn(keep))

    deltas = np.unique(np.concatenate([[0.0], np.maximum(drops.ravel(), 0.0)]))
    hi_keep = keep_for(float(deltas[-1]))
    if cost(hi_keep) > budget:
        raise ValueError(
            f"budget {budget!r} is unreachable with keep_grid {grid.tolist()}: pruning every "
            f"unit to its smallest keep gives cost {cost(hi_keep)!r}; add smaller keep ratios")
    lo, hi = 0, len(deltas) - 1        # invariant: deltas[hi] meets the budget
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(keep_for(float(deltas[mid]))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    keep = keep_for(float(deltas[hi]))
    return SensitivityKeep(keep_ratios=keep, tolerated_drop=float(deltas[hi]), cost=cost(keep))
