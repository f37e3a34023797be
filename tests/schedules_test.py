"""Tests for jaxprune.schedules: exact sparsity values, update steps, update_masks."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import masks, schedules


def _values(schedule, steps):
    fn = jax.jit(schedule.sparsity_fn)
    return [float(fn(jnp.int32(t))) for t in steps]


def test_one_shot():
    sched = schedules.one_shot(0.75, step=5)
    assert _values(sched, [0, 4, 5, 100]) == [0.0, 0.0, 0.75, 0.75]
    assert [bool(sched.is_update(t)) for t in [4, 5, 6]] == [False, True, False]
    assert sched.rewind_step is None
    with pytest.raises(ValueError, match=r"sparsity=1\.0"):
        schedules.one_shot(1.0)


def test_polynomial_zhu_gupta_exact_values():
    sched = schedules.polynomial(0.8, begin_step=10, end_step=50, frequency=10)
    # s_t = 0.8 + (0 - 0.8) * (1 - (t - 10) / 40) ** 3, held between update steps
    expected = {0: 0.0, 10: 0.0, 15: 0.0, 20: 0.8 - 0.8 * 0.75 ** 3, 29: 0.8 - 0.8 * 0.75 ** 3,
                30: 0.8 - 0.8 * 0.5 ** 3, 40: 0.8 - 0.8 * 0.25 ** 3, 50: 0.8, 1000: 0.8}
    np.testing.assert_allclose(_values(sched, list(expected)), list(expected.values()),
                               rtol=1e-6, atol=1e-7)
    updates = [t for t in range(0, 70) if bool(sched.is_update(t))]
    assert updates == [10, 20, 30, 40, 50]
    init = schedules.polynomial(0.9, begin_step=0, end_step=7, frequency=3,
                                initial_sparsity=0.5)
    np.testing.assert_allclose(
        _values(init, [0, 3, 6, 7]),
        [0.5, 0.9 - 0.4 * (1 - 3 / 7) ** 3, 0.9 - 0.4 * (1 - 6 / 7) ** 3, 0.9], rtol=1e-6)
    assert [t for t in range(10) if bool(init.is_update(t))] == [0, 3, 6, 7]
    with pytest.raises(ValueError, match="begin_step < end_step"):
        schedules.polynomial(0.5, begin_step=5, end_step=5)


def test_imp_exact_values_and_rewind_step():
    sched = schedules.imp(3, 0.2, round_steps=10, rewind_step=2)
    np.testing.assert_allclose(_values(sched, [0, 9, 10, 19, 20, 30, 45]),
                               [0.0, 0.0, 0.2, 0.2, 0.36, 0.488, 0.488], rtol=1e-6)
    assert [t for t in range(50) if bool(sched.is_update(t))] == [10, 20, 30]
    assert sched.rewind_step == 2
    with pytest.raises(ValueError, match="prune_fraction"):
        schedules.imp(3, 1.2, round_steps=10)


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"a": {"kernel": jax.random.normal(k1, (8, 8)), "bias": jnp.zeros(8)},
            "b": {"kernel": jax.random.normal(k2, (16, 4))}}


def test_update_masks_only_on_update_steps_inside_jit():
    params = _params()
    sched = schedules.polynomial(0.5, begin_step=2, end_step=6, frequency=2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(t, params, m):
        return schedules.update_masks(t, params, m, sched)

    m0 = masks.ones_like(params)
    m = step(jnp.int32(3), params, m0)                  # not an update step
    assert masks.count(m).kept == masks.count(m0).kept
    m = step(jnp.int32(4), params, m0)                  # s = 0.5 - 0.5 * 0.5 ** 3 = 0.4375
    per_leaf = masks.count(m, masks.default_prunable).per_leaf
    assert per_leaf[("a", "kernel")] == (round(0.5625 * 64), 64)
    assert per_leaf[("b", "kernel")] == (round(0.5625 * 64), 64)
    a = np.asarray(params["a"]["kernel"])
    ka = np.asarray(m["a"]["kernel"])
    assert np.abs(a[ka]).min() >= np.abs(a[~ka]).max()
    assert bool(jnp.all(m["a"]["bias"]))


def test_imp_never_resurrects_and_rewinds():
    params = _params()
    sched = schedules.imp(2, 0.5, round_steps=4, rewind_step=0)
    m1 = schedules.update_masks(4, params, masks.ones_like(params), sched)
    assert masks.sparsity(m1) == pytest.approx(0.5)
    # training moves a pruned weight to a huge value (no masked optimizer): still pruned later
    pruned = np.argwhere(~np.asarray(m1["a"]["kernel"]))[0]
    grown = jax.tree.map(lambda x: x, params)
    grown["a"]["kernel"] = params["a"]["kernel"].at[tuple(pruned)].set(100.0)
    m2 = jax.jit(lambda t, p, m: schedules.update_masks(t, p, m, sched))(8, grown, m1)
    assert not bool(m2["a"]["kernel"][tuple(pruned)])
    for a, b in zip(jax.tree.leaves(m2), jax.tree.leaves(m1)):
        assert not np.any(np.asarray(a) & ~np.asarray(b))             # subset of m1
    assert masks.sparsity(m2) == pytest.approx(0.75)
    rewound = schedules.rewind(params, m2)
    np.testing.assert_array_equal(rewound["b"]["kernel"],
                                  jnp.where(m2["b"]["kernel"], params["b"]["kernel"], 0.0))


def test_update_masks_global_scope_and_nm_rejected():
    params = _params()
    sched = schedules.one_shot(0.75, step=0)
    m = schedules.update_masks(0, params, masks.ones_like(params), sched, scope="global")
    assert masks.count(m, masks.default_prunable).kept == 32
    with pytest.raises(ValueError, match="nm"):
        schedules.update_masks(0, params, masks.ones_like(params), sched, granularity="nm")


def test_update_masks_channel_granularity_is_monotone():
    from jaxprune.structure import ChannelGroup
    params = _params()
    groups = (ChannelGroup("a", 8, producers=(("a", "kernel"), ("a", "bias"))),)
    sched = schedules.polynomial(0.75, begin_step=0, end_step=2, frequency=1)
    m = masks.ones_like(params)
    kept = []
    for t in range(3):
        new = schedules.update_masks(t, params, m, sched, granularity="channel", groups=groups)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(m)):
            assert not np.any(np.asarray(a) & ~np.asarray(b))
        m = new
        kept.append(int(np.asarray(m["a"]["bias"]).sum()))
    # s_1 = 0.75 - 0.75 * 0.5 ** 3 = 0.65625 -> keep round(0.34375 * 8) = 3; s_2 = 0.75 -> 2
    assert kept == [8, 3, 2]
    assert bool(jnp.all(m["b"]["kernel"]))


def test_update_masks_final_keep_ends_at_every_groups_planned_channels():
    """Per-group targets (4 heads at 2/4, 128 neurons at 63/128): one scalar keep (their mean
    sparsity) rounds each group on its own (64 of 128 kept: over the plan); `final_keep` ends
    exactly at the planned channels, and earlier updates stay between dense and the plan."""
    from jaxprune.structure import ChannelGroup
    rng = np.random.default_rng(0)
    params = {"h": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
              "f": {"kernel": jnp.asarray(rng.normal(size=(3, 128)), jnp.float32)}}
    groups = (ChannelGroup("h", 4, producers=(("h", "kernel"),)),
              ChannelGroup("f", 128, producers=(("f", "kernel"),)))
    target = np.asarray([2 / 4, 63 / 128], np.float32)
    final = 1.0 - float(np.mean(target))
    sched = schedules.polynomial(final, begin_step=0, end_step=2, frequency=1)

    def kept(m):
        return [int(np.asarray(m[g.name]["kernel"]).any(0).sum()) for g in groups]

    scalar = schedules.update_masks(2, params, masks.ones_like(params), sched,
                                    granularity="channel", groups=groups)
    assert kept(scalar) == [2, 64]
    m, history = masks.ones_like(params), []
    for t in range(3):
        m = schedules.update_masks(t, params, m, sched, granularity="channel", groups=groups,
                                   final_keep=target)
        history.append(kept(m))
    assert history[-1] == [2, 63]
    assert all(2 <= h <= 4 and 63 <= f <= 128 for h, f in history)
    with pytest.raises(ValueError, match="layerwise"):
        schedules.update_masks(2, params, masks.ones_like(params), sched, scope="global",
                               granularity="channel", groups=groups, final_keep=target)
