"""Projection of keep-ratio vectors onto a FLOPs (MACs) or params budget.

A controller proposes keep ratios without knowing what they cost; `project` moves each vector
onto the budget before it is evaluated, so every candidate the search scores is one it could
return. The projection scales the whole vector by one scalar,

    keep'(alpha) = clip(alpha * clip(keep, lower, upper), lower, upper)        (alpha >= 0)

(snapped down to the `step` grid when one is given). This family is monotone: every entry is
non-decreasing in alpha, and so is any cost that grows with the number of kept channels
(MACs, params). alpha = 0 is the cheapest vector (every group at its lower bound),
alpha = 1 is the proposal itself, and a large enough alpha puts every group at its upper bound.
Scaling keeps the *shape* of the proposal (which groups it favours) — the thing a controller
learns — and changes only its overall size, which the budget fixes anyway.

`project` bisects alpha for the largest value whose cost is within the budget, in a fixed
number of iterations, so it is jittable and vmappable. The invariant of the bisection is that
the lower end is always within budget, so (whenever the budget is feasible at all, see
`check_feasible`) every returned vector satisfies `cost_fn(keep') <= budget` exactly.

With `fill=True` (the default) a proposal that is already *below* the budget is scaled *up*
until the budget is used: a cheaper candidate wastes capacity that the budget allows, and
comparing candidates of equal cost makes their accuracies comparable. With `fill=False` such a
proposal is returned unchanged (clipped to the bounds).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Union[jax.Array, np.ndarray, float]
CostFn = Callable[[jax.Array], jax.Array]

_INT32_MAX_F32 = 2147483520.0  # the largest float32 below 2**31


class InfeasibleBudgetError(ValueError):
    """The budget is below the cheapest vector the search space allows."""


def _within(cost: jax.Array, budget) -> jax.Array:
    """cost <= budget, exact for integer costs (compared with floor(budget) as an integer)."""
    cost = jnp.asarray(cost)
    if jnp.issubdtype(cost.dtype, jnp.integer):
        if isinstance(budget, (int, float, np.integer, np.floating)):
            bound = math.floor(budget)
            info = jnp.iinfo(cost.dtype)
            if bound >= info.max:
                return jnp.ones(cost.shape, bool)
            if bound < info.min:
                return jnp.zeros(cost.shape, bool)
            return cost <= jnp.asarray(bound, cost.dtype)
        bound = jnp.clip(jnp.floor(jnp.asarray(budget, jnp.float32)), -_INT32_MAX_F32,
                         _INT32_MAX_F32)
        return cost.astype(jnp.int32) <= bound.astype(jnp.int32)
    return cost <= budget


def _family(keep0: jax.Array, alpha: jax.Array, lower, upper, step):
    scaled = alpha * keep0
    if step is not None:
        scaled = jnp.floor(scaled / step + 1e-5) * step
    return jnp.clip(scaled, lower, upper)


def _project_one(keep, cost_fn, budget, lower, upper, iters, fill, step):
    keep0 = jnp.clip(keep, lower, upper)
    if step is not None:  # the proposal itself must lie on the grid too
        keep0 = _family(keep0, jnp.float32(1.0), lower, upper, step)

    def ok(alpha):
        return _within(cost_fn(_family(keep0, alpha, lower, upper, step)), budget)

    keep0_ok = _within(cost_fn(keep0), budget)
    # alpha at which every entry reaches its upper bound.
    alpha_max = jnp.maximum(jnp.max(upper / jnp.maximum(keep0, 1e-6)), 1.0)
    if fill:
        lo = jnp.where(keep0_ok, 1.0, 0.0)
        hi = jnp.where(keep0_ok, alpha_max, 1.0)
    else:
        lo, hi = jnp.float32(0.0), jnp.float32(1.0)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (jnp.asarray(lo, jnp.float32),
                                                jnp.asarray(hi, jnp.float32)))
    alpha = jnp.where(ok(hi), hi, lo)
    projected = _family(keep0, alpha, lower, upper, step)
    if fill:
        # alpha = 1 reproduces keep0 only up to the step snap; keep the proposal itself then.
        projected = jnp.where(keep0_ok & (alpha == 1.0), keep0, projected)
        return projected
    return jnp.where(keep0_ok, keep0, projected)


def project(keep: jax.Array, cost_fn: CostFn, budget: ArrayLike, lower: ArrayLike,
            upper: ArrayLike = 1.0, iters: int = 30, *, fill: bool = True,
            step=None) -> jax.Array:
    """Moves keep-ratio vectors onto the budget `cost_fn(keep) <= budget`.

    Args:
      keep: float32[G], or a batch float32[K, G] (projected independently, via vmap).
      cost_fn: jittable cost of ONE vector, `float32[G] -> scalar` (e.g. `CostModel.macs`),
        non-decreasing in every entry.
      budget: the absolute budget (e.g. `Budget.absolute(cost_model)`), same units as cost_fn.
      lower, upper: per-group bounds, scalars or [G] (e.g. `space.lower`, `space.upper`).
      iters: bisection steps on alpha (alpha is resolved to range * 2**-iters).
      fill: if True, proposals below budget are scaled up to use it (see module doc); if
        False they are returned unchanged (clipped to the bounds).
      step: optional grid, a scalar or per-group [G] (e.g. `channel_multiple / group_size`
        so kept channel counts are multiples of 8, which CPU and GPU kernels need to run
        fast); scaled vectors are snapped *down* to multiples of `step` (then clipped to the
        bounds), which keeps the family monotone and the budget satisfied.

    Returns:
      float32 keep ratios shaped like `keep`, within [lower, upper], with
      `cost_fn(result) <= budget` whenever `cost_fn(lower) <= budget` (see `check_feasible`;
      otherwise every entry is at `lower`, the cheapest vector).
    """
    keep = jnp.asarray(keep, jnp.float32)
    lower = jnp.asarray(lower, jnp.float32)
    upper = jnp.asarray(upper, jnp.float32)
    if keep.ndim not in (1, 2):
        raise ValueError(f"project: keep must be float32[G] or [K, G], got shape {keep.shape}.")
    g = keep.shape[-1]
    for name, bound in (("lower", lower), ("upper", upper)):
        if bound.ndim > 1 or (bound.ndim == 1 and bound.shape[0] != g):
            raise ValueError(f"project: {name} must be a scalar or shape ({g},), got "
                             f"{bound.shape}.")
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 1:
        raise ValueError(f"project: iters must be a positive int, got {iters!r}.")
    if step is not None:
        step_np = np.asarray(step, np.float32)
        if step_np.ndim > 1 or (step_np.ndim == 1 and step_np.shape[0] != g) or \
                not np.all((step_np > 0.0) & (step_np <= 1.0)):
            raise ValueError(f"project: step must be None or in (0, 1], a scalar or shape ({g},); "
                             f"got {step}.")
    lower = jnp.broadcast_to(lower, (g,))
    upper = jnp.broadcast_to(upper, (g,))
    one = functools.partial(_project_one, cost_fn=cost_fn, budget=budget, lower=lower,
                            upper=upper, iters=int(iters), fill=bool(fill),
                            step=None if step is None else jnp.asarray(step, jnp.float32))
    if keep.ndim == 2:
        return jax.vmap(one)(keep)
    return one(keep)


def realised_fraction(keep: jax.Array, cost_fn: CostFn, dense_cost) -> jax.Array:
    """cost_fn(keep) / dense_cost as float32; keep [G] -> scalar, [K, G] -> [K]."""
    keep = jnp.asarray(keep, jnp.float32)
    fn = jax.vmap(cost_fn) if keep.ndim == 2 else cost_fn
    return jnp.asarray(fn(keep), jnp.float32) / jnp.float32(dense_cost)


def check_feasible(cost_fn: CostFn, lower: ArrayLike, budget: float, *,
                   num_groups: int | None = None, dense_cost=None) -> float:
    """Raises InfeasibleBudgetError if even every group at `lower` exceeds `budget`.

    Host-side check (not jittable); run it once before a search.

    Args:
      cost_fn: cost of one keep vector.
      lower: the lower bounds, [G] (or a scalar with `num_groups`).
      budget: the absolute budget.
      num_groups: G, needed when `lower` is a scalar.
      dense_cost: the unpruned cost; defaults to `cost_fn(ones)`.

    Returns:
      The minimum achievable cost as a fraction of the dense cost.
    """
    lower = np.asarray(lower, np.float32)
    if lower.ndim == 0:
        if num_groups is None:
            raise ValueError("check_feasible: lower is a scalar; pass num_groups=G.")
        lower = np.full((num_groups,), float(lower), np.float32)
    ones = jnp.ones(lower.shape, jnp.float32)
    dense = float(cost_fn(ones) if dense_cost is None else dense_cost)
    min_cost = float(cost_fn(jnp.asarray(lower)))
    min_fraction = min_cost / dense if dense > 0 else 0.0
    if not bool(_within(cost_fn(jnp.asarray(lower)), float(budget))):
        raise InfeasibleBudgetError(
            f"budget {float(budget):.6g} ({float(budget) / dense:.2%} of the dense cost "
            f"{dense:.6g}) cannot be met: with every group at its lower keep ratio "
            f"(min {lower.min():.3g}, max {lower.max():.3g}) the cost is {min_cost:.6g} "
            f"({min_fraction:.2%} of dense). Allow a budget fraction >= {min_fraction:.4f} "
            f"(prune.sparsity <= {1.0 - min_fraction:.4f}) or lower the bound (search.lower).")
    return min_fraction


@dataclasses.dataclass(frozen=True)
class Budget:
    """A budget as a fraction of the dense cost.

    Attributes:
      kind: 'macs' or 'params' (config `prune.target`).
      fraction: fraction of the dense cost allowed, in (0, 1]
        (= 1 - `prune.sparsity`; see `Budget.from_sparsity`).
    """

    kind: str
    fraction: float

    def __post_init__(self):
        if self.kind not in ("macs", "params"):
            raise ValueError(f"Budget kind must be 'macs' or 'params', got {self.kind!r}.")
        if not (0.0 < float(self.fraction) <= 1.0):
            raise ValueError(
                f"Budget fraction is the fraction of the dense cost kept and must be in (0, 1], "
                f"got {self.fraction!r}.")

    @classmethod
    def from_sparsity(cls, kind: str, sparsity: float) -> "Budget":
        """Budget removing `sparsity` (fraction in [0, 1)) of the dense cost."""
        if not (0.0 <= float(sparsity) < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}.")
        return cls(kind, 1.0 - float(sparsity))

    def cost_fn(self, cost_model) -> CostFn:
        """`cost_model.macs` or `cost_model.params`."""
        return cost_model.macs if self.kind == "macs" else cost_model.params

    def dense(self, cost_model) -> int:
        return cost_model.dense_macs if self.kind == "macs" else cost_model.dense_params

    def absolute(self, cost_model) -> float:
        """The budget in MACs or params: fraction * dense cost of `cost_model`."""
        return float(self.fraction) * float(self.dense(cost_model))
