"""Tests for jaxprune.search.budget: projection onto a MACs / params budget."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import costs
from jaxprune.search import budget as budget_lib
from jaxprune.structure import ChannelGroup


def _chain_cost_model(sizes=(16, 12, 8, 16), hw=(16, 16, 8, 4)):
    """A CostModel for a chain of 3x3 convs on (hw x hw) maps, built from a real trace."""
    sizes = tuple(sizes)
    chans = (3,) + sizes

    def apply(params, batch_stats, x, *, train):
        for i in range(len(sizes)):
            stride = x.shape[1] // hw[i]
            x = jax.lax.conv_general_dilated(
                x, params[f"conv{i}"]["kernel"], (stride, stride), "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return x.mean(axis=(1, 2)) @ params["head"]["kernel"], batch_stats

    params = {f"conv{i}": {"kernel": jax.ShapeDtypeStruct((3, 3, chans[i], chans[i + 1]),
                                                          jnp.float32)}
              for i in range(len(sizes))}
    params["head"] = {"kernel": jax.ShapeDtypeStruct((sizes[-1], 10), jnp.float32)}
    groups = [ChannelGroup(f"g{i}", s, ((f"conv{i}", "kernel"),),
                           (((f"conv{i + 1}", "kernel") if i + 1 < len(sizes)
                             else ("head", "kernel"), 1),))
              for i, s in enumerate(sizes)]
    return costs.cost_model(apply, params, {}, (hw[0], hw[0], 3), groups)


CM = _chain_cost_model()
G = CM.num_groups
LOWER = jnp.full((G,), 0.1, jnp.float32)
UPPER = jnp.ones((G,), jnp.float32)


def _random_keeps(seed, k=32):
    """Random proposals, some outside the bounds (0 .. 1.2), fixed seed."""
    return np.random.default_rng(seed).uniform(0.0, 1.2, (k, G)).astype(np.float32)


@pytest.mark.parametrize("fraction", [0.15, 0.3, 0.5, 0.8])
@pytest.mark.parametrize("fill", [True, False])
def test_projection_always_within_budget_and_bounds(fraction, fill):
    budget = budget_lib.Budget("macs", fraction).absolute(CM)
    keeps = _random_keeps(seed=int(fraction * 100))
    out = jax.jit(lambda k: budget_lib.project(k, CM.macs, budget, LOWER, UPPER, fill=fill))(keeps)
    assert out.shape == keeps.shape and out.dtype == jnp.float32
    out = np.asarray(out)
    assert np.all(out >= np.asarray(LOWER)) and np.all(out <= np.asarray(UPPER))
    for row in out:
        assert CM.macs_exact(row) <= budget          # exact integer check on the host


def test_projection_fill_uses_the_budget_and_keeps_the_shape():
    budget = 0.5 * CM.dense_macs
    keep = jnp.asarray([0.2, 0.3, 0.2, 0.3], jnp.float32)        # well below budget
    assert CM.macs_exact(keep) < budget
    filled = budget_lib.project(keep, CM.macs, budget, LOWER, UPPER, fill=True)
    unchanged = budget_lib.project(keep, CM.macs, budget, LOWER, UPPER, fill=False)
    np.testing.assert_array_equal(np.asarray(unchanged), np.asarray(keep))
    assert CM.macs_exact(keep) < CM.macs_exact(filled) <= budget
    # one scalar multiplier: the proportions of the proposal are kept (nothing was clipped)
    ratio = np.asarray(filled) / np.asarray(keep)
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    # maximal up to the bisection resolution: a slightly larger multiplier breaks the budget
    bigger = np.clip(np.asarray(filled) * 1.02, 0.1, 1.0)
    assert CM.macs_exact(bigger) > budget


def test_projection_shrinks_over_budget_vector_and_keeps_feasible_one():
    budget = 0.4 * CM.dense_macs
    full = jnp.ones((G,), jnp.float32)
    out = budget_lib.project(full, CM.macs, budget, LOWER, UPPER, fill=False)
    assert CM.macs_exact(out) <= budget
    assert CM.macs_exact(out) > 0.3 * CM.dense_macs            # not needlessly small
    # all-lower is feasible and stays put without fill; a budget >= dense leaves ones alone
    out = budget_lib.project(LOWER, CM.macs, budget, LOWER, UPPER, fill=False)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(LOWER))
    out = budget_lib.project(full, CM.macs, float(CM.dense_macs), LOWER, UPPER)
    np.testing.assert_array_equal(np.asarray(out), np.ones(G))


def test_projection_vmap_matches_batched_and_single():
    budget = budget_lib.Budget("params", 0.4).absolute(CM)
    keeps = _random_keeps(seed=7, k=8)
    batched = budget_lib.project(keeps, CM.params, budget, 0.1, 1.0)
    vmapped = jax.vmap(lambda k: budget_lib.project(k, CM.params, budget, 0.1, 1.0))(keeps)
    single = np.stack([budget_lib.project(k, CM.params, budget, 0.1, 1.0) for k in keeps])
    np.testing.assert_array_equal(np.asarray(batched), np.asarray(vmapped))
    np.testing.assert_allclose(np.asarray(batched), single, rtol=1e-6)
    assert all(CM.params_exact(k) <= budget for k in np.asarray(batched))


def test_projection_with_step_stays_on_grid_and_within_budget():
    budget = 0.35 * CM.dense_macs
    keeps = _random_keeps(seed=11, k=16)
    out = np.asarray(budget_lib.project(keeps, CM.macs, budget, 0.125, 1.0, step=0.125))
    np.testing.assert_allclose(out / 0.125, np.round(out / 0.125), atol=1e-4)
    assert all(CM.macs_exact(k) <= budget for k in out)


def test_projection_with_float_cost_fn():
    weights = jnp.asarray([3.0, 1.0, 2.0, 5.0])
    cost_fn = lambda k: jnp.sum(weights * k)  # noqa: E731
    keeps = _random_keeps(seed=5, k=16)
    out = budget_lib.project(keeps, cost_fn, 5.0, 0.1, 1.0)
    assert np.all(np.asarray(jax.vmap(cost_fn)(out)) <= 5.0)
    assert np.all(np.asarray(jax.vmap(cost_fn)(out)) > 4.99)   # filled to the budget


def test_realised_fraction():
    keeps = jnp.stack([jnp.ones((G,)), jnp.zeros((G,))])
    frac = budget_lib.realised_fraction(keeps, CM.macs, CM.dense_macs)
    np.testing.assert_allclose(np.asarray(frac), [1.0, CM.min_macs / CM.dense_macs], rtol=1e-6)
    assert float(budget_lib.realised_fraction(keeps[0], CM.params, CM.dense_params)) == 1.0


def test_check_feasible_and_infeasible_message():
    min_frac = budget_lib.check_feasible(CM.macs, LOWER, 0.5 * CM.dense_macs)
    assert min_frac == pytest.approx(CM.macs_exact(LOWER) / CM.dense_macs)
    with pytest.raises(budget_lib.InfeasibleBudgetError, match="search.lower") as err:
        budget_lib.check_feasible(CM.macs, 0.5, 0.01 * CM.dense_macs, num_groups=G)
    assert "budget fraction >=" in str(err.value) and "of dense" in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="num_groups"):
        budget_lib.check_feasible(CM.macs, 0.5, 1.0)


def test_budget_spec():
    b = budget_lib.Budget("macs", 0.5)
    assert b.absolute(CM) == 0.5 * CM.dense_macs and b.cost_fn(CM) == CM.macs
    p = budget_lib.Budget.from_sparsity("params", 0.75)
    assert p.fraction == 0.25 and p.absolute(CM) == 0.25 * CM.dense_params
    with pytest.raises(ValueError, match="'macs' or 'params'"):
        budget_lib.Budget("flops", 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        budget_lib.Budget("macs", 0.0)
    with pytest.raises(ValueError, match="shape"):
        budget_lib.project(jnp.ones((2, 3, G)), CM.macs, 1.0, 0.1, 1.0)


def test_per_group_step_gives_whole_channel_multiples():
    sizes = np.asarray([16.0, 32.0, 64.0])
    step = 8.0 / sizes  # multiples of 8 channels

    def cost(keep):
        return jnp.sum(keep * sizes)

    budget = 0.55 * float(cost(jnp.ones((3,))))
    keep = jax.random.uniform(jax.random.key(0), (32, 3), minval=0.1, maxval=1.0)
    lower = jnp.asarray(step)
    out = np.asarray(budget_lib.project(keep, cost, budget, lower, 1.0, step=jnp.asarray(step)))
    channels = out * sizes
    np.testing.assert_allclose(channels, np.round(channels / 8) * 8, atol=1e-3)
    assert np.all(np.asarray(jax.vmap(cost)(jnp.asarray(out))) <= budget)
    with pytest.raises(ValueError, match="step"):
        budget_lib.project(keep, cost, budget, lower, 1.0, step=np.asarray([0.5, 0.0, 0.1]))


# -- the greedy fill on the channel grid (issue #9, item 1) ------------------------------------

import functools  # noqa: E402


@functools.lru_cache(maxsize=None)
def _resnet20_grid():
    """ResNet-20's cost model, 8-channel grid and lower bound exactly as jaxprune.Pruner builds them."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import projection_slack
    return projection_slack.grid_setup("resnet20")


@pytest.mark.parametrize("target,fraction", [("macs", 0.7), ("params", 0.3)])
def test_grid_projection_fills_budget_resnet20(target, fraction):
    cm, _, _, space, step = _resnet20_grid()
    cost_fn = cm.macs if target == "macs" else cm.params
    exact = cm.macs_exact if target == "macs" else cm.params_exact
    dense = cm.dense_macs if target == "macs" else cm.dense_params
    keeps = jax.random.uniform(jax.random.key(3), (48, space.num_groups), minval=0.2, maxval=1.0)
    budget = fraction * dense
    one = jax.jit(lambda k: budget_lib.project(k, cost_fn, budget, space.lower, space.upper,
                                               step=step))
    out = np.asarray(jax.vmap(one)(keeps))                     # jit of vmap of single vectors
    slack = np.asarray([budget - exact(k) for k in out]) / dense
    assert np.all(slack >= 0)                                  # never over the budget
    assert np.median(slack) <= 0.01 and np.max(slack) <= 0.03  # and the budget is used
    np.testing.assert_array_equal(np.asarray(cm.kept(out)) % 8, 0)   # whole multiples of 8
    np.testing.assert_array_equal(np.asarray(one(keeps[3])), out[3])


def test_grid_projection_of_ones_reaches_the_budget():
    # The case: project(ones) at 70 % used to land at 0.509 of the dense MACs.
    cm, _, _, space, step = _resnet20_grid()
    out = jax.jit(lambda k: budget_lib.project(k, cm.macs, 0.7 * cm.dense_macs, space.lower,
                                               space.upper, step=step))(jnp.ones((space.num_groups,)))
    assert 0.69 <= cm.macs_exact(out) / cm.dense_macs <= 0.7


def test_uniform_control_is_one_architecture_on_the_grid():
    from jaxprune.search import controllers
    cm, _, _, space, step = _resnet20_grid()
    uniform = controllers.get_controller("uniform")
    proposals = uniform.ask(jax.random.key(0), uniform.init(jax.random.key(1), space), 32)
    assert len({tuple(np.asarray(p)) for p in proposals}) > 1       # different proposals ...
    proposals = jnp.concatenate([proposals, jnp.ones((1, space.num_groups))])
    out = np.asarray(jax.jit(lambda k: budget_lib.project(
        k, cm.macs, 0.5 * cm.dense_macs, space.lower, space.upper, step=step))(proposals))
    assert len({tuple(row) for row in out}) == 1   # ... one architecture, the layer-wise keep


def test_continuous_projection_slack_is_small():
    cm, _, _, space, _ = _resnet20_grid()
    keeps = jax.random.uniform(jax.random.key(4), (32, space.num_groups), minval=0.2, maxval=1.0)
    budget = 0.5 * cm.dense_macs
    out = np.asarray(jax.jit(lambda k: budget_lib.project(k, cm.macs, budget, 0.2, 1.0))(keeps))
    slack = np.asarray([budget - cm.macs_exact(k) for k in out]) / cm.dense_macs
    # no grid: only the rounding to whole channels is left (one channel of a 16-channel group)
    assert np.all(slack >= 0) and np.median(slack) <= 0.01 and np.max(slack) <= 0.03


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_grid_projection_is_idempotent(fraction):
    """A projected vector projected again stays as it is (a seed or an elite proposed again
    is scored as itself), and a full on-grid vector within budget is a fixed point."""
    cm, _, _, space, step = _resnet20_grid()
    budget = fraction * cm.dense_macs
    one = jax.jit(jax.vmap(lambda k: budget_lib.project(k, cm.macs, budget, space.lower,
                                                        space.upper, step=step)))
    keeps = jax.random.uniform(jax.random.key(5), (64, space.num_groups), minval=0.2, maxval=1.0)
    once = np.asarray(one(keeps))
    np.testing.assert_array_equal(np.asarray(one(jnp.asarray(once))), once)
    # An on-grid vector with room left (every group at its lower bound) is filled, not kept.
    lowest = np.broadcast_to(np.asarray(space.lower, np.float32), (1, space.num_groups))
    filled = np.asarray(one(jnp.asarray(lowest)))[0]
    assert cm.macs_exact(filled) > 1.5 * cm.macs_exact(lowest[0])
    assert budget - cm.macs_exact(filled) <= 0.03 * cm.dense_macs
