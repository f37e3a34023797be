"""Channel groups of any traced model, found from its jaxpr, and channel masks without a hook.

    discovery = discover_groups(apply_fn, variables, x)      # apply_fn(variables, x) -> outputs
    discovery.groups          # prunable `Group`s: every (leaf, axis) slice a channel indexes
    discovery.unprunable      # {group name: why it must not be pruned}
    discovery.channel_groups()                     # as `structure.ChannelGroup`s (zoo layout)
    masked_fn = mask_activations(apply_fn)         # masked_fn(variables, x, channel_masks)

`apply_fn(variables, x)` is traced once with `jax.make_jaxpr` (abstract values; nothing runs).
Calls (`jit`, `closed_call`, `custom_jvp_call`, `custom_vjp_call`, `remat`) are inlined into
one flat program. Each value then gets a *channel label*: which of its axes carries which
groups' channels. A `conv_general_dilated` or `dot_general` whose kernel is a param leaf
*produces* a new group on its output-feature axis. Labels follow values through
elementwise ops (a per-channel param leaf combined with a labelled value, such as a bias or
a BatchNorm scale / mean, joins the group on its axis), reductions and pooling over other
axes, transposes, reshapes (a flatten of (H, W, C) into H*W*C records the spatial factor:
channel c at position p is input index p * C + c), concatenation on the channel axis (each
operand's groups keep their offset), and residual adds (the two operands' groups are
*coupled*: union-find merges them into one group). A depthwise conv (`feature_group_count`
equal to its channels) passes its input's groups through and its kernel's output axis joins
them. A conv / dot whose input is labelled on the contracted axis *consumes* those channels:
the kernel's input axis (with offset and spatial factor) joins the group.

Attention: a kernel's first free axis of size > 1 produces the group, so a (D, heads,
head_dim) projection produces heads. A channel axis split into equal parts (a reshape of
(.., 3*H*hd) into (.., 3, H, hd), a `split` or slice of q / k / v) *refines* its group: the
channels are removed in blocks (head_dim wide, the same in each of the 3 parts), which
`Analysis.resolve` maps to the coarse group. A dot of two activations couples the groups on
its batch axes (the heads of q.k and p.v; grouped-query key / value heads take their query
heads along), passes channels on a free axis (a gate) and couples channels contracted on
both sides. A grouped conv refines its input and output groups into its groups (a channel
goes in every group at once); an embedding lookup (gather from a param table) produces an
unprunable group. Each primitive family is one rule in `_RULES`.

A group is marked unprunable, with the reason, when it feeds a model output (the logits);
when it goes through a primitive discovery does not follow (reductions over the channel
axis, slices into unequal parts, gathers, scans, ...); or when it is combined with a value
whose channel axis discovery cannot slice (the model input, a constant that varies over
channels). Those groups are reported, never dropped silently.

Hookless masks (`mask_activations`): the same flat program is evaluated with each group's
mask multiplied onto the inputs of its consumers (on the labelled axis, with offsets and
spatial factors). That is exactly what removing the channels computes, for any model; the
weights are shared, so `jax.vmap` over the masks batches only the activations. The program
is re-traced per input shape / train flag (cached), so it works inside `jit`, `vmap` and
`shard_map`. Gradients through the masked program use each primitive's own rule: custom
JVP / VJP rules of inlined calls are not kept (evaluation only).

This module never imports Flax.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from jaxprune import masks as masks_lib
from jaxprune.structure import ChannelGroup, Member, Path  # noqa: F401 (discover.Member)

# --------------------------------------------------------------------------------------------
# Members and groups (the result).


@dataclasses.dataclass(frozen=True)
class Group:
    """Channels removed together. `reason` is '' for a prunable group, else why it is not."""

    name: str
    size: int
    members: Tuple[Member, ...]
    reason: str = ""

    @property
    def producers(self) -> Tuple[Member, ...]:
        return tuple(m for m in self.members if m.role == "producer")

    @property
    def consumers(self) -> Tuple[Member, ...]:
        return tuple(m for m in self.members if m.role == "consumer")


class Discovery(NamedTuple):
    """What `discover_groups` found.

    Attributes:
      groups: the prunable groups, in order of their first producer in the program.
      unprunable: {group name: reason} for the groups that must not be pruned.
      blocked: those unprunable groups (their members, for inspection).
    """

    groups: Tuple[Group, ...]
    unprunable: Dict[str, str]
    blocked: Tuple[Group, ...]

    @property
    def all_groups(self) -> Tuple[Group, ...]:
        return self.groups + self.blocked

    def channel_groups(self, params_key: Optional[str] = "params",
                       stats_key: Optional[str] = "batch_stats") -> Tuple[ChannelGroup, ...]:
        """The prunable groups as `structure.ChannelGroup`s (paths relative to the subtrees).

        With `params_key` set, variables are `{params_key: params, stats_key: stats}` and
        members under `stats_key` become `stats`; with `params_key=None` the paths are used
        as they are and every per-channel leaf is a producer.

        Raises:
          ValueError naming the group and member a ChannelGroup cannot express (a channel
          axis that is not the last axis of a producer / -2 of a consumer, a concatenation
          offset, a channel-major flatten). Use this module's masks and `surgery.compact`.
          `inexpressible` names such groups; `params_groups` gives every group on params.
        """
        out = []
        for g in self.groups:
            producers, consumers, stats = [], [], []
            for m in g.members:
                path, under = m.path, None
                if params_key is not None:
                    under, path = m.path[0], m.path[1:]
                    if under not in (params_key, stats_key):
                        raise ValueError(f"group {g.name!r}: member {_fmt(m.path)!r} is in "
                                         f"neither {params_key!r} nor {stats_key!r}")
                plain = m.offset == 0 and m.period == g.size and m.inner == 1
                if m.role == "consumer":
                    if not plain or m.axis != m.ndim - 2:
                        raise ValueError(f"group {g.name!r}: consumer {_fmt(m.path)!r} (axis "
                                         f"{m.axis}, {m}) is not expressible as a ChannelGroup")
                    consumers.append((path, m.outer))
                else:
                    if not plain or m.outer != 1 or m.axis != m.ndim - 1:
                        raise ValueError(f"group {g.name!r}: {m.role} {_fmt(m.path)!r} (axis "
                                         f"{m.axis}, {m}) is not expressible as a ChannelGroup")
                    (stats if under is not None and under == stats_key else producers).append(path)
            out.append(ChannelGroup(g.name, g.size, producers=tuple(producers),
                                    consumers=tuple(consumers), stats=tuple(stats)))
        return tuple(out)


    def inexpressible(self, params_key: Optional[str] = "params",
                      stats_key: Optional[str] = "batch_stats") -> Dict[str, str]:
        """{group name: why} for the prunable groups a `ChannelGroup` cannot express (heads on
        a middle kernel axis, grouped convs, concatenation offsets)."""
        out = {}
        for g in self.groups:
            try:
                Discovery((g,), {}, ()).channel_groups(params_key, stats_key)
            except ValueError as e:
                out[g.name] = str(e)
        return out


_fmt = masks_lib.path_str

# --------------------------------------------------------------------------------------------
# The flat program: one list of equations with every call inlined.


class _Lit(NamedTuple):
    value: Any


class _Eqn(NamedTuple):
    prim: Any
    ins: tuple      # value ids (int) or _Lit
    outs: tuple     # value ids
    params: dict


class Program(NamedTuple):
    """A traced function as flat equations over integer value ids."""

    eqns: Tuple[_Eqn, ...]
    avals: Tuple[Any, ...]          # id -> abstract value (shape, dtype)
    invars: Tuple[int, ...]         # the flattened (variables, x) leaves
    outvars: Tuple[Any, ...]        # ids or _Lit
    consts: Dict[int, Any]
    var_paths: Tuple[Path, ...]     # paths of the variables leaves (first invars)
    out_tree: Any


# Call-like primitives and the param holding the jaxpr whose inputs are the eqn's inputs.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
          "remat": "jaxpr", "checkpoint": "jaxpr", "remat2": "jaxpr"}


def _inline(jaxpr, consts, in_refs, eqns, avals, const_vals):
    env = {}

    def new(aval):
        avals.append(aval)
        return len(avals) - 1

    def read(v):
        if isinstance(v, jax_core.Literal):
            return _Lit(v.val)
        return env[v]

    for cv, c in zip(jaxpr.constvars, consts):
        i = new(jax_core.get_aval(c) if hasattr(jax_core, "get_aval") else
                jax.ShapeDtypeStruct(np.shape(c), np.asarray(c).dtype))
        const_vals[i] = c
        env[cv] = i
    for v, r in zip(jaxpr.invars, in_refs):
        env[v] = r
    for eqn in jaxpr.eqns:
        ins = tuple(read(v) for v in eqn.invars)
        key = _CALLS.get(eqn.primitive.name)
        sub = eqn.params.get(key) if key else None
        if sub is not None:
            sub_jaxpr, sub_consts = ((sub.jaxpr, sub.consts)
                                     if isinstance(sub, jax_core.ClosedJaxpr) else (sub, ()))
            if len(sub_jaxpr.invars) == len(ins):
                outs = _inline(sub_jaxpr, sub_consts, ins, eqns, avals, const_vals)
                for ov, r in zip(eqn.outvars, outs):
                    env[ov] = r
                continue
        outs = tuple(new(ov.aval) for ov in eqn.outvars)
        for ov, r in zip(eqn.outvars, outs):
            env[ov] = r
        eqns.append(_Eqn(eqn.primitive, ins, outs, dict(eqn.params)))
    return tuple(read(v) for v in jaxpr.outvars)


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def trace(apply_fn: Callable, variables, example_input) -> Program:
    """The flat `Program` of `apply_fn(variables, x)` (abstract trace; nothing is run)."""
    leaves, _ = masks_lib.leaves_with_paths(variables)
    closed, out_shape = jax.make_jaxpr(apply_fn, return_shape=True)(
        _abstract(variables), _abstract(example_input))
    eqns: List[_Eqn] = []
    avals: List[Any] = []
    const_vals: Dict[int, Any] = {}
    invars = []
    for v in closed.jaxpr.invars:
        avals.append(v.aval)
        invars.append(len(avals) - 1)
    outs = _inline(closed.jaxpr, closed.consts, tuple(invars), eqns, avals, const_vals)
    return Program(tuple(eqns), tuple(avals), tuple(invars), outs, const_vals,
                   tuple(p for p, _ in leaves), jax.tree.structure(out_shape))


# --------------------------------------------------------------------------------------------
# Labels.


class Label(NamedTuple):
    """Channels on one axis: segments (group id, start, size) of a `period`-wide channel
    block, repeated `outer` times, each channel `inner` elements wide (see `Member`)."""

    axis: int
    segs: Tuple[Tuple[int, int, int], ...]
    period: int
    outer: int = 1
    inner: int = 1

    def moved(self, axis):
        return self._replace(axis=axis)

    @property
    def plain(self) -> bool:
        return self.outer == 1 and self.inner == 1


class _Info(NamedTuple):
    """What is known about one value.

    data: depends on the model input. label: its channel label (data values only).
    srcs: for non-data values, the param leaves it is computed from, each with a map from
      the value's axes to the leaf's axes (-1: not a leaf axis). vary: per axis, whether the
      value may vary along it (False for broadcast axes).
    """

    data: bool
    label: Optional[Label] = None
    srcs: frozenset = frozenset()
    vary: Tuple[bool, ...] = ()


_UNARY = frozenset({
    "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan",
    "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "abs", "sign", "floor",
    "ceil", "round", "sqrt", "rsqrt", "cbrt", "integer_pow", "square", "erf", "erfc", "erf_inv",
    "convert_element_type", "copy", "copy_p", "reduce_precision", "not", "is_finite", "real",
    "imag", "lgamma", "digamma", "sharding_constraint", "pvary", "stop_gradient",
    "optimization_barrier", "mesh_cast", "reshard",
})
_NARY = frozenset({
    "add", "add_any", "sub", "mul", "div", "max", "min", "pow", "rem", "atan2", "and", "or",
    "xor", "eq", "ne", "lt", "le", "gt", "ge", "select_n", "clamp", "nextafter",
})
_REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                     "reduce_or", "argmax", "argmin"})
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})


def _touched_axes(eqn, in_shape, out_shape) -> Optional[set]:
    """Axes a rank-preserving structural op acts on, or None when it is not one."""
    name, p = eqn.prim.name, eqn.params
    if name.startswith("reduce_window"):
        t = {a for a, w in enumerate(p["window_dimensions"]) if w != 1}
        t |= {a for a, s in enumerate(p["window_strides"]) if s != 1}
        t |= {a for a, pd in enumerate(p["padding"]) if tuple(pd) != (0, 0)}
        for k in ("base_dilation", "window_dilation"):
            t |= {a for a, d in enumerate(p.get(k) or ()) if d != 1}
        return t
    if name == "slice" or name == "dynamic_slice" or name == "pad":
        return {a for a, (i, o) in enumerate(zip(in_shape, out_shape)) if i != o} | (
            {a for a, c in enumerate(p["padding_config"]) if tuple(c) != (0, 0, 0)}
            if name == "pad" else set())
    if name == "rev":
        return set(p["dimensions"])
    if name in _CUMULATIVE:
        return {p["axis"]}
    return None


def _reshape_blocks(ins, outs):
    """[(in axes, out axes)] blocks of a reshape, size-1 axes left out (None: no blocks)."""
    ia = [a for a, d in enumerate(ins) if d != 1]
    oa = [a for a, d in enumerate(outs) if d != 1]
    blocks, i, j = [], 0, 0
    while i < len(ia) and j < len(oa):
        bi, bo = [ia[i]], [oa[j]]
        pi, po = ins[ia[i]], outs[oa[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po:
                if i >= len(ia):
                    return None
                bi.append(ia[i]); pi *= ins[ia[i]]; i += 1
            else:
                if j >= len(oa):
                    return None
                bo.append(oa[j]); po *= outs[oa[j]]; j += 1
        blocks.append((bi, bo))
    if i != len(ia) or j != len(oa):
        return None
    return blocks


class _UnionFind:
    def __init__(self):
        self.parent: List[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


class Site(NamedTuple):
    """A consumer input (equation index, operand index) and its label: masks go here."""

    eqn: int
    operand: int
    label: Label


class Analysis(NamedTuple):
    """Per-value labels of a `Program` and the groups they refer to (internal)."""

    program: Program
    info: Tuple[_Info, ...]
    uf: _UnionFind
    sizes: Tuple[int, ...]                 # group id -> size
    members: Tuple[Tuple[int, Member], ...]
    reasons: Tuple[Tuple[int, str], ...]
    sites: Tuple[Site, ...]
    names: Dict[int, str]                  # root group id -> name
    depthwise: frozenset                   # eqn indices of depthwise convs on labelled inputs
    coarse: Dict[int, Tuple[int, int, int]] = {}  # group id -> (root, outer, inner), below

    def resolve(self, gid: int) -> Tuple[int, int, int]:
        """`(root, outer, inner)`: group `gid`'s channel f is channel (f // inner) % size of
        the final group `root` (a group split into heads or into a grouped conv's groups is
        *refined*: its channels are removed in blocks of `inner`, the same in `outer` copies)."""
        return self.coarse.get(gid) or (self.uf.find(gid), 1, 1)

    def removed(self, gid: int, removed_by_root: Dict[int, int]) -> int:
        """How many of group `gid`'s channels go when its root loses `removed_by_root`."""
        root, outer, inner = self.resolve(gid)
        return removed_by_root.get(root, 0) * outer * inner

    def expand(self, gid: int, root_masks: Dict[int, Any]):
        """Group `gid`'s channel mask from its root's mask (None when the root has none)."""
        root, outer, inner = self.resolve(gid)
        m = root_masks.get(root)
        if m is None or (outer == 1 and inner == 1):
            return m
        m = jnp.repeat(jnp.asarray(m), inner) if inner > 1 else jnp.asarray(m)
        return jnp.tile(m, outer) if outer > 1 else m


class _State:
    """The analysis in progress: value infos, groups (union-find), members, reasons, sites.

    Rules (one per primitive family, `_RULES`) read the infos of an equation's inputs and
    return the infos of its outputs, recording groups, members, reasons and mask sites here.
    """

    def __init__(self, prog: Program):
        self.prog = prog
        self.avals = prog.avals
        self.info: List[Optional[_Info]] = [None] * len(prog.avals)
        self.uf = _UnionFind()
        self.sizes: List[int] = []
        self.members: List[Tuple[int, Member]] = []
        self.reasons: List[Tuple[int, str]] = []
        self.sites: List[Site] = []
        self.depthwise = set()
        self.refined: Dict[int, Tuple[int, int, int]] = {}  # root -> (coarser gid, outer, inner)
        self.made_by: Dict[int, int] = {}  # value id -> index of the equation that makes it
        n_vars = len(prog.var_paths)
        for k, i in enumerate(prog.invars):
            shape = self.avals[i].shape
            if k < n_vars:
                self.info[i] = _Info(False, None, frozenset({(k, tuple(range(len(shape))))}),
                                     tuple(d != 1 for d in shape))
            else:
                self.info[i] = _Info(True)
        for i, c in prog.consts.items():
            self.info[i] = _Info(False, None, frozenset(), tuple(d != 1 for d in np.shape(c)))

    def shape_of(self, r) -> tuple:
        return tuple(np.shape(r.value)) if isinstance(r, _Lit) else tuple(self.avals[r].shape)

    def get(self, r) -> _Info:
        if isinstance(r, _Lit):
            return _Info(False, None, frozenset(), tuple(d != 1 for d in np.shape(r.value)))
        return self.info[r]

    def poison(self, label: Optional[Label], reason: str) -> None:
        if label is not None:
            for gid, _, _ in label.segs:
                self.reasons.append((gid, reason))

    def new_group(self, size: int) -> int:
        self.sizes.append(size)
        return self.uf.add()

    def new_label(self, axis: int, size: int, leaf_axes=(), role: str = "producer") -> Label:
        """A label on `axis` for a new group of `size` channels, which `leaf_axes` join."""
        label = Label(axis, ((self.new_group(size), 0, size),), size)
        self.join(label, leaf_axes, role)
        return label

    def join(self, label: Label, leaf_axes, role: str) -> None:
        """Leaf axes `[(variables leaf index, leaf axis)]` join `label`'s groups as `role`."""
        for path_idx, leaf_axis in leaf_axes:
            ndim = len(self.avals[self.prog.invars[path_idx]].shape)
            for gid, start, _ in label.segs:
                self.members.append((gid, Member(self.prog.var_paths[path_idx], leaf_axis,
                                                 role, start, label.period, label.outer,
                                                 label.inner, ndim)))

    def consume(self, label: Label, leaf_axes, e: "_Eq", operand: int) -> None:
        """A kernel contracts `label`'s channels (operand `operand` of `e`): its leaf axes join
        as consumers and the operand is a mask site."""
        if not leaf_axes:
            self.poison(label, f"{e.where} contracts the channels with a kernel that is not a "
                               "param leaf axis")
        self.join(label, leaf_axes, "consumer")
        self.sites.append(Site(e.idx, operand, label))

    def union(self, a: int, b: int) -> None:
        """Merges groups a and b (and the coarser groups they were refined into)."""
        ra, rb = self.uf.find(a), self.uf.find(b)
        if ra == rb:
            return
        fa, fb = self.refined.pop(ra, None), self.refined.pop(rb, None)
        self.uf.union(ra, rb)
        root = self.uf.find(ra)
        if fa and fb:
            if fa[1:] != fb[1:]:
                self.reasons.append((root, f"its channels are split into blocks two ways "
                                           f"(outer, inner = {fa[1:]} and {fb[1:]})"))
            self.union(fa[0], fb[0])
        if fa or fb:
            self.refined[root] = fa or fb

    def couple(self, ref: Label, others: Sequence[Label]) -> None:
        """Merges the groups of labels laid out like `ref` (segment by segment)."""
        for lb in others:
            for (g1, _, _), (g2, _, _) in zip(ref.segs, lb.segs):
                self.union(g1, g2)

    def refine(self, lab: Label, outer: int, inner: int, axis: int) -> Optional[Label]:
        """`lab`'s channels regrouped into blocks: fine channel f = (o * n + c) * inner + i
        becomes channel c of a coarser group (n = period / (outer * inner)); the label of the
        coarse channels, on `axis`. None when the layout does not allow it."""
        if not lab.plain or lab.period % (outer * inner):
            return None
        full = len(lab.segs) == 1 and lab.segs[0][1:] == (0, lab.period)
        if outer > 1 and not full:
            return None
        if any(st_ % inner or sz % inner for _, st_, sz in lab.segs):
            return None
        segs = []
        for gid, st_, sz in lab.segs:
            n = sz // (outer * inner)
            root = self.uf.find(gid)
            old = self.refined.get(root)
            if old is not None and old[1:] != (outer, inner):
                return None
            if old is None:
                old = self.refined[root] = (self.new_group(n), outer, inner)
            segs.append((self.uf.find(old[0]), st_ // inner, n))
        return Label(axis, tuple(segs), lab.period // (outer * inner))

    def tie(self, r, label: Label) -> None:
        """Labels a value broadcast along the channel axis (a padding mask or a constant
        combined with the attention scores) and the elementwise ops between it and its
        broadcast, so that compaction gives the broadcast the new channel count."""
        if isinstance(r, _Lit) or self.avals[r].shape[label.axis] == 1:
            return
        self.info[r] = self.info[r]._replace(label=label)
        eqn = self.prog.eqns[self.made_by[r]] if r in self.made_by else None
        if eqn is not None and eqn.prim.name == "broadcast_in_dim" \
                and label.axis in eqn.params["broadcast_dimensions"]:
            self.tie(eqn.ins[0],
                     label.moved(list(eqn.params["broadcast_dimensions"]).index(label.axis)))
        elif eqn is not None and (eqn.prim.name in _UNARY or eqn.prim.name in _NARY):
            for x in eqn.ins:
                if not isinstance(x, _Lit) and len(self.avals[x].shape) == len(
                        self.avals[r].shape):
                    self.tie(x, label)

    def nondata_generic(self, ins, out_shape) -> _Info:
        srcs = frozenset((k, (-1,) * len(out_shape)) for x in ins for k, _ in self.get(x).srcs)
        return _Info(False, None, srcs, tuple(d != 1 for d in out_shape))


class _Eq(NamedTuple):
    """One equation as a rule sees it."""

    idx: int
    eqn: _Eqn
    name: str
    ins: List[_Info]
    in_shapes: List[tuple]
    out_shapes: List[tuple]
    labels: List[Label]
    any_data: bool
    where: str


def _leaf_axes(x: _Info, axis: int) -> List[Tuple[int, int]]:
    """`[(variables leaf index, leaf axis)]` that axis `axis` of non-data value `x` indexes."""
    return [(k, m[axis]) for k, m in x.srcs if m[axis] >= 0]


def _same_layout(labels: Sequence[Label]) -> bool:
    """Whether labels index their axes alike (segment offsets, period, outer, inner)."""
    ref = labels[0]
    key = (ref.period, ref.outer, ref.inner, [s[1:] for s in ref.segs])
    return all((lb.period, lb.outer, lb.inner, [s[1:] for s in lb.segs]) == key
               for lb in labels)


def _rule_unary(st: _State, e: _Eq) -> List[_Info]:
    if len(e.eqn.outs) != len(e.eqn.ins):
        return _rule_default(st, e)
    return list(e.ins)


def _rule_nary(st: _State, e: _Eq) -> List[_Info]:
    """Elementwise ops: labels must agree (and are coupled); per-channel params join them."""
    oshape = e.out_shapes[0]
    rank = len(oshape)
    if e.labels:
        labels = e.labels
        if len({lb.axis for lb in labels}) != 1 or not _same_layout(labels):
            for lb in labels:
                st.poison(lb, f"{e.where} combines values whose channels are laid out "
                              "differently")
            return [_Info(True)]
        ref = labels[0]
        st.couple(ref, labels[1:])
        a = ref.axis
        for r, x, s in zip(e.eqn.ins, e.ins, e.in_shapes):
            if x.label is not None or len(s) != rank or s[a] == 1:
                continue
            if x.vary and not x.vary[a]:  # broadcast along the channels
                st.tie(r, ref)
                continue
            if x.data:
                st.poison(ref, f"{e.where} combines the channels with a value discovery "
                               "cannot follow (the model input, or an unsupported op)")
                continue
            mapped = _leaf_axes(x, a)
            if x.vary[a] and not mapped:
                st.poison(ref, f"{e.where} combines the channels with a constant that "
                               "varies over them")
            st.join(ref, mapped, "param")
        return [_Info(True, ref)]
    if e.any_data:  # where the result varies (a padding mask broadcast over the heads)
        vary = [False] * rank
        for x, s in zip(e.ins, e.in_shapes):
            if len(s) == rank:
                xv = x.vary or tuple(d != 1 for d in s)
                vary = [v or (xv[a] and s[a] == oshape[a] != 1) for a, v in enumerate(vary)]
        return [_Info(True, None, frozenset(), tuple(vary))]
    srcs, vary = set(), [False] * rank
    for x, s in zip(e.ins, e.in_shapes):
        if len(s) != rank:
            continue
        for k, m in x.srcs:
            srcs.add((k, tuple(m[a] if s[a] == oshape[a] else -1 for a in range(rank))))
        vary = [v or (xv and s[a] == oshape[a]) for a, (v, xv) in enumerate(zip(vary, x.vary))]
    return [_Info(False, None, frozenset(srcs), tuple(vary))]


def _reshaped_label(lab: Label, blocks, s_in, s_out) -> Optional[Label]:
    """The label after a reshape, or None when discovery does not follow it."""
    blk = None if blocks is None else next((b for b in blocks if lab.axis in b[0]), None)
    if blk is None:
        return None
    bi, bo = blk
    if len(bi) == 1 and len(bo) == 1:
        return lab.moved(bo[0])
    if len(bo) == 1:  # a flatten: the axes before / after become outer / inner factors
        pos = bi.index(lab.axis)
        om = math.prod(s_in[a] for a in bi[:pos])
        im = math.prod(s_in[a] for a in bi[pos + 1:])
        return lab._replace(axis=bo[0], outer=lab.outer * om, inner=lab.inner * im)
    if len(bi) == 1:  # an unflatten of an earlier flatten
        sz = [s_out[a] for a in bo]
        for k in range(len(bo)):
            if (math.prod(sz[:k]) == lab.outer and sz[k] == lab.period
                    and math.prod(sz[k + 1:]) == lab.inner):
                return lab._replace(axis=bo[k], outer=1, inner=1)
    return None


def _split_label(st: _State, lab: Label, blocks, s_out) -> Optional[Label]:
    """A channel axis split into several axes, e.g. (B, S, 3*H*hd) -> (B, S, 3, H, hd): the
    channels move to the last-but-one new axis (the heads) in blocks of the last (head_dim);
    the axes before it repeat the blocks (q / k / v)."""
    blk = None if blocks is None else next((b for b in blocks if lab.axis in b[0]), None)
    if blk is None or len(blk[0]) != 1 or len(blk[1]) < 2:
        return None
    sz = [s_out[a] for a in blk[1]]
    k = len(sz) - 2
    return st.refine(lab, math.prod(sz[:k]), sz[k + 1], blk[1][k])


def _rule_reshape(st: _State, e: _Eq) -> List[_Info]:
    x, s_in, s_out = e.ins[0], e.in_shapes[0], e.out_shapes[0]
    blocks = _reshape_blocks(s_in, s_out)
    if x.data:
        lab = x.label
        if lab is None:
            return [_Info(True)]
        new = _reshaped_label(lab, blocks, s_in, s_out)
        if new is None:
            new = _split_label(st, lab, blocks, s_out)
        if new is None:
            st.poison(lab, f"{e.where} reshapes the channel axis in a way discovery "
                           f"does not follow ({s_in} -> {s_out})")
        return [_Info(True, new)]
    amap = {}
    vary = [False] * len(s_out)
    for bi, bo in (blocks or []):
        if len(bi) == 1 and len(bo) == 1:
            amap[bo[0]] = bi[0]
        for b in bo:
            vary[b] = any(x.vary[a] for a in bi)
    if blocks is None:
        vary = [d != 1 for d in s_out]
    srcs = frozenset((k, tuple(m[amap[a]] if a in amap else -1 for a in range(len(s_out))))
                     for k, m in x.srcs)
    return [_Info(False, None, srcs, tuple(vary))]


def _rule_broadcast(st: _State, e: _Eq) -> List[_Info]:
    x, s_in, s_out = e.ins[0], e.in_shapes[0], e.out_shapes[0]
    bd = e.eqn.params["broadcast_dimensions"]
    keep = {bd[a]: a for a in range(len(s_in)) if s_in[a] == s_out[bd[a]]}
    if x.data:
        lab = x.label
        if lab is not None and s_in[lab.axis] != s_out[bd[lab.axis]]:
            st.poison(lab, f"{e.where} broadcasts the channel axis")
            lab = None
        vary = tuple(a in keep and (not x.vary or x.vary[keep[a]]) for a in range(len(s_out)))
        return [_Info(True, None if lab is None else lab.moved(bd[lab.axis]), frozenset(), vary)]
    srcs = frozenset((k, tuple(m[keep[a]] if a in keep else -1 for a in range(len(s_out))))
                     for k, m in x.srcs)
    vary = tuple(a in keep and x.vary[keep[a]] for a in range(len(s_out)))
    return [_Info(False, None, srcs, vary)]


def _rule_transpose(st: _State, e: _Eq) -> List[_Info]:
    x, perm = e.ins[0], e.eqn.params["permutation"]
    if x.data:
        lab = x.label
        return [_Info(True, None if lab is None else lab.moved(perm.index(lab.axis)))]
    return [_Info(False, None, frozenset((k, tuple(m[p] for p in perm)) for k, m in x.srcs),
                  tuple(x.vary[p] for p in perm))]


def _rule_reduce(st: _State, e: _Eq) -> List[_Info]:
    x, axes = e.ins[0], tuple(e.eqn.params["axes"])
    remaining = [a for a in range(len(e.in_shapes[0])) if a not in axes]
    if x.data:
        lab = x.label
        if lab is not None and lab.axis in axes:
            st.poison(lab, f"{e.where} reduces over the channel axis")
            lab = None
        return [_Info(True, None if lab is None else lab.moved(remaining.index(lab.axis)))]
    return [_Info(False, None, frozenset((k, tuple(m[a] for a in remaining)) for k, m in x.srcs),
                  tuple(x.vary[a] for a in remaining))]


def _rule_concatenate(st: _State, e: _Eq) -> List[_Info]:
    dim = e.eqn.params["dimension"]
    labels = e.labels
    if labels and any(lb.axis == dim for lb in labels):
        segs, offset, ok = [], 0, True
        for x, s in zip(e.ins, e.in_shapes):
            if x.label is not None:
                if x.label.axis != dim or not x.label.plain:
                    ok = False
                segs += [(g, st_ + offset, sz) for g, st_, sz in x.label.segs]
            offset += s[dim]
        if ok:
            return [_Info(True, Label(dim, tuple(segs), offset))]
        for lb in labels:
            st.poison(lb, f"{e.where} concatenates channels laid out differently")
        return [_Info(True)]
    if labels:
        ref = labels[0]
        if len(labels) != len(e.ins) or any(lb.axis != ref.axis for lb in labels) or not \
                _same_layout([lb for lb in labels if lb.segs] or [ref]):
            for lb in labels:
                st.poison(lb, f"{e.where} concatenates channels with values laid out "
                              "differently")
            return [_Info(True)]
        st.couple(ref, labels[1:])
        return [_Info(True, ref)]
    if e.any_data:
        return [_Info(True)]
    return [st.nondata_generic(e.eqn.ins, e.out_shapes[0])]


def _operands(st: _State, e: _Eq):
    """(activation info, kernel info, activation operand index) of a dot / conv, or None
    (after poisoning) when it is not an activation times a param kernel."""
    x_info, k_info = e.ins
    x_idx = 0
    if not x_info.data and k_info.data:
        x_info, k_info, x_idx = k_info, x_info, 1
    if not k_info.data and not k_info.srcs:
        for lb in e.labels:
            st.poison(lb, f"{e.where} multiplies the channels with another activation")
        return None
    return x_info, k_info, x_idx


def _dot_positions(dims, shapes):
    """Per operand, (contracting axes, batch axes, {free axis: output axis})."""
    (lc, rc), (lb, rb) = dims
    free = [[a for a in range(len(s)) if a not in c and a not in b]
            for s, c, b in zip(shapes, (lc, rc), (lb, rb))]
    pos0 = {a: len(lb) + i for i, a in enumerate(free[0])}
    pos1 = {a: len(lb) + len(free[0]) + i for i, a in enumerate(free[1])}
    return (tuple(lc), tuple(lb), pos0), (tuple(rc), tuple(rb), pos1)


def _align_heads(st: _State, lab: Label, other: Label) -> Tuple[Label, Label]:
    """Grouped-query attention: query heads (H on one axis) against key / value heads
    repeated r times (G heads, each `inner` r wide). The query heads are refined into G blocks
    of r, so a group is one key / value head with its r query heads. Labels as they are when
    they do not have that shape."""
    for x, y, swap in ((lab, other, False), (other, lab, True)):
        if x.plain and y.outer == 1 and y.inner > 1 and x.period == y.period * y.inner:
            coarse = st.refine(x, 1, y.inner, x.axis)
            if coarse is not None:
                y = y._replace(inner=1)
                return (y, coarse) if swap else (coarse, y)
    return lab, other


def _dot_activations(st: _State, e: _Eq) -> List[_Info]:
    """A dot of two activations (attention scores q.k and context p.v). Channels on the batch
    axes (the heads) must be channels on both operands: their groups are coupled and the
    output keeps them. Channels on a free axis pass to the output (a gate scales them);
    channels contracted on both sides with one layout are coupled and masked on one side."""
    sides = _dot_positions(e.eqn.params["dimension_numbers"], e.in_shapes)
    labs = [x.label for x in e.ins]
    out_lab, done = None, False
    for i, (lab, (c, b, pos)) in enumerate(zip(labs, sides)):
        if lab is None or done:
            continue
        other, (oc, ob, _) = labs[1 - i], sides[1 - i]
        if lab.axis in pos:
            if out_lab is not None:
                st.poison(lab, f"{e.where} multiplies two values with channels on free axes")
                st.poison(out_lab, f"{e.where} multiplies two values with channels on free "
                                   "axes")
                out_lab = None
                continue
            out_lab = lab.moved(pos[lab.axis])
            continue
        axes, o_axes = (b, ob) if lab.axis in b else (c, oc)
        o_axis = o_axes[axes.index(lab.axis)]
        if other is not None and other.axis == o_axis and axes is b:
            lab, other = _align_heads(st, lab, other)
        if other is None or other.axis != o_axis or not _same_layout([lab, other]):
            st.poison(lab, f"{e.where} multiplies the channels with another activation whose "
                           "matching axis has no (or differently laid out) channels")
            st.poison(other, f"{e.where} multiplies the channels with another activation")
            done = True
            continue
        st.couple(lab, [other])
        done = True
        if axes is b:
            out_lab = labs[i].moved(axes.index(lab.axis))
        else:
            st.sites.append(Site(e.idx, i, lab))
    return [_Info(True, out_lab)]


def _rule_dot_general(st: _State, e: _Eq) -> List[_Info]:
    if not e.any_data:
        return [st.nondata_generic(e.eqn.ins, e.out_shapes[0])]
    if all(x.data for x in e.ins):
        return _dot_activations(st, e)
    ops = _operands(st, e)
    if ops is None:
        return [_Info(True)]
    x_info, k_info, x_idx = ops
    sides = _dot_positions(e.eqn.params["dimension_numbers"], e.in_shapes)
    (xc, xb, pos_x), (kc, kb, pos_k) = sides[x_idx], sides[1 - x_idx]
    lab = x_info.label
    new_lab = None
    if lab is not None:
        if lab.axis in xc:
            st.consume(lab, _leaf_axes(k_info, kc[xc.index(lab.axis)]), e, x_idx)
        elif lab.axis in pos_x:
            new_lab = lab.moved(pos_x[lab.axis])
        else:
            st.poison(lab, f"{e.where} uses the channel axis as a batch dimension")
    # A kernel's first free axis of size > 1 produces the channels: the output features of
    # a Dense, the heads of a (D, heads, head_dim) projection.
    ks = e.in_shapes[1 - x_idx]
    kfree = [a for a in pos_k if ks[a] != 1]
    if kfree:
        ka = kfree[0]
        mapped = _leaf_axes(k_info, ka)
        if mapped:
            if new_lab is not None:
                st.poison(new_lab, f"{e.where} keeps the channels on a free axis")
            new_lab = st.new_label(pos_k[ka], ks[ka], mapped)
    return [_Info(True, new_lab)]


def _grouped_conv(st: _State, e: _Eq, lab, k_in, k_out, fgc, in_ch, out_ch):
    """A grouped conv (ResNeXt, RegNet): the kernel's input axis is shared by the groups, so
    input channel i is removed in every group at once (the input group is refined into
    `fgc` copies of in_ch / fgc channels), and the output channels are removed the same way
    (each group keeps as many). `feature_group_count` is unchanged by compaction."""
    if lab is not None:
        coarse = st.refine(lab, fgc, 1, lab.axis)
        if coarse is None or not k_in:
            st.poison(lab, f"{e.where} is a grouped conv (feature_group_count={fgc}) over "
                           "channels laid out in a way discovery does not follow")
        else:
            st.join(coarse, k_in, "consumer")
            st.sites.append(Site(e.idx, 0, lab))
    if not k_out:
        return None
    out_spec = e.eqn.params["dimension_numbers"].out_spec
    new_lab = st.new_label(out_spec[1], out_ch, k_out)
    st.refine(new_lab, fgc, 1, out_spec[1])
    return new_lab


def _rule_conv(st: _State, e: _Eq) -> List[_Info]:
    if not e.any_data:
        return [st.nondata_generic(e.eqn.ins, e.out_shapes[0])]
    ops = _operands(st, e)
    if ops is None:
        return [_Info(True)]
    x_info, k_info, x_idx = ops
    dn = e.eqn.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    fgc = e.eqn.params["feature_group_count"]
    bgc = e.eqn.params["batch_group_count"]
    xs = e.in_shapes[0]
    in_ch, out_ch = xs[lhs_spec[1]], e.out_shapes[0][out_spec[1]]
    lab = x_info.label
    if x_idx != 0 or bgc != 1:
        st.poison(lab, f"{e.where} is a conv discovery does not follow "
                       f"(batch_group_count={bgc})")
        return [_Info(True)]
    new_lab = None
    k_out, k_in = _leaf_axes(k_info, rhs_spec[0]), _leaf_axes(k_info, rhs_spec[1])
    if lab is not None and (lab.axis != lhs_spec[1] or not lab.plain):
        st.poison(lab, f"{e.where} convolves over the channel axis")
        lab = None
    if fgc == 1:
        if lab is not None:
            st.consume(lab, k_in, e, 0)
        if k_out:
            new_lab = st.new_label(out_spec[1], out_ch, k_out)
    elif fgc != in_ch or in_ch != out_ch:
        new_lab = _grouped_conv(st, e, lab, k_in, k_out, fgc, in_ch, out_ch)
    elif lab is not None:
        # depthwise: output channel c reads input channel c only.
        new_lab = lab.moved(out_spec[1])
        st.join(lab, k_out, "param")
        st.depthwise.add(e.idx)
    elif k_out:  # depthwise over channels that cannot be pruned (e.g. the model input)
        new_lab = st.new_label(out_spec[1], out_ch, k_out, "param")
        st.poison(new_lab, f"{e.where} is a depthwise conv of a value whose "
                           "channels cannot be pruned")
    return [_Info(True, new_lab)]


def _rule_default(st: _State, e: _Eq) -> List[_Info]:
    """Rank-preserving structural ops (pooling, slicing, padding, ...) that leave the channel
    axis alone pass labels on; anything else poisons the labels it sees."""
    eqn = e.eqn
    touched = (_touched_axes(eqn, e.in_shapes[0], e.out_shapes[0])
               if len(eqn.ins) >= 1 and len(eqn.outs) == 1
               and len(e.in_shapes[0]) == len(e.out_shapes[0]) else None)
    if touched is not None and e.ins[0].data:
        lab = e.ins[0].label
        for x in e.ins[1:]:
            st.poison(x.label, f"{e.where} takes the channels as an index operand")
        if lab is not None and lab.axis in touched:
            st.poison(lab, f"{e.where} acts on the channel axis")
            lab = None
        return [_Info(True, lab)]
    if touched is not None and not e.any_data:
        x = e.ins[0]
        vary = tuple(v or a in touched for a, v in enumerate(x.vary))
        srcs = frozenset((k, tuple(-1 if a in touched else m[a] for a in range(len(m))))
                         for k, m in x.srcs)
        return [_Info(False, None, srcs, vary)]
    for lb in e.labels:
        st.poison(lb, f"the channels go through {e.where}, which discovery does not follow")
    if e.any_data:
        return [_Info(True) for _ in eqn.outs]
    return [st.nondata_generic(eqn.ins, s) for s in e.out_shapes]


def _rule_slice(st: _State, e: _Eq) -> List[_Info]:
    """A slice of the channel axis that takes one of n equal parts (q of a fused q/k/v
    projection, one half of a gated unit): the parts' channels are removed together."""
    lab, strides = e.ins[0].label, e.eqn.params.get("strides")
    if lab is None or (strides is not None and strides[lab.axis] != 1):
        return _rule_default(st, e)
    p = e.eqn.params
    start, width = p["start_indices"][lab.axis], e.out_shapes[0][lab.axis]
    size = e.in_shapes[0][lab.axis]
    if width == size:
        return [_Info(True, lab)]
    new = None
    if width > 1 and size % width == 0 and start % width == 0:
        new = st.refine(lab, size // width, 1, lab.axis)
    if new is None:
        return _rule_default(st, e)
    return [_Info(True, new)]


def _rule_split(st: _State, e: _Eq) -> List[_Info]:
    """`split` of the channel axis into equal parts (as `_rule_slice`)."""
    lab = e.ins[0].label
    sizes, axis = e.eqn.params["sizes"], e.eqn.params["axis"]
    if not e.ins[0].data:
        return [st.nondata_generic(e.eqn.ins, s) for s in e.out_shapes]
    if lab is None or lab.axis != axis:
        return [_Info(True, lab) for _ in e.eqn.outs]
    new = None
    if len(set(sizes)) == 1:
        new = st.refine(lab, len(sizes), 1, axis)
    if new is None:
        st.poison(lab, f"{e.where} splits the channel axis into unequal parts")
    return [_Info(True, new) for _ in e.eqn.outs]


def _rule_gather(st: _State, e: _Eq) -> List[_Info]:
    """An embedding lookup (rows of a param table gathered by data indices) produces a group
    on the table's last axis; it is reported unprunable (discovery does not prune embeddings:
    their width is the residual stream's)."""
    table, idx = e.ins[0], e.ins[1]
    dn = e.eqn.params["dimension_numbers"]
    last = len(e.in_shapes[0]) - 1
    if table.data or not idx.data or e.labels or not table.srcs or last in dn.collapsed_slice_dims \
            or e.eqn.params["slice_sizes"][last] != e.in_shapes[0][last]:
        return _rule_default(st, e)
    mapped = _leaf_axes(table, last)
    if not mapped:
        return _rule_default(st, e)
    lab = st.new_label(dn.offset_dims[-1], e.in_shapes[0][last], mapped)
    st.poison(lab, f"{e.where} is an embedding lookup (discovery does not prune embeddings)")
    return [_Info(True, lab)]


# {primitive name: rule}. A rule maps the infos of an equation's inputs to its outputs'.
_RULES: Dict[str, Callable[[_State, _Eq], List[_Info]]] = {
    **{n: _rule_unary for n in _UNARY},
    **{n: _rule_nary for n in _NARY},
    **{n: _rule_reduce for n in _REDUCE},
    "reshape": _rule_reshape, "squeeze": _rule_reshape, "expand_dims": _rule_reshape,
    "broadcast_in_dim": _rule_broadcast,
    "transpose": _rule_transpose,
    "concatenate": _rule_concatenate,
    "dot_general": _rule_dot_general,
    "conv_general_dilated": _rule_conv,
    "slice": _rule_slice,
    "split": _rule_split,
    "gather": _rule_gather,
}


def _coarse_member(m: Member, fine: int, outer: int, inner: int) -> Optional[Member]:
    """Member `m` of a group of `fine` channels as a member of the group it was refined into
    (see `Analysis.resolve`); None when its layout does not allow it."""
    if outer == 1 and m.offset % inner == 0 and m.period % inner == 0:
        return dataclasses.replace(m, offset=m.offset // inner, period=m.period // inner,
                                   inner=m.inner * inner)
    if m.offset == 0 and m.period == fine:
        return dataclasses.replace(m, period=fine // (outer * inner), outer=m.outer * outer,
                                   inner=m.inner * inner)
    return None


def _resolve(st: _State):
    """`(coarse, members, reasons)` with every group id mapped to its final group
    (`Analysis.resolve`), and members and reasons moved onto the final groups."""
    coarse: Dict[int, Tuple[int, int, int]] = {}

    def resolve(gid):
        root = st.uf.find(gid)
        if gid not in coarse:
            if root in st.refined:
                c, o, i = st.refined[root]
                r2, o2, i2 = resolve(c)
                coarse[gid] = (r2, o * o2, i2 * i)
            else:
                coarse[gid] = (root, 1, 1)
        return coarse[gid]

    for gid in range(len(st.sizes)):
        resolve(gid)
    reasons = [(coarse[g][0], r) for g, r in st.reasons]
    members = []
    for gid, m in st.members:
        root, outer, inner = coarse[gid]
        new = _coarse_member(m, st.sizes[gid], outer, inner) if (outer, inner) != (1, 1) else m
        if new is None:
            reasons.append((root, f"{_fmt(m.path)} (axis {m.axis}) cannot be cut in the blocks "
                                  f"its channels are split into ({outer} x {inner})"))
        else:
            members.append((root, new))
    return coarse, members, reasons


def _group_names(members) -> Dict[int, str]:
    """{root group id: name}: the first producer's leaf path (without a trailing 'kernel')."""
    names: Dict[int, str] = {}
    taken = set()
    for root, m in members:
        if root in names or m.role != "producer":
            continue
        path = m.path[:-1] if len(m.path) > 1 and m.path[-1] in ("kernel", "w", "weight") \
            else m.path
        name = "/".join(path)
        base, n = name, 1
        while name in taken:
            n += 1
            name = f"{base}#{n}"
        taken.add(name)
        names[root] = name
    return names


def _analyse(prog: Program) -> Analysis:
    """Labels every value of `prog` by applying each equation's rule (`_RULES`) in order."""
    st = _State(prog)
    for e_idx, eqn in enumerate(prog.eqns):
        ins = [st.get(r) for r in eqn.ins]
        name = eqn.prim.name
        e = _Eq(e_idx, eqn, name, ins, [st.shape_of(r) for r in eqn.ins],
                [tuple(st.avals[o].shape) for o in eqn.outs],
                [x.label for x in ins if x.label is not None], any(x.data for x in ins),
                f"{name} (equation {e_idx})")
        out = _RULES.get(name, _rule_default)(st, e)
        for o, x in zip(eqn.outs, out):
            st.info[o] = x
            st.made_by[o] = e_idx
    for r in prog.outvars:
        if not isinstance(r, _Lit):
            st.poison(st.info[r].label, "feeds a model output (the logits)")
    coarse, members, reasons = _resolve(st)
    return Analysis(prog, tuple(st.info), st.uf, tuple(st.sizes), tuple(members),
                    tuple(reasons), tuple(st.sites), _group_names(members),
                    frozenset(st.depthwise), coarse)


def _groups(an: Analysis) -> Tuple[Group, ...]:
    """The analysis' groups (one per union-find root), in order of their first producer."""
    uf = an.uf
    by_root: Dict[int, List[Member]] = {}
    for gid, m in an.members:
        lst = by_root.setdefault(uf.find(gid), [])
        if m not in lst:
            lst.append(m)
    why: Dict[int, List[str]] = {}
    for gid, r in an.reasons:
        lst = why.setdefault(uf.find(gid), [])
        if r not in lst:
            lst.append(r)
    out = []
    for root in sorted(by_root, key=lambda r: list(an.names).index(r) if r in an.names else 1e9):
        out.append(Group(an.names.get(root, f"group{root}"), an.sizes[root],
                         tuple(by_root[root]), "; ".join(why.get(root, []))))
    return tuple(out)


def discover_groups(apply_fn: Callable, variables, example_input) -> Discovery:
    """The channel groups of `apply_fn(variables, x)`, found from its jaxpr.

    Args:
      apply_fn: pure `apply_fn(variables, x) -> outputs`. Its outputs are treated as the
        logits: a group that reaches an output is unprunable. Return only the logits (for a
        train-mode function, not the updated BatchNorm statistics).
      variables: any pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. {'params': ...,
        'batch_stats': ...}); member paths are paths in it.
      example_input: an input (array or ShapeDtypeStruct, or a pytree of them) of the shapes
        to trace with; nothing is computed.

    Returns:
      `Discovery(groups, unprunable, blocked)`.
    """
    prog = trace(apply_fn, variables, example_input)
    groups = _groups(_analyse(prog))
    ok = tuple(g for g in groups if not g.reason)
    blocked = tuple(g for g in groups if g.reason)
    return Discovery(ok, {g.name: g.reason for g in blocked}, blocked)


# --------------------------------------------------------------------------------------------
# Groups of any layout on params (what `Pruner` uses for groups that a
# `structure.ChannelGroup` cannot express, such as attention heads and grouped convs;
# `masks.channel_scores` / `masks.channel_masks` take them as they take ChannelGroups).


def params_groups(discovery: Discovery, params_key: str = "params") -> Tuple[Group, ...]:
    """The prunable groups with member paths relative to `variables[params_key]`; members
    outside it (batch statistics) are left out."""
    return tuple(dataclasses.replace(g, members=tuple(
        dataclasses.replace(m, path=m.path[1:]) for m in g.members if m.path[0] == params_key))
        for g in discovery.groups)


def unit_width(group: Group, shapes: Dict[Path, tuple]) -> int:
    """Elements of a producer kernel that one channel spans beyond its own axis (a head's
    head_dim; 1 for a conv / dense output channel)."""
    widths = [m.inner * math.prod(shapes[m.path][m.axis + 1:]) for m in group.producers
              if len(shapes[m.path]) >= 2]
    return max(widths, default=1)


# --------------------------------------------------------------------------------------------
# Evaluating a program, with channel masks at the consumers.


def _read(env, r):
    return r.value if isinstance(r, _Lit) else env[r]


def mask_vector(label: Label, length: int, group_masks: Dict[int, Any], dtype):
    """The [length] multiplier of a labelled axis from per-group masks (None: all ones)."""
    segs = [(g, st, sz) for g, st, sz in label.segs if group_masks.get(g) is not None]
    if not segs:
        return None
    if len(label.segs) == 1 and label.plain and label.segs[0][1] == 0 \
            and label.segs[0][2] == label.period:
        return jnp.asarray(group_masks[label.segs[0][0]], dtype)
    pieces, pos = [], 0
    for g, st, sz in sorted(segs, key=lambda s: s[1]):
        if st > pos:
            pieces.append(jnp.ones((st - pos,), dtype))
        pieces.append(jnp.asarray(group_masks[g], dtype))
        pos = st + sz
    if pos < label.period:
        pieces.append(jnp.ones((label.period - pos,), dtype))
    vec = jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    if label.inner > 1:
        vec = jnp.repeat(vec, label.inner)
    if label.outer > 1:
        vec = jnp.tile(vec, label.outer)
    return vec


def _varying(x) -> frozenset:
    try:
        return frozenset(getattr(getattr(jax.typeof(x), "mat", None), "varying", ()) or ())
    except TypeError:
        return frozenset()


def _match_varying(ins):
    """Inside `shard_map`, casts inputs to the union of their varying manual axes (what
    `jax.numpy` / `lax` wrappers do before binding; `bind` alone does not)."""
    vmas = [_varying(x) for x in ins]
    union = frozenset().union(*vmas)
    if not union:
        return ins
    return [x if v == union else
            jax.lax.pcast(jnp.asarray(x), tuple(sorted(union - v)), to="varying")
            for x, v in zip(ins, vmas)]


def _apply_mask(x, label: Label, group_masks):
    vec = mask_vector(label, x.shape[label.axis], group_masks, x.dtype)
    if vec is None:
        return x
    view = [1] * x.ndim
    view[label.axis] = x.shape[label.axis]
    return jnp.multiply(x, vec.reshape(view))


def evaluate(prog: Program, flat_inputs: Sequence[Any], *, sites: Sequence[Site] = (),
             group_masks: Optional[Dict[int, Any]] = None,
             param_overrides: Optional[Dict[int, Dict[str, Any]]] = None,
             dynamic_params: Optional[Dict[int, Callable]] = None):
    """Runs `prog` on flat inputs (variables leaves then input leaves); flat outputs.

    `sites` with `group_masks` {group id: mask} multiply consumer inputs by the masks;
    `param_overrides` {eqn index: params} and `dynamic_params` {eqn index: fn(ins) -> params}
    replace equation params (used by compaction for new shapes).
    """
    env = dict(prog.consts)
    for i, v in zip(prog.invars, flat_inputs):
        env[i] = v
    at: Dict[int, List[Site]] = {}
    if group_masks:
        for s in sites:
            at.setdefault(s.eqn, []).append(s)
    masked = {}  # value id -> masked value: a value read by several consumers is masked once
    for e_idx, eqn in enumerate(prog.eqns):
        ins = [_read(env, r) for r in eqn.ins]
        for s in at.get(e_idx, ()):
            r = eqn.ins[s.operand]
            if r not in masked:
                masked[r] = _apply_mask(ins[s.operand], s.label, group_masks)
            ins[s.operand] = masked[r]
        params = eqn.params
        if param_overrides and e_idx in param_overrides:
            params = param_overrides[e_idx]
        if dynamic_params and e_idx in dynamic_params:
            params = dynamic_params[e_idx](ins, params)
        if len(ins) > 1:
            ins = _match_varying(ins)
        outs = eqn.prim.bind(*ins, **params)
        if not eqn.prim.multiple_results:
            outs = (outs,)
        for o, v in zip(eqn.outs, outs):
            env[o] = v
    return [_read(env, r) for r in prog.outvars]


def _spec_key(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)


def mask_activations(apply_fn: Callable) -> Callable:
    """`masked_fn(variables, x, channel_masks)`: `apply_fn(variables, x)` with channels masked.

    `channel_masks` is {group name: float[size]} for any subset of the groups that
    `discover_groups(apply_fn, variables, x)` names (prunable or not); each mask multiplies the
    inputs of the group's consumers, which is what removing the channels computes. The model
    needs no `channel_masks` argument. Jittable and vmappable over `channel_masks` (the
    weights stay shared). Traced once per input / variables shapes (cached).

    Raises:
      ValueError for an unknown group name or a mask of the wrong size.
    """
    cache: Dict[Any, Tuple[Program, Analysis, Dict[str, int]]] = {}

    def analysed(variables, x):
        key = _spec_key((variables, x))
        if key not in cache:
            prog = trace(apply_fn, variables, x)
            an = _analyse(prog)
            cache[key] = (prog, an, {name: root for root, name in an.names.items()})
        return cache[key]

    def masked_fn(variables, x, channel_masks=None):
        prog, an, ids = analysed(variables, x)
        group_masks = {}
        for name, m in (channel_masks or {}).items():
            if name not in ids:
                raise ValueError(f"channel_masks has unknown group {name!r}; the traced model's "
                                 f"groups are {sorted(ids)}")
            if np.shape(m) != (an.sizes[ids[name]],):
                raise ValueError(f"channel_masks[{name!r}] has shape {np.shape(m)}, expected "
                                 f"({an.sizes[ids[name]]},)")
            group_masks[ids[name]] = m
        site_masks = {g: an.expand(g, group_masks) for s in an.sites for g, _, _ in s.label.segs}
        flat = jax.tree.leaves((variables, x))
        outs = evaluate(prog, flat, sites=an.sites, group_masks=site_masks)
        return jax.tree.unflatten(prog.out_tree, outs)

    return masked_fn


def hookless_apply(apply_fn: Callable) -> Callable:
    """A zoo-style `apply(params, batch_stats, x, *, train, channel_masks=None)` built from an
    `apply_fn(params, batch_stats, x, *, train)` that takes no `channel_masks` argument.

    Group names are those of `discover_groups` on
    `lambda v, x: apply_fn(v['params'], v['batch_stats'], x, train=...)`, so pass the
    evaluator `discovery.channel_groups()`. Drop-in for `search.evaluate.make_evaluator`.
    """
    fns = {train: mask_activations(
        lambda v, x, train=train: apply_fn(v["params"], v["batch_stats"], x, train=train))
        for train in (False, True)}

    def apply(params, batch_stats, x, *, train: bool, channel_masks=None):
        return fns[bool(train)]({"params": params, "batch_stats": batch_stats}, x,
                                channel_masks)

    return apply
