"""Tests for jaxprune.costs: MACs from the jaxpr, params, bytes, latency, cost models."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import costs, models
from jaxprune.structure import ChannelGroup

INPUT = (8, 8, 3)


# --------------------------------------------------------------------------------------
# a hand-written tiny conv net on dict params
# --------------------------------------------------------------------------------------

def _conv(x, k, stride=1, groups=1, padding="SAME"):
    return jax.lax.conv_general_dilated(
        x, k, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups)


def tiny_apply(params, batch_stats, x, *, train, channel_masks=None):
    """conv1 3x3 (3->4) + BN + relu, conv2 3x3 stride 2 (4->8) + bias, flatten, dense 128->10."""
    del channel_masks
    c = lambda v: v[None, None, None, :]  # noqa: E731  (explicit rank promotion)
    bn, stats = params["bn1"], batch_stats["bn1"]
    y = _conv(x, params["conv1"]["kernel"])
    y = (y - c(stats["mean"])) * jax.lax.rsqrt(c(stats["var"]) + 1e-5)
    y = jax.nn.relu(y * c(bn["scale"]) + c(bn["bias"]))     # custom_jvp around a jit
    # the kernel reaches the conv through a jit, a dtype cast and a double transpose
    conv2 = jax.jit(lambda a, k: _conv(a, k.astype(jnp.float32), stride=2))
    kernel2 = jnp.transpose(jnp.transpose(params["conv2"]["kernel"], (3, 2, 1, 0)), (3, 2, 1, 0))
    y = conv2(y, kernel2) + c(params["conv2"]["bias"])
    y = y.reshape(y.shape[0], -1)                             # index (h * 4 + w) * 8 + c
    logits = y @ params["dense"]["kernel"] + params["dense"]["bias"][None, :]
    return logits, batch_stats


# Hand-computed per-example MACs (SAME padding):
CONV1_MACS = 8 * 8 * 3 * 3 * 3 * 4      # 6912
CONV2_MACS = 4 * 4 * 3 * 3 * 4 * 8      # 4608
DENSE_MACS = 128 * 10                   # 1280
TOTAL_MACS = CONV1_MACS + CONV2_MACS + DENSE_MACS
TOTAL_PARAMS = 108 + 4 + 4 + 288 + 8 + 1280 + 10

GROUPS = (
    ChannelGroup("g1", 4, (("conv1", "kernel"), ("bn1", "scale"), ("bn1", "bias")),
                 ((("conv2", "kernel"), 1),), (("bn1", "mean"), ("bn1", "var"))),
    ChannelGroup("g2", 8, (("conv2", "kernel"), ("conv2", "bias")),
                 ((("dense", "kernel"), 16),)),
)


def tiny_params(seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {
        "conv1": {"kernel": jax.random.normal(keys[0], (3, 3, 3, 4))},
        "bn1": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))},
        "conv2": {"kernel": jax.random.normal(keys[1], (3, 3, 4, 8)).astype(jnp.bfloat16),
                  "bias": jnp.zeros((8,))},
        "dense": {"kernel": jax.random.normal(keys[2], (128, 10)), "bias": jnp.zeros((10,))},
    }
    batch_stats = {"bn1": {"mean": jnp.zeros((4,)), "var": jnp.ones((4,))}}
    return params, batch_stats


def local_channel_masks(kept, groups, params):
    """Stand-in for masks.channel_masks(channel_keep(...)): keeps the first kept[g] channels."""
    masks = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    for group, k in zip(groups, kept):
        keep = np.arange(group.size) < k
        for path in group.producers:
            leaf = masks[path[0]][path[1]]
            leaf &= keep.reshape((1,) * (leaf.ndim - 1) + (-1,))
        for path, spatial in group.consumers:
            leaf = masks[path[0]][path[1]]
            leaf &= np.tile(keep, spatial)[:, None]
    return masks


def kept_channels(keep, sizes):
    """The contract's rounding: clip(round(keep * size), 1, size), in float32."""
    keep = np.asarray(keep, np.float32)
    return [int(np.clip(np.round(k * np.float32(s)), 1, s)) for k, s in zip(keep, sizes)]


# --------------------------------------------------------------------------------------
# count_macs / count_params / param_bytes / latency
# --------------------------------------------------------------------------------------

def test_count_macs_tiny_net_exact():
    params, stats = tiny_params()
    assert costs.count_macs(tiny_apply, params, stats, INPUT) == TOTAL_MACS == 12800


def test_count_macs_accepts_abstract_params():
    params, stats = tiny_params()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, stats))
    assert costs.count_macs(tiny_apply, *abstract, INPUT) == TOTAL_MACS


def test_count_macs_channel_masks_exact():
    params, stats = tiny_params()
    masks = local_channel_masks([2, 3], GROUPS, params)
    expected = 8 * 8 * 3 * 3 * 3 * 2 + 4 * 4 * 3 * 3 * 2 * 3 + 16 * 3 * 10
    assert costs.count_macs(tiny_apply, params, stats, INPUT, masks=masks) == expected


def test_count_macs_unstructured_masks_count_nonzero_weights():
    params, stats = tiny_params()
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda p: rng.random(p.shape) < 0.3, params)
    expected = (8 * 8 * masks["conv1"]["kernel"].sum() + 4 * 4 * masks["conv2"]["kernel"].sum()
                + masks["dense"]["kernel"].sum())
    assert costs.count_macs(tiny_apply, params, stats, INPUT, masks=masks) == expected


def test_grouped_conv_macs():
    def apply(params, batch_stats, x, *, train):
        return _conv(x, params["k"], groups=2, padding="VALID"), batch_stats

    params = {"k": jnp.zeros((3, 3, 2, 6))}           # 4 in-channels in 2 groups -> 6 out
    # out 4x4x6, each output sums 3*3*(4/2) products
    assert costs.count_macs(apply, params, {}, (6, 6, 4)) == 4 * 4 * 3 * 3 * 2 * 6


def test_count_macs_through_scan_cond_remat_custom_vjp():
    @jax.custom_vjp
    def matmul(x, w):
        return x @ w

    matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))

    def apply(params, batch_stats, x, *, train):
        y = matmul(x, params["a"])                                    # 3*4
        y = jax.checkpoint(lambda y: y @ params["b"].T)(y)            # 4*4 (transposed view)

        def body(carry, _):
            return carry @ params["c"], None
        y, _ = jax.lax.scan(body, y, None, length=3)                  # 3 * 4*4
        y = jax.lax.cond(y.sum() > 0, lambda y: y @ params["b"], lambda y: y, y)  # max branch
        return y, batch_stats

    params = {"a": jnp.ones((3, 4)), "b": jnp.ones((4, 4)), "c": jnp.ones((4, 4))}
    assert costs.count_macs(apply, params, {}, (3,)) == 12 + 16 + 48 + 16
    masks = {"a": np.eye(3, 4, dtype=bool), "b": np.zeros((4, 4), bool),
             "c": np.eye(4, dtype=bool)}
    # every kernel is traced back to its leaf: a 3/12, b 0/16, c 4/16 (x3 in the scan)
    assert costs.count_macs(apply, params, {}, (3,), masks=masks) == 3 + 0 + 3 * 4 + 0


def test_count_macs_rejects_bad_input_and_masks():
    params, stats = tiny_params()
    with pytest.raises(ValueError, match="per-example shape"):
        costs.count_macs(tiny_apply, params, stats, (0, 8, 3))
    bad = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    bad["dense"]["kernel"] = np.ones((10, 128), bool)
    with pytest.raises(ValueError, match="dense/kernel"):
        costs.count_macs(tiny_apply, params, stats, INPUT, masks=bad)
    missing = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    del missing["bn1"]
    with pytest.raises(ValueError, match="same tree structure"):
        costs.count_params(params, missing)


def test_count_params_and_bytes():
    params, _ = tiny_params()
    assert costs.count_params(params) == TOTAL_PARAMS
    masks = local_channel_masks([2, 3], GROUPS, params)
    expected = 3 * 3 * 3 * 2 + 2 + 2 + 3 * 3 * 2 * 3 + 3 + 16 * 3 * 10 + 10
    assert costs.count_params(params, masks) == expected
    # conv2/kernel is bfloat16 (2 bytes), the rest float32
    assert costs.param_bytes(params) == 4 * TOTAL_PARAMS - 2 * 288


def test_latency_reports_percentiles():
    out = costs.latency(jax.jit(lambda x: x * 2.0), jnp.ones((4,)), warmup=1, repeats=5)
    assert set(out) == {"median_ms", "p10_ms", "p90_ms", "repeats"}
    assert 0.0 <= out["p10_ms"] <= out["median_ms"] <= out["p90_ms"]
    with pytest.raises(ValueError, match="repeats"):
        costs.latency(lambda: None, repeats=0)


# --------------------------------------------------------------------------------------
# CostModel
# --------------------------------------------------------------------------------------

def test_cost_model_dense_and_min():
    params, stats = tiny_params()
    cm = costs.cost_model(tiny_apply, params, stats, INPUT, GROUPS)
    assert cm.names == ("g1", "g2") and cm.sizes == (4, 8) and cm.kind == "channel"
    assert cm.dense_macs == TOTAL_MACS and cm.dense_params == TOTAL_PARAMS
    assert cm.min_macs == 8 * 8 * 27 + 4 * 4 * 9 + 16 * 10
    assert cm.min_params == 27 + 2 + 9 + 1 + 16 * 10 + 10
    assert cm.fixed_params == 10 and cm.fixed_macs == 0
    assert int(cm.macs(jnp.ones((2,)))) == TOTAL_MACS
    assert int(cm.macs(jnp.zeros((2,)))) == cm.min_macs        # at least one channel per group


def test_cost_model_equals_count_with_channel_masks_random_keeps():
    params, stats = tiny_params()
    cm = costs.cost_model(tiny_apply, params, stats, INPUT, GROUPS)
    rng = np.random.default_rng(1)
    keeps = rng.uniform(0.05, 1.0, (6, 2)).astype(np.float32)
    keeps[0] = [0.375, 0.0625]        # exact halves: round-half-even 1.5 -> 2, 0.5 -> 0 -> 1
    batched_macs = jax.jit(jax.vmap(cm.macs))(keeps)
    batched_params = jax.jit(cm.params)(keeps)                 # leading axes work directly
    for i, keep in enumerate(keeps):
        masks = local_channel_masks(kept_channels(keep, cm.sizes), GROUPS, params)
        macs = costs.count_macs(tiny_apply, params, stats, INPUT, masks=masks)
        n = costs.count_params(params, masks)
        assert int(batched_macs[i]) == macs == cm.macs_exact(keep)
        assert int(batched_params[i]) == n == cm.params_exact(keep)
    assert batched_macs.dtype == jnp.int32


def test_cost_model_rejects_bad_groups_and_keep():
    params, stats = tiny_params()
    wrong_size = (ChannelGroup("g1", 5, (("conv1", "kernel"),)),)
    with pytest.raises(ValueError, match="conv1/kernel"):
        costs.cost_model(tiny_apply, params, stats, INPUT, wrong_size)
    missing = (ChannelGroup("g1", 4, (("conv9", "kernel"),)),)
    with pytest.raises(ValueError, match="conv9/kernel"):
        costs.cost_model(tiny_apply, params, stats, INPUT, missing)
    wrong_spatial = (ChannelGroup("g2", 8, (("conv2", "kernel"),), ((("dense", "kernel"), 4),)),)
    with pytest.raises(ValueError, match="spatial 4"):
        costs.cost_model(tiny_apply, params, stats, INPUT, wrong_spatial)
    twice = GROUPS + (ChannelGroup("g3", 8, (("conv2", "bias"),)),)
    with pytest.raises(ValueError, match="producer of both"):
        costs.cost_model(tiny_apply, params, stats, INPUT, twice)
    cm = costs.cost_model(tiny_apply, params, stats, INPUT, GROUPS)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        cm.macs(jnp.ones((3,)))


def test_unstructured_cost_model_equals_count_with_masks():
    params, stats = tiny_params()
    um = costs.unstructured_cost_model(tiny_apply, params, stats, INPUT)
    assert um.names == ("conv1/kernel", "conv2/kernel", "dense/kernel")
    assert um.sizes == (108, 288, 1280)
    assert um.dense_macs == TOTAL_MACS and um.dense_params == TOTAL_PARAMS
    rng = np.random.default_rng(2)
    keeps = rng.uniform(0.0, 1.0, (4, 3)).astype(np.float32)
    got_macs = jax.jit(jax.vmap(um.macs))(keeps)
    got_params = jax.vmap(um.params)(keeps)
    for i, keep in enumerate(keeps):
        kept = kept_channels(keep, um.sizes)
        masks = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
        for (layer, _), k in zip([("conv1", 0), ("conv2", 0), ("dense", 0)], kept):
            flat = np.zeros(params[layer]["kernel"].size, bool)
            flat[rng.permutation(flat.size)[:k]] = True
            masks[layer]["kernel"] = flat.reshape(params[layer]["kernel"].shape)
        assert int(got_macs[i]) == costs.count_macs(tiny_apply, params, stats, INPUT, masks)
        assert int(got_params[i]) == costs.count_params(params, masks)
    exclude = lambda path, leaf: leaf.ndim >= 2 and path != ("conv1", "kernel")  # noqa: E731
    um2 = costs.unstructured_cost_model(tiny_apply, params, stats, INPUT, prunable_fn=exclude)
    assert um2.names == ("conv2/kernel", "dense/kernel")
    assert um2.fixed_macs == CONV1_MACS and um2.min_macs == CONV1_MACS + 16 + 1


# --------------------------------------------------------------------------------------
# real zoo models (traced abstractly: no parameter initialisation is run)
# --------------------------------------------------------------------------------------

def _abstract_model(name, input_shape=(32, 32, 3)):
    holder = {}

    def build(key):
        model = models.get_model(name, num_classes=10, input_shape=input_shape, key=key)
        holder["model"] = model
        return model.params, model.batch_stats

    params, stats = jax.eval_shape(build, jax.random.key(0))
    return holder["model"]._replace(params=params, batch_stats=stats)


@pytest.mark.parametrize("name, macs_m, params_m", [
    ("resnet20", 41.0, 0.27),     # He et al. 2016 CIFAR ResNet-20: ~41M MACs, 0.27M params
    ("resnet56", 126.0, 0.85),    # ResNet-56: 125-127M MACs, 0.85M params
    ("vgg16", 313.0, 14.7),       # VGG-16 for CIFAR: ~313M MACs, 14.7M params
])
def test_zoo_model_costs_match_published(name, macs_m, params_m):
    model = _abstract_model(name)
    macs = costs.count_macs(model.apply, model.params, model.batch_stats, (32, 32, 3))
    n = costs.count_params(model.params)
    assert macs / 1e6 == pytest.approx(macs_m, rel=0.03)
    assert n / 1e6 == pytest.approx(params_m, rel=0.03)
    cm = costs.cost_model(model.apply, model.params, model.batch_stats, (32, 32, 3),
                          models.channel_groups(model))
    assert cm.dense_macs == macs and cm.dense_params == n


def test_resnet20_cost_model_equals_count_with_real_channel_masks():
    masks_lib = pytest.importorskip("jaxprune.masks")
    model = _abstract_model("resnet20")
    groups = models.channel_groups(model)
    cm = costs.cost_model(model.apply, model.params, model.batch_stats, (32, 32, 3), groups)
    key = jax.random.key(3)
    scores = {g.name: jax.random.uniform(jax.random.fold_in(key, i), (g.size,))
              for i, g in enumerate(groups)}
    keeps = np.random.default_rng(3).uniform(0.1, 1.0, (2, cm.num_groups)).astype(np.float32)
    got_macs, got_params = jax.jit(lambda k: (cm.macs(k), cm.params(k)))(keeps)
    for i, keep in enumerate(keeps):
        keep_bool = masks_lib.channel_keep(scores, jnp.asarray(keep), groups)
        masks = masks_lib.channel_masks(keep_bool, groups, model.params)
        assert int(got_macs[i]) == costs.count_macs(
            model.apply, model.params, model.batch_stats, (32, 32, 3), masks=masks)
        assert int(got_params[i]) == costs.count_params(model.params, masks)
    assert math.isclose(cm.min_macs / cm.dense_macs, float(cm.macs(jnp.zeros(cm.num_groups)))
                        / cm.dense_macs)
