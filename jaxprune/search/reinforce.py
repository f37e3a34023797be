"""REINFORCE controller: a policy over keep-ratio vectors trained by policy gradient.

The policy picks, for every group g, one of `num_bins` evenly spaced keep ratios
`lower[g] + j / (num_bins - 1) * (upper[g] - lower[g])`, j = 0 .. num_bins-1 (a categorical
over a per-group grid, as in the NAS controllers of Zoph & Le, 2017 and the layer-wise
pruning agents after them). Two parametrisations:

- `autoregressive=False`: independent per-group logits `float32[G, num_bins]` (zero-initialised,
  i.e. a uniform first round). Fast to learn when groups matter roughly independently.
- `autoregressive=True`: a tiny GRU runs over the groups in order; at step g its input is an
  embedding of the previous group's choice plus a learned position embedding of g; group g's
  logits are a shared linear head of the hidden state plus a per-group bias (all
  zero-initialised: uniform first round; the bias alone is the independent policy). It can
  learn correlations between groups ("if stage1 is thin, keep block1 wide"). The recurrent
  weights learn at `recurrent_lr_scale` times the bias's step size: at the same Adam step
  the GRU makes the policy deterministic within a few rounds.

Update (`tell`): the REINFORCE estimator with a moving-average baseline,

    advantage_i = (reward_i - baseline) [/ std(rewards)],
    loss = -mean_i advantage_i * log pi(a_i) - entropy_weight * mean_i H(pi),

minimised with Adam (optax). The baseline is the first round's mean reward, then an
exponential moving average (`baseline_decay`) of the per-round mean. Dividing by the round's
reward standard deviation (`normalize_advantages=True`) makes the step size independent of
the reward scale (accuracy differences between candidates are often ~1e-2).

Two options make the update sturdier (both off by default, which is the update above):

- `reward_shaping="rank"`: the advantage of a candidate is its centered rank in the round,
  in [-0.5, 0.5] (`space.centered_ranks`, as in OpenAI-ES / PEPG fitness shaping), instead of
  the baseline-subtracted reward: invariant to the scale and shift of the rewards and to a
  lucky outlier.
- `clip_epsilon > 0`: a PPO-style clipped surrogate (Schulman et al., 2017),
  `-mean_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i)` with
  `rho_i = pi(a_i) / pi_old(a_i)`, minimised for `update_epochs` Adam steps on the same round;
  the clip stops a round from moving the policy far from the one that sampled it.

`tell` takes the ratio vectors that were evaluated, possibly moved off the grid by a budget
projection; each is scored under the policy as its nearest grid point (the bin that the
evaluated architecture falls into). Non-finite rewards (failed evaluations) get zero weight; a
round without any finite reward leaves the state unchanged.

All K samples of a round are drawn in one graph (`vmap` over keys). States are pytrees.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune import checks
from jaxprune.search import space as space_lib
from jaxprune.search.space import Controller, SearchSpace


class ReinforceState(NamedTuple):
    """State of the REINFORCE controller.

    Attributes:
      params: policy parameters (plain dict of arrays).
      opt_state: optax Adam state for `params`.
      baseline: float32[], moving-average reward baseline (meaningless while step == 0).
      step: int32[], number of `tell`s that carried at least one finite reward.
      space: the search space (pytree; bounds are leaves, step/names static).
    """

    params: Any
    opt_state: Any
    baseline: jax.Array
    step: jax.Array
    space: SearchSpace


# -- the tiny GRU (pure functions on a param dict) --------------------------------------------


def _init_autoregressive(key, num_groups, num_bins, hidden_size, embed_size):
    k_embed, k_pos, k_wx, k_wh = jax.random.split(key, 4)
    normal = jax.nn.initializers.normal(stddev=0.1)
    lecun = jax.nn.initializers.lecun_normal()
    return {
        # num_bins choices + one start token.
        "embed": normal(k_embed, (num_bins + 1, embed_size), jnp.float32),
        "pos": normal(k_pos, (num_groups, embed_size), jnp.float32),
        "gru": {
            "wx": lecun(k_wx, (embed_size, 3 * hidden_size), jnp.float32),
            "wh": jax.nn.initializers.orthogonal()(k_wh, (hidden_size, 3 * hidden_size),
                                                   jnp.float32),
            "b": jnp.zeros((3 * hidden_size,), jnp.float32),
        },
        # Zero head: the first round is uniform over the grid. The per-group bias makes this
        # policy a superset of the independent one (which is exactly the bias alone).
        "head": {
            "w": jnp.zeros((hidden_size, num_bins), jnp.float32),
            "b": jnp.zeros((num_groups, num_bins), jnp.float32),
        },
    }


def _gru_step(params, h, prev_action, pos, bias):
    """One controller step: previous choice + position -> new hidden state and logits."""
    gru = params["gru"]
    hidden = h.shape[-1]
    x = params["embed"][prev_action] + pos
    gx = x @ gru["wx"] + gru["b"]
    gh = h @ gru["wh"]
    r = jax.nn.sigmoid(gx[:hidden] + gh[:hidden])
    z = jax.nn.sigmoid(gx[hidden:2 * hidden] + gh[hidden:2 * hidden])
    n = jnp.tanh(gx[2 * hidden:] + r * gh[2 * hidden:])
    h = (1.0 - z) * n + z * h
    logits = h @ params["head"]["w"] + bias
    return h, logits


def _entropy(log_probs):
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def _sample_autoregressive(params, key, num_groups):
    """Samples one vector of bin indices int32[G].

    Gumbel-max sampling with all the noise drawn up front (one key, outside the scan).
    """
    hidden = params["gru"]["wh"].shape[0]
    num_bins = params["head"]["b"].shape[1]
    start = jnp.asarray(params["embed"].shape[0] - 1, jnp.int32)

    def body(carry, xs):
        h, prev = carry
        pos, bias, gumbel = xs
        h, logits = _gru_step(params, h, prev, pos, bias)
        action = jnp.argmax(logits + gumbel).astype(jnp.int32)
        return (h, action), action

    gumbels = jax.random.gumbel(key, (num_groups, num_bins), jnp.float32)
    h0 = jnp.zeros((hidden,), jnp.float32)
    _, actions = jax.lax.scan(body, (h0, start),
                              (params["pos"], params["head"]["b"], gumbels))
    return actions


def _score_autoregressive(params, actions):
    """Log-probability and summed per-step entropy of given bin indices int32[G]."""
    hidden = params["gru"]["wh"].shape[0]
    start = jnp.asarray(params["embed"].shape[0] - 1, jnp.int32)

    def body(carry, xs):
        h, prev = carry
        pos, bias, action = xs
        h, logits = _gru_step(params, h, prev, pos, bias)
        log_probs = jax.nn.log_softmax(logits)
        return (h, action), (log_probs[action], _entropy(log_probs))

    h0 = jnp.zeros((hidden,), jnp.float32)
    _, (log_p, ent) = jax.lax.scan(body, (h0, start),
                                  (params["pos"], params["head"]["b"], actions))
    return jnp.sum(log_p), jnp.sum(ent)


# -- independent per-group logits ----------------------------------------------------------


def _sample_independent(params, key, num_groups):
    del num_groups
    return jax.random.categorical(key, params["logits"], axis=-1).astype(jnp.int32)


def _score_independent(params, actions):
    log_probs = jax.nn.log_softmax(params["logits"], axis=-1)  # [G, B]
    picked = jnp.take_along_axis(log_probs, actions[:, None], axis=-1)[:, 0]
    return jnp.sum(picked), jnp.sum(_entropy(log_probs))


# -- grid <-> ratios -----------------------------------------------------------------------


def _index_to_ratios(space: SearchSpace, index, num_bins):
    unit = index.astype(jnp.float32) / jnp.float32(num_bins - 1)
    return space.discretise(space.from_unit(unit))


def _ratios_to_index(space: SearchSpace, ratios, num_bins):
    unit = jnp.clip(space.to_unit(ratios), 0.0, 1.0)
    return jnp.round(unit * (num_bins - 1)).astype(jnp.int32)


REWARD_SHAPINGS = ("none", "rank")
# The checks of `search.reinforce.<argument>`, one per argument of `make_reinforce`
# (`controllers.CONFIG_CHECKS` gathers them for `config_checks`).
HPARAM_CHECKS = {
    "learning_rate": checks.positive_number, "entropy_weight": checks.non_negative_number,
    "baseline_decay": checks.number(0, 1, high_open=True), "num_bins": checks.integer(2),
    "autoregressive": checks.boolean, "normalize_advantages": checks.boolean,
    "hidden_size": checks.integer(1), "embed_size": checks.integer(1),
    "recurrent_lr_scale": checks.positive_number,
    "reward_shaping": checks.choice(REWARD_SHAPINGS),
    "clip_epsilon": checks.number(0, 1, high_open=True), "update_epochs": checks.integer(1),
}


def make_reinforce(
    *,
    learning_rate: float = 0.2,
    entropy_weight: float = 1e-3,
    baseline_decay: float = 0.8,
    num_bins: int = 10,
    autoregressive: bool = False,
    hidden_size: int = 32,
    embed_size: int = 16,
    normalize_advantages: bool = True,
    recurrent_lr_scale: float = 0.1,
    reward_shaping: str = "none",
    clip_epsilon: float = 0.0,
    update_epochs: int = 1,
) -> Controller:
    """Builds the REINFORCE controller.

    Args:
      learning_rate: Adam step size on the policy parameters.
      entropy_weight: weight of the entropy bonus (keeps exploring; 0 disables it).
      baseline_decay: EMA decay of the reward baseline, in [0, 1).
      num_bins: grid points per group (>= 2), evenly spaced in [lower, upper].
      autoregressive: False = independent per-group logits; True = GRU over groups.
      hidden_size: GRU hidden width (autoregressive only).
      embed_size: action / position embedding width (autoregressive only).
      normalize_advantages: divide advantages by the round's reward std.
      recurrent_lr_scale: (autoregressive only) the GRU, embeddings and head weights learn at
        `learning_rate * recurrent_lr_scale`; the per-group logit bias at `learning_rate`.
      reward_shaping: 'none' (baseline-subtracted rewards) or 'rank' (centered ranks).
      clip_epsilon: 0 = the REINFORCE loss; > 0 = PPO clipped surrogate with this epsilon.
      update_epochs: Adam steps per `tell` on the round's candidates (>= 1).

    Returns:
      Controller(init, ask, tell); see `search.space.Controller`.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
    if not entropy_weight >= 0:
        raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight}.")
    if not 0.0 <= baseline_decay < 1.0:
        raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}.")
    if int(num_bins) != num_bins or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins}.")
    if not recurrent_lr_scale > 0:
        raise ValueError(f"recurrent_lr_scale must be > 0, got {recurrent_lr_scale}.")
    if hidden_size < 1 or embed_size < 1:
        raise ValueError(
            f"hidden_size and embed_size must be >= 1, got {hidden_size}, {embed_size}.")
    if reward_shaping not in REWARD_SHAPINGS:
        raise ValueError(f"reward_shaping must be 'none' or 'rank', got {reward_shaping!r}.")
    if not 0.0 <= clip_epsilon < 1.0:
        raise ValueError(f"clip_epsilon must be in [0, 1) (0 = no clipping), got {clip_epsilon}.")
    if int(update_epochs) != update_epochs or update_epochs < 1:
        raise ValueError(f"update_epochs must be an int >= 1, got {update_epochs}.")
    num_bins, update_epochs = int(num_bins), int(update_epochs)
    if autoregressive:
        # Adam moves every parameter by ~learning_rate per step; the GRU has hundreds of them
        # feeding every logit, so at the bias's step size it turns the policy deterministic
        # within a few rounds. Its parameters take a smaller step.
        optimizer = optax.multi_transform(
            {"bias": optax.adam(learning_rate),
             "recurrent": optax.adam(learning_rate * recurrent_lr_scale)},
            lambda params: {
                name: (jax.tree.map(lambda _: "recurrent", sub) if name != "head" else
                       {"w": "recurrent", "b": "bias"})
                for name, sub in params.items()})
    else:
        optimizer = optax.adam(learning_rate)
    sample_fn = _sample_autoregressive if autoregressive else _sample_independent
    score_fn = _score_autoregressive if autoregressive else _score_independent

    def init(key: jax.Array, space: SearchSpace) -> ReinforceState:
        if autoregressive:
            params = _init_autoregressive(key, space.num_groups, num_bins, hidden_size,
                                          embed_size)
        else:
            params = {"logits": jnp.zeros((space.num_groups, num_bins), jnp.float32)}
        return ReinforceState(
            params=params,
            opt_state=optimizer.init(params),
            baseline=jnp.zeros((), jnp.float32),
            step=jnp.zeros((), jnp.int32),
            space=space,
        )

    def ask(key: jax.Array, state: ReinforceState, k: int) -> jax.Array:
        k = space_lib.check_num_candidates(k)
        keys = jax.random.split(key, k)
        index = jax.vmap(lambda kk: sample_fn(state.params, kk, state.space.num_groups))(keys)
        return _index_to_ratios(state.space, index, num_bins)

    def tell(state: ReinforceState, ratios: jax.Array, rewards: jax.Array) -> ReinforceState:
        ratios, rewards = space_lib.check_ratios_rewards(state.space, ratios, rewards)
        index = _ratios_to_index(state.space, ratios, num_bins)
        valid = jnp.isfinite(rewards)
        n_valid = jnp.sum(valid.astype(jnp.float32))
        denom = jnp.maximum(n_valid, 1.0)
        rewards = jnp.where(valid, rewards, 0.0)
        mean = jnp.sum(rewards) / denom
        std = jnp.sqrt(jnp.sum(jnp.where(valid, (rewards - mean) ** 2, 0.0)) / denom)
        baseline = jnp.where(state.step > 0, state.baseline, mean)
        advantages = jnp.where(valid, rewards - baseline, 0.0)
        if normalize_advantages:
            advantages = advantages / jnp.where(std > 1e-12, std, 1.0)
        if reward_shaping == "rank":
            advantages = space_lib.centered_ranks(rewards, valid)
        advantages = jax.lax.stop_gradient(advantages)
        old_log_p = jax.lax.stop_gradient(
            jax.vmap(lambda a: score_fn(state.params, a))(index)[0])

        def loss_fn(params):
            log_p, ent = jax.vmap(lambda a: score_fn(params, a))(index)
            if clip_epsilon > 0:
                rho = jnp.exp(log_p - old_log_p)
                surrogate = jnp.minimum(
                    rho * advantages,
                    jnp.clip(rho, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantages)
                pg = -jnp.sum(jnp.where(valid, surrogate, 0.0)) / denom
            else:
                pg = -jnp.sum(advantages * log_p) / denom
            return pg - entropy_weight * jnp.mean(ent)

        def update(_, carry):
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        if update_epochs == 1:
            params, opt_state = update(0, (state.params, state.opt_state))
        else:
            params, opt_state = jax.lax.fori_loop(0, update_epochs, update,
                                                  (state.params, state.opt_state))
        new_state = ReinforceState(
            params=params,
            opt_state=opt_state,
            baseline=(baseline_decay * baseline + (1.0 - baseline_decay) * mean).astype(
                jnp.float32),
            step=state.step + 1,
            space=state.space,
        )
        # A round without any finite reward changes nothing.
        return jax.tree.map(lambda new, old: jnp.where(n_valid > 0, new, old), new_state, state)

    return Controller(init=init, ask=ask, tell=tell)
