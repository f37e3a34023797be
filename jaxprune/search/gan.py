"""GAN controller: a generator learns to propose keep-ratio vectors like the best found so far.

What it is: a small black-box optimiser in the "learn a generative model of the good
solutions" family (estimation-of-distribution algorithms and the cross-entropy method, with a
GAN as the model, as in GAN-based black-box optimisation). A *generator* maps noise to
keep-ratio vectors and is trained adversarially so that a *discriminator* cannot tell its
vectors from an elite set, the top-E vectors scored so far; as better candidates replace worse
elites, the generator follows them. Nothing here touches the network's weights: the GAN works
only in the G-dimensional space of per-group keep ratios.

What it is not, though both are often named next to it: GAL (Lin et al., CVPR 2019,
"Towards optimal structured CNN pruning via generative adversarial learning") learns soft
masks on the network's own channels adversarially, with the unpruned network's features as the
"real" side; it is a pruning-by-training method, not an architecture generator. ABCPruner
(Lin et al., IJCAI 2020) searches per-layer channel counts with an artificial bee colony, with
no GAN. What we take from ABCPruner is the framing only: search the per-layer keep ratios
(not the masks) under a budget and keep the best structures found; from GAN work the
adversarial training of G and D.

- **Elite buffer.** The state keeps the top-E (`elite_size`) keep-ratio vectors scored so far
  and their rewards, a fixed-size buffer initialised empty (rewards = -inf). Every `tell`
  merges the new candidates into it and keeps the E best (NaN rewards never enter).
- **Generator** G: noise z ~ N(0, I)[noise_size] -> MLP -> sigmoid -> [0, 1]^G ->
  affinely into the space's bounds. **Discriminator** D: a keep-ratio vector (mapped to
  [-1, 1]^G) -> MLP -> one logit, "is this an elite?".
- **Training** (inside `tell`, once the buffer is full): `train_steps` alternating steps of
  D (binary cross-entropy: elites -> 1, generated -> 0) and G (non-saturating loss
  -log D(G(z))), each with Adam. With `elite_weighting="rank"` each elite's term in D's loss
  is weighted by its rank in the elite set (`space.centered_ranks` + 0.5, normalised to mean
  1; the same shaping as REINFORCE's `reward_shaping="rank"`), so G is pulled harder towards
  the best elites, whatever the scale of the rewards. As better candidates replace worse elites, the target
  distribution contracts towards the good region and G follows it.
- **Asking.** While the buffer is not yet full, `ask` returns uniform samples (the generator
  has nothing to imitate). Afterwards it returns G(z) plus small Gaussian exploration noise
  (`explore_std`, in unit-box coordinates), except a fixed fraction (`explore_fraction`) of
  the rows, which stay uniform so the search never stops exploring the whole box.

`tell` needs randomness (noise for the training steps) but has no key argument: the state
carries raw key data (uint32, checkpointable) and round r uses `fold_in(key, r)`.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune import checks
from jaxprune.search import space as space_lib
from jaxprune.search.space import Controller, SearchSpace


class GanState(NamedTuple):
    """State of the GAN controller.

    Attributes:
      gen_params, disc_params: generator / discriminator MLP parameters (lists of dicts).
      gen_opt_state, disc_opt_state: their Adam states.
      elite_ratios: float32[E, G], the best keep-ratio vectors scored so far (best first).
      elite_rewards: float32[E], their rewards; -inf marks an empty slot.
      key_data: uint32[2], raw threefry PRNG key data for the training noise of `tell`.
      step: int32[], number of `tell`s so far.
      space: the search space.
    """

    gen_params: Any
    disc_params: Any
    gen_opt_state: Any
    disc_opt_state: Any
    elite_ratios: jax.Array
    elite_rewards: jax.Array
    key_data: jax.Array
    step: jax.Array
    space: SearchSpace


# -- a tiny MLP as pure functions -------------------------------------------------------------


def mlp_init(key: jax.Array, sizes) -> list:
    """Params of an MLP with layer widths `sizes` (input first): [{'w': [i, o], 'b': [o]}]."""
    keys = jax.random.split(key, len(sizes) - 1)
    init = jax.nn.initializers.lecun_normal()
    return [{"w": init(k, (i, o), jnp.float32), "b": jnp.zeros((o,), jnp.float32)}
            for k, i, o in zip(keys, sizes[:-1], sizes[1:])]


def mlp_apply(params: list, x: jax.Array) -> jax.Array:
    """Leaky-ReLU MLP, linear last layer; `x` is [..., in]."""

    def dense(layer, x):
        bias = jnp.reshape(layer["b"], (1,) * (x.ndim - 1) + layer["b"].shape)
        return x @ layer["w"] + bias

    for layer in params[:-1]:
        x = jax.nn.leaky_relu(dense(layer, x), 0.2)
    return dense(params[-1], x)


ELITE_WEIGHTINGS = ("uniform", "rank")
# The checks of `search.gan.<argument>`, one per argument of `make_gan`
# (`controllers.CONFIG_CHECKS` gathers them for `config_checks`).
HPARAM_CHECKS = {
    "elite_size": checks.integer(1), "noise_size": checks.integer(1),
    "hidden_size": checks.integer(1), "learning_rate": checks.positive_number,
    "train_steps": checks.integer(0), "explore_std": checks.non_negative_number,
    "explore_fraction": checks.number(0, 1), "elite_weighting": checks.choice(ELITE_WEIGHTINGS),
}


def make_gan(
    *,
    elite_size: int = 16,
    noise_size: int = 8,
    hidden_size: int = 32,
    learning_rate: float = 5e-3,
    train_steps: int = 5,
    explore_std: float = 0.05,
    explore_fraction: float = 0.125,
    elite_weighting: str = "uniform",
) -> Controller:
    """Builds the GAN controller.

    Args:
      elite_size: E, size of the elite buffer (and of each training batch).
      noise_size: dimension of the generator's input noise.
      hidden_size: width of the two hidden layers of G and of D.
      learning_rate: Adam step size for both G and D.
      train_steps: D-then-G update pairs per `tell`.
      explore_std: std of the Gaussian noise added to generated vectors, unit-box units.
      explore_fraction: fraction of each round's rows (rounded down) drawn uniformly once
        the buffer is full.
      elite_weighting: 'uniform' (every elite counts the same in D's loss) or 'rank'.

    Returns:
      Controller(init, ask, tell); see `search.space.Controller`.
    """
    if int(elite_size) != elite_size or elite_size < 1:
        raise ValueError(f"elite_size must be an int >= 1, got {elite_size}.")
    if noise_size < 1 or hidden_size < 1:
        raise ValueError(
            f"noise_size and hidden_size must be >= 1, got {noise_size}, {hidden_size}.")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
    if int(train_steps) != train_steps or train_steps < 0:
        raise ValueError(f"train_steps must be an int >= 0, got {train_steps}.")
    if not explore_std >= 0:
        raise ValueError(f"explore_std must be >= 0, got {explore_std}.")
    if not 0.0 <= explore_fraction <= 1.0:
        raise ValueError(f"explore_fraction must be in [0, 1], got {explore_fraction}.")
    if elite_weighting not in ELITE_WEIGHTINGS:
        raise ValueError(f"elite_weighting must be 'uniform' or 'rank', got {elite_weighting!r}.")
    elite_size, train_steps = int(elite_size), int(train_steps)
    gen_opt = optax.adam(learning_rate, b1=0.5)
    disc_opt = optax.adam(learning_rate, b1=0.5)

    def generate_unit(gen_params, z):
        return jax.nn.sigmoid(mlp_apply(gen_params, z))

    def discriminate(disc_params, unit):
        return mlp_apply(disc_params, 2.0 * unit - 1.0)[..., 0]

    def init(key: jax.Array, space: SearchSpace) -> GanState:
        g = space.num_groups
        gen_key, disc_key, tell_key = jax.random.split(key, 3)
        gen_params = mlp_init(gen_key, (noise_size, hidden_size, hidden_size, g))
        disc_params = mlp_init(disc_key, (g, hidden_size, hidden_size, 1))
        return GanState(
            gen_params=gen_params,
            disc_params=disc_params,
            gen_opt_state=gen_opt.init(gen_params),
            disc_opt_state=disc_opt.init(disc_params),
            elite_ratios=jnp.broadcast_to(space.lower[None, :], (elite_size, g)).astype(
                jnp.float32),
            elite_rewards=jnp.full((elite_size,), -jnp.inf, jnp.float32),
            # Raw threefry key data drawn from `tell_key`, whatever PRNG impl `key` uses.
            key_data=jax.random.bits(tell_key, (2,), jnp.uint32),
            step=jnp.zeros((), jnp.int32),
            space=space,
        )

    def ask(key: jax.Array, state: GanState, k: int) -> jax.Array:
        k = space_lib.check_num_candidates(k)
        space = state.space
        z_key, noise_key, uniform_key = jax.random.split(key, 3)
        z = jax.random.normal(z_key, (k, noise_size), jnp.float32)
        unit = generate_unit(state.gen_params, z)
        unit = unit + explore_std * jax.random.normal(noise_key, unit.shape, jnp.float32)
        uniform = jax.random.uniform(uniform_key, unit.shape, jnp.float32)
        filled = jnp.all(jnp.isfinite(state.elite_rewards))
        n_explore = int(math.floor(explore_fraction * k))
        use_uniform = (jnp.arange(k) < n_explore) | jnp.logical_not(filled)
        unit = jnp.where(use_uniform[:, None], uniform, jnp.clip(unit, 0.0, 1.0))
        return space.discretise(space.from_unit(unit))

    def train(state: GanState, noise: jax.Array) -> GanState:
        """`train_steps` D-then-G Adam steps; noise is float32[train_steps, 2, E, noise_size]."""
        real = state.space.to_unit(state.elite_ratios)
        if elite_weighting == "rank":
            weight = space_lib.centered_ranks(state.elite_rewards) + 0.5
            weight = weight / jnp.maximum(jnp.mean(weight), 1e-6)
        else:
            weight = jnp.ones_like(state.elite_rewards)

        def d_loss_fn(disc_params, fake):
            d_real = discriminate(disc_params, real)
            d_fake = discriminate(disc_params, fake)
            return (jnp.mean(weight * jax.nn.softplus(-d_real))
                    + jnp.mean(jax.nn.softplus(d_fake)))

        def g_loss_fn(gen_params, disc_params, z):
            fake = generate_unit(gen_params, z)
            return jnp.mean(jax.nn.softplus(-discriminate(disc_params, fake)))

        def body(carry, step_noise):
            gen_params, disc_params, gen_os, disc_os = carry
            fake = jax.lax.stop_gradient(generate_unit(gen_params, step_noise[0]))
            d_grads = jax.grad(d_loss_fn)(disc_params, fake)
            d_updates, disc_os = disc_opt.update(d_grads, disc_os, disc_params)
            disc_params = optax.apply_updates(disc_params, d_updates)
            g_grads = jax.grad(g_loss_fn)(gen_params, disc_params, step_noise[1])
            g_updates, gen_os = gen_opt.update(g_grads, gen_os, gen_params)
            gen_params = optax.apply_updates(gen_params, g_updates)
            return (gen_params, disc_params, gen_os, disc_os), None

        carry = (state.gen_params, state.disc_params, state.gen_opt_state,
                 state.disc_opt_state)
        carry, _ = jax.lax.scan(body, carry, noise)
        gen_params, disc_params, gen_os, disc_os = carry
        return state._replace(gen_params=gen_params, disc_params=disc_params,
                              gen_opt_state=gen_os, disc_opt_state=disc_os)

    def tell(state: GanState, ratios: jax.Array, rewards: jax.Array) -> GanState:
        ratios, rewards = space_lib.check_ratios_rewards(state.space, ratios, rewards)
        rewards = space_lib.finite_or(rewards, -jnp.inf)
        elite_ratios, elite_rewards = space_lib.keep_best(
            state.elite_ratios, state.elite_rewards, state.space.clip(ratios), rewards, elite_size)
        state = state._replace(elite_ratios=elite_ratios, elite_rewards=elite_rewards)
        if train_steps > 0:
            stream = jax.random.wrap_key_data(state.key_data, impl="threefry2x32")
            # All training noise is drawn here, outside cond / scan (no keys cross them).
            noise = jax.random.normal(jax.random.fold_in(stream, state.step),
                                      (train_steps, 2, elite_size, noise_size), jnp.float32)
            filled = jnp.all(jnp.isfinite(elite_rewards))
            state = jax.lax.cond(filled, train, lambda s, _: s, state, noise)
        return state._replace(step=state.step + 1)

    return Controller(init=init, ask=ask, tell=tell)
