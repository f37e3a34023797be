"""Tests for jaxprune.structure (group validation on hand-made pytrees) and for the one slicing
of variables by a keep, `surgery.slice_variables`, on the groups discovered from a tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import discover, structure, surgery
from jaxprune.structure import ChannelGroup


def _tiny():
    """conv(3->4) + BN, flatten 2x2, dense(16->5), dense(5->2). Groups 'conv' and 'fc'."""
    rng = np.random.default_rng(0)
    params = {
        "conv": {"kernel": rng.normal(size=(3, 3, 3, 4)).astype(np.float32)},
        "bn": {"scale": rng.normal(size=(4,)).astype(np.float32),
               "bias": rng.normal(size=(4,)).astype(np.float32)},
        "fc": {"kernel": rng.normal(size=(2 * 2 * 4, 5)).astype(np.float32),
               "bias": rng.normal(size=(5,)).astype(np.float32)},
        "out": {"kernel": rng.normal(size=(5, 2)).astype(np.float32)},
    }
    batch_stats = {"bn": {"mean": rng.normal(size=(4,)).astype(np.float32),
                          "var": rng.uniform(1, 2, size=(4,)).astype(np.float32)}}
    groups = (
        ChannelGroup("conv", 4, producers=(("conv", "kernel"), ("bn", "scale"), ("bn", "bias")),
                     consumers=((("fc", "kernel"), 4),), stats=(("bn", "mean"), ("bn", "var"))),
        ChannelGroup("fc", 5, producers=(("fc", "kernel"), ("fc", "bias")),
                     consumers=((("out", "kernel"), 1),)),
    )
    return params, batch_stats, groups


def test_validate_groups_accepts_consistent_groups():
    params, batch_stats, groups = _tiny()
    structure.validate_groups(groups, params, batch_stats)


@pytest.mark.parametrize("mutate, match", [
    (lambda p, s: p["bn"].pop("scale"), "bn/scale"),
    (lambda p, s: p["fc"].__setitem__("kernel", np.zeros((15, 5))), "fc/kernel"),
    (lambda p, s: p["bn"].__setitem__("bias", np.zeros((3,))), "bn/bias"),
    (lambda p, s: s["bn"].__setitem__("var", np.zeros((2,))), "bn/var"),
    (lambda p, s: s.pop("bn"), "bn/mean"),
])
def test_validate_groups_names_the_bad_path(mutate, match):
    params, batch_stats, groups = _tiny()
    mutate(params, batch_stats)
    with pytest.raises(ValueError, match=match):
        structure.validate_groups(groups, params, batch_stats)


def test_validate_groups_rejects_duplicates():
    params, batch_stats, groups = _tiny()
    with pytest.raises(ValueError, match="duplicate"):
        structure.validate_groups((groups[0], groups[0]), params, batch_stats)
    twice = ChannelGroup("again", 5, producers=(("fc", "bias"),))
    with pytest.raises(ValueError, match="fc/bias"):
        structure.validate_groups(groups + (twice,), params, batch_stats)


def _forward(v, x):
    """The tiny model's logits: conv 1x1 (centre tap) + BN + ReLU, flatten, dense, dense."""
    p, s = v["params"], v["batch_stats"]
    h = jnp.einsum("bhwi,io->bhwo", x, p["conv"]["kernel"][1, 1])
    c = lambda a: a.reshape((1, 1, 1, -1))  # noqa: E731 (no implicit rank promotion)
    h = (h - c(s["bn"]["mean"])) * c(p["bn"]["scale"]) / jnp.sqrt(c(s["bn"]["var"])) + c(
        p["bn"]["bias"])
    h = jnp.maximum(h, 0).reshape((x.shape[0], -1))
    h = jnp.maximum(h @ p["fc"]["kernel"] + p["fc"]["bias"][None], 0)
    return h @ p["out"]["kernel"]


def _sliced(keep):
    """(variables, discovery, sliced variables) of the tiny model at `keep`, under the
    discovered names 'params/conv' and 'params/fc'."""
    params, batch_stats, _ = _tiny()
    variables = {"params": params, "batch_stats": batch_stats}
    found = discover.discover_groups(_forward, variables, jnp.zeros((2, 2, 2, 3)))
    return variables, found, surgery.slice_variables(variables, found, keep)


def test_discovered_groups_of_the_tiny_model():
    params, batch_stats, groups = _tiny()
    _, found, _ = _sliced({})
    got = {(g.size, frozenset(g.producers), frozenset(g.consumers), frozenset(g.stats))
           for g in found.channel_groups()}
    assert got == {(g.size, frozenset(g.producers), frozenset(g.consumers), frozenset(g.stats))
                   for g in groups}


def test_slicing_cuts_producers_consumers_and_stats():
    params, batch_stats, groups = _tiny()
    keep = {"params/conv": np.array([True, False, True, False]),
            "params/fc": np.array([0, 1, 1, 0, 1])}
    _, found, small = _sliced(keep)
    new_params, new_stats = small["params"], small["batch_stats"]
    np.testing.assert_array_equal(new_params["conv"]["kernel"],
                                  params["conv"]["kernel"][..., [0, 2]])
    np.testing.assert_array_equal(new_params["bn"]["scale"], params["bn"]["scale"][[0, 2]])
    np.testing.assert_array_equal(new_stats["bn"]["var"], batch_stats["bn"]["var"][[0, 2]])
    # Flattened (2, 2, 4) map: input index p * 4 + c for p < 4, kept c in {0, 2}.
    rows = [p * 4 + c for p in range(4) for c in (0, 2)]
    np.testing.assert_array_equal(new_params["fc"]["kernel"],
                                  params["fc"]["kernel"][rows][:, [1, 2, 4]])
    np.testing.assert_array_equal(new_params["fc"]["bias"], params["fc"]["bias"][[1, 2, 4]])
    np.testing.assert_array_equal(new_params["out"]["kernel"], params["out"]["kernel"][[1, 2, 4]])
    assert params["conv"]["kernel"].shape == (3, 3, 3, 4)  # inputs untouched
    widths = {"conv": 2, "fc": 3}
    structure.validate_groups(
        [ChannelGroup(g.name, widths[g.name], g.producers, g.consumers, g.stats) for g in groups],
        new_params, new_stats)


def test_sliced_forward_equals_masked_forward():
    """Dense forward with dropped channels zeroed equals the forward of the sliced variables."""
    params, batch_stats, _ = _tiny()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, 2, 3)).astype(np.float32))
    keep = {"params/conv": np.array([False, True, True, False]),
            "params/fc": np.array([True, False, True, True, False])}
    masked = {k: dict(v) for k, v in params.items()}
    m = keep["params/conv"].astype(np.float32)
    masked["bn"] = {"scale": params["bn"]["scale"] * m, "bias": params["bn"]["bias"] * m}
    mf = keep["params/fc"].astype(np.float32)
    masked["fc"] = {"kernel": params["fc"]["kernel"] * mf, "bias": params["fc"]["bias"] * mf}
    _, _, small = _sliced(keep)
    np.testing.assert_allclose(_forward({"params": masked, "batch_stats": batch_stats}, x),
                               _forward(small, x), rtol=1e-5, atol=1e-5)


def test_slicing_keeps_what_is_not_dropped():
    variables, _, small = _sliced({"params/conv": jnp.ones(4, bool)})
    jax.tree.map(np.testing.assert_array_equal, small, variables)


@pytest.mark.parametrize("keep, match", [
    ({"bogus": np.ones(1, bool)}, "bogus"),
    ({"params/conv": np.ones(3, bool)}, "keep\\['params/conv'\\] has shape"),
    ({"params/fc": np.zeros(5, bool)}, "keep\\['params/fc'\\] keeps no channel"),
    ({"params/conv": np.full(4, 0.5)}, "keep\\['params/conv'\\] must be boolean"),
    ({"params/out": np.array([True, False])}, "cannot be pruned"),
])
def test_slicing_rejects_bad_keep(keep, match):
    with pytest.raises(ValueError, match=match):
        _sliced(keep)
