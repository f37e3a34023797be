"""Grouped convolutions (ResNeXt / RegNet) and squeeze-excitation gates, found, masked and cut
out by discovery, in NNX and Linen. Tiny models; each test runs in seconds."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import discover
from compact_check import assert_compact_equals_masked  # tests/ is on sys.path under pytest

C, GROUPS = 8, 2


class NNXBlock(nnx.Module):
    """conv -> BN -> grouped conv -> BN -> squeeze-excitation -> 1x1 conv, plus a residual."""

    def __init__(self, rngs):
        self.c1, self.b1 = nnx.Conv(3, C, (3, 3), rngs=rngs), nnx.BatchNorm(C, rngs=rngs)
        self.g = nnx.Conv(C, C, (3, 3), feature_group_count=GROUPS, rngs=rngs)
        self.b2 = nnx.BatchNorm(C, rngs=rngs)
        self.se1, self.se2 = nnx.Linear(C, 4, rngs=rngs), nnx.Linear(4, C, rngs=rngs)
        self.c3 = nnx.Conv(C, C, (1, 1), rngs=rngs)
        self.fc = nnx.Linear(C, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.b1(self.c1(x)))
        y = nnx.relu(self.b2(self.g(x)))
        gate = nnx.sigmoid(self.se2(nnx.relu(self.se1(y.mean((1, 2))))))
        y = self.c3(y * gate[:, None, None, :])
        return self.fc(nnx.relu(x + y).mean((1, 2)))


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(C, (3, 3))(x)))
        y = nn.Conv(C, (3, 3), feature_group_count=GROUPS)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=True)(y))
        gate = nn.Dense(4)(jnp.mean(y, axis=(1, 2), keepdims=True))
        y = y * nn.sigmoid(nn.Dense(C)(nn.relu(gate)))
        y = nn.Conv(C, (1, 1))(y)
        return nn.Dense(3)(nn.relu(x + y).mean((1, 2)))


def model(style):
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    if style == "nnx":
        module = NNXBlock(nnx.Rngs(0))
        module.eval()
        graph, state = nnx.split(module)
        # random BatchNorm statistics, so that masking is not trivially exact
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        state = jax.tree.unflatten(treedef, [
            leaf + 0.1 * jnp.abs(jax.random.normal(k, leaf.shape)) for k, leaf in zip(keys, leaves)])
        return lambda s, x: nnx.merge(graph, s)(x), state, x
    module = LinenBlock()
    variables = module.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda v: v + 0.1, variables)
    return module.apply, variables, x


def groups_by_producer(found):
    return {m.path[:-2] if m.path[-1] == "value" else m.path[:-1]: g
            for g in found.all_groups for m in g.producers if m.path[-1] in ("kernel", "value")
            and "kernel" in m.path}


@pytest.mark.parametrize("style", ["nnx", "linen"])
def test_grouped_conv_and_squeeze_excitation_are_prunable(style):
    apply_fn, variables, x = model(style)
    found = discover.discover_groups(apply_fn, variables, x)
    # residual stream (c1, c3, the output of the block) and the grouped conv's outputs (with the
    # SE gate's second Dense) are two groups of C / GROUPS channels: a grouped conv's kernel
    # input axis is shared by its groups, so a channel goes in every group at once.
    sizes = sorted(g.size for g in found.groups)
    assert sizes == [C // GROUPS, C // GROUPS, 4], [(g.name, g.size, g.reason)
                                                   for g in found.all_groups]
    assert list(found.unprunable.values()) == ["feeds a model output (the logits)"]
    grouped = [g for g in found.groups if g.size == C // GROUPS and any(
        m.role == "producer" and m.outer == GROUPS for m in g.members)
        and sum(m.role == "producer" and m.ndim == 2 for m in g.members) == 1]
    assert len(grouped) == 1  # the grouped conv's output, gated by the SE's second Dense


@pytest.mark.parametrize("style", ["nnx", "linen"])
def test_grouped_conv_and_se_compact_equals_masked(style):
    apply_fn, variables, x = model(style)
    found = discover.discover_groups(apply_fn, variables, x)
    keep = {g.name: np.arange(g.size) % 2 == 1 for g in found.groups}
    small_vars = assert_compact_equals_masked(apply_fn, variables, x, found, keep)
    shapes = sorted(tuple(a.shape) for a in jax.tree.leaves(small_vars) if a.ndim == 4)
    # c1 (3 -> 4), the grouped conv (2 of 4 inputs per group -> 4), the 1x1 conv (4 -> 4)
    assert shapes == sorted([(3, 3, 3, C // 2), (3, 3, C // 2 // GROUPS, C // 2), (1, 1, C // 2, C // 2)])


def test_grouped_conv_keeps_the_same_channels_in_every_group():
    """Oracle without discovery: masking channel j of the grouped conv's input group zeroes
    input channel j of every group (j and j + C / GROUPS)."""
    apply_fn, variables, x = model("linen")
    found = discover.discover_groups(apply_fn, variables, x)
    stream = next(g for g in found.groups if any("Conv_0" in m.path for m in g.producers))
    mask = np.ones(C // GROUPS, np.float32)
    mask[1] = 0.0
    masked = discover.mask_activations(apply_fn)(variables, x, {stream.name: mask})
    p = jax.tree.map(lambda v: v, variables)
    cut = np.array([1, 1 + C // GROUPS])  # zero the producers of those channels (conv, BN bias -> 0 out)
    p["params"]["Conv_0"]["kernel"] = p["params"]["Conv_0"]["kernel"].at[..., cut].set(0.0)
    p["params"]["Conv_0"]["bias"] = p["params"]["Conv_0"]["bias"].at[cut].set(0.0)
    p["params"]["BatchNorm_0"]["bias"] = p["params"]["BatchNorm_0"]["bias"].at[cut].set(0.0)
    p["params"]["BatchNorm_0"]["scale"] = p["params"]["BatchNorm_0"]["scale"].at[cut].set(0.0)
    p["params"]["Conv_2"]["bias"] = p["params"]["Conv_2"]["bias"].at[cut].set(0.0)
    p["params"]["Conv_2"]["kernel"] = p["params"]["Conv_2"]["kernel"].at[..., cut].set(0.0)
    np.testing.assert_allclose(masked, apply_fn(p, x), atol=2e-5)
