"""Evolutionary search over keep-ratio vectors, and the two non-learning controls.

- `make_evolution`: a (mu + lambda) genetic algorithm. The state holds the best
  `population_size` vectors scored so far (elitist: `tell` keeps the best P of population ∪
  new candidates). `ask` breeds k children: two parents by tournament selection, uniform
  crossover (each gene from the second parent with probability `crossover_prob`), Gaussian
  mutation in unit-box coordinates (each gene with probability `mutation_prob`, std
  `mutation_std`), clipped to the bounds. Until the population is full, `ask` returns uniform
  samples (the random initial population). With `survival="aging"` it is regularised (aging)
  evolution (Real et al., 2019): `tell` keeps the P *youngest* scored vectors instead of the
  best (the oldest die, however good), so a candidate that scored well by luck on the small
  proxy set does not rule the population for ever; parents still come from tournaments on
  fitness.
- `make_random`: uniform vectors in the box (EagleEye's control: random ratio vectors, the
  budget projection happens outside the controller).
- `make_uniform`: one keep ratio shared by every group, sampled uniformly (the budget
  projection then scales it to the budget): the "prune every layer equally" baseline.

Why not evosax (0.3.2 is installed): its algorithms import Flax (`flax.struct` states; the
pruning core must not import Flax), fix the population size at construction while our `ask`
takes k per call, and its `SimpleGA.tell` replaces the population with the newest
generation (no plus-selection over population ∪ offspring), needs an evaluated population at
`init`, minimises, and knows no bounds. The GA here is ~40 lines of pure JAX.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxprune import checks
from jaxprune.search import space as space_lib
from jaxprune.search.space import Controller, SearchSpace


class EvolutionState(NamedTuple):
    """State of the genetic algorithm.

    Attributes:
      population: float32[P, G], the best keep-ratio vectors scored so far (best first).
      fitness: float32[P], their rewards; -inf marks an empty slot.
      step: int32[], number of `tell`s so far.
      space: the search space.
    """

    population: jax.Array
    fitness: jax.Array
    step: jax.Array
    space: SearchSpace


SURVIVALS = ("elitist", "aging")
# The checks of `search.evolution.<argument>`, one per argument of `make_evolution`
# (`controllers.CONFIG_CHECKS` gathers them for `config_checks`; make_random and make_uniform
# take none).
HPARAM_CHECKS = {
    "population_size": checks.integer(2), "tournament_size": checks.integer(1),
    "crossover_prob": checks.number(0, 1), "mutation_prob": checks.number(0, 1),
    "mutation_std": checks.non_negative_number, "survival": checks.choice(SURVIVALS),
}


def make_evolution(
    *,
    population_size: int = 16,
    tournament_size: int = 2,
    crossover_prob: float = 0.5,
    mutation_prob: float = 0.5,
    mutation_std: float = 0.1,
    survival: str = "elitist",
) -> Controller:
    """Builds the (mu + lambda) genetic algorithm.

    Args:
      population_size: P, number of survivors kept in the state.
      tournament_size: candidates per tournament when picking each parent (>= 1; 1 = uniform).
      crossover_prob: per-gene probability of taking the second parent's gene.
      mutation_prob: per-gene probability of a Gaussian mutation.
      mutation_std: mutation std in unit-box coordinates (1 = the full [lower, upper] width).
      survival: 'elitist' ((mu + lambda): the best P survive; population best first) or
        'aging' (regularised evolution: the youngest P survive; population oldest first).

    Returns:
      Controller(init, ask, tell); see `search.space.Controller`.
    """
    if int(population_size) != population_size or population_size < 2:
        raise ValueError(f"population_size must be an int >= 2, got {population_size}.")
    if int(tournament_size) != tournament_size or tournament_size < 1:
        raise ValueError(f"tournament_size must be an int >= 1, got {tournament_size}.")
    for name, value in (("crossover_prob", crossover_prob), ("mutation_prob", mutation_prob)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}.")
    if not mutation_std >= 0:
        raise ValueError(f"mutation_std must be >= 0, got {mutation_std}.")
    if survival not in SURVIVALS:
        raise ValueError(f"survival must be 'elitist' or 'aging', got {survival!r}.")
    population_size, tournament_size = int(population_size), int(tournament_size)

    def init(key: jax.Array, space: SearchSpace) -> EvolutionState:
        del key  # The initial population is drawn by `ask`.
        g = space.num_groups
        return EvolutionState(
            population=jnp.broadcast_to(space.lower[None, :], (population_size, g)).astype(
                jnp.float32),
            fitness=jnp.full((population_size,), -jnp.inf, jnp.float32),
            step=jnp.zeros((), jnp.int32),
            space=space,
        )

    def ask(key: jax.Array, state: EvolutionState, k: int) -> jax.Array:
        k = space_lib.check_num_candidates(k)
        space = state.space
        parents_unit = space.to_unit(state.population)  # [P, G]
        g = space.num_groups

        def pick(key):
            entrants = jax.random.randint(key, (tournament_size,), 0, population_size)
            return entrants[jnp.argmax(state.fitness[entrants])]

        def child(key):
            k1, k2, k_cross, k_mut, k_noise = jax.random.split(key, 5)
            p1, p2 = parents_unit[pick(k1)], parents_unit[pick(k2)]
            x = jnp.where(jax.random.uniform(k_cross, (g,)) < crossover_prob, p2, p1)
            mutate = jax.random.uniform(k_mut, (g,)) < mutation_prob
            x = x + jnp.where(mutate, mutation_std * jax.random.normal(k_noise, (g,)), 0.0)
            return jnp.clip(x, 0.0, 1.0)

        child_key, uniform_key = jax.random.split(key)
        children = jax.vmap(child)(jax.random.split(child_key, k))
        uniform = jax.random.uniform(uniform_key, (k, g), jnp.float32)
        filled = jnp.all(jnp.isfinite(state.fitness))
        unit = jnp.where(filled, children, uniform)
        return space.discretise(space.from_unit(unit))

    def tell(state: EvolutionState, ratios: jax.Array, rewards: jax.Array) -> EvolutionState:
        ratios, rewards = space_lib.check_ratios_rewards(state.space, ratios, rewards)
        rewards = space_lib.finite_or(rewards, -jnp.inf)
        if survival == "aging":
            population, fitness = _keep_youngest(state.population, state.fitness,
                                                 state.space.clip(ratios), rewards,
                                                 population_size)
        else:
            population, fitness = space_lib.keep_best(state.population, state.fitness,
                                                      state.space.clip(ratios), rewards,
                                                      population_size)
        return EvolutionState(population=population, fitness=fitness, step=state.step + 1,
                              space=state.space)

    return Controller(init=init, ask=ask, tell=tell)


def _keep_youngest(population, fitness, new, new_fitness, n):
    """The `n` youngest of population (oldest first) then new rows, oldest first; failed
    (-inf) new rows never enter, while empty (-inf) slots are the oldest and leave first."""
    pool = jnp.concatenate([population, new], axis=0)
    pool_fitness = jnp.concatenate([fitness, new_fitness], axis=0)
    p = population.shape[0]
    age_rank = jnp.arange(pool.shape[0], dtype=jnp.int32)              # larger = younger
    entered = jnp.concatenate([jnp.ones((p,), bool), jnp.isfinite(new_fitness)])
    _, index = jax.lax.top_k(jnp.where(entered, age_rank, -1), n)      # youngest first
    index = index[::-1]
    return pool[index], pool_fitness[index]


class RandomState(NamedTuple):
    """State of the `random` and `uniform` controls: just the space and a round counter."""

    step: jax.Array
    space: SearchSpace


def _stateless(sample_fn) -> Controller:
    def init(key: jax.Array, space: SearchSpace) -> RandomState:
        del key
        return RandomState(step=jnp.zeros((), jnp.int32), space=space)

    def ask(key: jax.Array, state: RandomState, k: int) -> jax.Array:
        k = space_lib.check_num_candidates(k)
        return sample_fn(key, state.space, k)

    def tell(state: RandomState, ratios: jax.Array, rewards: jax.Array) -> RandomState:
        space_lib.check_ratios_rewards(state.space, ratios, rewards)
        return RandomState(step=state.step + 1, space=state.space)

    return Controller(init=init, ask=ask, tell=tell)


def make_random() -> Controller:
    """Uniform keep-ratio vectors in the box (snapped to the grid); `tell` learns nothing."""
    return _stateless(space_lib.uniform_sample)


def _uniform_across_groups(key: jax.Array, space: SearchSpace, k: int) -> jax.Array:
    # Inside every group's bounds when they overlap, so no group is clipped and each row is
    # exactly c * ones (the projection then maps every row to the same vector).
    lo, hi = jnp.max(space.lower), jnp.min(space.upper)
    lo, hi = jnp.where(lo < hi, lo, jnp.min(space.lower)), jnp.where(lo < hi, hi,
                                                                       jnp.max(space.upper))
    keep = lo + (hi - lo) * jax.random.uniform(key, (k, 1), jnp.float32)
    return space.discretise(jnp.broadcast_to(keep, (k, space.num_groups)))


def make_uniform() -> Controller:
    """One keep ratio c for all groups, uniform in [max lower, min upper] (the range inside
    every group's bounds; [min lower, max upper], clipped per group, if that range is empty
    or a single point).

    Under a budget this is the classic "uniform width multiplier" baseline: the search loop's
    projection (`budget.project`, which depends only on a proposal's shape, keep / max(keep))
    maps every such vector to the same vector at the budget, so all its candidates are one
    architecture, on any grid.
    It is kept as a control so every method spends the same evaluation count; its score is the
    score of the uniform keep (the same vector layer-wise threshold pruning uses).
    """
    return _stateless(_uniform_across_groups)
