"""Tests for jaxprune.masks: mask pytrees, from_scores, channel / N:M masks, masked optimizer."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import masks
from jaxprune.structure import ChannelGroup


def _params(key=0):
    """Hand-written dict of arrays: conv(3x3, 4->8) -> conv(3x3, 8->8) -> dense(2*2*8 -> 4)."""
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    return {
        "conv1": {"kernel": jax.random.normal(k1, (3, 3, 4, 8)), "bias": jnp.zeros(8)},
        "bn1": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
        "conv2": {"kernel": jax.random.normal(k2, (3, 3, 8, 8)), "bias": jnp.zeros(8)},
        "dense": {"kernel": jax.random.normal(k3, (32, 4)), "bias": jnp.zeros(4)},
    }


GROUPS = (
    ChannelGroup("conv1", 8,
                 producers=(("conv1", "kernel"), ("conv1", "bias"), ("bn1", "scale"),
                            ("bn1", "bias")),
                 consumers=((("conv2", "kernel"), 1),)),
    ChannelGroup("conv2", 8, producers=(("conv2", "kernel"), ("conv2", "bias")),
                 consumers=((("dense", "kernel"), 4),)),
)


def _abs(params):
    return jax.tree.map(jnp.abs, params)


# ------------------------------------------------------------------------------------- basics
def test_ones_like_apply_and_dtypes():
    params = _params()
    m = masks.ones_like(params)
    assert all(x.dtype == jnp.bool_ for x in jax.tree.leaves(m))
    m["dense"]["kernel"] = m["dense"]["kernel"].at[0, :].set(False)
    out = masks.apply(params, m)
    assert np.all(np.asarray(out["dense"]["kernel"][0]) == 0)
    np.testing.assert_array_equal(out["dense"]["kernel"][1:], params["dense"]["kernel"][1:])
    masks.check_compatible(params, m)


def test_check_compatible_names_leaf_and_fix():
    params = _params()
    m = masks.ones_like(params)
    missing = {k: v for k, v in m.items() if k != "conv2"}
    with pytest.raises(ValueError, match="conv2/bias"):
        masks.check_compatible(params, missing)
    bad_shape = jax.tree.map(lambda x: x, m)
    bad_shape["dense"]["kernel"] = jnp.ones((4, 32), bool)
    with pytest.raises(ValueError, match=r"dense/kernel.*shape \(4, 32\)"):
        masks.check_compatible(params, bad_shape)
    bad_dtype = jax.tree.map(lambda x: x, m)
    bad_dtype["conv1"]["kernel"] = jnp.ones((3, 3, 4, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"conv1/kernel.*float32.*astype\(bool\)"):
        masks.check_compatible(params, bad_dtype)


def test_prunable_paths_order_and_exclude():
    params = _params()
    assert masks.prunable_paths(params) == [
        ("conv1", "kernel"), ("conv2", "kernel"), ("dense", "kernel")]
    fn = masks.make_prunable_fn(exclude=[("conv1", "kernel"), "dense/kernel"])
    assert masks.prunable_paths(params, fn) == [("conv2", "kernel")]


def test_count_and_sparsity_are_python_numbers():
    params = _params()
    m = masks.from_scores(_abs(params), 0.5)
    c = masks.count(m, masks.default_prunable)
    assert isinstance(c.kept, int) and isinstance(c.total, int)
    assert c.per_leaf[("dense", "kernel")] == (64, 128)
    assert c.total == 288 + 576 + 128 and c.kept == 144 + 288 + 64
    s = masks.sparsity(m)
    assert isinstance(s, float) and s == pytest.approx(0.5)
    assert masks.count(m).total == c.total + 4 * 8 + 4   # all leaves (4 x [8] + [4])


# ----------------------------------------------------------------------- from_scores: unstructured
@pytest.mark.parametrize("keep", [0.5, 0.3, 1.0, 0.001])
def test_layerwise_realised_sparsity_per_leaf(keep):
    params = _params()
    m = masks.from_scores(_abs(params), keep)
    for path, (kept, total) in masks.count(m, masks.default_prunable).per_leaf.items():
        assert kept == max(1, round(keep * total)), path
    # unprunable leaves stay all-True
    assert bool(jnp.all(m["bn1"]["scale"])) and bool(jnp.all(m["conv1"]["bias"]))


def test_layerwise_keeps_highest_scores():
    params = _params()
    scores = _abs(params)
    m = masks.from_scores(scores, 0.25)
    s, k = np.asarray(scores["conv2"]["kernel"]), np.asarray(m["conv2"]["kernel"])
    assert s[k].min() >= s[~k].max()


def test_layerwise_vector_and_dict_keep():
    params = _params()
    scores = _abs(params)
    m = masks.from_scores(scores, jnp.array([0.5, 0.25, 0.125]))
    c = masks.count(m, masks.default_prunable).per_leaf
    assert [c[p][0] for p in masks.prunable_paths(params)] == [144, 144, 16]
    m = masks.from_scores(scores, {("conv2", "kernel"): 0.25, "dense/kernel": 0.5})
    c = masks.count(m, masks.default_prunable).per_leaf
    assert c[("conv1", "kernel")] == (288, 288)      # missing from the dict: dense
    assert c[("conv2", "kernel")][0] == 144 and c[("dense", "kernel")][0] == 64


def test_ties_lower_index_wins():
    scores = {"w": jnp.ones((4, 5))}
    m = masks.from_scores(scores, 0.35)          # round(7.0) = 7 of 20
    flat = np.asarray(m["w"]).ravel()
    np.testing.assert_array_equal(flat, np.arange(20) < 7)
    m = masks.from_scores(scores, 0.35, scope="global")
    np.testing.assert_array_equal(np.asarray(m["w"]).ravel(), np.arange(20) < 7)


def test_global_single_threshold_and_count():
    params = _params()
    scores = _abs(params)
    keep = 0.3
    m = masks.from_scores(scores, keep, scope="global")
    c = masks.count(m, masks.default_prunable)
    assert c.kept == round(keep * c.total)
    kept, pruned = [], []
    for p in masks.prunable_paths(params):
        leaf_s = np.asarray(scores[p[0]][p[1]]).ravel()
        leaf_m = np.asarray(m[p[0]][p[1]]).ravel()
        kept.append(leaf_s[leaf_m])
        pruned.append(leaf_s[~leaf_m])
    assert np.concatenate(kept).min() >= np.concatenate(pruned).max()
    # layers differ, unlike layer-wise
    assert len({k / t for k, t in c.per_leaf.values()}) > 1


def test_global_keeps_at_least_one_per_leaf():
    scores = {"a": jnp.full((4, 4), 10.0), "b": jnp.full((4, 4), 0.1)}
    m = masks.from_scores(scores, 0.5, scope="global")
    c = masks.count(m)
    assert c.kept == 16 and c.per_leaf[("b",)] == (1, 16) and c.per_leaf[("a",)] == (15, 16)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_keep_ratio_outside_range(bad):
    scores = _abs(_params())
    with pytest.raises(ValueError, match="outside \\(0, 1\\]"):
        masks.from_scores(scores, bad)
    with pytest.raises(ValueError, match="dense/kernel"):
        masks.from_scores(scores, {"dense/kernel": bad})
    with pytest.raises(ValueError, match="conv2"):
        masks.from_scores(scores, {"conv2": bad}, granularity="channel", groups=GROUPS)


def test_keep_ratio_errors_name_value_and_key():
    scores = _abs(_params())
    with pytest.raises(ValueError, match=r"1\.5.*'dense/kernel'"):
        masks.from_scores(scores, {"dense/kernel": 1.5})
    with pytest.raises(ValueError, match=r"0\.0 at index 1"):
        masks.from_scores(scores, jnp.array([0.5, 0.0, 0.5]))
    with pytest.raises(ValueError, match=r"shape \(2,\).*\(3,\)"):
        masks.from_scores(scores, jnp.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="not a prunable leaf"):
        masks.from_scores(scores, {"bn1/scale": 0.5})
    with pytest.raises(ValueError, match="ONE scalar"):
        masks.from_scores(scores, jnp.array([0.5, 0.5, 0.5]), scope="global")


def test_unknown_scope_and_granularity_list_allowed():
    scores = _abs(_params())
    with pytest.raises(ValueError, match=r"'layerwise', 'global'"):
        masks.from_scores(scores, 0.5, scope="local")
    with pytest.raises(ValueError, match=r"'unstructured', 'channel', 'nm'"):
        masks.from_scores(scores, 0.5, granularity="block")
    with pytest.raises(ValueError, match=r"\['l1', 'l2', 'sum'\]"):
        masks.channel_scores(scores, GROUPS, reduce="max")


def test_jit_and_vmap_over_keep_vectors_match_loop():
    params = _params()
    scores = _abs(params)
    batch = jnp.array([[0.5, 0.25, 1.0], [0.1, 0.9, 0.5], [0.3, 0.3, 0.3]])
    build = jax.jit(jax.vmap(lambda k: masks.from_scores(scores, k)))
    batched = build(batch)
    for i in range(batch.shape[0]):
        single = jax.jit(lambda k: masks.from_scores(scores, k))(batch[i])
        ref = masks.from_scores(scores, [float(x) for x in batch[i]])
        for a, b, c in zip(jax.tree.leaves(batched), jax.tree.leaves(single),
                           jax.tree.leaves(ref)):
            np.testing.assert_array_equal(a[i], b)
            np.testing.assert_array_equal(b, c)
    g_build = jax.jit(jax.vmap(lambda k: masks.from_scores(scores, k, scope="global")))
    g = g_build(jnp.array([0.2, 0.6]))
    assert masks.count(jax.tree.map(lambda x: x[1], g), masks.default_prunable).kept == round(
        0.6 * 992)


def _sort_operand_shapes(jaxpr):
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sort":
            shapes += [v.aval.shape for v in eqn.invars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += _sort_operand_shapes(sub)
    return shapes


def test_sort_is_not_batched_under_vmap():
    """The sort does not depend on the keep ratio, so vmap over 16 keeps still sorts once."""
    scores = {"w": jnp.arange(64.0).reshape(8, 8)}
    closed = jax.make_jaxpr(jax.vmap(lambda k: masks.from_scores(scores, k)))(jnp.ones(16))
    shapes = _sort_operand_shapes(closed.jaxpr)
    assert shapes and all(shape == (64,) for shape in shapes), shapes


# ----------------------------------------------------------------------------------- channels
def test_channel_scores_reductions():
    params = _params()
    cs = masks.channel_scores(params, GROUPS, "l1")
    np.testing.assert_allclose(cs["conv1"], jnp.sum(jnp.abs(params["conv1"]["kernel"]),
                                                    axis=(0, 1, 2)), rtol=1e-6)
    cs = masks.channel_scores(params, GROUPS, "l2")
    np.testing.assert_allclose(
        cs["conv2"], jnp.sqrt(jnp.sum(params["conv2"]["kernel"] ** 2, axis=(0, 1, 2))),
        rtol=1e-6)
    cs = masks.channel_scores(params, GROUPS, "sum")
    np.testing.assert_allclose(cs["conv2"], jnp.sum(params["conv2"]["kernel"], axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-5)


def test_channel_masks_producers_consumers_spatial():
    params = _params()
    keep = {"conv1": jnp.array([1, 0, 1, 1, 0, 1, 1, 1], bool),
            "conv2": jnp.array([1, 1, 0, 1, 1, 1, 1, 0], bool)}
    m = masks.channel_masks(keep, GROUPS, params)
    k1, k2 = np.asarray(keep["conv1"]), np.asarray(keep["conv2"])
    for path in [("conv1", "kernel"), ("conv1", "bias"), ("bn1", "scale"), ("bn1", "bias")]:
        leaf = np.asarray(m[path[0]][path[1]])
        np.testing.assert_array_equal(leaf.reshape(-1, 8).all(0), k1)
        np.testing.assert_array_equal(leaf.reshape(-1, 8).any(0), k1)
    conv2 = np.asarray(m["conv2"]["kernel"])                     # [3, 3, in=8, out=8]
    np.testing.assert_array_equal(conv2[0, 0], k1[:, None] & k2[None, :])
    dense = np.asarray(m["dense"]["kernel"])                     # [32 = 4 * 8, 4]
    np.testing.assert_array_equal(dense[:, 0], np.tile(k2, 4))
    # masked param count == param count of the compact model
    c1, c2 = k1.sum(), k2.sum()
    compact = (9 * 4 * c1 + c1 + 2 * c1 + 9 * c1 * c2 + c2 + 4 * c2 * 4 + 4)
    assert masks.count(m).kept == compact


def test_channel_from_scores_layerwise_and_vector():
    params = _params()
    scores = _abs(params)
    m = masks.from_scores(scores, jnp.array([0.5, 0.25]), granularity="channel", groups=GROUPS)
    out1 = np.asarray(m["conv1"]["kernel"]).reshape(-1, 8).any(0)
    out2 = np.asarray(m["conv2"]["kernel"]).reshape(-1, 8).any(0)
    assert out1.sum() == 4 and out2.sum() == 2
    cs = masks.channel_scores(scores, GROUPS)
    expected = np.asarray(cs["conv1"]) >= np.sort(np.asarray(cs["conv1"]))[-4]
    np.testing.assert_array_equal(out1, expected)
    # vmappable
    mm = jax.jit(jax.vmap(lambda k: masks.from_scores(scores, k, granularity="channel",
                                                      groups=GROUPS)))(
        jnp.array([[0.5, 0.25], [1.0, 0.125]]))
    np.testing.assert_array_equal(mm["conv1"]["kernel"][0], m["conv1"]["kernel"])
    assert int(mm["conv2"]["bias"][1].sum()) == 1


def test_channel_global_normalises_group_scale():
    params = _params()
    scores = _abs(params)
    # blow conv2 up by 1000x: without per-group normalisation it would take every kept slot
    scores["conv2"]["kernel"] = scores["conv2"]["kernel"] * 1000.0
    m = masks.from_scores(scores, 0.5, scope="global", granularity="channel", groups=GROUPS)
    n1 = int(np.asarray(m["conv1"]["bias"]).sum())
    n2 = int(np.asarray(m["conv2"]["bias"]).sum())
    assert n1 + n2 == 8 and n1 >= 2 and n2 >= 2


def test_channel_needs_groups_and_checks_paths():
    scores = _abs(_params())
    with pytest.raises(ValueError, match="needs groups"):
        masks.from_scores(scores, 0.5, granularity="channel")
    bad = (ChannelGroup("x", 8, producers=(("conv9", "kernel"),)),)
    with pytest.raises(ValueError, match="conv9/kernel"):
        masks.from_scores(scores, 0.5, granularity="channel", groups=bad)
    bad = (ChannelGroup("x", 8, producers=(("conv2", "kernel"),),
                        consumers=((("dense", "kernel"), 3),)),)
    with pytest.raises(ValueError, match=r"dense/kernel.*3 \* 8 = 24"):
        masks.channel_masks({"x": jnp.ones(8, bool)}, bad, scores)


# ---------------------------------------------------------------------------------------- N:M
def test_nm_two_of_four_along_input_axis():
    params = _params()
    scores = _abs(params)
    m = masks.from_scores(scores, None, granularity="nm", n=2, m=4,
                          prunable_fn=masks.make_prunable_fn(exclude=["dense/kernel"]))
    conv2 = np.asarray(m["conv2"]["kernel"])                           # [3, 3, 8, 8]
    blocks = conv2.reshape(3, 3, 2, 4, 8)                                # in = 2 blocks of 4
    assert np.all(blocks.sum(axis=3) == 2)
    s = np.asarray(scores["conv2"]["kernel"]).reshape(3, 3, 2, 4, 8)
    assert np.all(np.where(blocks, s, np.inf).min(3) >= np.where(blocks, -np.inf, s).max(3))
    assert masks.sparsity(m, masks.make_prunable_fn(exclude=["dense/kernel"])) == 0.5
    # the same with keep_ratios = n / m; a mismatching keep is an error
    m2 = masks.from_scores(scores, 0.5, granularity="nm",
                           prunable_fn=masks.make_prunable_fn(exclude=["dense/kernel"]))
    np.testing.assert_array_equal(m2["conv2"]["kernel"], conv2)
    with pytest.raises(ValueError, match="n/m"):
        masks.from_scores(scores, 0.3, granularity="nm")


def test_nm_ties_and_one_d_leaves():
    scores = {"w": jnp.ones((8, 2)), "b": jnp.ones(3)}
    m = masks.from_scores(scores, None, granularity="nm", n=1, m=4,
                          prunable_fn=lambda path, leaf: True)
    np.testing.assert_array_equal(np.asarray(m["w"])[:, 0], [1, 0, 0, 0, 1, 0, 0, 0])
    assert bool(jnp.all(m["b"]))


def test_nm_m_must_divide_input_dim():
    scores = {"layer": {"kernel": jnp.ones((6, 4))}}
    with pytest.raises(ValueError, match=r"layer/kernel.*dimension.*6.*m=4"):
        masks.from_scores(scores, None, granularity="nm", n=2, m=4)


# ------------------------------------------------------------------------------------ optimizer
@pytest.mark.parametrize("name, tx", [
    ("sgd_momentum", optax.sgd(0.1, momentum=0.9)),
    ("adam", optax.adam(0.1)),
    ("adamw", optax.adamw(0.1, weight_decay=0.1)),
    ("decay_sgd", optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9))),
])
def test_masked_updates_keep_pruned_weights_exactly_zero(name, tx):
    params = _params()
    m = masks.from_scores(_abs(params), 0.5)
    params = masks.apply(params, m)
    tx = optax.chain(tx, masks.masked_updates())
    opt_state = tx.init(params)

    def loss_fn(p, x):
        h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"][None, :])
        return jnp.sum(h ** 2) + sum(jnp.sum(jnp.sin(l)) for l in jax.tree.leaves(p))

    @jax.jit
    def step(p, s, x):
        g = jax.grad(loss_fn)(p, x)
        u, s = tx.update(g, s, p, masks=m)
        return optax.apply_updates(p, u), s

    x = jnp.ones((8, 32))
    start = params
    for _ in range(3):
        params, opt_state = step(params, opt_state, x)
    for p, mk, p0 in zip(jax.tree.leaves(params), jax.tree.leaves(m), jax.tree.leaves(start)):
        assert np.all(np.asarray(p)[~np.asarray(mk)] == 0.0), name
    moved = np.asarray(params["conv2"]["kernel"] != start["conv2"]["kernel"])
    assert moved[np.asarray(m["conv2"]["kernel"])].all(), name


def test_masked_updates_requires_masks():
    tx = masks.masked_updates()
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="masks=masks"):
        tx.update(params, tx.init(params), params)


# ---------------------------------------------------------------------------------- Flax Linen
def test_core_on_flax_linen_params():
    """The core only sees a pytree: a Linen model's params work unchanged."""
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
            return nn.Dense(4, name="head")(x.reshape(x.shape[0], -1))

    net = Net()
    x = jnp.ones((2, 4, 4, 3))
    params = net.init(jax.random.key(0), x)["params"]
    m = masks.from_scores(jax.tree.map(jnp.abs, params), 0.25)
    masks.check_compatible(params, m)
    c = masks.count(m, masks.default_prunable)
    assert c.per_leaf[("conv", "kernel")] == (round(0.25 * 216), 216)
    assert c.per_leaf[("head", "kernel")] == (round(0.25 * 512), 512)
    pruned = masks.apply(params, m)
    assert net.apply({"params": pruned}, x).shape == (2, 4)
    group = ChannelGroup("conv", 8, producers=(("conv", "kernel"), ("conv", "bias")),
                         consumers=((("head", "kernel"), 16),))
    cm = masks.from_scores(jax.tree.map(jnp.abs, params), 0.5, granularity="channel",
                           groups=(group,))
    assert masks.count(cm).kept == 27 * 4 + 4 + 16 * 4 * 4 + 4
