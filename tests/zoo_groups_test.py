"""The zoo's published channel-group layouts are the oracle of discovery.

The zoo models hold no pruning code: their groups come from `discover.discover_groups`, named
after the width argument that sizes them (`models.discovery`). The layouts written here by hand
(LeNet-5 and the MLP: one group per layer; VGG-16: each conv with its BatchNorm; CIFAR ResNets:
one group per residual stream and one per block's inner conv) must be what discovery finds,
group for group, in the order of the width arguments.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import models, structure
from jaxprune.structure import ChannelGroup


def _layer(name, size, consumer, spatial=1):
    """A conv / dense layer with a bias and no BatchNorm."""
    return ChannelGroup(name, size, producers=((name, "kernel"), (name, "bias")),
                        consumers=(((consumer, "kernel"), spatial),))


def lenet5_layout(w, spatial):
    return (_layer("conv1", w["conv1"], "conv2"), _layer("conv2", w["conv2"], "fc1", spatial),
            _layer("fc1", w["fc1"], "fc2"), _layer("fc2", w["fc2"], "classifier"))


def mlp_layout(w):
    return (_layer("fc1", w["fc1"], "fc2"), _layer("fc2", w["fc2"], "classifier"))


def vgg16_layout(w, spatial):
    groups = []
    for i in range(1, 14):
        consumer = (("classifier", "kernel"), spatial) if i == 13 else ((f"conv{i + 1}", "kernel"), 1)
        groups.append(ChannelGroup(
            f"conv{i}", w[f"conv{i}"],
            producers=((f"conv{i}", "kernel"), (f"bn{i}", "scale"), (f"bn{i}", "bias")),
            consumers=(consumer,), stats=((f"bn{i}", "mean"), (f"bn{i}", "var"))))
    return tuple(groups)


def _bn(prefix, bn):
    return [prefix + (bn, "scale"), prefix + (bn, "bias")], [prefix + (bn, "mean"),
                                                             prefix + (bn, "var")]


def resnet_layout(w, blocks):
    """Stage s's stream: the stem (s = 1) or block0's 1x1 projection, and every block's conv2
    produce it; its blocks' conv1 (but a later stage's block0, which reads the previous
    stream) and the next projection (or the classifier) consume it.
    Block b's inner conv1 is its own group, consumed by the block's conv2."""
    groups = []
    for s, n in enumerate(blocks, start=1):
        stream = f"stage{s}"
        if s == 1:
            bn_p, bn_s = _bn((), "bn1")
            producers, stats = [("conv1", "kernel"), *bn_p], [*bn_s]
        else:
            bn_p, bn_s = _bn((stream, "block0"), "shortcut_bn")
            producers, stats = [(stream, "block0", "shortcut_conv", "kernel"), *bn_p], [*bn_s]
        consumers, inner = [], []
        for b in range(n):
            block = (stream, f"block{b}")
            bn_p, bn_s = _bn(block, "bn2")
            producers += [block + ("conv2", "kernel"), *bn_p]
            stats += bn_s
            if b > 0 or s == 1:  # block0 of a later stage reads the previous stream
                consumers.append((block + ("conv1", "kernel"), 1))
            bn_p, bn_s = _bn(block, "bn1")
            inner.append(ChannelGroup(f"{stream}.block{b}.conv1", w[f"{stream}.block{b}.conv1"],
                                      producers=(block + ("conv1", "kernel"), *bn_p),
                                      consumers=((block + ("conv2", "kernel"), 1),),
                                      stats=tuple(bn_s)))
        if s < len(blocks):
            nxt = (f"stage{s + 1}", "block0")
            consumers += [(nxt + ("conv1", "kernel"), 1), (nxt + ("shortcut_conv", "kernel"), 1)]
        else:
            consumers.append((("classifier", "kernel"), 1))
        groups += [ChannelGroup(stream, w[stream], producers=tuple(producers),
                                consumers=tuple(consumers), stats=tuple(stats)), *inner]
    return tuple(groups)


def _distinct_widths(name):
    """Small widths, different for every argument (sizes cannot hide a wrong coupling)."""
    return {g: 3 + i for i, g in enumerate(models.MODELS[name].default_widths(None))}


def _abstract(name, input_shape, widths):
    """The zoo model with `jax.ShapeDtypeStruct` variables (nothing is initialised)."""
    built = {}

    def build():
        built["model"] = models.get_model(name, num_classes=5, input_shape=input_shape,
                                          key=jax.random.key(0), widths=widths)
        return built["model"].params, built["model"].batch_stats

    params, batch_stats = jax.eval_shape(build)
    return built["model"]._replace(params=params, batch_stats=batch_stats)


# (name, input shape, the flattened map's positions feeding the first dense layer)
CASES = [("lenet5", (8, 8, 1), 4), ("lenet5", (32, 32, 3), 25), ("mlp", (8, 8, 1), None),
         ("vgg16", (8, 8, 3), 1), ("vgg16", (32, 32, 3), 1), ("resnet20", (8, 8, 3), None),
         ("resnet56", (8, 8, 3), None), ("resnet18", (8, 8, 3), None)]


def _layout(name, w, spatial):
    if name == "lenet5":
        return lenet5_layout(w, spatial)
    if name == "mlp":
        return mlp_layout(w)
    if name == "vgg16":
        return vgg16_layout(w, spatial)
    return resnet_layout(w, models.MODELS[name].BLOCKS)


def _canonical(g):
    return (g.name, g.size, frozenset(g.producers), frozenset(g.consumers), frozenset(g.stats))


@pytest.mark.parametrize("name, input_shape, spatial", CASES)
def test_discovered_groups_are_the_published_layout(name, input_shape, spatial):
    widths = _distinct_widths(name)
    model = _abstract(name, input_shape, widths)
    want = _layout(name, widths, spatial)
    got = models.channel_groups(model)
    assert [_canonical(g) for g in got] == [_canonical(g) for g in want]
    assert [g.name for g in got] == list(models.MODELS[name].default_widths(input_shape))
    structure.validate_groups(got, model.params, model.batch_stats)
    # The classifier's outputs are the logits: the one group discovery leaves unpruned.
    assert models.discovery(model).unprunable == {
        "params/classifier": "feeds a model output (the logits)"}


def test_with_widths_rebuilds_the_narrower_module():
    model = _abstract("lenet5", (8, 8, 1), None)
    small = _abstract("lenet5", (8, 8, 1), {"conv2": 5, "fc1": 7})
    params = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), small.params)
    narrow = models.with_widths(model, {"conv2": 5, "fc1": 7}, params, {})
    assert dict(narrow.spec.widths) == {"conv1": 6, "conv2": 5, "fc1": 7, "fc2": 84}
    logits, _ = narrow.apply(narrow.params, {}, jnp.ones((2, 8, 8, 1)), train=False)
    assert logits.shape == (2, 5) and np.all(np.isfinite(logits))
    with pytest.raises(ValueError, match="do not match"):
        models.with_widths(model, {"conv2": 4}, params, {})
    with pytest.raises(ValueError, match="bogus"):
        models.with_widths(model, {"bogus": 4}, params, {})


CAMPAIGN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "2026-12-03_resnet20_cpu", "workdir", "checkpoints",
                        "dense")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(CAMPAIGN), reason="no committed campaign snapshot")
def test_the_campaign_checkpoint_restores_into_the_hook_free_resnet20():
    """The ResNet-20 campaign's dense checkpoint (made at 9723022, when the zoo still had
    declared groups and hooks) restores into the plain module: same param paths and shapes."""
    from jaxprune import checkpoint, masks, pipeline, train
    cfg = pipeline.load_config("cifar10", "resnet20_cpu")
    model = models.get_model("resnet20", num_classes=10, input_shape=(32, 32, 3),
                             key=jax.random.key(0))
    state = train.create_state(model.params, model.batch_stats, masks.ones_like(model.params),
                               train.make_optimizer(train.Settings.from_config(cfg)))
    restored, _ = checkpoint.Checkpointer(CAMPAIGN, max_to_keep=None, fingerprint=None,
                                          fallback=True).restore(like=state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert int(restored.step) > 0
    logits, _ = model.apply(restored.params, restored.batch_stats, jnp.zeros((2, 32, 32, 3)),
                            train=False)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
