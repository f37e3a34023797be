"""Registry of search controllers: name -> factory building a `Controller(init, ask, tell)`.

    controller = get_controller("reinforce", learning_rate=0.1)
    state = controller.init(key, space)
    ask = jax.jit(controller.ask, static_argnames="k")
    tell = jax.jit(controller.tell)

Factories take keyword-only hyper-parameters, all with defaults (see each `make_*`); configs
set them in `config.search.<name>` (e.g. `search.reinforce.learning_rate`).

`with_seeds(controller, seeds)` (or `get_controller(name, seeds=...)`) makes the first
candidates asked for exactly the given keep vectors (e.g. the sensitivity and uniform keeps),
then hands over to the controller, which learns from them like from any other candidate.
"""
from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxprune import checks
from jaxprune.search import evolution, gan, reinforce
from jaxprune.search.evolution import make_evolution, make_random, make_uniform
from jaxprune.search.gan import make_gan
from jaxprune.search.reinforce import make_reinforce
from jaxprune.search.space import Controller, SearchSpace

__all__ = ["CONTROLLERS", "Controller", "default_hparams", "get_controller", "with_seeds"]

CONTROLLERS = {
    "reinforce": make_reinforce,
    "gan": make_gan,
    "evolution": make_evolution,
    "random": make_random,
    "uniform": make_uniform,
}
# Each factory's argument -> its check, declared beside the factory (the controllers not named
# here take no hyper-parameters).
HPARAM_CHECKS = {"reinforce": reinforce.HPARAM_CHECKS, "gan": gan.HPARAM_CHECKS,
                 "evolution": evolution.HPARAM_CHECKS}
# What `config_checks` reads: `search.methods`, and each controller's hyper-parameters as
# `search.<name>.<argument>` (optional: an absent one takes the factory's default).
CONFIG_CHECKS = {"search.methods": checks.method_list(CONTROLLERS)}
OPTIONAL_CONFIG_CHECKS = {f"search.{name}.{argument}": check
                          for name, hparams in HPARAM_CHECKS.items()
                          for argument, check in hparams.items()}


class SeededState(NamedTuple):
    """State of `with_seeds`: the wrapped controller's state, the seeds, how many were asked."""
    inner: Any
    seeds: jax.Array     # float32[S, G]
    emitted: jax.Array   # int32[], seeds already handed out (by completed `tell`s)


def with_seeds(controller: Controller, seeds) -> Controller:
    """`controller` whose first asked rows are `seeds` float32[S, G] (clipped to the space).

    Round after round, the rows of `ask` not yet covered by seeds come from the controller;
    `tell` passes every evaluated row (seeds included) to it. Pure and jittable like the rest.
    """
    seeds = jnp.asarray(seeds, jnp.float32)
    if seeds.ndim != 2 or seeds.shape[0] < 1:
        raise ValueError(f"seeds must be float32[S, G] with S >= 1, got shape {seeds.shape}.")

    def init(key: jax.Array, space: SearchSpace) -> SeededState:
        if seeds.shape[1] != space.num_groups:
            raise ValueError(f"seeds have {seeds.shape[1]} groups, the space {space.num_groups}.")
        return SeededState(controller.init(key, space), space.clip(seeds),
                           jnp.zeros((), jnp.int32))

    def ask(key: jax.Array, state: SeededState, k: int) -> jax.Array:
        rows = controller.ask(key, state.inner, k)
        index = state.emitted + jnp.arange(k)
        seeded = state.seeds[jnp.minimum(index, state.seeds.shape[0] - 1)]
        return jnp.where((index < state.seeds.shape[0])[:, None], seeded, rows)

    def tell(state: SeededState, ratios: jax.Array, rewards: jax.Array) -> SeededState:
        inner = controller.tell(state.inner, ratios, rewards)
        emitted = jnp.minimum(state.emitted + ratios.shape[0], state.seeds.shape[0])
        return SeededState(inner, state.seeds, emitted.astype(jnp.int32))

    return Controller(init=init, ask=ask, tell=tell)


def get_controller(name: str, seeds: Optional[Any] = None, **overrides) -> Controller:
    """Builds the controller `name` with its default hyper-parameters, updated by `overrides`;
    with `seeds` (float32[S, G]) its first S candidates are those (see `with_seeds`).

    Raises:
      ValueError: unknown name (lists the known ones) or unknown hyper-parameter (lists the
        ones that controller accepts).
    """
    if name not in CONTROLLERS:
        raise ValueError(
            f"Unknown search controller {name!r}; known: {', '.join(sorted(CONTROLLERS))}.")
    factory = CONTROLLERS[name]
    allowed = list(inspect.signature(factory).parameters)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"Controller {name!r} has no hyper-parameter(s) {unknown}; allowed: "
            f"{allowed or 'none'}.")
    controller = factory(**overrides)
    return controller if seeds is None else with_seeds(controller, seeds)


def default_hparams(name: str) -> dict:
    """The hyper-parameters of controller `name` with their defaults, read off its factory's
    signature (the one source of truth; configs declare `search.<name>` from this)."""
    if name not in CONTROLLERS:
        raise ValueError(
            f"Unknown search controller {name!r}; known: {', '.join(sorted(CONTROLLERS))}.")
    return {p.name: p.default for p in inspect.signature(CONTROLLERS[name]).parameters.values()
            if p.default is not inspect.Parameter.empty}
