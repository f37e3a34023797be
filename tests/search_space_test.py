"""Tests for search/space.py: bounds, validation, grid snapping, unit maps, pytree behaviour."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.search import space as space_lib
from jaxprune.search.space import SearchSpace


def test_create_broadcasts_scalars():
    space = SearchSpace.create(5, lower=0.2, upper=0.9, step=0.1, names="abcde")
    assert space.num_groups == 5
    assert space.lower.shape == (5,) and space.lower.dtype == jnp.float32
    np.testing.assert_allclose(space.lower, 0.2)
    np.testing.assert_allclose(space.upper, 0.9)
    assert space.step == 0.1
    assert space.names == ("a", "b", "c", "d", "e")


def test_create_defaults_and_step_zero_means_continuous():
    space = SearchSpace.create(3, step=0)
    np.testing.assert_allclose(space.lower, 0.1)
    np.testing.assert_allclose(space.upper, 1.0)
    assert space.step is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(lower=0.0), r"group 0.*0\.0.*> 0"),
    (dict(lower=[0.1, -0.2, 0.1]), r"group 1.*-0\.2"),
    (dict(lower=[0.5, 0.5, 0.9], upper=[1.0, 1.0, 0.8]), r"group 2.*0\.9.*> upper 0\.8"),
    (dict(upper=[1.0, 1.5, 1.0]), r"group 1.*1\.5.*<= 1"),
    (dict(lower=[0.1, 0.2]), r"shape \(3,\)"),
    (dict(lower=float("nan")), r"finite"),
    (dict(step=1.5), r"step"),
    (dict(step=-0.1), r"step"),
    (dict(names=["a", "b"]), r"names has 2"),
])
def test_create_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace.create(3, **kwargs)


def test_create_error_names_the_group():
    with pytest.raises(ValueError, match=r"'conv2'.*0\.0"):
        SearchSpace.create(2, lower=[0.5, 0.0], names=["conv1", "conv2"])


@pytest.mark.parametrize("num_groups", [0, -1, 2.5, True])
def test_create_rejects_bad_num_groups(num_groups):
    with pytest.raises(ValueError, match="num_groups"):
        SearchSpace.create(num_groups)


def test_clip_per_group_bounds_and_batch_shapes():
    space = SearchSpace.create(3, lower=[0.1, 0.3, 0.5], upper=[0.9, 0.6, 1.0])
    x = jnp.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.7]])
    np.testing.assert_allclose(
        space.clip(x), [[0.1, 0.3, 0.5], [0.9, 0.6, 1.0], [0.5, 0.5, 0.7]], rtol=1e-6)
    np.testing.assert_allclose(space.clip(x[0]), [0.1, 0.3, 0.5], rtol=1e-6)  # rank 1
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        space.clip(jnp.zeros((4, 2)))


def test_discretise_snaps_to_multiples_within_bounds():
    space = SearchSpace.create(4, lower=[0.1, 0.12, 0.3, 0.12], upper=[1.0, 0.95, 0.5, 0.18],
                               step=0.1)
    x = jnp.array([[0.04, 0.13, 0.26, 0.15], [0.96, 0.97, 0.55, 0.17], [0.44, 0.46, 0.41, 0.1]])
    out = space.discretise(x)
    expected = np.array([
        [0.1, 0.2, 0.3, 0.15],   # group 1: nearest multiple 0.1 < lower -> 0.2; group 3: none
        [1.0, 0.9, 0.5, 0.17],   # group 1: 1.0 > upper 0.95 -> 0.9
        [0.4, 0.5, 0.4, 0.12],
    ])
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert np.all(out >= space.lower[None, :] - 1e-7) and np.all(out <= space.upper[None, :])
    np.testing.assert_allclose(space.discretise(out), out, atol=1e-6)  # idempotent


def test_discretise_without_step_is_clip():
    space = SearchSpace.create(2, lower=0.2)
    x = jnp.array([0.05, 0.333])
    np.testing.assert_allclose(space.discretise(x), [0.2, 0.333], rtol=1e-6)


def test_unit_maps_round_trip():
    space = SearchSpace.create(3, lower=[0.1, 0.5, 0.4], upper=[1.0, 0.5, 0.8])
    r = jnp.array([[0.1, 0.5, 0.4], [1.0, 0.5, 0.8], [0.55, 0.5, 0.6]])
    u = space.to_unit(r)
    np.testing.assert_allclose(u, [[0, 0, 0], [1, 0, 1], [0.5, 0, 0.5]], atol=1e-6)
    np.testing.assert_allclose(space.from_unit(u), r, atol=1e-6)
    np.testing.assert_allclose(space.from_unit(jnp.array([-1.0, 2.0, 0.5])), [0.1, 0.5, 0.6],
                               atol=1e-6)


def test_uniform_sample_bounds_grid_and_determinism():
    space = SearchSpace.create(5, lower=0.2, upper=0.8, step=0.05)
    a = space_lib.uniform_sample(jax.random.key(0), space, 64)
    b = space_lib.uniform_sample(jax.random.key(0), space, 64)
    assert a.shape == (64, 5) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert float(a.min()) >= 0.2 - 1e-6 and float(a.max()) <= 0.8 + 1e-6
    np.testing.assert_allclose(a / 0.05, np.round(a / 0.05), atol=1e-4)
    assert len(np.unique(np.round(np.asarray(a), 4))) > 5  # actually spread out


@pytest.mark.parametrize("k", [0, -3, 2.0, None])
def test_uniform_sample_rejects_bad_k(k):
    space = SearchSpace.create(2)
    with pytest.raises(ValueError, match="k"):
        space_lib.uniform_sample(jax.random.key(0), space, k)


def test_is_a_pytree_with_static_metadata():
    space = SearchSpace.create(3, lower=0.2, step=0.1, names=["a", "b", "c"])
    leaves = jax.tree.leaves(space)
    assert len(leaves) == 2  # lower, upper
    restored = jax.tree.map(np.asarray, space)  # simulated checkpoint restore
    assert isinstance(restored.lower, np.ndarray)
    assert restored.step == 0.1 and restored.names == ("a", "b", "c")
    assert restored.num_groups == 3
    assert restored == space and hash(restored) == hash(space)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(sp, x):
        return sp.discretise(x)

    x = jnp.full((2, 3), 0.33)
    np.testing.assert_allclose(f(space, x), 0.3, atol=1e-6)
    np.testing.assert_allclose(f(restored, x), 0.3, atol=1e-6)  # no retrace


def test_hashable_as_static_argument():
    space = SearchSpace.create(2, lower=0.5)
    same = SearchSpace.create(2, lower=0.5)
    other = SearchSpace.create(2, lower=0.4)
    assert space == same and space != other
    f = jax.jit(lambda x, sp: sp.clip(x), static_argnums=1)
    np.testing.assert_allclose(f(jnp.zeros(2), space), 0.5)
    np.testing.assert_allclose(f(jnp.zeros(2), other), 0.4)


def test_check_ratios_rewards_shapes():
    space = SearchSpace.create(3)
    space_lib.check_ratios_rewards(space, jnp.ones((4, 3)), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"\[k, 3\]"):
        space_lib.check_ratios_rewards(space, jnp.ones((4, 2)), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"rewards must have shape \[4\]"):
        space_lib.check_ratios_rewards(space, jnp.ones((4, 3)), jnp.zeros(3))
