"""When to prune and how much: one-shot, gradual (polynomial), iterative magnitude pruning.

A `Schedule` is a plain jittable function step -> sparsity (`schedule(step)`), plus
`schedule.is_update(step)` saying on which steps the masks are recomputed and, for IMP, the
step whose weights are rewound to after each pruning round. The training loop calls
`update_masks(step, params, masks, schedule)` every step (inside jit is fine): on update steps
it recomputes the masks from weight magnitude at the scheduled sparsity, otherwise it returns
the masks unchanged. Masks only ever shrink: a pruned weight is never resurrected.

Never imports Flax.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune import checks
from jaxprune import masks as masks_lib
from jaxprune.structure import ChannelGroup

PyTree = Any
# `prune.schedule`: the threshold method pruned at once, along `polynomial` while fine-tuning,
# or in `imp` rounds with rewinding (the pipeline's `finish` dispatches on these names).
SCHEDULES = ("oneshot", "gradual", "imp")
# `prune.imp_rounds`: the `rounds` of `imp` (the pipeline's `finish` passes it); `config_checks`
# reads these checks.
CONFIG_CHECKS = {"prune.schedule": checks.choice(SCHEDULES)}
OPTIONAL_CONFIG_CHECKS = {"prune.imp_rounds": checks.integer(1)}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """step -> sparsity (jittable), and the steps on which masks are updated.

    Attributes:
      sparsity_fn: step (int array) -> float32 sparsity in [0, 1).
      update_fn: step -> bool array, True on steps where masks are recomputed.
      rewind_step: IMP only: after each pruning step, unpruned weights are reset to their
        values at this step (`rewind`); None for schedules without rewinding.
    """
    sparsity_fn: Callable[[Any], jax.Array]
    update_fn: Callable[[Any], jax.Array]
    rewind_step: int | None = None

    def __call__(self, step) -> jax.Array:
        return self.sparsity_fn(step)

    def is_update(self, step) -> jax.Array:
        return self.update_fn(step)


def _check_sparsity(value: float, name: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} is a sparsity (fraction removed) and must be in "
                         f"[0, 1)")


def one_shot(sparsity: float, *, step: int = 0) -> Schedule:
    """Sparsity 0 before `step`, `sparsity` from `step` on; masks are set once, at `step`."""
    _check_sparsity(sparsity, "sparsity")
    at = int(step)

    def sparsity_fn(t):
        return jnp.where(jnp.asarray(t) >= at, jnp.float32(sparsity), jnp.float32(0.0))

    def update_fn(t):
        return jnp.asarray(t) == at

    return Schedule(sparsity_fn, update_fn)


def polynomial(final_sparsity: float, *, begin_step: int, end_step: int, frequency: int = 1,
               initial_sparsity: float = 0.0, power: int = 3) -> Schedule:
    """Gradual pruning of Zhu & Gupta (2017):

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3,   t = t0, t0 + dt, ..., t0 + n dt

    with t0 = begin_step, dt = frequency, t0 + n dt = end_step. Masks are updated on
    t0, t0 + dt, ... and on end_step; between updates the sparsity holds at the last update's
    value, before t0 it is s_i and after end_step s_f.
    """
    _check_sparsity(final_sparsity, "final_sparsity")
    _check_sparsity(initial_sparsity, "initial_sparsity")
    begin, end, freq = int(begin_step), int(end_step), int(frequency)
    if end <= begin or freq < 1:
        raise ValueError(f"polynomial schedule needs begin_step < end_step and frequency >= 1; "
                         f"got begin_step={begin_step}, end_step={end_step}, "
                         f"frequency={frequency}")

    def sparsity_fn(t):
        t = jnp.asarray(t, jnp.int32)
        last = begin + ((t - begin) // freq) * freq            # last update step <= t
        last = jnp.where(t >= end, end, jnp.clip(last, begin, end))
        frac = (last - begin).astype(jnp.float32) / jnp.float32(end - begin)
        s = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** power
        return jnp.asarray(s, jnp.float32)

    def update_fn(t):
        t = jnp.asarray(t, jnp.int32)
        on_grid = ((t - begin) % freq == 0) | (t == end)
        return (t >= begin) & (t <= end) & on_grid

    return Schedule(sparsity_fn, update_fn)


def imp(rounds: int, prune_fraction: float, *, round_steps: int,
        rewind_step: int = 0) -> Schedule:
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

    Round r (r = 0 .. rounds-1) trains for `round_steps` steps; at its end (step
    (r + 1) * round_steps) a fraction `prune_fraction` of the still-unpruned weights is
    removed, and the survivors are rewound to their values at `rewind_step` (`rewind`).
    Sparsity at step t: 1 - (1 - prune_fraction) ** min(t // round_steps, rounds).
    """
    if rounds < 1 or round_steps < 1:
        raise ValueError(f"imp needs rounds >= 1 and round_steps >= 1; got rounds={rounds}, "
                         f"round_steps={round_steps}")
    if not 0.0 < prune_fraction < 1.0:
        raise ValueError(f"prune_fraction={prune_fraction!r} (fraction of the remaining weights "
                         f"removed per round) must be in (0, 1)")
    if not 0 <= rewind_step < round_steps:
        raise ValueError(f"rewind_step={rewind_step} must be in [0, round_steps={round_steps})")
    rounds, round_steps = int(rounds), int(round_steps)

    def sparsity_fn(t):
        done = jnp.clip(jnp.asarray(t, jnp.int32) // round_steps, 0, rounds)
        return (1.0 - jnp.float32(1.0 - prune_fraction) ** done.astype(jnp.float32)).astype(
            jnp.float32)

    def update_fn(t):
        t = jnp.asarray(t, jnp.int32)
        return (t > 0) & (t % round_steps == 0) & (t <= rounds * round_steps)

    return Schedule(sparsity_fn, update_fn, rewind_step=int(rewind_step))


def rewind(rewind_params: PyTree, masks: PyTree) -> PyTree:
    """IMP rewinding: the weights saved at `schedule.rewind_step`, with the new masks applied."""
    return masks_lib.apply(rewind_params, masks)


def update_masks(step, params: PyTree, masks: PyTree, schedule: Schedule, *,
                 scope: str = "layerwise", granularity: str = "unstructured",
                 groups: Sequence[ChannelGroup] | None = None,
                 prunable_fn: masks_lib.PrunableFn = masks_lib.default_prunable,
                 final_keep=None) -> PyTree:
    """Masks for this training step.

    On `schedule.is_update(step)` the masks are recomputed from weight magnitude |w| at
    sparsity `schedule(step)` (keep = 1 - sparsity, `masks.from_scores` with `scope`,
    `granularity`, `groups`); already-pruned weights score lowest and the result is ANDed
    with the old masks, so nothing pruned comes back. Other steps return `masks` unchanged.
    Jittable (`lax.cond`; `step` may be traced).

    `final_keep` (scope 'layerwise' only): per-unit keep ratios to end at, as `from_scores`
    takes them (float[G] in `groups` order for channels). Each unit then moves from 1 to its own
    target in step with the schedule, keep_u = 1 - (1 - final_keep_u) * schedule(step) / s_f
    with s_f = 1 - mean(final_keep) the schedule's final sparsity, so the last update keeps
    exactly the planned channels of every unit (one scalar keep would round each unit on its own
    and can overshoot a MACs budget by a channel).
    """
    if final_keep is not None and scope != "layerwise":
        raise ValueError(f"final_keep is per unit: scope must be 'layerwise', not {scope!r}")
    if granularity == "nm":
        raise ValueError("update_masks schedules a sparsity; granularity='nm' has a fixed "
                         "sparsity 1 - n/m: build it once with masks.from_scores")

    def recompute(operand):
        params, masks = operand
        keep = 1.0 - schedule(step)
        if final_keep is not None:
            target = jnp.asarray(final_keep, jnp.float32)
            final = 1.0 - jnp.mean(target)
            progress = jnp.where(final > 0, (1.0 - keep) / jnp.maximum(final, 1e-12), 1.0)
            keep = 1.0 - (1.0 - target) * jnp.minimum(progress, 1.0)
        if granularity == "channel":
            scores = jax.tree.map(lambda w, m: jnp.abs(jnp.where(m, w, 0)).astype(jnp.float32),
                                  params, masks)
        else:
            scores = jax.tree.map(lambda w, m: jnp.where(m, jnp.abs(w).astype(jnp.float32),
                                                         -jnp.inf), params, masks)
        new = masks_lib.from_scores(scores, keep, scope=scope, granularity=granularity,
                                    groups=groups, prunable_fn=prunable_fn)
        return jax.tree.map(jnp.logical_and, new, masks)

    def unchanged(operand):
        return operand[1]

    return jax.lax.cond(schedule.is_update(step), recompute, unchanged, (params, masks))
