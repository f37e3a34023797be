"""Physically smaller models from discovered channel groups, for any traced model.

    small_fn, small_vars = compact(apply_fn, variables, discovery, keep)
    small_fn(small_vars, x)  ==  mask_activations(apply_fn)(variables, x, keep as masks)
    modelio.save_compact(directory, small_fn, small_vars, x)   # jaxprune.save_compact

Every member of a group (`discover.Member`) is sliced on its axis: producers' output axes,
per-channel leaves, consumers' input axes (with the offsets of concatenations and the
spatial factor of flattens). The compact *program* is the user's function re-traced at the
original widths and evaluated with new shapes: every equation that names a shape
(`reshape`, `broadcast_in_dim`, ...) gets the shape its output has once the channels are
gone, and depthwise convs get their new `feature_group_count`. So `apply_fn` itself need not
accept smaller params (Flax Linen modules check param shapes against their init; NNX and
plain functions often would, but nothing relies on it). Limits: the groups must come from
the same `apply_fn` and variable shapes; the program is re-traced per input shape (cached);
gradients through inlined `custom_jvp` / `custom_vjp` calls use the primal's rules.

Saving the compact program and variables (`jax.export`) is `modelio.save_compact`.

This module never imports Flax.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import discover as dlib
from jaxprune import masks as masks_lib
from jaxprune import structure

_SHAPE_PARAMS = ("new_sizes", "shape")


def _group_list(groups) -> Tuple[dlib.Group, ...]:
    if isinstance(groups, dlib.Discovery):
        return groups.all_groups
    return tuple(groups)


def _check_keep(keep, groups) -> Dict[str, np.ndarray]:
    """{group name: bool[size]} validated; groups not named keep everything."""
    by_name = {g.name: g for g in groups}
    unknown = sorted(set(keep) - set(by_name))
    if unknown:
        raise ValueError(f"keep names unknown group(s) {unknown}; groups: {sorted(by_name)}")
    out = {}
    for name, value in keep.items():
        g = by_name[name]
        arr = structure._keep_vector(name, g.size, value)
        if not arr.all() and g.reason:
            raise ValueError(f"group {name!r} cannot be pruned: {g.reason}")
        out[name] = arr
    return out


def slice_variables(variables, groups, keep):
    """`variables` with the channels that `keep` drops removed from every member leaf."""
    groups = _group_list(groups)
    keep = _check_keep(keep, groups)
    leaves, treedef = masks_lib.leaves_with_paths(variables)
    index = {p: i for i, (p, _) in enumerate(leaves)}
    axis_keep: Dict[Tuple[int, int], np.ndarray] = {}
    for g in groups:
        if g.name not in keep or keep[g.name].all():
            continue
        dropped = np.flatnonzero(~keep[g.name])
        for m in g.members:
            i = index[tuple(m.path)]
            shape = np.shape(leaves[i][1])
            vec = axis_keep.setdefault((i, m.axis), np.ones((shape[m.axis],), bool))
            vec[m.indices(dropped)] = False
    new = [leaf for _, leaf in leaves]
    for (i, axis), vec in sorted(axis_keep.items()):
        kept = np.flatnonzero(vec)
        if isinstance(new[i], jax.core.Tracer):
            new[i] = jnp.take(new[i], kept, axis=axis)
        else:  # on the host: an eager jnp.take would compile once per shape
            new[i] = jnp.asarray(np.take(np.asarray(new[i]), kept, axis=axis))
    return jax.tree.unflatten(treedef, new)


def _scaled(index, old, new):
    """A slice bound on an axis whose channels were cut in proportion (equal parts)."""
    return tuple(i * n // o for i, o, n in zip(index, old, new))


# {slicing primitive: fn(params, old input shape, new input shape, new output shapes) ->
# the params that name shapes}: the slices discovery follows take equal parts of an axis.
_SLICES = {
    "slice": lambda p, old, new, outs: dict(
        start_indices=_scaled(p["start_indices"], old, new),
        limit_indices=_scaled(p["limit_indices"], old, new)),
    "dynamic_slice": lambda p, old, new, outs: dict(slice_sizes=outs[0]),
    "split": lambda p, old, new, outs: dict(sizes=tuple(o[p["axis"]] for o in outs)),
}


def _rewrites(an: dlib.Analysis, removed: Dict[int, int], new_leaf_shapes):
    """{eqn index: params} with new shapes, and {eqn index: fn} for depthwise convs."""
    prog, info = an.program, an.info

    def new_shape(vid):
        shape = list(prog.avals[vid].shape)
        x = info[vid]
        if x.data or x.label is not None:
            lab = x.label
            if lab is not None:
                gone = sum(an.removed(g, removed) for g, _, _ in lab.segs)
                shape[lab.axis] = lab.outer * (lab.period - gone) * lab.inner
        else:
            for k, amap in x.srcs:
                for a, leaf_axis in enumerate(amap):
                    if leaf_axis >= 0 and shape[a] == prog.avals[prog.invars[k]].shape[leaf_axis]:
                        shape[a] = new_leaf_shapes[k][leaf_axis]
        return tuple(shape)

    overrides, dynamic = {}, {}
    for e_idx, eqn in enumerate(prog.eqns):
        for key in _SHAPE_PARAMS:
            if key in eqn.params and len(eqn.outs) == 1:
                shape = new_shape(eqn.outs[0])
                if shape != tuple(prog.avals[eqn.outs[0]].shape):
                    overrides[e_idx] = {**eqn.params, key: shape}
        if eqn.prim.name in _SLICES and not isinstance(eqn.ins[0], dlib._Lit):
            old_in, new_in = tuple(prog.avals[eqn.ins[0]].shape), new_shape(eqn.ins[0])
            outs = [new_shape(o) for o in eqn.outs]
            if new_in != old_in or any(o != tuple(prog.avals[v].shape)
                                       for o, v in zip(outs, eqn.outs)):
                overrides[e_idx] = {**eqn.params,
                                    **_SLICES[eqn.prim.name](eqn.params, old_in, new_in, outs)}
        if e_idx in an.depthwise:
            feature = eqn.params["dimension_numbers"].lhs_spec[1]
            dynamic[e_idx] = lambda ins, p, f=feature: {**p, "feature_group_count":
                                                       ins[0].shape[f]}
    return overrides, dynamic


def compact(apply_fn: Callable, variables, groups, keep) -> Tuple[Callable, Any]:
    """`(compact_apply_fn, compact_variables)`: the model with the dropped channels removed.

    Args:
      apply_fn: `apply_fn(variables, x)`, the function `groups` were discovered on.
      variables: its (dense) variables, concrete arrays.
      groups: the `discover.Discovery` (or its groups) of `apply_fn` at these variables.
      keep: {group name: bool[size]}; groups not named are kept whole. Unprunable groups
        must be kept whole. Concrete (the output shapes depend on it).

    Returns:
      `compact_apply_fn(compact_variables, x)` (pure, jittable; any batch size) computes what
      `discover.mask_activations(apply_fn)(variables, x, keep)` computes.

    Raises:
      ValueError for unknown groups, wrong sizes, a group with nothing kept, or pruning a
      group that discovery marked unprunable (with its reason).
    """
    groups = _group_list(groups)
    keep = _check_keep(keep, groups)
    removed_by_name = {n: int((~k).sum()) for n, k in keep.items()}
    small = slice_variables(variables, groups, keep)
    dense_spec = dlib._abstract(variables)
    new_leaf_shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(small)]
    cache: Dict[Any, Any] = {}

    def prepared(x):
        key = dlib._spec_key(x)
        if key not in cache:
            prog = dlib.trace(apply_fn, dense_spec, x)
            an = dlib._analyse(prog)
            removed = {}
            for root, name in an.names.items():
                if removed_by_name.get(name):
                    removed[root] = removed_by_name[name]
            missing = sorted(n for n, r in removed_by_name.items()
                             if r and n not in an.names.values())
            if missing:
                raise ValueError(f"groups {missing} are not in apply_fn traced at input "
                                 f"{key[1]}; compact with groups discovered on this apply_fn")
            cache[key] = (prog, *_rewrites(an, removed, new_leaf_shapes))
        return cache[key]

    def compact_apply_fn(compact_variables, x):
        prog, overrides, dynamic = prepared(x)
        flat = jax.tree.leaves((compact_variables, x))
        outs = dlib.evaluate(prog, flat, param_overrides=overrides, dynamic_params=dynamic)
        return jax.tree.unflatten(prog.out_tree, outs)

    compact_apply_fn.widths = {g.name: int(keep[g.name].sum()) if g.name in keep else g.size
                               for g in groups}
    return compact_apply_fn, small


def save(*args, **kwargs):
    """Moved to `modelio.save_compact` (`jaxprune.save_compact`); kept for older scripts."""
    from jaxprune import modelio
    return modelio.save_compact(*args, **kwargs)


def load(*args, **kwargs):
    """Moved to `modelio.load_compact` (`jaxprune.load_compact`); kept for older scripts."""
    from jaxprune import modelio
    return modelio.load_compact(*args, **kwargs)
