"""What a (masked or compacted) model costs: MACs, parameters, bytes and latency.

MACs (multiply-accumulates) are counted from the model *as traced*: the apply function is
turned into a jaxpr (batch size 1, params as jaxpr inputs, nothing is compiled or run) and
every `conv_general_dilated` and `dot_general` in it, including those inside `jit`, `remat`,
`custom_jvp` / `custom_vjp`, `scan` and `cond` sub-jaxprs, contributes

    conv:  out_h * out_w * k_h * k_w * (in / feature_groups) * out     (per example)
    dot:   (output elements) * (contracted size)                        (per example)

Elementwise work (activations, BatchNorm, residual adds, pooling, softmax) is **not**
counted: these are the MACs of the conv and dense layers, the convention of the published
numbers (ResNet-20 ≈ 41M, ResNet-56 ≈ 125M, VGG-16-CIFAR ≈ 313M). Report them as "MACs".

Each conv / dot kernel operand is traced back to the param leaf it comes from (through
dtype casts, reshapes, transposes and calls; see `_VIEW_PRIMITIVES`), so with masks a
kernel's MACs are its dense MACs times nnz(mask) / mask.size — exactly
out_h·out_w·k_h·k_w·kept_in·kept_out for channel masks and "nonzero weights" for
unstructured masks. MACs of products that involve no param (e.g. attention scores) are
counted dense.

`CostModel` turns the same per-kernel MACs into jittable, vmappable functions of a keep-ratio
vector (one entry per channel group, or per prunable leaf for unstructured search), so that a
search can price thousands of candidates in-graph. Channels are counted as whole channels,
kept = clip(round(keep * size), 1, size), the rounding `masks.channel_keep` uses, so
`CostModel.macs(keep)` equals `count_macs(..., masks=<the corresponding channel masks>)`.

This module never imports Flax.
"""
from __future__ import annotations

import dataclasses
import fractions
import math
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from jaxprune import masks as masks_lib
from jaxprune.structure import ChannelGroup

Path = Tuple[str, ...]

# Primitives through which a kernel operand keeps its identity (same elements, same
# nonzero fraction): the output is traced back to the same param leaf as the first input.
_VIEW_PRIMITIVES = frozenset({
    "convert_element_type", "reshape", "copy", "copy_p", "transpose", "squeeze",
    "expand_dims", "rev", "reduce_precision", "sharding_constraint", "pvary",
    "mesh_cast", "reshard",
})
# Multi-operand identity primitives: output i is input i.
_IDENTITY_PRIMITIVES = frozenset({"device_put", "optimization_barrier"})

# Above this, costs are summed in float32 instead of exact int32 (see `CostModel`).
_INT32_LIMIT = 2 ** 31 - 1


# --------------------------------------------------------------------------------------
# pytree helpers
# --------------------------------------------------------------------------------------

def _flatten(tree) -> List[Tuple[Path, Any]]:
    """(path, leaf) pairs in tree-flatten order; paths are tuples of str."""
    return masks_lib.leaves_with_paths(tree)[0]


_fmt = masks_lib.path_str


def _shape(leaf) -> Tuple[int, ...]:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


def _dtype(leaf):
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(_shape(a), _dtype(a)), tree)


def _lead(arr, ndim: int):
    """`arr` [T] reshaped to [1, ..., 1, T] of rank `ndim` (explicit rank promotion)."""
    arr = jnp.asarray(arr)
    return arr.reshape((1,) * (ndim - 1) + arr.shape)


def _leaf_shapes(params) -> Dict[Path, Tuple[int, ...]]:
    return {path: _shape(leaf) for path, leaf in _flatten(params)}


def _mask_nnz(params, masks) -> Dict[Path, Tuple[int, int]]:
    """path -> (nonzero count, size) of each mask leaf, checked against params."""
    p_leaves = _flatten(params)
    m_leaves = _flatten(masks)
    p_paths = [p for p, _ in p_leaves]
    m_paths = [p for p, _ in m_leaves]
    if p_paths != m_paths:
        missing = sorted(set(map(_fmt, p_paths)) - set(map(_fmt, m_paths)))
        extra = sorted(set(map(_fmt, m_paths)) - set(map(_fmt, p_paths)))
        raise ValueError(
            "masks must have the same tree structure as params; "
            f"missing mask leaves: {missing[:5]}, unexpected mask leaves: {extra[:5]}.")
    out = {}
    for (path, leaf), (_, mask) in zip(p_leaves, m_leaves):
        if _shape(mask) != _shape(leaf):
            raise ValueError(
                f"mask for {_fmt(path)!r} has shape {_shape(mask)} but the param has shape "
                f"{_shape(leaf)}; masks must be shaped like their params.")
        try:
            mask = np.asarray(mask)
        except jax.errors.TracerArrayConversionError as err:
            raise ValueError(
                f"mask for {_fmt(path)!r} is traced; count_macs / count_params need concrete "
                "masks (use CostModel for costs inside jit / vmap).") from err
        out[path] = (int(np.count_nonzero(mask)), int(mask.size))
    return out


# --------------------------------------------------------------------------------------
# jaxpr walk
# --------------------------------------------------------------------------------------

def _is_var(v) -> bool:
    return not isinstance(v, jax_core.Literal)


def _size(aval) -> int:
    return int(math.prod(aval.shape))


def _eqn_macs(eqn) -> int:
    """MACs of one conv / dot eqn (batch size as traced)."""
    out = eqn.outvars[0].aval
    if eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        # kernel elements per output feature = k_h * k_w * in / feature_groups
        return _size(out) * (_size(rhs) // rhs.shape[out_feature_dim])
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    return _size(out) * int(math.prod(lhs.shape[d] for d in lhs_contract))


def _closed(jaxpr):
    """The Jaxpr of a Jaxpr or ClosedJaxpr (a ClosedJaxpr's consts are not operands)."""
    return jaxpr.jaxpr if isinstance(jaxpr, jax_core.ClosedJaxpr) else jaxpr


def _sub_jaxprs(value) -> List[Any]:
    if isinstance(value, (jax_core.ClosedJaxpr, jax_core.Jaxpr)):
        return [_closed(value)]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _walk(jaxpr, env: Dict[Any, Path], records: List[Tuple[Optional[Path], int]],
          mult: int) -> Dict[Any, Path]:
    """Appends (kernel leaf path or None, MACs) for every conv / dot; returns the var env."""
    env = dict(env)

    def leaf(v):
        return env.get(v) if _is_var(v) else None

    def call(sub, inner_in: Sequence[Any], outer_out: Sequence[Any], m: int, recs):
        inner_env = {iv: leaf(ov) for iv, ov in zip(sub.invars, inner_in) if leaf(ov) is not None}
        inner_env = _walk(sub, inner_env, recs, m)
        if len(sub.outvars) == len(outer_out):
            for iv, ov in zip(sub.outvars, outer_out):
                if _is_var(iv) and iv in inner_env:
                    env[ov] = inner_env[iv]

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("conv_general_dilated", "dot_general"):
            lhs, rhs = eqn.invars[:2]
            # The kernel is the rhs by convention (lax.conv, x @ w); fall back to the lhs.
            path = leaf(rhs) if leaf(rhs) is not None else leaf(lhs)
            records.append((path, _eqn_macs(eqn) * mult))
        elif name in _VIEW_PRIMITIVES:
            if eqn.invars and leaf(eqn.invars[0]) is not None:
                env[eqn.outvars[0]] = leaf(eqn.invars[0])
        elif name in _IDENTITY_PRIMITIVES:
            for iv, ov in zip(eqn.invars, eqn.outvars):
                if leaf(iv) is not None:
                    env[ov] = leaf(iv)
        elif name == "scan":
            body = _closed(eqn.params["jaxpr"])
            n_consts = eqn.params["num_consts"]
            # Only loop-invariant operands (consts) keep their identity inside the body.
            call(body, list(eqn.invars[:n_consts]) + [None] * (len(body.invars) - n_consts),
                 [], mult * int(eqn.params["length"]), records)
        elif name == "while":
            before = len(records)
            for key, n_key in (("cond_jaxpr", "cond_nconsts"), ("body_jaxpr", "body_nconsts")):
                sub = _closed(eqn.params[key])
                n = eqn.params[n_key]
                offset = 0 if key == "cond_jaxpr" else eqn.params["cond_nconsts"]
                consts = list(eqn.invars[offset:offset + n])
                call(sub, consts + [None] * (len(sub.invars) - n), [], mult, records)
            if any(m for _, m in records[before:]):
                warnings.warn("count_macs: a while_loop contains convs / dots; its trip count is "
                              "unknown, so its body is counted once.")
        elif name == "cond":
            # Count the most expensive branch (an upper bound; branches are data dependent).
            best: List[Tuple[Optional[Path], int]] = []
            for branch in eqn.params["branches"]:
                recs: List[Tuple[Optional[Path], int]] = []
                call(_closed(branch), eqn.invars[1:], [], mult, recs)
                if sum(m for _, m in recs) > sum(m for _, m in best):
                    best = recs
            records.extend(best)
        else:
            # Calls (jit, closed_call, remat, custom_jvp_call, custom_vjp_call, ...): their
            # sub-jaxpr's inputs are the eqn's inputs, one to one.
            subs = [s for v in eqn.params.values() for s in _sub_jaxprs(v)]
            for sub in subs:
                if len(sub.invars) == len(eqn.invars):
                    call(sub, eqn.invars, eqn.outvars, mult, records)
                else:  # unknown operand layout: count its MACs, without kernel identities
                    call(sub, [None] * len(sub.invars), [], mult, records)
    return env


def _kernel_macs(apply_fn: Callable, params, batch_stats, input_shape: Sequence[int],
                 input_dtype=jnp.float32) -> Tuple[Dict[Path, int], int]:
    """Dense per-example MACs: ({kernel leaf path: MACs}, MACs not tied to any param leaf)."""
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or any(d < 1 for d in input_shape):
        raise ValueError(
            f"input_shape must be the per-example shape without the batch axis, e.g. "
            f"(32, 32, 3), got {input_shape}.")
    x = jax.ShapeDtypeStruct((1,) + input_shape, input_dtype)

    def forward(p, s, x):
        return apply_fn(p, s, x, train=False)

    closed = jax.make_jaxpr(forward)(_abstract(params), _abstract(batch_stats), x)
    jaxpr = closed.jaxpr
    param_paths = [path for path, _ in _flatten(params)]
    env = {v: path for v, path in zip(jaxpr.invars[:len(param_paths)], param_paths)}
    records: List[Tuple[Optional[Path], int]] = []
    _walk(jaxpr, env, records, 1)
    per_leaf: Dict[Path, int] = {}
    fixed = 0
    for path, macs in records:
        if path is None:
            fixed += macs
        else:
            per_leaf[path] = per_leaf.get(path, 0) + macs
    return per_leaf, fixed


def _scaled(dense: int, nnz: int, size: int) -> int:
    """dense * nnz / size as an int (exact when dense is a multiple of size, as for kernels)."""
    return int(round(fractions.Fraction(dense * nnz, size)))


# --------------------------------------------------------------------------------------
# public counters
# --------------------------------------------------------------------------------------

def count_macs(apply_fn: Callable, params, batch_stats, input_shape: Sequence[int],
               masks=None, *, input_dtype=jnp.float32) -> int:
    """Per-example MACs of the conv and dense layers of `apply_fn`, from its jaxpr.

    Args:
      apply_fn: `apply(params, batch_stats, x, *, train)` (a `FunctionalModel.apply`).
      params, batch_stats: the model's pytrees (arrays or `jax.ShapeDtypeStruct`s).
      input_shape: the per-example input shape, without the batch axis, e.g. (32, 32, 3).
      masks: optional bool pytree shaped like `params`; a kernel's MACs are scaled by the
        fraction of its mask that is nonzero (channel masks: kept_in * kept_out channels;
        unstructured masks: nonzero weights). Must be concrete.
      input_dtype: the dtype `apply_fn` takes: float32 (images), int32 (token ids).

    Returns:
      MACs per example (int). Elementwise ops (activations, BN, adds, pooling) are not counted.
    """
    per_leaf, fixed = _kernel_macs(apply_fn, params, batch_stats, input_shape, input_dtype)
    if masks is None:
        return fixed + sum(per_leaf.values())
    nnz = _mask_nnz(params, masks)
    return fixed + sum(_scaled(macs, *nnz[path]) for path, macs in per_leaf.items())


def param_free_macs(apply_fn: Callable, params, batch_stats, input_shape: Sequence[int], *,
                    input_dtype=jnp.float32) -> int:
    """Per-example MACs of the products that no param leaf takes part in (attention's QK^T and
    AV); arguments as for `count_macs`."""
    return _kernel_macs(apply_fn, params, batch_stats, input_shape, input_dtype)[1]


def count_params(params, masks=None) -> int:
    """Number of parameters; with `masks`, the number of True (kept) mask entries."""
    if masks is None:
        return int(sum(math.prod(_shape(leaf)) for _, leaf in _flatten(params)))
    return int(sum(nnz for nnz, _ in _mask_nnz(params, masks).values()))


def param_bytes(params) -> int:
    """Bytes of all param leaves (size * itemsize; works on `ShapeDtypeStruct`s too)."""
    return int(sum(math.prod(_shape(leaf)) * _dtype(leaf).itemsize
                   for _, leaf in _flatten(params)))


def latency(fn: Callable, *args, warmup: int = 3, repeats: int = 20) -> Dict[str, float]:
    """Wall time of `fn(*args)` in milliseconds, after `warmup` calls (compilation).

    Each call is timed to `jax.block_until_ready` of its output.

    Returns:
      dict(median_ms, p10_ms, p90_ms, repeats).
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"latency: need warmup >= 0 and repeats >= 1, got warmup={warmup}, "
                         f"repeats={repeats}.")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = np.empty((repeats,), np.float64)
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[i] = (time.perf_counter() - start) * 1e3
    return dict(median_ms=float(np.median(times)), p10_ms=float(np.percentile(times, 10)),
                p90_ms=float(np.percentile(times, 90)), repeats=int(repeats))


# --------------------------------------------------------------------------------------
# cost models over keep-ratio vectors
# --------------------------------------------------------------------------------------

class _Terms:
    """A cost sum_t unit_t * f(in_t) * f(out_t) + fixed, f(idx) = kept[idx] (1 if idx < 0)."""

    def __init__(self, rows: Sequence[Tuple[int, int, int]], fixed: int):
        rows = list(rows)
        self.unit = np.asarray([r[0] for r in rows], np.int64).reshape(-1)
        self.in_idx = np.asarray([r[1] for r in rows], np.int32).reshape(-1)
        self.out_idx = np.asarray([r[2] for r in rows], np.int32).reshape(-1)
        self.fixed = int(fixed)

    def host(self, kept: np.ndarray) -> int:
        """Exact Python-int value for a concrete kept-count vector."""
        total = self.fixed
        for u, i, o in zip(self.unit, self.in_idx, self.out_idx):
            fi = int(kept[i]) if i >= 0 else 1
            fo = int(kept[o]) if o >= 0 else 1
            total += int(u) * fi * fo
        return total

    def __call__(self, kept: jax.Array, exact: bool) -> jax.Array:
        """Traced value for kept counts int32[..., G]; int32 if `exact` else float32."""
        dtype = jnp.int32 if exact else jnp.float32
        batch = kept.shape[:-1]
        if self.unit.size == 0:
            return jnp.full(batch, self.fixed, dtype)
        kept = kept.astype(dtype)
        nd = kept.ndim
        one = jnp.ones((), dtype)
        fin = jnp.where(_lead(self.in_idx >= 0, nd), kept[..., np.maximum(self.in_idx, 0)], one)
        fout = jnp.where(_lead(self.out_idx >= 0, nd),
                         kept[..., np.maximum(self.out_idx, 0)], one)
        terms = _lead(self.unit.astype(dtype), nd) * fin * fout
        return jnp.sum(terms, axis=-1, dtype=dtype) + jnp.asarray(self.fixed, dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class CostModel:
    """MACs and params of a model as functions of a keep-ratio vector `float32[..., G]`.

    Built by `cost_model` (channel groups) or `unstructured_cost_model` (one entry per prunable
    leaf). `macs(keep)` and `params(keep)` are jittable and vmappable (and accept leading batch
    axes directly); close over the `CostModel` (it is not a pytree).

    Entry g keeps `kept_g = clip(round(keep_g * size_g), 1, size_g)` whole channels (or
    weights): the rounding of `masks.channel_keep` / `masks.from_scores`, so the result equals
    `count_macs` / `count_params` with the corresponding masks. Costs are int32 (exact) when
    the dense cost fits in int32, else float32 (relative error ~1e-7).

    Attributes:
      kind: 'channel' or 'unstructured'.
      names: G entry names (group names, or '/'-joined leaf paths for 'unstructured').
      sizes: G channel counts (or leaf sizes).
      dense_macs, dense_params: costs with everything kept (keep = 1).
      min_macs, min_params: costs with every entry at its lower bound, 1 channel (or weight).
      fixed_macs, fixed_params: the parts no entry can change (e.g. unprunable layers).
    """

    kind: str
    names: Tuple[str, ...]
    sizes: Tuple[int, ...]
    dense_macs: int
    dense_params: int
    min_macs: int
    min_params: int
    fixed_macs: int
    fixed_params: int
    _macs_terms: _Terms = dataclasses.field(repr=False)
    _params_terms: _Terms = dataclasses.field(repr=False)

    @property
    def num_groups(self) -> int:
        return len(self.sizes)

    def kept(self, keep: jax.Array) -> jax.Array:
        """Whole channels (weights) kept per entry: int32[..., G]."""
        keep = jnp.asarray(keep, jnp.float32)
        if keep.ndim < 1 or keep.shape[-1] != self.num_groups:
            raise ValueError(
                f"keep must have shape [..., {self.num_groups}] (one keep ratio per "
                f"{'group' if self.kind == 'channel' else 'prunable leaf'}: "
                f"{list(self.names)[:6]}...), got shape {keep.shape}.")
        sizes = _lead(np.asarray(self.sizes, np.float32), keep.ndim)
        kept = jnp.clip(jnp.round(keep * sizes), 1.0, sizes)
        return kept.astype(jnp.int32)

    def macs(self, keep: jax.Array) -> jax.Array:
        """Per-example MACs for keep ratios `[..., G]` (int32 if exact, else float32)."""
        return self._macs_terms(self.kept(keep), self.dense_macs <= _INT32_LIMIT)

    def params(self, keep: jax.Array) -> jax.Array:
        """Parameter count for keep ratios `[..., G]` (int32 if exact, else float32)."""
        return self._params_terms(self.kept(keep), self.dense_params <= _INT32_LIMIT)

    def macs_exact(self, keep) -> int:
        """`macs` for one concrete keep vector, as an exact Python int (host side)."""
        return self._macs_terms.host(np.asarray(self.kept(keep)))

    def params_exact(self, keep) -> int:
        """`params` for one concrete keep vector, as an exact Python int (host side)."""
        return self._params_terms.host(np.asarray(self.kept(keep)))


def _unit(total: int, divisor: int, what: str) -> int:
    if divisor <= 0 or total % divisor:
        raise ValueError(
            f"{what}: {total} is not a multiple of {divisor}; the cost cannot be written "
            "per kept channel (is a kernel's in / out axis not its axis -2 / -1?).")
    return total // divisor


def _finish(kind, names, sizes, macs_rows, macs_fixed, params_rows, params_fixed) -> CostModel:
    macs_terms = _Terms(macs_rows, macs_fixed)
    params_terms = _Terms(params_rows, params_fixed)
    full = np.asarray(sizes, np.int64)
    ones = np.ones_like(full)
    return CostModel(
        kind=kind, names=tuple(names), sizes=tuple(int(s) for s in sizes),
        dense_macs=macs_terms.host(full), dense_params=params_terms.host(full),
        min_macs=macs_terms.host(ones), min_params=params_terms.host(ones),
        fixed_macs=int(macs_fixed), fixed_params=int(params_fixed),
        _macs_terms=macs_terms, _params_terms=params_terms)


def cost_model(apply_fn: Callable, params, batch_stats, input_shape: Sequence[int],
               groups: Sequence[ChannelGroup], *, input_dtype=jnp.float32,
               channel_macs: Optional[Sequence[int]] = None) -> CostModel:
    """Channel cost model: MACs / params as functions of one keep ratio per group.

    A kernel listed as a producer of group o and a consumer of group i costs
    `unit * kept_i * kept_o` MACs, where unit = dense MACs / (size_i * size_o) (a flattened
    consumer's `spatial` factor is part of unit); other producer leaves (biases, BN) scale
    with their producer group; leaves in no group are fixed. Every group is read through its
    members (`masks.group_members`). `keep` is float32[G] in `groups` order.

    Args:
      apply_fn, params, batch_stats, input_shape, input_dtype: as for `count_macs`.
      groups: the model's `ChannelGroup`s, or `discover.Group`s (members on any axis, as
        `discover.params_groups` gives them); each leaf may produce at most one group and
        consume at most one group (a member listed twice in one group counts once).
      channel_macs: per group (in `groups` order), the MACs per kept channel that no param
        leaf carries (attention's QK^T and AV shrink with the heads kept; `param_free_macs`
        measures them): taken off the fixed MACs, they scale with the group's kept count.

    Raises:
      ValueError: a group names a missing leaf, an axis size disagrees with the group size, or
        a leaf is in two groups on the same axis.
    """
    groups = tuple(groups)
    shapes = _leaf_shapes(params)
    index = {path: i for i, path in enumerate(shapes)}
    producer: Dict[Path, int] = {}  # 'producer' / 'param' members scale with their group
    consumer: Dict[Path, int] = {}
    for g, group in enumerate(groups):
        for _, m in masks_lib.group_members(group, index, list(shapes.values())):
            path, role = tuple(m.path), ("consumer" if m.role == "consumer" else "producer")
            table = consumer if role == "consumer" else producer
            if table.get(path, g) != g:
                raise ValueError(f"{_fmt(path)!r} is a {role} of both "
                                 f"{groups[table[path]].name!r} and {group.name!r}.")
            table[path] = g

    def row(path: Path, total: int, what: str):
        i, o = consumer.get(path, -1), producer.get(path, -1)
        divisor = (groups[i].size if i >= 0 else 1) * (groups[o].size if o >= 0 else 1)
        return (_unit(total, divisor, f"{what} of {_fmt(path)!r}"), i, o)

    per_leaf, macs_fixed = _kernel_macs(apply_fn, params, batch_stats, input_shape,
                                         input_dtype)
    macs_rows = []
    for path, macs in per_leaf.items():
        if path in producer or path in consumer:
            macs_rows.append(row(path, macs, "MACs"))
        else:
            macs_fixed += macs
    for g, per_channel in enumerate(channel_macs or ()):
        if int(per_channel) > 0:
            macs_rows.append((int(per_channel), g, -1))
            macs_fixed -= int(per_channel) * groups[g].size
    if macs_fixed < 0:
        raise ValueError(f"channel_macs {list(channel_macs)} exceed the MACs that no param leaf "
                         "carries; measure them with param_free_macs.")
    params_rows, params_fixed = [], 0
    for path, shape in shapes.items():
        size = int(math.prod(shape))
        if path in producer or path in consumer:
            params_rows.append(row(path, size, "size"))
        else:
            params_fixed += size
    return _finish("channel", [g.name for g in groups], [g.size for g in groups],
                   macs_rows, macs_fixed, params_rows, params_fixed)


def _default_prunable(path: Path, leaf) -> bool:
    """The contract's `masks.default_prunable`: leaves with ndim >= 2 (kernels)."""
    del path
    return len(_shape(leaf)) >= 2


def unstructured_cost_model(apply_fn: Callable, params, batch_stats,
                            input_shape: Sequence[int],
                            prunable_fn: Optional[Callable[[Path, Any], bool]] = None, *,
                            input_dtype=jnp.float32) -> CostModel:
    """Layer-wise unstructured cost model: one keep ratio per prunable leaf.

    Entry l (in `masks.prunable_paths` order: tree-flatten order of the leaves with
    `prunable_fn(path, leaf)` true) keeps kept_l = clip(round(keep_l * size_l), 1, size_l)
    weights; MACs = fixed + sum_l dense_macs_l * kept_l / size_l, params = fixed + sum_l kept_l.

    Args:
      apply_fn, params, batch_stats, input_shape, input_dtype: as for `count_macs`.
      prunable_fn: `(path, leaf) -> bool`; defaults to `leaf.ndim >= 2` (as
        `masks.default_prunable`).
    """
    prunable_fn = _default_prunable if prunable_fn is None else prunable_fn
    leaves = _flatten(params)
    paths = [path for path, leaf in leaves if prunable_fn(path, leaf)]
    if not paths:
        raise ValueError("unstructured_cost_model: no param leaf is prunable under prunable_fn.")
    index = {path: l for l, path in enumerate(paths)}
    shapes = _leaf_shapes(params)
    sizes = [int(math.prod(shapes[p])) for p in paths]

    per_leaf, macs_fixed = _kernel_macs(apply_fn, params, batch_stats, input_shape,
                                         input_dtype)
    macs_rows = []
    for path, macs in per_leaf.items():
        if path in index:
            l = index[path]
            macs_rows.append((_unit(macs, sizes[l], f"MACs of {_fmt(path)!r}"), -1, l))
        else:
            macs_fixed += macs
    params_rows = [(1, -1, l) for l in range(len(paths))]
    params_fixed = sum(int(math.prod(s)) for p, s in shapes.items() if p not in index)
    return _finish("unstructured", [_fmt(p) for p in paths], sizes,
                   macs_rows, macs_fixed, params_rows, params_fixed)
