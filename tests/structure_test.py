"""Tests for jaxprune.structure: group validation and compaction on hand-made pytrees."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import structure
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


def test_compact_slices_producers_consumers_and_stats():
    params, batch_stats, groups = _tiny()
    keep = {"conv": np.array([True, False, True, False]),
            "fc": np.array([0, 1, 1, 0, 1])}
    new_params, new_stats, widths = structure.compact(params, batch_stats, groups, keep)
    assert widths == {"conv": 2, "fc": 3}
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
    structure.validate_groups(
        [ChannelGroup(g.name, widths[g.name], g.producers, g.consumers, g.stats) for g in groups],
        new_params, new_stats)


def test_compact_equals_masked_forward():
    """Dense forward with dropped channels zeroed equals the compact forward."""
    params, batch_stats, groups = _tiny()
    x = np.random.default_rng(1).normal(size=(2, 2, 2, 3)).astype(np.float32)

    def forward(p, s):
        h = np.einsum("bhwi,io->bhwo", x, p["conv"]["kernel"][1, 1])  # numpy: broadcasting ok
        h = (h - s["bn"]["mean"]) * p["bn"]["scale"] / np.sqrt(s["bn"]["var"]) + p["bn"]["bias"]
        h = np.maximum(h, 0).reshape((2, -1))
        h = np.maximum(h @ p["fc"]["kernel"] + p["fc"]["bias"], 0)
        return h @ p["out"]["kernel"]

    keep = {"conv": np.array([False, True, True, False]),
            "fc": np.array([True, False, True, True, False])}
    masked = {k: dict(v) for k, v in params.items()}
    m = keep["conv"].astype(np.float32)
    masked["bn"] = {"scale": params["bn"]["scale"] * m, "bias": params["bn"]["bias"] * m}
    mf = keep["fc"].astype(np.float32)
    masked["fc"] = {"kernel": params["fc"]["kernel"] * mf, "bias": params["fc"]["bias"] * mf}
    small_params, small_stats, _ = structure.compact(params, batch_stats, groups, keep)
    np.testing.assert_allclose(forward(masked, batch_stats), forward(small_params, small_stats),
                               rtol=1e-5, atol=1e-5)


def test_compact_works_on_jax_arrays_and_keeps_everything():
    params, batch_stats, groups = _tiny()
    params = {k: {n: jnp.asarray(a) for n, a in v.items()} for k, v in params.items()}
    keep = {"conv": jnp.ones(4, bool), "fc": jnp.ones(5, bool)}
    new_params, _, widths = structure.compact(params, batch_stats, groups, keep)
    assert widths == {"conv": 4, "fc": 5}
    np.testing.assert_array_equal(new_params["fc"]["kernel"], params["fc"]["kernel"])


@pytest.mark.parametrize("keep, match", [
    ({"conv": np.ones(4, bool)}, "missing \\['fc'\\]"),
    ({"conv": np.ones(4, bool), "fc": np.ones(5, bool), "bogus": np.ones(1, bool)}, "bogus"),
    ({"conv": np.ones(3, bool), "fc": np.ones(5, bool)}, "keep\\['conv'\\] has shape"),
    ({"conv": np.ones(4, bool), "fc": np.zeros(5, bool)}, "keep\\['fc'\\] keeps no channel"),
    ({"conv": np.full(4, 0.5), "fc": np.ones(5, bool)}, "keep\\['conv'\\] must be boolean"),
])
def test_compact_rejects_bad_keep(keep, match):
    params, batch_stats, groups = _tiny()
    with pytest.raises(ValueError, match=match):
        structure.compact(params, batch_stats, groups, keep)


def test_consumer_indices():
    np.testing.assert_array_equal(structure.consumer_indices(np.array([1, 3]), 4, 2),
                                  [1, 3, 5, 7])
