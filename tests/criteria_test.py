"""Tests for jaxprune.criteria: weight scores, BN scale, sensitivity analysis."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import criteria, masks
from jaxprune.structure import ChannelGroup


def _params():
    return {
        "conv": {"kernel": jnp.arange(-12.0, 12.0).reshape(1, 1, 3, 8) / 4.0,
                 "bias": jnp.zeros(8)},
        "bn": {"scale": jnp.array([1.0, -2.0, 0.5, 3.0, -0.1, 0.0, 1.5, -4.0]),
               "bias": jnp.ones(8)},
        "dense": {"kernel": jnp.linspace(-1.0, 1.0, 16 * 4).reshape(16, 4),
                  "bias": jnp.zeros(4)},
    }


GROUPS = (ChannelGroup("conv", 8,
                       producers=(("conv", "kernel"), ("conv", "bias"), ("bn", "scale"),
                                  ("bn", "bias")),
                       consumers=((("dense", "kernel"), 2),)),)


def test_magnitude_l1_l2():
    params = _params()
    l1 = criteria.magnitude(params)
    l2 = criteria.magnitude(params, p=2)
    np.testing.assert_array_equal(l1["bn"]["scale"], jnp.abs(params["bn"]["scale"]))
    np.testing.assert_array_equal(l2["bn"]["scale"], params["bn"]["scale"] ** 2)
    assert jax.tree.structure(l1) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="p=3"):
        criteria.magnitude(params, p=3)


def _quadratic_loss(params, batch):
    # dL/dw = w * batch["c"] for every weight: easy closed forms
    return sum(0.5 * batch["c"] * jnp.sum(w ** 2) for w in jax.tree.leaves(params))


def test_taylor_is_mean_abs_w_times_grad():
    params = _params()
    batches = [{"c": jnp.float32(1.0)}, {"c": jnp.float32(-3.0)}]
    scores = criteria.taylor(_quadratic_loss, params, batches)
    # per batch |w * c w| = |c| w^2; mean over batches of |c| = 2
    expected = jax.tree.map(lambda w: 2.0 * w ** 2, params)
    for s, e in zip(jax.tree.leaves(scores), jax.tree.leaves(expected)):
        np.testing.assert_allclose(s, e, rtol=1e-6)
    with pytest.raises(ValueError, match="list"):
        criteria.taylor(_quadratic_loss, params, {"c": jnp.float32(1.0)})


def test_snip_normalised_mean_gradient():
    params = _params()
    batches = [{"c": jnp.float32(1.0)}, {"c": jnp.float32(-3.0)}]
    scores = criteria.snip(_quadratic_loss, params, batches)
    # mean gradient = -1 * w -> |w * g| = w^2, normalised to sum 1
    total = sum(jnp.sum(w ** 2) for w in jax.tree.leaves(params))
    for s, w in zip(jax.tree.leaves(scores), jax.tree.leaves(params)):
        np.testing.assert_allclose(s, w ** 2 / total, rtol=1e-5)
    assert float(sum(jnp.sum(s) for s in jax.tree.leaves(scores))) == pytest.approx(1.0)


def test_random_scores_shape_and_determinism():
    params = _params()
    a = criteria.random(jax.random.key(0), params)
    b = criteria.random(jax.random.key(0), params)
    for x, y, p in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(params)):
        assert x.shape == p.shape
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a["conv"]["bias"], a["bn"]["bias"])


def test_bn_scale_per_group():
    params = _params()
    cs = criteria.bn_scale(params, GROUPS)
    np.testing.assert_array_equal(cs["conv"], jnp.abs(params["bn"]["scale"]))
    keep = masks.channel_keep(cs, 0.5, GROUPS)
    np.testing.assert_array_equal(keep["conv"], [0, 1, 0, 1, 0, 0, 1, 1])
    no_bn = (ChannelGroup("conv", 8, producers=(("conv", "kernel"),)),)
    with pytest.raises(ValueError, match="no BatchNorm producer"):
        criteria.bn_scale(params, no_bn)


def test_registry_and_shared_channel_reduction():
    assert criteria.get_criterion("l1")(_params())["bn"]["bias"].dtype == jnp.float32
    with pytest.raises(ValueError, match=r"\['bn_scale', 'l1', 'l2'"):
        criteria.get_criterion("hessian")
    assert criteria.channel_scores is masks.channel_scores     # one implementation
    np.testing.assert_array_equal(criteria.reduce_channels(jnp.array([[1.0, -2.0]]), "l1"),
                                  [1.0, 2.0])


def _sum_eval(params):
    return jnp.sum(params["dense"]["kernel"]) + jnp.sum(params["conv"]["kernel"])


def test_layer_sensitivity_prunes_one_unit_at_a_time():
    params = jax.tree.map(jnp.abs, _params())
    scores = criteria.magnitude(params)
    grid = [0.25, 0.5, 1.0]
    curves = criteria.layer_sensitivity(_sum_eval, params, scores,
                                        [("dense", "kernel"), "conv"], grid, groups=GROUPS)
    assert curves.units == (("dense", "kernel"), "conv")
    dense_total = float(_sum_eval(params))
    assert curves.dense == pytest.approx(dense_total)
    dk = np.sort(np.asarray(params["dense"]["kernel"]).ravel())[::-1]
    ck = float(jnp.sum(params["conv"]["kernel"]))
    for j, keep in enumerate(grid):
        k = round(keep * dk.size)
        assert curves.values[0, j] == pytest.approx(dk[:k].sum() + ck, rel=1e-5)
    # channel unit: keep the top-2 of 8 channels (by L1 of the kernel); the dense consumer's
    # input rows of the pruned channels go too
    col = np.abs(np.asarray(params["conv"]["kernel"])).reshape(3, 8).sum(0)
    top = np.argsort(-col, kind="stable")[:2]
    keep_c = np.zeros(8, bool)
    keep_c[top] = True
    dense_rows = np.tile(keep_c, 2)
    expected = (np.asarray(params["dense"]["kernel"])[dense_rows].sum()
                + np.asarray(params["conv"]["kernel"]).reshape(3, 8)[:, keep_c].sum())
    assert curves.values[1, 0] == pytest.approx(expected, rel=1e-5)
    assert curves.values[1, 2] == pytest.approx(dense_total, rel=1e-6)
    with pytest.raises(ValueError, match="neither a channel group"):
        criteria.layer_sensitivity(_sum_eval, params, scores, ["nope"], grid)


def _curves(values, dense=1.0):
    return criteria.SensitivityCurves(units=("a", "b"), keep_grid=np.array([0.25, 0.5, 0.75]),
                                      values=np.asarray(values, np.float64), dense=dense)


def test_sensitivity_to_keep_bisects_tolerated_drop():
    # unit a is robust, unit b is sensitive; accuracy (higher is better)
    curves = _curves([[0.99, 1.0, 1.0], [0.5, 0.8, 0.97]])
    mean_keep = lambda k: float(np.mean(k))            # noqa: E731
    res = criteria.sensitivity_to_keep(curves, mean_keep, 0.5)
    # delta=0.01 -> keeps (0.25, 1.0) mean 0.625; delta=0.03 -> (0.25, 0.75) mean 0.5 meets
    np.testing.assert_array_equal(res.keep_ratios, [0.25, 0.75])
    assert res.tolerated_drop == pytest.approx(0.03)
    assert res.cost == pytest.approx(0.5)
    res = criteria.sensitivity_to_keep(curves, mean_keep, 1.0)
    np.testing.assert_array_equal(res.keep_ratios, [0.5, 1.0])      # no drop at all
    assert res.tolerated_drop == 0.0
    with pytest.raises(ValueError, match="unreachable"):
        criteria.sensitivity_to_keep(curves, mean_keep, 0.2)


def test_sensitivity_to_keep_lower_is_better():
    curves = _curves([[2.5, 2.1, 2.0], [2.0, 2.0, 2.0]], dense=2.0)     # losses
    res = criteria.sensitivity_to_keep(curves, lambda k: float(np.sum(k)), 0.5,
                                       higher_is_better=False)
    np.testing.assert_array_equal(res.keep_ratios, [0.25, 0.25])
    res = criteria.sensitivity_to_keep(curves, lambda k: float(np.sum(k)), 1.0,
                                       higher_is_better=False)
    np.testing.assert_array_equal(res.keep_ratios, [0.75, 0.25])
