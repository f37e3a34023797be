"""Tests for jaxprune.discover (channel groups from the jaxpr, hookless masks) and
jaxprune.surgery (compaction of any traced model, save / load).

Invariants (the zoo's published layouts are checked in zoo_groups_test.py): the compact
model's outputs equal the masked model's, for the zoo (rewritten program and rebuilt module) and
for models written outside it (Linen ResNet, NNX CNN, MobileNetV2 block, DenseNet block,
plain-dict MLP); what cannot be pruned is reported with a reason.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import discover, masks, modelio, models, surgery


def _zoo(name, input_shape, widths=None, abstract=False):
    """(model, variables, apply_fn(variables, x) -> logits); `abstract`: shapes only."""
    built = {}

    def build():
        built["model"] = models.get_model(name, num_classes=5, input_shape=input_shape,
                                          key=jax.random.key(0), widths=widths)
        return built["model"].params, built["model"].batch_stats

    # Eager init compiles every initialiser per distinct shape; discovery needs shapes only.
    params, batch_stats = jax.eval_shape(build) if abstract else build()
    model = built["model"]._replace(params=params, batch_stats=batch_stats)
    variables = {"params": params, "batch_stats": batch_stats}

    def apply_fn(v, x):
        return model.apply(v["params"], v["batch_stats"], x, train=False)[0]

    return model, variables, apply_fn


def _key(g):
    return (g.size, frozenset(g.producers), frozenset(g.consumers), frozenset(g.stats))


def _distinct_widths(name, input_shape):
    """Small widths, different for every group (so sizes cannot hide a wrong coupling)."""
    defaults = models.MODELS[name].default_widths(input_shape)
    return {g: 3 + i for i, g in enumerate(defaults)}


def _random_keep(groups, seed=0, p=0.4):
    rng = np.random.default_rng(seed)
    keep = {}
    for g in groups:
        k = rng.random(g.size) > p
        k[rng.integers(g.size)] = True
        keep[g.name] = k
    return keep


def _as_masks(keep):
    return {n: jnp.asarray(k, jnp.float32) for n, k in keep.items()}



def test_hookless_masks_vmap_over_candidates():
    model, variables, apply_fn = _zoo("resnet20", (8, 8, 3))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    found = discover.discover_groups(apply_fn, variables, x)
    masked_fn = discover.mask_activations(apply_fn)
    cands = [_random_keep(found.groups, seed=s) for s in range(3)]
    stacked = {g.name: jnp.stack([jnp.asarray(c[g.name], jnp.float32) for c in cands])
               for g in found.groups}
    got = jax.jit(jax.vmap(lambda cm: masked_fn(variables, x, cm)))(stacked)
    for i, c in enumerate(cands):
        np.testing.assert_allclose(got[i], masked_fn(variables, x, _as_masks(c)), atol=1e-5)
    np.testing.assert_allclose(masked_fn(variables, x, None), apply_fn(variables, x), atol=1e-6)
    with pytest.raises(ValueError, match="unknown group"):
        masked_fn(variables, x, {"nope": jnp.ones((3,))})


@pytest.mark.parametrize("name, input_shape", [  # VGG-16 and ResNet-20: ~40 CPU s each
    ("lenet5", (8, 8, 1)), pytest.param("vgg16", (8, 8, 3), marks=pytest.mark.slow),
    pytest.param("resnet20", (8, 8, 3), marks=pytest.mark.slow), ("mlp", (8, 8, 1))])
def test_zoo_compaction_matches_masked_model_and_the_narrower_module(name, input_shape):
    """The rewritten program and the zoo module rebuilt at the kept widths run the same sliced
    variables and give the masked model's outputs."""
    model, variables, apply_fn = _zoo(name, input_shape, _distinct_widths(name, input_shape))
    x = jax.random.normal(jax.random.key(1), (4,) + input_shape)
    found = discover.discover_groups(apply_fn, variables, x)
    keep = _random_keep(found.groups)
    small_fn, small = surgery.compact(apply_fn, variables, found, keep)
    want = discover.mask_activations(apply_fn)(variables, x, _as_masks(keep))
    np.testing.assert_allclose(jax.jit(small_fn)(small, x), want, atol=1e-5)
    # discovery's names -> the zoo's width names (the same groups: the same members)
    width_name = {frozenset(g.members): g.name for g in models.discovery(model).groups}
    named = {g.name: width_name[frozenset(g.members)] for g in found.groups}
    narrow = models.with_widths(model, {named[n]: int(k.sum()) for n, k in keep.items()},
                                small["params"], small["batch_stats"])
    np.testing.assert_allclose(narrow.apply(small["params"], small["batch_stats"], x,
                                            train=False)[0], want, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Models written outside the zoo.


class LinenBlock(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.Conv(self.features, (3, 3), (self.stride, self.stride), use_bias=False)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = nn.BatchNorm(use_running_average=not train)(y)
        if x.shape[-1] != self.features or self.stride != 1:
            x = nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.relu(x + y)


class LinenResNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(6, (3, 3))(x)))
        x = LinenBlock(6)(x, train)
        x = LinenBlock(6)(x, train)
        x = LinenBlock(10, stride=2)(x, train)
        return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


class NNXCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 5, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(5, rngs=rngs)
        self.conv2 = nnx.Conv(5, 7, (3, 3), strides=(2, 2), rngs=rngs)
        self.fc1 = nnx.Linear(4 * 4 * 7, 9, rngs=rngs)
        self.out = nnx.Linear(9, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x), use_running_average=True))
        x = nnx.avg_pool(nnx.relu(self.conv2(x)), (1, 1))
        x = nnx.gelu(self.fc1(x.reshape((x.shape[0], -1))))
        return self.out(x)


class MobileNetV2Block(nn.Module):
    """Stem, one inverted residual (expand 1x1, depthwise 3x3, linear project 1x1, add)."""

    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu6(nn.BatchNorm(use_running_average=True)(nn.Conv(6, (3, 3))(x)))
        y = jax.nn.relu6(nn.BatchNorm(use_running_average=True)(
            nn.Conv(12, (1, 1), use_bias=False)(x)))
        y = nn.Conv(12, (3, 3), feature_group_count=12, use_bias=False, name="depthwise")(y)
        y = jax.nn.relu6(nn.BatchNorm(use_running_average=True)(y))
        y = nn.BatchNorm(use_running_average=True)(
            nn.Conv(6, (1, 1), use_bias=False, name="project")(y))
        x = x + y
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


class DenseNetBlock(nn.Module):
    """Stem, two BN-ReLU-conv layers whose outputs are concatenated, transition, classifier."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="stem")(x)
        for i in range(2):
            y = nn.relu(nn.BatchNorm(use_running_average=True, name=f"bn{i}")(x))
            y = nn.Conv(3, (3, 3), name=f"layer{i}")(y)
            x = jnp.concatenate([x, y], axis=-1)
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn_final")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(3, name="head")(x.reshape((x.shape[0], -1)))


def _linen(module, input_shape, seed=0):
    x = jax.random.normal(jax.random.key(seed + 1), (2,) + input_shape)
    variables = module.init(jax.random.key(seed), x)
    # Random statistics, so that BN entries matter.
    rng = np.random.default_rng(seed)
    def stat(path, v):
        if "batch_stats" not in str(path):
            return jnp.asarray(v)
        if "mean" in str(path):
            return jnp.asarray(rng.normal(0.0, 0.1, v.shape), v.dtype)
        return jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype)

    variables = jax.tree_util.tree_map_with_path(stat, nn.unbox(variables))
    return (lambda v, x: module.apply(v, x)), dict(variables), x


def _nnx_cnn():
    model = NNXCNN(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    variables = nnx.to_pure_dict(state)

    def apply_fn(v, x):
        return nnx.merge(graphdef, nnx.State(v))(x)

    return apply_fn, variables, jax.random.normal(jax.random.key(2), (2, 8, 8, 3))


def _dict_mlp():
    rng = np.random.default_rng(0)
    params = {f"w{i}": jnp.asarray(rng.normal(size=s), jnp.float32)
              for i, s in enumerate([(12, 8), (8, 6), (6, 2)])}
    params.update({f"b{i}": jnp.asarray(rng.normal(size=(s,)), jnp.float32)
                   for i, s in enumerate([8, 6, 2])})

    def apply_fn(p, x):
        h = jax.nn.sigmoid(x @ p["w0"] + p["b0"][None])  # sigmoid(0) != 0: masks at consumers
        h = jnp.tanh(h @ p["w1"] + p["b1"][None])
        return h @ p["w2"] + p["b2"][None]

    return apply_fn, params, jax.random.normal(jax.random.key(3), (5, 12))


OUTSIDE = {
    "linen_resnet": lambda: _linen(LinenResNet(), (8, 8, 3)),
    "nnx_cnn": _nnx_cnn,
    "mobilenet_v2_block": lambda: _linen(MobileNetV2Block(), (6, 6, 3)),
    "densenet_block": lambda: _linen(DenseNetBlock(), (4, 4, 3)),
    "dict_mlp": _dict_mlp,
}


def _paths(group, role=None):
    return {"/".join(m.path) for m in group.members if role is None or m.role == role}


def _by_producer(found, path):
    return next(g for g in found.all_groups if path in _paths(g, "producer"))


def test_linen_resnet_couples_the_residual_stream():
    apply_fn, variables, x = OUTSIDE["linen_resnet"]()
    found = discover.discover_groups(apply_fn, variables, x)
    stream = _by_producer(found, "params/Conv_0/kernel")
    # stem + both identity blocks' second convs write one stream; the projection block starts
    # a second stream (its projection + its second conv), read by the classifier.
    assert _paths(stream, "producer") == {"params/Conv_0/kernel",
                                          "params/LinenBlock_0/Conv_1/kernel",
                                          "params/LinenBlock_1/Conv_1/kernel"}
    assert _paths(stream, "consumer") == {
        "params/LinenBlock_0/Conv_0/kernel", "params/LinenBlock_1/Conv_0/kernel",
        "params/LinenBlock_2/Conv_0/kernel", "params/LinenBlock_2/Conv_2/kernel"}
    assert "batch_stats/BatchNorm_0/mean" in _paths(stream, "param")
    last = _by_producer(found, "params/LinenBlock_2/Conv_2/kernel")
    assert "params/LinenBlock_2/Conv_1/kernel" in _paths(last, "producer")
    assert "params/Dense_0/kernel" in _paths(last, "consumer")
    assert len(found.groups) == 5  # two streams and three inner convs
    assert list(found.unprunable) == ["params/Dense_0"]


def test_nnx_cnn_flatten_records_the_spatial_factor():
    apply_fn, variables, x = OUTSIDE["nnx_cnn"]()
    found = discover.discover_groups(apply_fn, variables, x)
    conv2 = _by_producer(found, "conv2/kernel")
    (fc1,) = conv2.consumers
    assert fc1.path == ("fc1", "kernel") and fc1.outer == 16 and fc1.period == 7
    assert _paths(conv2) == {"conv2/kernel", "conv2/bias", "fc1/kernel"}
    assert _paths(_by_producer(found, "conv1/kernel"), "param") == {
        "conv1/bias", "bn1/scale", "bn1/bias", "bn1/mean", "bn1/var"}
    found.channel_groups(params_key=None)  # expressible as ChannelGroups


def test_mobilenet_v2_depthwise_and_inverted_residual():
    apply_fn, variables, x = OUTSIDE["mobilenet_v2_block"]()
    found = discover.discover_groups(apply_fn, variables, x)
    expand = _by_producer(found, "params/Conv_1/kernel")
    # the depthwise conv couples its input and output: its kernel is a per-channel member
    assert "params/depthwise/kernel" in _paths(expand, "param")
    assert _paths(expand, "consumer") == {"params/project/kernel"}
    stream = _by_producer(found, "params/Conv_0/kernel")
    assert "params/project/kernel" in _paths(stream, "producer")  # coupled by the residual add
    assert {g.name for g in found.groups} == {expand.name, stream.name}


def test_densenet_concatenation_offsets():
    apply_fn, variables, x = OUTSIDE["densenet_block"]()
    found = discover.discover_groups(apply_fn, variables, x)
    stem = _by_producer(found, "params/stem/kernel")
    layer0 = _by_producer(found, "params/layer0/kernel")
    layer1 = _by_producer(found, "params/layer1/kernel")
    offsets = lambda g, path: {(m.offset, m.period, m.outer) for m in g.members  # noqa: E731
                               if "/".join(m.path) == path}
    # the final BN sees [stem 4 | layer0 3 | layer1 3]; the head reads a 2x2 flatten of it
    assert offsets(stem, "params/bn_final/scale") == {(0, 10, 1)}
    assert offsets(layer0, "params/bn_final/scale") == {(4, 10, 1)}
    assert offsets(layer1, "params/head/kernel") == {(7, 10, 4)}
    assert offsets(layer0, "params/layer1/kernel") == {(4, 7, 1)}
    with pytest.raises(ValueError, match="not expressible"):
        found.channel_groups()


def test_dict_mlp_groups():
    apply_fn, params, x = OUTSIDE["dict_mlp"]()
    found = discover.discover_groups(apply_fn, params, x)
    groups = found.channel_groups(params_key=None, stats_key=None)
    assert {_key(g) for g in groups} == {
        (8, frozenset({("w0",), ("b0",)}), frozenset({(("w1",), 1)}), frozenset()),
        (6, frozenset({("w1",), ("b1",)}), frozenset({(("w2",), 1)}), frozenset())}
    assert found.unprunable == {"w2": "feeds a model output (the logits)"}


@pytest.mark.parametrize("name", sorted(OUTSIDE))
def test_outside_models_compact_equals_masked(name):
    apply_fn, variables, x = OUTSIDE[name]()
    found = discover.discover_groups(apply_fn, variables, x)
    assert found.groups
    keep = _random_keep(found.groups, seed=1)
    masked_fn = discover.mask_activations(apply_fn)
    masked = masked_fn(variables, x, _as_masks(keep))
    np.testing.assert_allclose(masked_fn(variables, x, {}), apply_fn(variables, x), atol=1e-5)
    full = apply_fn(variables, x)
    assert np.abs(full).max() > 1e-3
    assert not np.allclose(masked, full, atol=1e-3 * np.abs(full).max())  # masks do something
    small_fn, small = surgery.compact(apply_fn, variables, found, keep)
    np.testing.assert_allclose(jax.jit(small_fn)(small, x), masked, atol=1e-5)
    x2 = jnp.concatenate([x, x, x])  # another batch size re-traces
    np.testing.assert_allclose(small_fn(small, x2)[: len(x)], masked, atol=1e-5)
    # every member leaf shrank by exactly the dropped channels
    leaves = dict(masks.leaves_with_paths(small)[0])
    for g in found.groups:
        for m in g.members:
            if m.role == "producer":
                assert leaves[m.path].shape[m.axis] == keep[g.name].sum()
    assert masks.leaves_with_paths(small)[0]  # non-empty


def test_save_and_load_compact_model(tmp_path):
    apply_fn, variables, x = OUTSIDE["densenet_block"]()
    found = discover.discover_groups(apply_fn, variables, x)
    keep = _random_keep(found.groups, seed=2)
    small_fn, small = surgery.compact(apply_fn, variables, found, keep)
    modelio.save_compact(str(tmp_path), small_fn, small, x)
    loaded_fn, loaded = modelio.load_compact(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, loaded, small)
    x3 = jnp.concatenate([x, x[:1]])  # the exported batch size is symbolic
    np.testing.assert_allclose(loaded_fn(loaded, x3), small_fn(small, x3), atol=1e-6)


# --------------------------------------------------------------------------------------------
# What discovery refuses, and why.


def _conv_model(middle):
    """conv(3->4) -> middle(y) -> conv(->5) -> mean -> dense(->2), as a plain-dict model."""
    rng = np.random.default_rng(0)
    params = {"c1": jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32),
              "c2": jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32),
              "c2g": jnp.asarray(rng.normal(size=(3, 3, 2, 6)), jnp.float32),
              "d": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)}

    def conv(x, k, groups=1):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", feature_group_count=groups,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def apply_fn(p, x):
        y = middle(conv(x, p["c1"]), p, conv)
        return jnp.mean(y, axis=(1, 2)) @ p["d"]

    return apply_fn, params, jnp.ones((2, 6, 6, 3))


@pytest.mark.parametrize("middle, reason", [
    (lambda y, p, conv: conv(jax.nn.softmax(y, axis=-1), p["c2"]), "reduces over the channel"),
    (lambda y, p, conv: conv(jnp.concatenate([y[..., :3], y[..., 3:]], -1), p["c2"]),
     "acts on the channel axis"),  # (equal parts are followed: discover_attention_test)
    (lambda y, p, conv: conv(jnp.take(y, jnp.array([0, 2, 1, 3]), axis=-1), p["c2"]),
     "which discovery does not follow"),  # a gather (grouped convs: discover_conv_test)
    (lambda y, p, conv: conv(y + jnp.arange(4.0)[None, None, None], p["c2"]), "constant that varies"),
])
def test_unfollowed_ops_make_groups_unprunable(middle, reason):
    apply_fn, params, x = _conv_model(middle)
    found = discover.discover_groups(apply_fn, params, x)
    assert reason in found.unprunable["c1"]
    with pytest.raises(ValueError, match="cannot be pruned"):
        surgery.compact(apply_fn, params, found, {"c1": np.array([1, 0, 1, 1], bool)})
