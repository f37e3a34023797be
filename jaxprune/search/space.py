"""The search space: one keep ratio per prunable group, its bounds and its grid.

Every controller emits, and every evaluator consumes, a *keep-ratio vector* `float32[G]`:
entry g is the fraction of channel group g (or layer g) that is kept, in
`[lower[g], upper[g]] ⊂ (0, 1]`. A batch of K candidates is `float32[K, G]`.

`SearchSpace` is a **pytree**: `lower` and `upper` are its leaves (arrays, traced under
`jit`, converted by checkpoint restore), while `num_groups`, `step` and `names` are static
metadata held in the treedef. So it can sit inside a controller state, be passed to a jitted
function as an ordinary argument, and survive `jax.tree.map(np.asarray, state)`. It is also
hashable by value when its leaves are concrete, so it may be used as a static argument.

This module also defines the `Controller` interface shared by every search controller
(`reinforce`, `gan`, `evolution`, `random`, `uniform`; see `search.controllers`):

    state = controller.init(key, space)
    ratios = controller.ask(key, state, k)        # float32[k, G], within the space's bounds
    state = controller.tell(state, ratios, rewards)   # rewards float32[k], larger is better

All three are pure and jittable (`jax.jit(controller.ask, static_argnames="k")`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Union[jax.Array, np.ndarray, float, Sequence[float]]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("lower", "upper"),
    meta_fields=("num_groups", "step", "names"),
)
@dataclasses.dataclass(frozen=True, eq=False)
class SearchSpace:
    """Bounds (and optional grid) of the per-group keep ratios.

    Build it with `SearchSpace.create(...)`, which validates; the raw constructor does not
    (pytree unflattening calls it with placeholder leaves).

    Attributes:
      num_groups: G, the length of a keep-ratio vector (static).
      lower: float32[G], smallest keep ratio allowed per group, > 0 (pytree leaf).
      upper: float32[G], largest keep ratio allowed per group, <= 1 (pytree leaf).
      step: if set, keep ratios are snapped to multiples of `step` (static); None = continuous.
      names: optional group names, for error messages and reports (static).
    """

    num_groups: int
    lower: jax.Array
    upper: jax.Array
    step: Optional[float] = None
    names: Optional[Tuple[str, ...]] = None

    @classmethod
    def create(
        cls,
        num_groups: int,
        lower: ArrayLike = 0.1,
        upper: ArrayLike = 1.0,
        step: Optional[float] = None,
        names: Optional[Sequence[str]] = None,
    ) -> "SearchSpace":
        """Validated constructor. Scalars broadcast to all `num_groups` groups.

        Args:
          num_groups: number of groups G >= 1.
          lower: minimum keep ratio, scalar or [G]; each must be in (0, upper].
          upper: maximum keep ratio, scalar or [G]; each must be in [lower, 1].
          step: grid spacing in (0, 1], or None / 0 for a continuous space.
          names: optional G group names (used in error messages).

        Raises:
          ValueError: naming the offending group and value.
        """
        if isinstance(num_groups, bool) or int(num_groups) != num_groups or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}.")
        num_groups = int(num_groups)
        if names is not None:
            names = tuple(str(n) for n in names)
            if len(names) != num_groups:
                raise ValueError(
                    f"names has {len(names)} entries but num_groups is {num_groups}.")
        label = (lambda g: f"group {g} ({names[g]!r})") if names else (lambda g: f"group {g}")

        def _vector(value, what):
            arr = np.asarray(value, dtype=np.float64)
            if arr.ndim == 0:
                arr = np.full((num_groups,), float(arr))
            if arr.shape != (num_groups,):
                raise ValueError(
                    f"{what} must be a scalar or have shape ({num_groups},), got shape "
                    f"{arr.shape}.")
            for g, v in enumerate(arr):
                if not np.isfinite(v):
                    raise ValueError(f"{what} of {label(g)} is {v}; it must be finite.")
            return arr

        lo = _vector(lower, "lower")
        hi = _vector(upper, "upper")
        for g in range(num_groups):
            if lo[g] <= 0.0:
                raise ValueError(
                    f"lower keep ratio of {label(g)} is {lo[g]}; it must be > 0 "
                    "(a group cannot be removed entirely).")
            if hi[g] > 1.0:
                raise ValueError(
                    f"upper keep ratio of {label(g)} is {hi[g]}; it must be <= 1.")
            if lo[g] > hi[g]:
                raise ValueError(
                    f"lower keep ratio of {label(g)} is {lo[g]} > upper {hi[g]}; "
                    "need 0 < lower <= upper <= 1.")
        if step is not None:
            step = float(step)
            if step == 0.0:
                step = None
            elif not (0.0 < step <= 1.0):
                raise ValueError(f"step must be in (0, 1] or None/0, got {step}.")
        return cls(
            num_groups=num_groups,
            lower=jnp.asarray(lo, jnp.float32),
            upper=jnp.asarray(hi, jnp.float32),
            step=step,
            names=names,
        )

    # -- maps ------------------------------------------------------------------------------

    def _bounds(self, x: jax.Array):
        """`lower`, `upper` reshaped to broadcast against `x` of shape [..., G] (explicit ranks)."""
        if x.ndim < 1 or x.shape[-1] != self.num_groups:
            raise ValueError(
                f"keep-ratio array must have shape [..., {self.num_groups}] (one keep ratio per "
                f"group), got {x.shape}.")
        shape = (1,) * (x.ndim - 1) + (self.num_groups,)
        return (jnp.reshape(jnp.asarray(self.lower, jnp.float32), shape),
                jnp.reshape(jnp.asarray(self.upper, jnp.float32), shape))

    def clip(self, ratios: jax.Array) -> jax.Array:
        """Clips keep ratios `[..., G]` into `[lower, upper]` (float32)."""
        ratios = jnp.asarray(ratios, jnp.float32)
        lower, upper = self._bounds(ratios)
        return jnp.clip(ratios, lower, upper)

    def discretise(self, ratios: jax.Array) -> jax.Array:
        """Snaps keep ratios `[..., G]` to the nearest multiple of `step` inside the bounds.

        Values are rounded to the nearest multiple of `step`, then clamped to the smallest /
        largest multiple inside `[lower, upper]`. A group whose bounds contain no multiple of
        `step` is just clipped to its bounds. With `step=None` this is `clip`.
        """
        ratios = self.clip(ratios)
        if self.step is None:
            return ratios
        lower, upper = self._bounds(ratios)
        step = jnp.float32(self.step)
        eps = jnp.float32(1e-4)
        lo_q = jnp.ceil(lower / step - eps) * step
        hi_q = jnp.floor(upper / step + eps) * step
        snapped = jnp.clip(jnp.round(ratios / step) * step, lo_q, hi_q)
        snapped = jnp.where(lo_q <= hi_q, snapped, ratios)
        return self.clip(snapped)

    def to_unit(self, ratios: jax.Array) -> jax.Array:
        """Maps keep ratios `[..., G]` affinely to [0, 1]^G (0 where lower == upper)."""
        ratios = jnp.asarray(ratios, jnp.float32)
        lower, upper = self._bounds(ratios)
        width = upper - lower
        safe = jnp.where(width > 0, width, jnp.ones_like(width))
        unit = (ratios - lower) / safe
        return jnp.where(width > 0, unit, jnp.zeros_like(unit))

    def from_unit(self, unit: jax.Array) -> jax.Array:
        """Inverse of `to_unit`: [0, 1]^G -> `[lower, upper]` (input is clipped to [0, 1])."""
        unit = jnp.clip(jnp.asarray(unit, jnp.float32), 0.0, 1.0)
        lower, upper = self._bounds(unit)
        return lower + unit * (upper - lower)

    # -- hashing (static use) -------------------------------------------------------------

    def _key(self):
        return (self.num_groups, self.step, self.names,
                np.asarray(self.lower, np.float32).tobytes(),
                np.asarray(self.upper, np.float32).tobytes())

    def __eq__(self, other):
        if not isinstance(other, SearchSpace):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())


def check_num_candidates(k: Any) -> int:
    """Returns `k` as an int, or raises ValueError unless it is a static int >= 1."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(
            f"k (candidates per round) must be a static Python int >= 1, got {k!r}; "
            "under jax.jit pass it with static_argnames='k'.")
    if k < 1:
        raise ValueError(f"k (candidates per round) must be >= 1, got {k}.")
    return int(k)


def uniform_sample(key: jax.Array, space: SearchSpace, k: int) -> jax.Array:
    """Draws `k` keep-ratio vectors uniformly in the box, snapped to the grid: float32[k, G]."""
    k = check_num_candidates(k)
    unit = jax.random.uniform(key, (k, space.num_groups), jnp.float32)
    return space.discretise(space.from_unit(unit))


def check_ratios_rewards(space: SearchSpace, ratios: jax.Array, rewards: jax.Array):
    """Validates the shapes of a `tell`: ratios [k, G] and rewards [k]; returns float32 arrays."""
    ratios = jnp.asarray(ratios, jnp.float32)
    rewards = jnp.asarray(rewards, jnp.float32)
    if ratios.ndim != 2 or ratios.shape[1] != space.num_groups:
        raise ValueError(
            f"tell: ratios must have shape [k, {space.num_groups}] (keep ratio per group), "
            f"got {ratios.shape}.")
    if rewards.shape != (ratios.shape[0],):
        raise ValueError(
            f"tell: rewards must have shape [{ratios.shape[0]}] (one per candidate), got "
            f"{rewards.shape}.")
    return ratios, rewards


def finite_or(rewards: jax.Array, value: float) -> jax.Array:
    """Replaces NaN / inf rewards (failed evaluations) by `value`."""
    return jnp.where(jnp.isfinite(rewards), rewards, jnp.asarray(value, rewards.dtype))


class Controller(NamedTuple):
    """A search controller: three pure, jittable functions (the optax init/update pattern).

    Attributes:
      init: `init(key, space) -> state`; `state` is a pytree of arrays (plus the space).
      ask: `ask(key, state, k) -> float32[k, G]` keep ratios within the space's bounds
        (snapped to `space.step` if set); `k` is a static int >= 1.
      tell: `tell(state, ratios, rewards) -> state`; `ratios` float32[k, G] (the evaluated
        vectors, possibly moved by a budget projection), `rewards` float32[k], larger is
        better; non-finite rewards are treated as failed evaluations.
    """

    init: Callable[[jax.Array, SearchSpace], Any]
    ask: Callable[[jax.Array, Any, int], jax.Array]
    tell: Callable[[Any, jax.Array, jax.Array], Any]


def centered_ranks(rewards: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """Rank-based reward shaping: each reward's rank among the valid ones, mapped to [-0.5, 0.5].

    Invariant to any increasing transform of the rewards (scale, shift), so a learning rate
    means the same whether accuracies differ by 1e-1 or 1e-3. Ties share their mean rank;
    invalid entries (default: non-finite rewards) get 0 and do not count; a single valid reward
    gets 0.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    valid = jnp.isfinite(rewards) if valid is None else valid
    r = jnp.where(valid, rewards, 0.0)
    pair = valid[None, :] & valid[:, None]
    below = jnp.sum(pair & (r[None, :] < r[:, None]), axis=1).astype(jnp.float32)
    ties = jnp.sum(pair & (r[None, :] == r[:, None]), axis=1).astype(jnp.float32) - 1.0
    n = jnp.sum(valid.astype(jnp.float32))
    rank = (below + 0.5 * ties) / jnp.maximum(n - 1.0, 1.0)
    return jnp.where(valid & (n > 1), rank - 0.5, 0.0)


def keep_best(ratios: jax.Array, rewards: jax.Array, new_ratios: jax.Array,
              new_rewards: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The best `n` of incumbents ∪ new candidates (elitist survival; GA population, GAN elites).

    Incumbents come first, so on ties they survive (`lax.top_k` prefers the lower index).
    Returns (ratios [n, G], rewards [n]).
    """
    pool = jnp.concatenate([ratios, new_ratios], axis=0)
    pool_rewards = jnp.concatenate([rewards, new_rewards], axis=0)
    best, index = jax.lax.top_k(pool_rewards, n)
    return pool[index], best
