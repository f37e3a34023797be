"""Registry of search controllers: name -> factory building a `Controller(init, ask, tell)`.

    controller = get_controller("reinforce", learning_rate=0.1)
    state = controller.init(key, space)
    ask = jax.jit(controller.ask, static_argnames="k")
    tell = jax.jit(controller.tell)

Factories take keyword-only hyper-parameters, all with defaults (see each `make_*`).
"""
from __future__ import annotations

import inspect

from jaxprune.search.evolution import make_evolution, make_random, make_uniform
from jaxprune.search.gan import make_gan
from jaxprune.search.reinforce import make_reinforce
from jaxprune.search.space import Controller

__all__ = ["CONTROLLERS", "Controller", "get_controller"]

CONTROLLERS = {
    "reinforce": make_reinforce,
    "gan": make_gan,
    "evolution": make_evolution,
    "random": make_random,
    "uniform": make_uniform,
}


def get_controller(name: str, **overrides) -> Controller:
    """Builds the controller `name` with its default hyper-parameters, updated by `overrides`.

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
    return factory(**overrides)
